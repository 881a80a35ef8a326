"""`fedseg report table1 RUN...`: the FedGS paper's Table 1 from finished runs.

A RUN is a `fedseg cv` workspace (``cv_summary.json``: mean +- std over folds), a simulator workspace, or a results
folder (``metrics.json``: one split). Rows: model x FL method; columns: Dice / DiceS / DiceL per dataset. Every cell
is the test centre scored by the best checkpoint by validation Dice (the final model where a run kept none).
Writes ``table1.md``, ``table1.csv``, ``table1_bars.png`` and ``table1_qualitative.png`` (the same test images
predicted by every run: true positives green, false positives red, false negatives blue).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from fedseg.errors import CommandError

METRICS = (("dice_s", "DiceS"), ("dice_l", "DiceL"), ("dice", "Dice"))  # the paper's column order
DATASET_NAMES = {"polypgen": "PolypGen", "lits": "LiTS"}
MODEL_NAMES = {"sd_utnet": "SD-UTNet", "utnet": "UTNet", "unet": "U-Net"}
METHOD_NAMES = {"fedavg": "FedAvg", "fedgs": "FedGS"}


@dataclass
class RunResult:
    path: Path
    dataset: str
    model: str
    aggregation: str
    values: Dict[str, Optional[float]]
    stds: Dict[str, Optional[float]] = field(default_factory=dict)
    n_folds: int = 1
    model_file: Optional[Path] = None
    config: dict = field(default_factory=dict)

    @property
    def key(self):
        return (self.dataset, self.model, self.aggregation)


def register(subparsers):
    p = subparsers.add_parser("report", help="reports over finished runs (the FedGS paper's Table 1)")
    sub = p.add_subparsers(dest="report_command", metavar="REPORT")
    sub.required = True
    t = sub.add_parser("table1", help="FedAvg vs FedGS x model: Dice / DiceS / DiceL per dataset")
    t.add_argument("runs", nargs="+", type=Path, help="cv workspaces, simulator workspaces or results folders")
    t.add_argument("--out", type=Path, default=Path("table1"), help="output folder (default ./table1)")
    t.add_argument("--images", type=int, default=4, help="test images per dataset in the qualitative figure")
    t.set_defaults(func=run_table1)


def _metrics_file(path: Path) -> Optional[Path]:
    for cand in (path / "metrics.json", path / "results" / "metrics.json",
                 path / "server" / "simulate_job" / "results" / "metrics.json"):
        if cand.is_file():
            return cand
    return None


def load_run(path: Path) -> RunResult:
    path = Path(path)
    cv = path / "cv_summary.json"
    if cv.is_file():
        d = json.loads(cv.read_text())
        s = d["summary"]
        first = d["runs"][str(d["folds"][0])] if str(d["folds"][0]) in d["runs"] else next(iter(d["runs"].values()))
        model_file = Path(first["results"]) / "best_global_model.pt"
        return RunResult(path, d["dataset"], d["model"], d["aggregation"],
                         {k: s[k]["mean"] for k, _ in METRICS}, {k: s[k]["std"] for k, _ in METRICS},
                         n_folds=len(d["folds"]), model_file=model_file if model_file.is_file() else None,
                         config=d.get("config", {}))
    mf = _metrics_file(path)
    if mf is None:
        raise CommandError(f"{path}: neither cv_summary.json nor a results metrics.json found; give a `fedseg cv` "
                           "workspace, a simulator workspace or a results folder")
    d = json.loads(mf.read_text())
    cfg = d.get("config", {})
    best = d.get("best") or {}
    chosen = best.get("test_centre") or d.get("test_centre")
    if not chosen:
        raise CommandError(f"{mf}: the run has no test-centre result")
    model_file = mf.parent / ("best_global_model.pt" if best.get("test_centre") else "global_model.pt")
    return RunResult(path, cfg.get("dataset", "?"), cfg.get("model", "?"), cfg.get("aggregation", "?"),
                     {k: chosen.get(k) for k, _ in METRICS}, model_file=model_file if model_file.is_file() else None,
                     config=cfg)


def _cell(run: Optional[RunResult], key: str, best: bool) -> str:
    if run is None or run.values.get(key) is None:
        return "-"
    txt = f"{run.values[key]:.4f}" if run.n_folds == 1 else f"{run.values[key]:.2f}±{run.stds[key]:.2f}"
    return f"**{txt}**" if best else txt


def build_table(runs: List[RunResult]):
    """Markdown lines and CSV rows; the best FL method per model, dataset and metric is bold."""
    by_key = {r.key: r for r in runs}
    datasets = [d for d in ("polypgen", "lits") if any(r.dataset == d for r in runs)] + \
        sorted({r.dataset for r in runs} - {"polypgen", "lits"})
    models = [m for m in ("sd_utnet", "utnet", "unet") if any(r.model == m for r in runs)] + \
        sorted({r.model for r in runs} - {"sd_utnet", "utnet", "unet"})
    methods = ["fedavg", "fedgs"]
    head = ["Model", "FL method"] + [f"{DATASET_NAMES.get(d, d)} {label}" for d in datasets for _, label in METRICS]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [["model", "method", "dataset", "metric", "mean", "std", "n_folds", "run"]]
    for model in models:
        for method in methods:
            cells = [MODEL_NAMES.get(model, model), METHOD_NAMES.get(method, method)]
            for d in datasets:
                for key, label in METRICS:
                    run = by_key.get((d, model, method))
                    others = [by_key.get((d, model, m)) for m in methods]
                    vals = [o.values.get(key) for o in others if o is not None and o.values.get(key) is not None]
                    best = run is not None and len(vals) > 1 and run.values.get(key) == max(vals)
                    cells.append(_cell(run, key, best))
                    if run is not None:
                        rows.append([model, method, d, label, run.values.get(key), run.stds.get(key),
                                     run.n_folds, str(run.path)])
            md.append("| " + " | ".join(cells) + " |")
    return md, rows, datasets, models


def plot_bars(runs: List[RunResult], out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    datasets = sorted({r.dataset for r in runs}, key=lambda d: (d != "polypgen", d))
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        group = sorted((r for r in runs if r.dataset == d), key=lambda r: (r.model, r.aggregation))
        x = np.arange(len(METRICS))
        width = 0.8 / max(len(group), 1)
        for i, r in enumerate(group):
            vals = [r.values.get(k) or 0.0 for k, _ in METRICS]
            errs = [r.stds.get(k) or 0.0 for k, _ in METRICS] if r.n_folds > 1 else None
            ax.bar(x + (i - (len(group) - 1) / 2) * width, vals, width, yerr=errs, capsize=3,
                   label=f"{MODEL_NAMES.get(r.model, r.model)} {METHOD_NAMES.get(r.aggregation, r.aggregation)}")
        ax.set_xticks(x, [label for _, label in METRICS])
        ax.set_ylim(0, 1)
        ax.set_title(DATASET_NAMES.get(d, d) + (" (mean ± std over folds)" if any(r.n_folds > 1 for r in group) else ""))
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def lesion_window(mask, min_size: int = 48, margin: float = 3.0):
    """Square crop around the lesion (``margin`` x its extent, at least ``min_size`` px) so small lesions are visible."""
    import numpy as np

    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return np.s_[:, :]
    size = int(min(max(h, w), max(min_size, margin * max(np.ptp(ys) + 1, np.ptp(xs) + 1))))
    cy, cx = int(ys.mean()), int(xs.mean())
    y0 = int(np.clip(cy - size // 2, 0, max(h - size, 0)))
    x0 = int(np.clip(cx - size // 2, 0, max(w - size, 0)))
    return np.s_[y0:y0 + size, x0:x0 + size]


def plot_qualitative(runs: List[RunResult], out_png: Path, n_images: int = 4) -> Optional[Path]:
    """Rows: test images (small lesions first), columns: runs; every run predicts the same images; each panel is
    cropped around the true lesion (see :func:`lesion_window`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from fedseg.evaluation import predict_masks
    from fedseg.models import get_model
    from fedseg.results import overlay_rgb
    from fedseg.sitedata import load_test_data
    from fedseg.training import load_state

    panels = []  # (dataset, image rows, [(label, preds)])
    for d in sorted({r.dataset for r in runs}, key=lambda d: (d != "polypgen", d)):
        group = [r for r in sorted(runs, key=lambda r: (r.model, r.aggregation)) if r.dataset == d and r.model_file]
        if not group:
            continue
        data, _ = load_test_data(d, group[0].config.get("data_args"))
        nonempty = np.flatnonzero(np.asarray(data.nonempty))
        small = nonempty[np.asarray(data.small, bool)[nonempty]]
        large = nonempty[~np.asarray(data.small, bool)[nonempty]]
        k_small = min(len(small), max(1, n_images // 2))
        idx = np.concatenate([small[:k_small], large[: n_images - k_small]]).astype(int)

        class _Rows:
            images, masks, delta = data.images[idx], data.masks[idx], np.asarray(data.delta)[idx]

        preds = []
        for r in group:
            cfg = r.config
            net = get_model(r.model, in_channels=cfg.get("in_channels", 1), num_classes=cfg.get("num_classes", 1),
                            **cfg.get("model_args", {}))
            load_state(net, torch.load(r.model_file, map_location="cpu", weights_only=True))
            label = f"{MODEL_NAMES.get(r.model, r.model)} {METHOD_NAMES.get(r.aggregation, r.aggregation)}"
            preds.append((label, predict_masks(net, _Rows, torch.device("cpu"))))
        panels.append((d, idx, data, preds))
    if not panels:
        return None
    n_rows = sum(len(p[1]) for p in panels)
    n_cols = max(len(p[3]) for p in panels)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.6 * n_cols, 2.6 * n_rows + 0.5), squeeze=False)
    row = 0
    for d, idx, data, preds in panels:
        for j, i in enumerate(idx):
            img = np.asarray(data.images[i], np.float32)
            win = lesion_window(np.asarray(data.masks[i]))
            for c in range(n_cols):
                ax = axes[row, c]
                ax.axis("off")
                if c < len(preds):
                    label, p = preds[c]
                    ax.imshow(overlay_rgb(img, data.masks[i], p[j])[win])
                    if row == 0 or j == 0:
                        ax.set_title(f"{DATASET_NAMES.get(d, d)}: {label}", fontsize=7)
            axes[row, 0].text(-0.05, 0.5, "small" if data.small[i] else "large", transform=axes[row, 0].transAxes,
                              rotation=90, va="center", ha="right", fontsize=7)
            row += 1
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color=(0.1, 0.85, 0.1), label="true positive"),
                        Patch(color=(0.9, 0.1, 0.1), label="false positive"),
                        Patch(color=(0.15, 0.35, 1.0), label="false negative")], loc="lower center", ncol=3, fontsize=8)
    fig.subplots_adjust(left=0.03, right=0.99, top=0.96, bottom=0.06, wspace=0.04, hspace=0.15)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def run_table1(args) -> int:
    runs = [load_run(p) for p in args.runs]
    dup = {}
    for r in runs:
        if r.key in dup:
            raise CommandError(f"{r.path} and {dup[r.key]} are both {r.key}; give one run per dataset/model/method")
        dup[r.key] = r.path
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    md, rows, _, _ = build_table(runs)
    notes = ["", "Test centre; each cell is the best checkpoint by validation Dice. Cross-validated runs: mean±std "
             "(sample std) over folds; single-split runs: one value. Bold: the better FL method for that model."]
    (out / "table1.md").write_text("\n".join(md + notes) + "\n")
    with open(out / "table1.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    plot_bars(runs, out / "table1_bars.png")
    qual = plot_qualitative(runs, out / "table1_qualitative.png", args.images) if args.images > 0 else None
    print("\n".join(md))
    print(f"wrote table1.md, table1.csv, table1_bars.png{', table1_qualitative.png' if qual else ''} to {out}")
    return 0
