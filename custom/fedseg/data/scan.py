"""Data scans: per-site histograms of the FedGS inverse area (paper 000, supplementary Fig. 1) and summaries.

Only segmentations are read (no image preprocessing, no cache), so a scan is cheap even on real LiTS. The
slice selection and difficulty are exactly those of :mod:`fedseg.data.lits` (same ``min_tumour_pixels``,
native-resolution counts, :func:`fedseg.difficulty.lits_difficulty_from_counts`).

Outputs of :func:`scan_lits` in ``out_dir``: ``inverse_area_<group>.png`` per group (log x-axis, the
threshold tau marked), ``inverse_area_all.png`` (all groups side by side), ``summary.json`` and
``summary.md`` (slices, small fraction, inverse-area quantiles per group and split part).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from fedseg.data.splits import PARTS, Split
from fedseg.difficulty import LITS_BASE, LITS_TAU, lits_difficulty_from_counts

__all__ = ["ScanGroup", "scan_centre", "summarize_split", "scan_lits", "format_table", "recommended_min_pixels"]


@dataclass
class ScanGroup:
    """Tumour slices of one site (or the test centre): one entry per kept slice."""

    label: str  # e.g. "site-1" or "test"
    centre: str
    root: str
    volumes: int
    parts: list[str] = field(default_factory=list)  # split part of each slice
    case_ids: list[int] = field(default_factory=list)
    tumour_pixels: list[int] = field(default_factory=list)
    inverse_area: list[float] = field(default_factory=list)
    small: list[bool] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        a = np.asarray(self.inverse_area, dtype=np.float64)
        s = np.asarray(self.small, dtype=bool)
        n = int(a.size)
        out: dict[str, Any] = {
            "group": self.label, "centre": self.centre, "root": self.root, "volumes": self.volumes, "slices": n,
            "small": int(s.sum()), "small_fraction": float(s.mean()) if n else None,
            "mean_tumour_pixels": float(np.mean(self.tumour_pixels)) if n else None,
            "inverse_area": ({"min": float(a.min()), "median": float(np.median(a)), "max": float(a.max())}
                             if n else None),
            "parts": {},
        }
        parts = np.asarray(self.parts)
        for p in PARTS:
            sel = parts == p
            if sel.any():
                out["parts"][p] = {"slices": int(sel.sum()), "small": int(s[sel].sum()),
                                   "small_fraction": float(s[sel].mean())}
        return out


def recommended_min_pixels(root: Path) -> int | None:
    """``recommended_min_tumour_pixels`` of a synthetic data set (from its ``synthetic.json``), else None."""
    meta = Path(root) / "synthetic.json"
    if not meta.is_file():
        return None
    try:
        value = json.loads(meta.read_text(encoding="utf-8")).get("recommended_min_tumour_pixels")
    except (OSError, json.JSONDecodeError):
        return None
    return int(value) if isinstance(value, int) else None


def scan_centre(label: str, root: Path, cases: dict[int, tuple[Path, Path]], split: Split, centre: str,
                min_tumour_pixels: int, base: float = LITS_BASE, tau: float = LITS_TAU,
                parts: Iterable[str] = PARTS) -> ScanGroup:
    """Read the segmentations of ``centre`` (all given parts) and collect the kept slices' difficulty."""
    from fedseg.data.lits import tumour_slice_counts

    group = ScanGroup(label=label, centre=centre, root=str(root), volumes=0)
    for part in parts:
        for case_id in split.ids(centre, part):
            (h, w, _), counts = tumour_slice_counts(cases[case_id][1])
            group.volumes += 1
            kept = counts[counts >= min_tumour_pixels]
            if kept.size == 0:
                continue
            a_inv, small, _ = lits_difficulty_from_counts(kept, h, w, base=base, tau=tau)
            group.parts += [part] * int(kept.size)
            group.case_ids += [int(case_id)] * int(kept.size)
            group.tumour_pixels += kept.astype(int).tolist()
            group.inverse_area += a_inv.tolist()
            group.small += small.astype(bool).tolist()
    return group


