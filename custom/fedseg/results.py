"""One results folder per run: final metrics (JSON), a markdown table, training curves and Dice bars (PNG).

Pure code (numpy + matplotlib Agg), no nvflare import; the FLARE controller and the CLI both call it.

Per-site final metrics are the site's summary of the final global model on its held-out part (``"part"``: ``"val"``
or ``"test"``; validation when absent). A site that ran the final local adaptation (Per-FedAvg, gamma steps) also
sends ``"personalized"``: the same metric keys for the adapted model on the same part. When any site sent them,
the table gains "Dice (personalized)" / "DiceS (personalized)" / "DiceL (personalized)" columns and a row with the
unweighted mean over sites, metrics.json gains ``site_means``, and ``personalized_bars.png`` (per site: global vs
personalized Dice) is written.

A run with differential privacy (``privacy``: :meth:`fedseg.flare.privacy_recorder.PrivacyRecorder.summary`) adds
``"privacy"`` to metrics.json, writes it to ``privacy.json``, adds a "Privacy" section to results.md (per site:
mechanism, clipping, rounds, epsilon per round and in total, delta, accountant, last threshold; then the guarantee in
words) and plots cumulative epsilon and the clipping threshold per site and round (``privacy.png``).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

METRICS = (("dice", "Dice"), ("dice_s", "DiceS"), ("dice_l", "DiceL"))
PERSONALIZED = "personalized"
PART_NAMES = {"val": "validation split", "test": "test part"}


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


def history_by_tag(history: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, list[tuple]]]:
    """[{site, tag, step, value}] -> {tag: {site: [(step, value), ...] sorted by step}}."""
    out: dict[str, dict[str, list[tuple]]] = defaultdict(lambda: defaultdict(list))
    for rec in history:
        out[rec["tag"]][rec["site"]].append((rec["step"], rec["value"]))
    return {t: {s: sorted(v) for s, v in sites.items()} for t, sites in out.items()}


def personalized_of(m: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """A site's personalized metrics (the dict under ``"personalized"``), or None when it sent none."""
    p = m.get(PERSONALIZED) if isinstance(m, Mapping) else None
    return p if isinstance(p, Mapping) else None


def has_personalized(site_metrics: Mapping[str, Mapping[str, Any]]) -> bool:
    return any(personalized_of(m) is not None for m in site_metrics.values())


