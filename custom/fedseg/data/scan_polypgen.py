"""PolypGen data scans: per-site histograms of the FedGS small-polyp inverse area (supplementary Fig. 1(a)).

Only masks are read (no image preprocessing, no cache). Each mask goes through exactly the reader's path
(:func:`fedseg.data.polypgen.read_polypgen_mask`: threshold and binary check) and
:func:`fedseg.difficulty.polypgen_difficulty` at native resolution, so the small flags equal the manifest's.

The histogram's x value is the quantity compared with ``tau``: ``H * W / area(smallest detected polyp)``
(:func:`fedseg.difficulty.smallest_lesion_area`), on a log axis with ``tau`` (150) marked; frames without
polyp are counted separately. The whole-mask inverse area (which sets delta) is summarised too.

Outputs of :func:`scan_polypgen` in ``out_dir``: ``inverse_area_<group>.png`` per group,
``inverse_area_all.png``, ``summary.json`` and ``summary.md``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedseg.difficulty import POLYPGEN_BASE, POLYPGEN_TAU

__all__ = ["PolypScanGroup", "scan_polypgen_group", "scan_polypgen", "format_polypgen_table"]


@dataclass
class PolypScanGroup:
    """The frames of one site's centre (or the test centre): one entry per frame."""

    label: str  # e.g. "site-1" or "test"
    centre: str
    root: str
    folds: list[int | None] = field(default_factory=list)  # fold of each frame (None: test)
    stems: list[str] = field(default_factory=list)
    lesion_pixels: list[int] = field(default_factory=list)
    inverse_area: list[float] = field(default_factory=list)  # whole mask (inf when empty)
    small_inverse_area: list[float] = field(default_factory=list)  # H*W / smallest polyp area (inf when none)
    small: list[bool] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        n = len(self.stems)
        s = np.asarray(self.small, dtype=bool)
        a = np.asarray(self.inverse_area, dtype=np.float64)
        sa = np.asarray(self.small_inverse_area, dtype=np.float64)
        fin, sfin = a[np.isfinite(a)], sa[np.isfinite(sa)]
        folds = [f for f in self.folds if f is not None]
        out: dict[str, Any] = {
            "group": self.label, "centre": self.centre, "root": self.root, "images": n,
            "empty": int(np.sum(~np.isfinite(a))), "small": int(s.sum()),
            "small_fraction": float(s.mean()) if n else None,
            "inverse_area": ({"min": float(fin.min()), "median": float(np.median(fin)), "max": float(fin.max())}
                             if fin.size else None),
            "small_inverse_area": ({"min": float(sfin.min()), "median": float(np.median(sfin)),
                                    "max": float(sfin.max())} if sfin.size else None),
            "folds": {},
        }
        for k in sorted(set(folds)):
            sel = np.asarray([f == k for f in self.folds])
            out["folds"][str(k)] = {"images": int(sel.sum()), "small": int(s[sel].sum())}
        return out


def scan_polypgen_group(label: str, root: Path, centre: str, pairs: Iterable[tuple[Path, Path]],
                        fold_of: dict[str, int], mask_threshold: int = 127, base: float = POLYPGEN_BASE,
                        tau: float = POLYPGEN_TAU) -> PolypScanGroup:
    """Read the masks of ``pairs`` and collect their difficulty (``fold_of``: stem -> fold, absent for test)."""
    from fedseg import difficulty as dif
    from fedseg.data.polypgen import read_polypgen_mask

    smallest = getattr(dif, "smallest_lesion_area", None)
    group = PolypScanGroup(label=label, centre=centre, root=str(root))
    for img_path, mask_path in pairs:
        mask = read_polypgen_mask(mask_path, mask_threshold)
        d = dif.polypgen_difficulty(mask, base=base, tau=tau)
        area = smallest(mask) if (smallest is not None and d.lesion_pixels > 0) else None
        group.stems.append(img_path.stem)
        group.folds.append(fold_of.get(img_path.stem))
        group.lesion_pixels.append(int(d.lesion_pixels))
        group.inverse_area.append(float(d.inverse_area))
        if area:
            group.small_inverse_area.append(float(d.height * d.width / area))
        else:  # no estimator exposed (or empty mask): the whole-mask value
            group.small_inverse_area.append(float(d.inverse_area))
        group.small.append(bool(d.small))
    return group


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def _fmt(x: Any, spec: str = ".3f") -> str:
    if x is None:
        return "-"
    return format(x, spec) if isinstance(x, float) else str(x)