def summarize_split(root: Path, cases: dict[int, tuple[Path, Path]], split: Split, min_tumour_pixels: int,
                    base: float = LITS_BASE, tau: float = LITS_TAU) -> list[ScanGroup]:
    """One group per centre of ``split`` (all parts), labelled by the centre name."""
    return [scan_centre(c, root, cases, split, c, min_tumour_pixels, base, tau) for c in split.centres]


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def _fmt(x: Any, spec: str = ".3f") -> str:
    if x is None:
        return "-"
    return format(x, spec) if isinstance(x, float) else str(x)


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned plain-text table: header, dashes, rows (columns as wide as their longest cell)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: Iterable[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _markdown_doc(preamble: list[str], header: Sequence[str], rows: Sequence[Sequence[Any]],
                  summaries: list[dict[str, Any]]) -> str:
    """``summary.md``: ``preamble`` lines, a Markdown table, then each group's histogram image."""
    lines = [*preamble, "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in cells) + " |" for cells in rows]
    lines.append("")
    for s in summaries:
        lines.append(f"![{s['group']}](inverse_area_{_safe(s['group'])}.png)")
    return "\n".join(lines) + "\n"


_COLUMNS = ("group", "centre", "volumes", "slices", *PARTS, "small", "small fraction", "median a_inv")


def _cells(s: dict[str, Any]) -> list[str]:
    parts = s["parts"]
    return [s["group"], s["centre"], str(s["volumes"]), str(s["slices"]),
            *(str(parts[p]["slices"]) if p in parts else "-" for p in PARTS), str(s["small"]),
            _fmt(s["small_fraction"]), _fmt(s["inverse_area"]["median"], ".0f") if s["inverse_area"] else "-"]


def format_table(summaries: list[dict[str, Any]]) -> str:
    """Plain-text table: group, centre, volumes, slices per part, small count and fraction."""
    header = tuple("small frac" if c == "small fraction" else c for c in _COLUMNS)
    return _text_table(header, [_cells(s) for s in summaries])


def _markdown(summaries: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    preamble = ["# Inverse-area scan (FedGS small-lesion statistics)", "",
                f"- min_tumour_pixels: {meta['min_tumour_pixels']}", f"- base l: {meta['base']:g}, tau: "
                f"{meta['tau']:g} (a slice is small when H*W / tumour_pixels >= tau)", ""]
    return _markdown_doc(preamble, _COLUMNS, [_cells(s) for s in summaries], summaries)


def _log_bins(arrays: Iterable[Iterable[float]], tau: float) -> np.ndarray:
    """41 log-spaced histogram edges over the finite values of ``arrays``, always spanning [tau/2, 2*tau]."""
    values = np.concatenate([np.asarray(a, dtype=np.float64) for a in arrays] or [np.zeros(0)])
    values = values[np.isfinite(values)]
    lo = min(float(values.min()) if values.size else tau / 10, tau / 2)
    hi = max(float(values.max()) if values.size else tau * 10, tau * 2)
    return np.logspace(math.log10(lo) - 0.02, math.log10(hi) + 0.02, 41)


def _plot_group(ax, group: ScanGroup, bins: np.ndarray, tau: float) -> None:
    a = np.asarray(group.inverse_area, dtype=np.float64)
    s = np.asarray(group.small, dtype=bool)
    if a.size:
        ax.hist([a[~s], a[s]], bins=bins, stacked=True, color=["#4C72B0", "#DD8452"], label=["not small", "small"])
    ax.axvline(tau, color="crimson", linestyle="--", linewidth=1.2, label=f"tau = {tau:g}")
    ax.set_xscale("log")
    ax.set_xlabel("inverse area  H*W / tumour pixels  (log scale)")
    ax.set_ylabel("slices")
    frac = f"{s.mean():.1%}" if a.size else "-"
    ax.set_title(f"{group.label} ({group.centre}): {a.size} slices, {frac} small", fontsize=10)
    ax.legend(fontsize=8)


def _write_scan(groups: Sequence[Any], out_dir: Path, *, plot_group: Callable[[Any, Any, np.ndarray, float], None],
                bins: np.ndarray, tau: float, meta: dict[str, Any],
                markdown: Callable[[list[dict[str, Any]], dict[str, Any]], str]) -> dict[str, Any]:
    """Plot each group (``plot_group``) and all side by side, write ``summary.json``/``.md``; return the summary.

    Shared by :func:`scan_lits` and :func:`fedseg.data.scan_polypgen.scan_polypgen`: ``groups`` have ``label``
    and ``summary()``; the result is ``meta`` plus ``groups`` (the summaries) and ``files`` (written names).
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for g in groups:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        plot_group(ax, g, bins, tau)
        fig.tight_layout()
        path = out_dir / f"inverse_area_{_safe(g.label)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path.name)
    if groups:
        cols = min(3, len(groups))
        rows = math.ceil(len(groups) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.4 * rows), squeeze=False)
        for ax, g in zip(axes.ravel(), groups):
            plot_group(ax, g, bins, tau)
        for ax in axes.ravel()[len(groups):]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(out_dir / "inverse_area_all.png", dpi=100)
        plt.close(fig)
        files.append("inverse_area_all.png")
    summaries = [g.summary() for g in groups]
    result = {**meta, "groups": summaries, "files": [*files, "summary.json", "summary.md"]}
    (out_dir / "summary.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (out_dir / "summary.md").write_text(markdown(summaries, meta), encoding="utf-8")
    return result


def scan_lits(groups: list[ScanGroup], out_dir: Path, *, min_tumour_pixels: int, base: float = LITS_BASE,
              tau: float = LITS_TAU) -> dict[str, Any]:
    """Write the histograms and summaries of ``groups`` into ``out_dir``; return the summary object."""
    meta = {"min_tumour_pixels": int(min_tumour_pixels), "base": float(base), "tau": float(tau)}
    bins = _log_bins([g.inverse_area for g in groups], tau)
    return _write_scan(groups, out_dir, plot_group=_plot_group, bins=bins, tau=tau, meta=meta, markdown=_markdown)