def site_parts(site_metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """site -> the held-out part its final metrics were computed on ("val" when the site did not say)."""
    return {s: str((m or {}).get("part") or "val") for s, m in site_metrics.items()}


def site_means(site_metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Unweighted means over sites of Dice / DiceS / DiceL, for the global model and (where sent) personalized.

    A site whose value is None (an empty group) does not count for that metric; None when no site has a value.
    ``n_sites`` counts the sites that sent the group at all.
    """
    def mean(rows):
        out: dict[str, Any] = {"n_sites": len(rows)}
        for key, _ in METRICS:
            vals = [float(r[key]) for r in rows if r.get(key) is not None and not
                    (isinstance(r.get(key), float) and math.isnan(r[key]))]
            out[key] = float(np.mean(vals)) if vals else None
        return out

    rows = [m for m in site_metrics.values() if m]
    return {"global": mean(rows), PERSONALIZED: mean([p for p in map(personalized_of, rows) if p is not None])}


def markdown_table(site_metrics: Mapping[str, Mapping[str, Any]], test_metrics: Mapping[str, Any] | None,
                   test_label: str = "test centre") -> str:
    """Per-site rows (then the test centre); personalized columns and a mean-over-sites row when any site sent
    personalized metrics. Rows are suffixed with their part when the sites' held-out parts differ."""
    pers = has_personalized(site_metrics)
    parts = site_parts(site_metrics)
    mixed = len(set(parts.values())) > 1
    head = "| data | Dice | DiceS | DiceL | "
    if pers:
        head += " | ".join(f"{label} (personalized)" for _, label in METRICS) + " | "
    lines = [head + "images (small / large) |", "|---" * (5 + 3 * pers) + "|"]
    def counts(m):
        return f"{m.get('n', '?')} ({m.get('n_small', '?')} / {m.get('n_large', '?')})"

    rows = [(f"{name} ({parts[name]})" if mixed else name, m, personalized_of(m), counts(m))
            for name, m in sorted(site_metrics.items())]
    if pers:
        means = site_means(site_metrics)
        n_g, n_p = means["global"]["n_sites"], means[PERSONALIZED]["n_sites"]
        label = f"mean over {n_g} sites" if n_g == n_p else f"mean over sites ({n_g} global, {n_p} personalized)"
        rows.append((label, means["global"], means[PERSONALIZED], "-"))
    if test_metrics:
        rows.append((test_label, test_metrics, None, counts(test_metrics)))
    for name, m, p, n_images in rows:
        cells = [_fmt(m.get(k)) for k, _ in METRICS]
        if pers:
            cells += [_fmt(p.get(k)) if p is not None else "-" for k, _ in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {n_images} |")
    return "\n".join(lines) + "\n"


def plot_training_curves(history, out_png: Path, test_curve: Mapping[Any, Mapping[str, Any]] | None = None) -> Path:
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


def plot_personalized_bars(site_metrics, out_png: Path, title: str = "") -> Path:
    """Per site (and the mean over sites): Dice of the global model next to the personalized model's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(site_metrics)
    glob = [site_metrics[n].get("dice") for n in names]
    pers = [(personalized_of(site_metrics[n]) or {}).get("dice") for n in names]
    means = site_means(site_metrics)
    n_g, n_p = means["global"]["n_sites"], means[PERSONALIZED]["n_sites"]
    names.append("mean" if n_g == n_p else f"mean\n({n_g} / {n_p} sites)")
    glob.append(means["global"]["dice"])
    pers.append(means[PERSONALIZED]["dice"])
    x = np.arange(len(names))
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names) + 2), 4))
    for offset, vals, label in ((-width / 2, glob, "global model"),
                                (width / 2, pers, "personalized (local adaptation)")):
        bars = ax.bar(x + offset, [v if v is not None else 0.0 for v in vals], width, label=label)
        for b, v in zip(bars, vals):
            if v is None:  # no value (the site sent none)
                ax.annotate("n/a", (b.get_x() + b.get_width() / 2, 0.0), ha="center", va="bottom", fontsize=7)
            else:
                ax.annotate(f"{v:.3f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("Dice")
    ax.set_title(title or "global vs personalized Dice per site")
    ax.legend(loc="upper left", ncol=2, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def combined_value(value: Any, mechanism: str | None) -> float | None:
    """A per-layer DP report value (dict tensor -> number) as one number: the L1 sum (laplace) or the L2 norm
    (gaussian) of the per-tensor values, i.e. the whole-update bound they add up to; a plain number unchanged."""
    if isinstance(value, Mapping):
        vals = [float(v) for v in value.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if not vals:
            return None
        return float(math.sqrt(sum(v * v for v in vals))) if mechanism == "gaussian" else float(sum(vals))
    if isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
        return float(value)
    return None


def privacy_series(privacy: Mapping[str, Any]) -> dict[str, dict[str, list[tuple]]]:
    """{"epsilon_total" | "clip": {site: [(round, value), ...]}} from the by-round records of a privacy summary
    (rounds without a DP report are skipped; per-layer thresholds combined with :func:`combined_value`)."""
    out: dict[str, dict[str, list[tuple]]] = {"epsilon_total": defaultdict(list), "clip": defaultdict(list)}
    for rec in privacy.get("by_round") or []:
        report = rec.get("dp")
        if not isinstance(report, Mapping) or rec.get("round") is None:
            continue
        eps = combined_value(report.get("epsilon_total"), report.get("mechanism"))
        clip = combined_value(report.get("clip"), report.get("mechanism"))
        if eps is not None:
            out["epsilon_total"][str(rec.get("site"))].append((int(rec["round"]), eps))
        if clip is not None:
            out["clip"][str(rec.get("site"))].append((int(rec["round"]), clip))
    return {k: {s: sorted(v) for s, v in sites.items()} for k, sites in out.items()}


def privacy_markdown(privacy: Mapping[str, Any]) -> str:
    """The "Privacy" section of results.md: one row per site, then the guarantee in plain language."""
    per_site = privacy.get("per_site") or {}
    lines = ["\n## Privacy\n\n",
             "| site | mechanism | clipping | rounds released | epsilon / round | epsilon total | delta total | "
             "accountant | last clip threshold | over budget |\n",
             "|---" * 10 + "|\n"]
    def g(v):
        return "n/a" if v is None else f"{float(v):.6g}"

    for site, r in sorted(per_site.items()):
        if not r.get("rounds"):
            lines.append(f"| {site} | none (no DP report) | - | 0 | - | - | - | - | - | - |\n")
            continue
        clipping = f"{r.get('clipping')}{' per-layer' if r.get('per_layer') else ''}"
        unprotected = f" (+{r['unprotected_rounds']} without DP)" if r.get("unprotected_rounds") else ""
        lines.append(
            f"| {site} | {r.get('mechanism')} | {clipping} | {r.get('rounds')}{unprotected} | "
            f"{g(r.get('epsilon_round'))} | {g(r.get('epsilon_total'))} | {g(r.get('delta_total'))} | "
            f"{r.get('accountant')} | {g(combined_value(r.get('clip'), r.get('mechanism')))} | "
            f"{'yes' if r.get('over_budget') else 'no'} |\n")
    if privacy.get("guarantee"):
        lines.append("\n" + str(privacy["guarantee"]).strip() + "\n")
    return "".join(lines)


def plot_privacy(privacy: Mapping[str, Any], out_png: Path, title: str = "") -> Path:
    """Cumulative epsilon (left) and the clipping threshold used (right) per site and round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = privacy_series(privacy)
    panels = [("epsilon_total", "cumulative epsilon per site"), ("clip", "clipping threshold used (L1 / L2 norm)")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for site, points in sorted(series[key].items()):
            ax.plot(*zip(*points), marker="o", ms=3, label=site)
        ax.set_title(label)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _parts_note(site_metrics) -> str:
    parts = set(site_parts(site_metrics).values())
    if len(parts) == 1:
        part = parts.pop()
        where = "each site's validation split" if part == "val" else f"each site's own {PART_NAMES.get(part, part)}"
    else:
        where = "each site's held-out part (named in the row: val = validation split, test = the site's test part)"
    return f"\nPer-site rows: {where}. "


def write_results(
    out_dir: Path,
    *,
    job_name: str,
    site_metrics: Mapping[str, Mapping[str, Any]],
    test_metrics: Mapping[str, Any] | None = None,
    initial_test_metrics: Mapping[str, Any] | None = None,
    test_curve: Mapping[Any, Mapping[str, Any]] | None = None,
    history: Iterable[Mapping[str, Any]] = (),
    config: Mapping[str, Any] | None = None,
    notes: Iterable[str] = (),
    best: Mapping[str, Any] | None = None,
    privacy: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write metrics.json, results.md, training_curves.png and dice_bars.png into ``out_dir`` (and
    personalized_bars.png when any site sent personalized metrics; privacy.json, a "Privacy" section and
    privacy.png when ``privacy`` is given)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    history = list(history)
    pers = has_personalized(site_metrics)
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
    if pers:
        payload["site_means"] = site_means(site_metrics)
    if privacy is not None:
        payload["privacy"] = privacy
    paths = {"metrics": out_dir / "metrics.json", "table": out_dir / "results.md",
             "curves": out_dir / "training_curves.png", "bars": out_dir / "dice_bars.png"}
    if pers:
        paths["personalized_bars"] = out_dir / "personalized_bars.png"
    if privacy is not None:
        paths["privacy"] = out_dir / "privacy.json"
        paths["privacy_plot"] = out_dir / "privacy.png"
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
    md.append(_parts_note(site_metrics) + "DiceS: non-empty small-lesion images; "
              "DiceL: the other non-empty images (FedGS paper, section 3.4).\n")
    if pers:
        gamma = (config or {}).get("adaptation_steps")
        alpha = (config or {}).get("alpha")
        how = f"{gamma} plain SGD step(s)" if gamma is not None else "gamma plain SGD steps"
        how += f" of size alpha = {alpha}" if alpha is not None else " of size alpha"
        missing = sorted(s for s, m in site_metrics.items() if personalized_of(m) is None)
        md.append(f"\n(personalized): the final global model after the site's local adaptation ({how} on its own "
                  "training data, Per-FedAvg), evaluated on the same held-out part; the mean row is the unweighted "
                  "mean over sites (a site without a value for a metric does not count for it)."
                  + (f" Sites without personalized metrics: {missing}." if missing else "") + "\n")
    if privacy is not None:
        md.append(privacy_markdown(privacy))
        paths["privacy"].write_text(json.dumps(_jsonable(privacy), indent=2))
    paths["table"].write_text("".join(md))
    plot_training_curves(history, paths["curves"], test_curve)
    plot_dice_bars(site_metrics, test_metrics, paths["bars"], title=f"{job_name}: final global model")
    if pers:
        plot_personalized_bars(site_metrics, paths["personalized_bars"],
                               title=f"{job_name}: global vs personalized Dice per site")
    if privacy is not None:
        plot_privacy(privacy, paths["privacy_plot"], title=f"{job_name}: differential privacy per site")
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
    fig.legend(handles=[Patch(color=(0.1, 0.85, 0.1), label="true positive"),
                        Patch(color=(0.9, 0.1, 0.1), label="false positive"),
                        Patch(color=(0.15, 0.35, 1.0), label="false negative")], loc="lower center", ncol=3, fontsize=8)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.95, bottom=0.08, wspace=0.05, hspace=0.2)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
