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

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedseg.data.scan import _fmt, _log_bins, _markdown_doc, _text_table, _write_scan
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


def _fold_sizes(s: dict[str, Any]) -> str:
    return "/".join(str(v["images"]) for _, v in sorted(s["folds"].items(), key=lambda kv: int(kv[0]))) or "-"


_COLUMNS = ("group", "centre", "images", "folds", "empty", "small", "small fraction", "median a_inv",
            "median small-a_inv")


def _cells(s: dict[str, Any]) -> list[str]:
    return [s["group"], s["centre"], str(s["images"]), _fold_sizes(s), str(s["empty"]), str(s["small"]),
            _fmt(s["small_fraction"]), _fmt(s["inverse_area"]["median"], ".1f") if s["inverse_area"] else "-",
            _fmt(s["small_inverse_area"]["median"], ".1f") if s["small_inverse_area"] else "-"]


def format_polypgen_table(summaries: list[dict[str, Any]]) -> str:
    """Plain-text table: group, centre, images, fold sizes, empty, small count and fraction, medians."""
    header = tuple("small frac" if c == "small fraction" else c for c in _COLUMNS)
    return _text_table(header, [_cells(s) for s in summaries])


def _markdown(summaries: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    preamble = ["# PolypGen inverse-area scan (FedGS small-polyp statistics)", "",
                f"- mask threshold: gray > {meta['mask_threshold']}",
                f"- base l: {meta['base']:g}, tau: {meta['tau']:g} (a frame is small when H*W / area of its smallest "
                f"detected polyp >= tau; delta uses the whole-mask inverse area)", ""]
    return _markdown_doc(preamble, _COLUMNS, [_cells(s) for s in summaries], summaries)


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
    meta = {"dataset": "polypgen", "mask_threshold": int(mask_threshold), "base": float(base), "tau": float(tau)}
    bins = _log_bins([g.small_inverse_area for g in groups], tau)
    return _write_scan(groups, out_dir, plot_group=_plot_group, bins=bins, tau=tau, meta=meta, markdown=_markdown)
