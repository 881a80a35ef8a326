"""`fedseg report table1 RUN...` (the FedGS paper's Table 1) and `fedseg report sites --run LABEL=PATH ...` (the
PPPML-HMI per-site comparison: centralized / local / FedAvg / PPPML-HMI Dice per site, paper Fig. 3C).

table1:

A RUN is a `fedseg cv` workspace (``cv_summary.json``: mean +- std over folds), a simulator workspace, or a results
folder (``metrics.json``: one split). Rows: model x FL method; columns: Dice / DiceS / DiceL per dataset. Every cell
is the test centre scored by the best checkpoint by validation Dice (the final model where a run kept none).
Writes ``table1.md``, ``table1.csv``, ``table1_bars.png`` and ``table1_qualitative.png`` (the same test images
predicted by every run: true positives green, false positives red, false negatives blue).

sites:

``--run LABEL=PATH`` (repeatable; the order of the options is the order of the columns). PATH is a folder with
``metrics.json`` (an FL job's results folder, a ``fedseg baseline`` output folder), a simulator workspace (its
``server/simulate_job/results/metrics.json`` is used) or a ``metrics.json`` file. A run contributes one column of
``--metric`` (default Dice) per site from its per-site final metrics (``"sites"``), except an FL run whose sites sent
``"personalized"`` metrics (Per-FedAvg final adaptation), which contributes two: ``LABEL (global)`` (the final global
model) and ``LABEL (personalized)``. ``LABEL:personalized=PATH`` keeps only the personalized column (named
``LABEL``), ``LABEL:global=PATH`` only the global one. E.g. the paper's Fig. 3C::

    fedseg report sites --run Centralized=baseline_central_pppml_covid --run Local=baseline_local_pppml_covid \
        --run FedAvg=ws_fedavg --run PPPML-HMI:personalized=ws_pppml --out fig3c

Rows: the sites (all runs must cover the same sites, else an error that names the common sites and what each run
lacks; ``--common-sites`` compares on the common ones) and "mean over sites" (unweighted mean over the sites with a
value). Every run's per-site metrics must be on the same held-out part for a fair comparison: when the parts differ
(e.g. one run on "val", another on "test") the report says so. Writes ``sites.md``, ``sites.csv`` and
``sites_bars.png`` (grouped bars per site and for the mean).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from fedseg.errors import CommandError

METRICS = (("dice_s", "DiceS"), ("dice_l", "DiceL"), ("dice", "Dice"))  # the paper's column order
DATASET_NAMES = {"polypgen": "PolypGen", "lits": "LiTS"}
MODEL_NAMES = {"sd_utnet": "SD-UTNet", "utnet": "UTNet", "unet": "U-Net"}
METHOD_NAMES = {"fedavg": "FedAvg", "fedgs": "FedGS"}
SITE_METRICS = (("dice", "Dice"), ("dice_s", "DiceS"), ("dice_l", "DiceL"))
VIEWS = ("global", "personalized")


@dataclass
class RunResult:
    path: Path
    dataset: str
    model: str
    aggregation: str
    values: dict[str, float | None]
    stds: dict[str, float | None] = field(default_factory=dict)
    n_folds: int = 1
    model_file: Path | None = None
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
    st = sub.add_parser("sites", help="per-site Dice of several runs side by side (FL runs, personalized "
                        "models, fedseg baseline local/central): the PPPML-HMI comparison")
    st.add_argument("--run", action="append", required=True, metavar="LABEL=PATH", dest="runs",
                    help="a run: LABEL=PATH (an FL results folder, a simulator workspace or a fedseg baseline "
                    "folder); an FL run with personalized metrics gives two columns, 'LABEL (global)' and 'LABEL "
                    "(personalized)'; LABEL:personalized=PATH or LABEL:global=PATH keeps one (repeatable)")
    st.add_argument("--metric", choices=[k for k, _ in SITE_METRICS], default="dice",
                    help="the per-site metric (default dice)")
    st.add_argument("--common-sites", action="store_true",
                    help="when the runs cover different sites, compare on the sites common to all (else an error)")
    st.add_argument("--out", type=Path, default=Path("sites_report"), help="output folder (default ./sites_report)")
    st.set_defaults(func=run_sites)


def _metrics_file(path: Path) -> Path | None:
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


def _cell(run: RunResult | None, key: str, best: bool) -> str:
    if run is None or run.values.get(key) is None:
        return "-"
    txt = f"{run.values[key]:.4f}" if run.n_folds == 1 else f"{run.values[key]:.2f}±{run.stds[key]:.2f}"
    return f"**{txt}**" if best else txt


def build_table(runs: list[RunResult]):
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


def plot_bars(runs: list[RunResult], out_png: Path) -> Path:
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


def plot_qualitative(runs: list[RunResult], out_png: Path, n_images: int = 4) -> Path | None:
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
    notes = ["", ("Test centre; each cell is the best checkpoint by validation Dice. Cross-validated runs: mean±std "
                  "(sample std) over folds; single-split runs: one value. Bold: the better FL method for that model.")]
    (out / "table1.md").write_text("\n".join(md + notes) + "\n")
    with open(out / "table1.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    plot_bars(runs, out / "table1_bars.png")
    qual = plot_qualitative(runs, out / "table1_qualitative.png", args.images) if args.images > 0 else None
    print("\n".join(md))
    print(f"wrote table1.md, table1.csv, table1_bars.png{', table1_qualitative.png' if qual else ''} to {out}")
    return 0


# ---------------------------------------------------------------------------------------------- sites
@dataclass
class SiteColumn:
    label: str
    run: str  # the run's label
    view: str  # "global" or "personalized"
    metrics: dict[str, dict | None]  # site -> metrics (None: the run has the site but no value for this view)
    parts: dict[str, str]
    source: Path
    kind: str


def parse_run_spec(spec: str):
    """``LABEL=PATH`` / ``LABEL:personalized=PATH`` / ``LABEL:global=PATH`` -> (label, view or None, path)."""
    left, sep, path = spec.partition("=")
    if not sep or not left.strip() or not path.strip():
        raise CommandError(f"--run takes LABEL=PATH (or LABEL:personalized=PATH, LABEL:global=PATH), got {spec!r}")
    label, view = left.strip(), None
    head, colon, tail = label.rpartition(":")
    if colon and tail in VIEWS:
        label, view = head.strip(), tail
        if not label:
            raise CommandError(f"--run {spec!r}: the label before ':{tail}' is empty")
    return label, view, Path(path.strip())


def _site_key(site: str):
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", site)]


def load_site_columns(label: str, view: str | None, path: Path) -> list[SiteColumn]:
    """The columns one run contributes (see the module docstring)."""
    from fedseg.results import has_personalized, personalized_of

    path = Path(path)
    mf = path if path.is_file() else _metrics_file(path)
    if mf is None:
        raise CommandError(f"run {label!r}: no metrics.json in {path} (looked for {path / 'metrics.json'}, "
                           f"{path / 'results' / 'metrics.json'} and "
                           f"{path / 'server' / 'simulate_job' / 'results' / 'metrics.json'}); give an FL results "
                           "folder, a simulator workspace or a `fedseg baseline` output folder")
    try:
        d = json.loads(mf.read_text())
    except (OSError, ValueError) as e:
        raise CommandError(f"run {label!r}: cannot read {mf}: {e}") from e
    sites = d.get("sites") if isinstance(d, dict) else None
    if not isinstance(sites, dict) or not sites:
        raise CommandError(f"run {label!r}: {mf} has no per-site metrics (its \"sites\" entry is missing or empty); "
                           "per-site results come from an FL run's final evaluation at every site or from "
                           "`fedseg baseline`")
    sites = {str(k): (v if isinstance(v, dict) else None) for k, v in sites.items()}
    method = d.get("method")
    kind = f"baseline {method}" if method in ("local", "central") else "FL"
    parts = {s: str((m or {}).get("part") or "val") for s, m in sites.items()}
    pers = has_personalized({s: m for s, m in sites.items() if m})
    if view == "personalized" and not pers:
        raise CommandError(f"run {label!r}: {mf} has no personalized per-site metrics (the run did no final local "
                           "adaptation: adaptation_steps = 0, or it is a baseline); drop ':personalized'")
    views = [view] if view else (list(VIEWS) if pers else ["global"])
    cols = []
    for v in views:
        metrics = {s: (personalized_of(m) if v == "personalized" else m) if m else None for s, m in sites.items()}
        name = label if len(views) == 1 else f"{label} ({v})"
        cols.append(SiteColumn(name, label, v, metrics, parts, mf, kind))
    return cols


def _mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def sites_table(columns: list[SiteColumn], metric: str = "dice", common_sites: bool = False):
    """(sites, {column label: {site: value}}, {column label: mean}, notes). Raises CommandError when the runs
    cover different sites (unless ``common_sites``) or two columns share a label."""
    labels = [c.label for c in columns]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise CommandError(f"column labels used twice: {dup}; give every --run its own LABEL")
    site_sets = {c.run: set(c.metrics) for c in columns}
    common = set.intersection(*site_sets.values())
    union = set.union(*site_sets.values())
    notes = []
    if common != union:
        lacks = "; ".join(f"{run} lacks {sorted(union - s, key=_site_key)}" for run, s in site_sets.items()
                          if union - s)
        msg = f"the runs cover different sites: common to all: {sorted(common, key=_site_key)}; {lacks}"
        if not common_sites or not common:
            raise CommandError(msg + ("; pass --common-sites to compare on the common sites" if common else
                                      "; no site is common to all runs"))
        notes.append(msg + "; the table uses the common sites only (--common-sites).")
    sites = sorted(common, key=_site_key)
    values = {c.label: {s: (c.metrics[s] or {}).get(metric) if c.metrics.get(s) else None for s in sites}
              for c in columns}
    means = {label: _mean(v.values()) for label, v in values.items()}
    for c in columns:
        missing = [s for s in sites if values[c.label][s] is None]
        if missing:
            notes.append(f"{c.label}: no {metric} for {missing} (n/a; the mean is over the other sites).")
    parts = {}
    for c in columns:
        if c.run not in parts:
            parts[c.run] = sorted({c.parts[s] for s in sites})
    if len({tuple(p) for p in parts.values()}) > 1:
        notes.append("WARNING: the runs are evaluated on different held-out parts ("
                     + ", ".join(f"{run}: {'/'.join(p)}" for run, p in parts.items())
                     + "); the columns are not directly comparable.")
    return sites, values, means, notes


def plot_sites_bars(sites, values, means, out_png: Path, metric_label: str = "Dice") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = list(sites) + ["mean"]
    x = np.arange(len(groups))
    labels = list(values)
    width = 0.8 / max(len(labels), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(groups) * len(labels) + 2.5), 4.2))
    for i, label in enumerate(labels):
        vals = [values[label][s] for s in sites] + [means[label]]
        bars = ax.bar(x + (i - (len(labels) - 1) / 2) * width, [v if v is not None else 0.0 for v in vals], width,
                      label=label)
        for b, v in zip(bars, vals):
            ax.annotate("n/a" if v is None else f"{v:.2f}", (b.get_x() + b.get_width() / 2, v or 0.0),
                        ha="center", va="bottom", fontsize=6)
    ax.set_xticks(x, groups)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel(metric_label)
    ax.set_title(f"{metric_label} per site")
    ax.legend(fontsize=8, ncol=min(len(labels), 4), loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def run_sites(args) -> int:
    metric_label = dict(SITE_METRICS)[args.metric]
    columns = []
    for spec in args.runs:
        columns.extend(load_site_columns(*parse_run_spec(spec)))
    sites, values, means, notes = sites_table(columns, args.metric, args.common_sites)
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"
    labels = list(values)
    md = [f"# {metric_label} per site\n", "| site | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for s in sites:
        md.append(f"| {s} | " + " | ".join(fmt(values[c][s]) for c in labels) + " |")
    md.append("| mean over sites | " + " | ".join(fmt(means[c]) for c in labels) + " |")
    md += ["", "Runs:"]
    for c in columns:
        part = "/".join(sorted({c.parts[s] for s in sites}))
        what = {"baseline local": "one model per site, trained on the site's own data only",
                "baseline central": "one model trained on the pooled data of all sites"}.get(c.kind, (
                    "the final global model after each site's local adaptation (personalized)"
                    if c.view == "personalized" else "the final global model"))
        md.append(f"- {c.label}: {c.kind}, {what}; held-out part {part}; {c.source}")
    md += ["", "The mean row is the unweighted mean over sites (a site without a value does not count)."]
    md += [""] + notes if notes else []
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "sites.md").write_text("\n".join(md) + "\n")
    with open(out / "sites.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["site"] + labels)
        for s in sites:
            w.writerow([s] + ["" if values[c][s] is None else values[c][s] for c in labels])
        w.writerow(["mean over sites"] + ["" if means[c] is None else means[c] for c in labels])
    plot_sites_bars(sites, values, means, out / "sites_bars.png", metric_label)
    print("\n".join(md))
    print(f"wrote sites.md, sites.csv, sites_bars.png to {out}")
    return 0
