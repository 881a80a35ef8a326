"""One results folder per run: final metrics (JSON), a markdown table, training curves and Dice bars (PNG).

Pure code (numpy + matplotlib Agg), no nvflare import; the FLARE controller and the CLI both call it.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional

import numpy as np

METRICS = (("dice", "Dice"), ("dice_s", "DiceS"), ("dice_l", "DiceL"))


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    return obj


def history_by_tag(history: Iterable[Mapping[str, Any]]) -> Dict[str, Dict[str, List[tuple]]]:
    """[{site, tag, step, value}] -> {tag: {site: [(step, value), ...] sorted by step}}."""
    out: Dict[str, Dict[str, List[tuple]]] = defaultdict(lambda: defaultdict(list))
    for rec in history:
        out[rec["tag"]][rec["site"]].append((rec["step"], rec["value"]))
    return {t: {s: sorted(v) for s, v in sites.items()} for t, sites in out.items()}


def markdown_table(site_metrics: Mapping[str, Mapping[str, Any]], test_metrics: Optional[Mapping[str, Any]],
                   test_label: str = "test centre") -> str:
    lines = ["| data | Dice | DiceS | DiceL | images (small / large) |", "|---|---|---|---|---|"]
    rows = list(sorted(site_metrics.items()))
    if test_metrics:
        rows.append((test_label, test_metrics))
    for name, m in rows:
        counts = f"{m.get('n', '?')} ({m.get('n_small', '?')} / {m.get('n_large', '?')})"
        lines.append(f"| {name} | " + " | ".join(_fmt(m.get(k)) for k, _ in METRICS) + f" | {counts} |")
    return "\n".join(lines) + "\n"


def plot_training_curves(history, out_png: Path, test_curve: Optional[Mapping[Any, Mapping[str, Any]]] = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_tag = history_by_tag(history)
    panels = [("val_dice", "validation Dice of the global model"), ("train_loss", "local training loss (Dice loss)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (tag, title) in zip(axes[0], panels):
        for site, points in sorted(by_tag.get(tag, {}).items()):
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o", ms=3, label=site)
        if tag == "val_dice" and test_curve:
            pts = sorted((int(r), m["dice"]) for r, m in test_curve.items() if m and m.get("dice") is not None)
            if pts:
                ax.plot(*zip(*pts), "k--", marker="s", ms=4, label="test centre")
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_dice_bars(site_metrics, test_metrics, out_png: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(site_metrics) + (["test centre"] if test_metrics else [])
    data = [site_metrics[n] for n in sorted(site_metrics)] + ([test_metrics] if test_metrics else [])
    x = np.arange(len(names))
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(names) + 2), 4))
    for i, (key, label) in enumerate(METRICS):
        vals = [m.get(key) if m.get(key) is not None else 0.0 for m in data]
        bars = ax.bar(x + (i - 1) * width, vals, width, label=label)
        for b, m in zip(bars, data):
            if m.get(key) is None:
                b.set_hatch("//")
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice")
    ax.set_title(title or "final global model")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def write_results(
    out_dir: Path,
    *,
    job_name: str,
    site_metrics: Mapping[str, Mapping[str, Any]],
    test_metrics: Optional[Mapping[str, Any]] = None,
    initial_test_metrics: Optional[Mapping[str, Any]] = None,
    test_curve: Optional[Mapping[Any, Mapping[str, Any]]] = None,
    history: Iterable[Mapping[str, Any]] = (),
    config: Optional[Mapping[str, Any]] = None,
    notes: Iterable[str] = (),
    best: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Path]:
    """Write metrics.json, results.md, training_curves.png and dice_bars.png into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    history = list(history)
    payload = {
        "job": job_name,
        "sites": site_metrics,
        "test_centre": test_metrics,
        "test_centre_untrained": initial_test_metrics,
        "test_centre_by_round": test_curve or {},
        "history": history,
        "best": best,
        "config": config or {},
        "notes": list(notes),
    }
    paths = {"metrics": out_dir / "metrics.json", "table": out_dir / "results.md",
             "curves": out_dir / "training_curves.png", "bars": out_dir / "dice_bars.png"}
    paths["metrics"].write_text(json.dumps(_jsonable(payload), indent=2))
    md = [f"# {job_name}: final global model\n", markdown_table(site_metrics, test_metrics)]
    if initial_test_metrics and test_metrics:
        md.append(
            f"\nTest centre Dice: untrained model {_fmt(initial_test_metrics.get('dice'))} -> "
            f"trained {_fmt(test_metrics.get('dice'))}.\n"
        )
    if best:
        line = (f"\nBest global model by validation Dice: round {best['round']} "
                f"(validation Dice {_fmt(best.get('val_dice'))}), saved as {best.get('file')}")
        if best.get("test_centre"):
            line += f"; on the test centre: Dice {_fmt(best['test_centre'].get('dice'))}, " \
                    f"DiceS {_fmt(best['test_centre'].get('dice_s'))}, DiceL {_fmt(best['test_centre'].get('dice_l'))}"
        md.append(line + ".\n")
    md.extend(f"\n{n}\n" for n in notes)
    md.append("\nPer-site rows: each site's validation split. DiceS: non-empty small-lesion images; "
              "DiceL: the other non-empty images (FedGS paper, section 3.4).\n")
    paths["table"].write_text("".join(md))
    plot_training_curves(history, paths["curves"], test_curve)
    plot_dice_bars(site_metrics, test_metrics, paths["bars"], title=f"{job_name}: final global model")
    return paths


def overlay_rgb(image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """The image (grey [H, W] or colour [3, H, W], contrast-stretched) with true positives green, false positives
    red and false negatives blue; values in [0, 1]."""
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3:  # channels first -> channels last
        img = np.moveaxis(img, 0, -1)
    lo, hi = float(img.min()), float(img.max())
    norm = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    rgb = (np.repeat(norm[..., None], 3, axis=-1) if norm.ndim == 2 else norm[..., :3]) * 0.8
    t, p = np.asarray(truth) > 0, np.asarray(pred) > 0
    rgb[t & p] = (0.1, 0.85, 0.1)
    rgb[~t & p] = (0.9, 0.1, 0.1)
    rgb[t & ~p] = (0.15, 0.35, 1.0)
    return rgb


def plot_overlays(images, truths, preds, out_png: Path, titles=None, columns: int = 4) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    n = len(images)
    rows = max(1, math.ceil(n / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.3 * rows + 0.5), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(overlay_rgb(images[i], truths[i], preds[i]))
            if titles:
                ax.set_title(titles[i], fontsize=8)
    fig.legend(handles=[Patch(color=(0.1, 0.85, 0.1), label="true positive"), Patch(color=(0.9, 0.1, 0.1), label="false positive"),
                        Patch(color=(0.15, 0.35, 1.0), label="false negative")], loc="lower center", ncol=3, fontsize=8)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.95, bottom=0.08, wspace=0.05, hspace=0.2)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