def _fold_sizes(s: dict[str, Any]) -> str:
    return "/".join(str(v["images"]) for _, v in sorted(s["folds"].items(), key=lambda kv: int(kv[0]))) or "-"


def format_polypgen_table(summaries: list[dict[str, Any]]) -> str:
    """Plain-text table: group, centre, images, fold sizes, empty, small count and fraction, medians."""
    header = ("group", "centre", "images", "folds", "empty", "small", "small frac", "median a_inv",
              "median small-a_inv")
    rows = [(s["group"], s["centre"], str(s["images"]), _fold_sizes(s), str(s["empty"]), str(s["small"]),
             _fmt(s["small_fraction"]),
             _fmt(s["inverse_area"]["median"], ".1f") if s["inverse_area"] else "-",
             _fmt(s["small_inverse_area"]["median"], ".1f") if s["small_inverse_area"] else "-")
            for s in summaries]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: Iterable[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _markdown(summaries: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["# PolypGen inverse-area scan (FedGS small-polyp statistics)", "",
             f"- mask threshold: gray > {meta['mask_threshold']}",
             f"- base l: {meta['base']:g}, tau: {meta['tau']:g} (a frame is small when H*W / area of its smallest "
             f"detected polyp >= tau; delta uses the whole-mask inverse area)", "",
             "| group | centre | images | folds | empty | small | small fraction | median a_inv | median small-a_inv |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        cells = [s["group"], s["centre"], s["images"], _fold_sizes(s), s["empty"], s["small"],
                 _fmt(s["small_fraction"]), _fmt(s["inverse_area"]["median"], ".1f") if s["inverse_area"] else "-",
                 _fmt(s["small_inverse_area"]["median"], ".1f") if s["small_inverse_area"] else "-"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines.append("")
    for s in summaries:
        lines.append(f"![{s['group']}](inverse_area_{_safe(s['group'])}.png)")
    return "\n".join(lines) + "\n"


def _bins(groups: list[PolypScanGroup], tau: float) -> np.ndarray:
    values = np.concatenate([np.asarray(g.small_inverse_area, dtype=np.float64) for g in groups] or [np.zeros(0)])
    values = values[np.isfinite(values)]
    lo = min(float(values.min()) if values.size else tau / 10, tau / 2)
    hi = max(float(values.max()) if values.size else tau * 10, tau * 2)
    return np.logspace(math.log10(lo) - 0.02, math.log10(hi) + 0.02, 41)


def _plot_group(ax: Any, group: PolypScanGroup, bins: np.ndarray, tau: float) -> None:
    a = np.asarray(group.small_inverse_area, dtype=np.float64)
    s = np.asarray(group.small, dtype=bool)
    fin = np.isfinite(a)
    if fin.any():
        ax.hist([a[fin & ~s], a[fin & s]], bins=bins, stacked=True, color=["#4C72B0", "#DD8452"],
                label=["not small", "small"])
    ax.axvline(tau, color="crimson", linestyle="--", linewidth=1.2, label=f"tau = {tau:g}")
    ax.set_xscale("log")
    ax.set_xlabel("H*W / area of the smallest polyp  (log scale)")
    ax.set_ylabel("frames")
    frac = f"{s.mean():.1%}" if s.size else "-"
    empty = int((~fin).sum())
    ax.set_title(f"{group.label} ({group.centre}): {s.size} frames, {frac} small"
                 + (f", {empty} without polyp" if empty else ""), fontsize=10)
    ax.legend(fontsize=8, loc="upper right")


def scan_polypgen(groups: list[PolypScanGroup], out_dir: Path, *, mask_threshold: int = 127,
                  base: float = POLYPGEN_BASE, tau: float = POLYPGEN_TAU) -> dict[str, Any]:
    """Write the histograms and summaries of ``groups`` into ``out_dir``; return the summary object."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bins = _bins(groups, tau)
    files = []
    for g in groups:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        _plot_group(ax, g, bins, tau)
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
            _plot_group(ax, g, bins, tau)
        for ax in axes.ravel()[len(groups):]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(out_dir / "inverse_area_all.png", dpi=100)
        plt.close(fig)
        files.append("inverse_area_all.png")
    summaries = [g.summary() for g in groups]
    meta = {"dataset": "polypgen", "mask_threshold": int(mask_threshold), "base": float(base), "tau": float(tau)}
    result = {**meta, "groups": summaries, "files": [*files, "summary.json", "summary.md"]}
    (out_dir / "summary.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (out_dir / "summary.md").write_text(_markdown(summaries, meta), encoding="utf-8")
    return result
