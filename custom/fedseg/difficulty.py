"""FedGS segmentation difficulty of a binary lesion mask (paper 000, section 2.2, eq. 3-4).

For an image ``x`` with binary mask ``m`` of size ``H x W``::

    a_inv   = H * W / sum(m)                       # inverse relative lesion area
    delta_x = tanh( (log_l a_inv) ** 2 ) * s_x     # the square is on the logarithm
    eta_t   = 1 + (2 / N) * sum_i delta_i          # over the N images of a training batch

``(log_l a_inv) ** 2`` is ``(log(a_inv) / log(l)) ** 2``, *not* ``log_l(a_inv ** 2)``
(for ``a_inv = 1000, l = 1000`` the first is 1 and the second 2).

Small flag ``s_x``, by mode:

* ``"lits"`` (``l = 1000``, ``tau = 1000``): ``s = a_inv >= tau`` for the whole mask, using the mask's own
  ``H * W`` (the reference code hard-codes 512 * 512; we do not). Equality counts as small.
* ``"polypgen"`` (``l = 100``, ``tau = 150``): ``s = H * W / A_min >= tau`` where ``A_min`` is the estimated
  area of the smallest detected lesion (erosion to separate touching lesions, a scikit-image LoG blob detector,
  connected components / nearest-core partition for the area; see :func:`polypgen_difficulty`, whose docstring
  describes the estimator exactly). ``delta`` still uses the *whole-mask* ``a_inv``; ``s`` only decides whether
  ``delta`` counts.

An empty mask has ``a_inv = inf``, ``s = 0`` and ``delta = 0``: it never raises.

Difficulty is a property of the stored mask: compute it once per dataset (see
:func:`lits_difficulty_from_counts`, vectorised for the manifest builder) rather than per step on
augmented masks. Importing this module needs numpy only (Pillow / nibabel are imported by :func:`read_mask`,
scipy / scikit-image by the PolypGen mode).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np

from fedseg.errors import ConfigError, DataError

__all__ = [
    "LITS_BASE",
    "LITS_TAU",
    "POLYPGEN_BASE",
    "POLYPGEN_TAU",
    "DIFFICULTY_MODES",
    "MaskDifficulty",
    "inverse_area",
    "delta_from_inverse_area",
    "lits_difficulty",
    "lits_difficulty_from_counts",
    "polypgen_difficulty",
    "smallest_lesion_area",
    "polypgen_working_factor",
    "POLYPGEN_ESTIMATOR_VERSION",
    "DEFAULT_EROSION_RADIUS",
    "DEFAULT_MAX_WORKING_PIXELS",
    "DEFAULT_BLOB_THRESHOLD",
    "mask_difficulty",
    "mode_defaults",
    "batch_eta",
    "read_mask",
    "MASK_EXTENSIONS",
]

LITS_BASE: float = 1000.0
LITS_TAU: float = 1000.0
POLYPGEN_BASE: float = 100.0
POLYPGEN_TAU: float = 150.0

#: mode -> (default base l, default threshold tau)
_MODE_DEFAULTS: dict[str, tuple[float, float]] = {
    "lits": (LITS_BASE, LITS_TAU),
    "polypgen": (POLYPGEN_BASE, POLYPGEN_TAU),
}
#: every difficulty mode fedseg knows about (see :func:`mask_difficulty`)
DIFFICULTY_MODES: tuple[str, ...] = tuple(_MODE_DEFAULTS)

#: file name endings accepted by :func:`read_mask` (lower case)
MASK_EXTENSIONS: tuple[str, ...] = (".npy", ".png", ".jpg", ".jpeg", ".nii", ".nii.gz")

ArrayLike = Union[np.ndarray, Sequence[float], float, int]


# --------------------------------------------------------------------------------------------- formulas
def _check_base(base: float) -> float:
    base = float(base)
    if not math.isfinite(base) or base <= 0.0 or base == 1.0:
        raise ConfigError(f"difficulty base l must be a finite number > 0 and != 1 (got {base}); "
                          f"the paper uses l = {LITS_BASE:g} for LiTS and l = {POLYPGEN_BASE:g} for PolypGen")
    return base


def _check_tau(tau: float) -> float:
    tau = float(tau)
    if not math.isfinite(tau) or tau <= 0.0:
        raise ConfigError(f"small-lesion threshold tau must be a finite number > 0 (got {tau}); "
                          f"the paper uses tau = {LITS_TAU:g} for LiTS and tau = {POLYPGEN_TAU:g} for PolypGen")
    return tau


def _check_mask_2d(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask (H, W), got shape {mask.shape}")
    if mask.size == 0:
        raise ValueError(f"mask has no pixels (shape {mask.shape})")
    return mask


def inverse_area(mask: np.ndarray) -> float:
    """Inverse relative lesion area ``H * W / count_nonzero(mask)`` of a 2-D mask; ``math.inf`` if empty."""
    mask = _check_mask_2d(mask)
    count = int(np.count_nonzero(mask))
    if count == 0:
        return math.inf
    return mask.shape[0] * mask.shape[1] / count


def delta_from_inverse_area(a_inv: ArrayLike, base: float) -> float | np.ndarray:
    """``tanh((log(a_inv) / log(base)) ** 2)``, 0 where ``a_inv`` is ``inf`` (empty mask).

    This is the difficulty *before* the small flag ``s`` is applied. Vectorised: a scalar in gives a
    Python float, an array in gives a float64 array of the same shape.
    """
    base = _check_base(base)
    arr = np.asarray(a_inv, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_l = np.log(arr) / math.log(base)
        out = np.where(np.isposinf(arr), 0.0, np.tanh(log_l * log_l))
    if out.ndim == 0:
        return float(out)
    return out


def lits_difficulty_from_counts(
    lesion_pixels: ArrayLike,
    height: ArrayLike,
    width: ArrayLike,
    base: float = LITS_BASE,
    tau: float = LITS_TAU,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised LiTS difficulty from lesion pixel counts (one call for all slices of a dataset).

    ``height`` and ``width`` broadcast against ``lesion_pixels`` (scalars when all slices share a size).
    Returns ``(a_inv, small, delta)``: float64 (``inf`` where the count is 0), bool, float64 arrays.
    """
    base = _check_base(base)
    tau = _check_tau(tau)
    counts = np.asarray(lesion_pixels)
    if counts.dtype.kind == "f":
        if not np.all(np.isfinite(counts)) or np.any(counts != np.round(counts)):
            raise ValueError("lesion_pixels must be whole pixel counts")
    elif counts.dtype.kind not in "iub":
        raise ValueError(f"lesion_pixels must be integer counts, got dtype {counts.dtype}")
    counts = counts.astype(np.int64)
    hw = np.asarray(height, dtype=np.int64) * np.asarray(width, dtype=np.int64)
    counts, hw = np.broadcast_arrays(counts, hw)
    if np.any(hw <= 0):
        raise ValueError("height and width must be positive")
    if np.any(counts < 0) or np.any(counts > hw):
        raise ValueError("lesion_pixels must lie in [0, height * width]")
    nonempty = counts > 0
    with np.errstate(divide="ignore"):
        a_inv = np.where(nonempty, hw / np.where(nonempty, counts, 1), np.inf).astype(np.float64)
    small = nonempty & (a_inv >= tau)
    delta = np.where(small, delta_from_inverse_area(a_inv, base), 0.0)
    return a_inv, small, np.asarray(delta, dtype=np.float64)


# --------------------------------------------------------------------------------------------- per mask
@dataclass(frozen=True)
class MaskDifficulty:
    """Difficulty of one mask. ``inverse_area`` is ``math.inf`` for an empty mask."""

    height: int
    width: int
    lesion_pixels: int
    inverse_area: float
    small: bool
    delta: float

    def to_json_dict(self) -> dict[str, Any]:
        """Field name -> JSON-safe value (``inverse_area`` is ``None`` for an empty mask; JSON has no inf)."""
        return {
            "height": int(self.height),
            "width": int(self.width),
            "lesion_pixels": int(self.lesion_pixels),
            "inverse_area": float(self.inverse_area) if math.isfinite(self.inverse_area) else None,
            "small": bool(self.small),
            "delta": float(self.delta),
        }


def lits_difficulty(mask: np.ndarray, base: float = LITS_BASE, tau: float = LITS_TAU) -> MaskDifficulty:
    """LiTS-mode difficulty of a 2-D mask (nonzero = lesion): ``s = a_inv >= tau`` on the whole mask."""
    mask = _check_mask_2d(mask)
    h, w = mask.shape
    count = int(np.count_nonzero(mask))
    a_inv, small, delta = lits_difficulty_from_counts(count, h, w, base=base, tau=tau)
    return MaskDifficulty(height=int(h), width=int(w), lesion_pixels=count,
                          inverse_area=float(a_inv), small=bool(small), delta=float(delta))


# --------------------------------------------------------------------------------------------- PolypGen mode
#: bump when the PolypGen estimator's results can change, so caches of per-image difficulty can be rebuilt
POLYPGEN_ESTIMATOR_VERSION: int = 1
#: the grid (pixels per side) the reference implementation made its decision on; our scales are given on it
_REFERENCE_SIDE = 512
#: smallest erosion radius, in pixels of the 512 grid (the reference's 11 x 11 kernel has half-width 5)
DEFAULT_EROSION_RADIUS: float = 5.0
#: the working grid has at most this many pixels (the reference's 512 x 512); None = full resolution
DEFAULT_MAX_WORKING_PIXELS: int | None = _REFERENCE_SIDE * _REFERENCE_SIDE
#: threshold on the scale-normalised LoG response for a blob (a single isolated pixel scores 1/pi = 0.318)
DEFAULT_BLOB_THRESHOLD: float = 0.25
#: ratio between successive erosion radii, and between successive detector scales
_LEVEL_RATIO = 1.3
_EIGHT = np.ones((3, 3), dtype=bool)


def polypgen_working_factor(height: int, width: int, max_working_pixels: int | None = DEFAULT_MAX_WORKING_PIXELS
                            ) -> int:
    """Block size ``f`` of the working grid: the smallest integer ``f >= 1`` with
    ``ceil(H / f) * ceil(W / f) <= max_working_pixels`` (1 when ``max_working_pixels`` is None)."""
    if max_working_pixels is None:
        return 1
    if int(max_working_pixels) < 1:
        raise ValueError(f"max_working_pixels must be >= 1 or None (got {max_working_pixels})")
    f = max(1, math.ceil(math.sqrt(height * width / max_working_pixels)))
    while -(-height // f) * -(-width // f) > max_working_pixels:
        f += 1
    return f


def _pool(lesion: np.ndarray, f: int) -> np.ndarray:
    """Lesion pixel count of every ``f x f`` block (int32), blocks aligned to the top-left corner."""
    h, w = lesion.shape
    hb, wb = -(-h // f), -(-w // f)
    u = lesion.view(np.uint8)
    if hb * f != h or wb * f != w:
        padded = np.zeros((hb * f, wb * f), dtype=np.uint8)
        padded[:h, :w] = u
        u = padded
    return u.reshape(hb, f, wb, f).sum(axis=(1, 3), dtype=np.int32)


def _erosion_radii(r0: float, r_tau: float) -> list[float]:
    """Erosion radii ``r0 * 1.3**k`` below ``r_tau``; always at least ``r0``."""
    radii = [r0]
    while radii[-1] * _LEVEL_RATIO < r_tau:
        radii.append(radii[-1] * _LEVEL_RATIO)
    return radii


def _scan_smallest_lesion(lesion: np.ndarray, tau: float, erosion_radius: float,
                          max_working_pixels: int | None, blob_threshold: float) -> float | None:
    """Area (pixels of ``lesion``) of the smallest detected lesion; None if none. See polypgen_difficulty."""
    from scipy import ndimage as ndi

    h, w = lesion.shape
    rows = np.flatnonzero(lesion.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(lesion.any(axis=0))
    f = polypgen_working_factor(h, w, max_working_pixels)
    hw_grid, ww_grid = -(-h // f), -(-w // f)
    # the lesions' bounding box on the working grid plus one background block where that is not the image edge
    # (the distance transform treats the array edge like the image edge: outside the image counts as lesion)
    y0, y1 = max(0, rows[0] // f - 1), min(hw_grid, rows[-1] // f + 2)
    x0, x1 = max(0, cols[0] // f - 1), min(ww_grid, cols[-1] // f + 2)
    if f == 1:
        b = np.ascontiguousarray(lesion[y0:y1, x0:x1])
        counts = None
    else:
        counts = _pool(np.ascontiguousarray(lesion[y0 * f:min(h, y1 * f), x0 * f:min(w, x1 * f)]), f)
        b = counts > 0
    s = math.sqrt(h * w) / (f * _REFERENCE_SIDE)  # working pixels per pixel of the 512 grid
    small_area = h * w / tau  # a lesion is small iff its area A <= this (H*W / A >= tau)
    r_tau = math.sqrt(small_area / math.pi) / f  # radius of a disk of the threshold area, working pixels
    r0 = max(1.0, erosion_radius * s)

    # 1. + 2. regions: connected components, split where erosion at increasing radii separates cores
    comp, n_comp = ndi.label(b, structure=_EIGHT)
    regions = comp.astype(np.int32, copy=False)
    boxes: dict[int, tuple[slice, slice]] = {i + 1: box for i, box in enumerate(ndi.find_objects(comp))}
    next_id = n_comp + 1
    # a component can keep a core under erosion by r0 only if it is 2 floor(r0) + 1 pixels tall and wide, or
    # touches the image edge (outside the image counts as lesion); the others need no distance transform
    min_side = 2 * math.floor(r0) + 1
    edge = (y0 == 0, y1 == hw_grid, x0 == 0, x1 == ww_grid)
    thick = [i for i, (ry, rx) in boxes.items()
             if min(ry.stop - ry.start, rx.stop - rx.start) >= min_side
             or (edge[0] and ry.start == 0) or (edge[1] and ry.stop == b.shape[0])
             or (edge[2] and rx.start == 0) or (edge[3] and rx.stop == b.shape[1])]
    if thick and not b.all():  # (a mask without background is one lesion: nothing to separate)
        sy0 = max(0, min(boxes[i][0].start for i in thick) - 1)
        sy1 = min(b.shape[0], max(boxes[i][0].stop for i in thick) + 1)
        sx0 = max(0, min(boxes[i][1].start for i in thick) - 1)
        sx1 = min(b.shape[1], max(boxes[i][1].stop for i in thick) + 1)
        keep = np.zeros(n_comp + 1, dtype=bool)
        keep[thick] = True
        dist = ndi.distance_transform_edt(keep[comp[sy0:sy1, sx0:sx1]])  # erosion by r = {dist > r}
        for radius in _erosion_radii(r0, r_tau):
            cores, n_cores = ndi.label(dist > radius, structure=_EIGHT)
            if n_cores < 2:
                if n_cores == 0:
                    break
                continue
            parent = np.empty(n_cores, dtype=np.int64)
            for i, (cy, cx) in enumerate(ndi.find_objects(cores)):  # the core's top row holds one of its pixels
                j = int(np.argmax(cores[cy.start, cx] == i + 1))
                parent[i] = regions[sy0 + cy.start, sx0 + cx.start + j]
            for x in np.flatnonzero(np.bincount(parent) >= 2):
                next_id = _split_region(regions, boxes, int(x), cores, (sy0, sx0), parent, next_id)
    weights = None if counts is None else counts.ravel()
    area_of = np.bincount(regions.ravel(), weights=weights, minlength=next_id).astype(np.float64)
    ids = np.flatnonzero(area_of[1:] > 0) + 1
    areas = area_of[ids]

    # 3. + 4. smallest first; a region no larger than H*W/tau counts only if the blob detector finds a blob in it
    sigma_min = max(1.0, s)
    sigma_tau = max(sigma_min, r_tau / math.sqrt(2.0))
    min_coverage = 0.9 * blob_threshold * math.pi * sigma_min ** 2  # below this the LoG cannot reach the threshold
    for i in np.argsort(areas, kind="stable"):
        area = float(areas[i])
        if area > small_area:
            return area  # cannot make the mask small: accepted without the detector
        if area / (f * f) < min_coverage:
            continue
        box = boxes[int(ids[i])]
        pixels = regions[box] == ids[i]
        if counts is None:
            coverage = pixels.astype(np.float64)
        else:
            coverage = np.where(pixels, counts[box] / float(f * f), 0.0)
        # the LoG peaks at sigma = r / sqrt 2 for a disk of radius r, at half the width for a bar: <= half the box
        sigma_max = min(sigma_tau, max(sigma_min, min(pixels.shape) / 2.0))
        if _has_blob(coverage, sigma_min, sigma_max, blob_threshold):
            return area
    return None


def _split_region(regions: np.ndarray, boxes: dict[int, tuple[slice, slice]], x: int, cores: np.ndarray,
                  offset: tuple[int, int], parent: np.ndarray, next_id: int) -> int:
    """Split region ``x`` among its cores (pixel -> Euclidean-nearest core); returns the next free region id."""
    from scipy import ndimage as ndi

    box = boxes.pop(x)
    oy, ox = offset
    inside = regions[box] == x
    core_box = (slice(box[0].start - oy, box[0].stop - oy), slice(box[1].start - ox, box[1].stop - ox))
    seeds = np.where(inside, cores[core_box], 0)  # a region's cores lie inside it and inside its box
    _, (iy, ix) = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    nearest = np.where(inside, seeds[iy, ix], 0)
    children = np.flatnonzero(parent == x) + 1
    lut = np.zeros(parent.size + 1, dtype=np.int32)
    lut[children] = np.arange(next_id, next_id + children.size, dtype=np.int32)
    regions[box] = np.where(inside, lut[nearest], regions[box])
    for k, sub in enumerate(ndi.find_objects(nearest)):
        if sub is not None:
            boxes[int(lut[k + 1])] = (slice(box[0].start + sub[0].start, box[0].start + sub[0].stop),
                                      slice(box[1].start + sub[1].start, box[1].start + sub[1].stop))
    return next_id + children.size


def _has_blob(coverage: np.ndarray, sigma_min: float, sigma_max: float, threshold: float) -> bool:
    """Whether ``skimage.feature.blob_log(coverage (zero-padded), min_sigma, max_sigma, num_sigma, threshold,
    log_scale=True)`` finds at least one blob.

    blob_log keeps the local maxima of the scale-normalised LoG cube ``-sigma**2 * LoG_sigma`` that are
    ``> threshold`` and then prunes overlapping blobs, which never removes all of them; the cube's global maximum
    is such a local maximum. So "at least one blob" is exactly "cube maximum > threshold", computed here without
    blob_log's peak search and quadratic pruning (a bar has hundreds of plateau maxima);
    ``test_has_blob_is_blob_log`` checks the equivalence against skimage.
    """
    from scipy import ndimage as ndi

    image = np.pad(coverage, math.ceil(2.0 * sigma_max) + 1)
    for sigma in _blob_sigmas(sigma_min, sigma_max):
        if float((-ndi.gaussian_laplace(image, sigma) * sigma ** 2).max()) > threshold:
            return True
    return False


def _blob_sigmas(sigma_min: float, sigma_max: float) -> np.ndarray:
    """blob_log's scales for ``log_scale=True``: ``num`` log-spaced values, neighbours at most 1.3x apart."""
    num = 1 + max(0, math.ceil(math.log(sigma_max / sigma_min) / math.log(_LEVEL_RATIO) - 1e-9))
    return np.logspace(math.log10(sigma_min), math.log10(sigma_max), num)


def _check_estimator_options(erosion_radius: float, max_working_pixels: int | None,
                             blob_threshold: float) -> tuple[float, int | None, float]:
    erosion_radius = float(erosion_radius)
    if not math.isfinite(erosion_radius) or erosion_radius < 0:
        raise ValueError(f"erosion_radius must be a finite number >= 0 (got {erosion_radius})")
    if max_working_pixels is not None:
        if int(max_working_pixels) != max_working_pixels or max_working_pixels < 1:
            raise ValueError(f"max_working_pixels must be a whole number >= 1 or None (got {max_working_pixels})")
        max_working_pixels = int(max_working_pixels)
    blob_threshold = float(blob_threshold)
    if not math.isfinite(blob_threshold) or blob_threshold <= 0:
        raise ValueError(f"blob_threshold must be a finite number > 0 (got {blob_threshold})")
    return erosion_radius, max_working_pixels, blob_threshold


def _lesion_of(mask: np.ndarray) -> np.ndarray:
    mask = _check_mask_2d(mask)
    if mask.dtype == bool:
        return mask
    if mask.dtype.kind == "f" and np.isnan(mask).any():
        raise ValueError("mask contains NaN; pass a binary mask (nonzero = lesion)")
    if mask.dtype.kind not in "biuf":
        raise ValueError(f"mask must be numeric or bool, got dtype {mask.dtype}")
    return mask != 0


def smallest_lesion_area(mask: np.ndarray, *, tau: float = POLYPGEN_TAU,
                         erosion_radius: float = DEFAULT_EROSION_RADIUS,
                         max_working_pixels: int | None = DEFAULT_MAX_WORKING_PIXELS,
                         blob_threshold: float = DEFAULT_BLOB_THRESHOLD) -> float | None:
    """Estimated area (pixels of ``mask``) of the smallest detected lesion, or None (empty / only specks).

    The estimator of :func:`polypgen_difficulty`. ``tau`` matters only through the detector's scale range and the
    rule that regions larger than ``H * W / tau`` are accepted without running the detector.
    """
    erosion_radius, max_working_pixels, blob_threshold = _check_estimator_options(
        erosion_radius, max_working_pixels, blob_threshold)
    return _scan_smallest_lesion(_lesion_of(mask), _check_tau(tau), erosion_radius, max_working_pixels,
                                 blob_threshold)


def polypgen_difficulty(mask: np.ndarray, base: float = POLYPGEN_BASE, tau: float = POLYPGEN_TAU, *,
                        erosion_radius: float = DEFAULT_EROSION_RADIUS,
                        max_working_pixels: int | None = DEFAULT_MAX_WORKING_PIXELS,
                        blob_threshold: float = DEFAULT_BLOB_THRESHOLD) -> MaskDifficulty:
    """PolypGen-mode difficulty (FedGS section 3.2, "Small polyp classification").

    ``inverse_area`` is the whole mask's ``H * W / lesion pixels``; ``small = H * W / A_min >= tau`` with ``A_min``
    the estimated area of the smallest detected lesion (:func:`smallest_lesion_area`); ``delta =
    tanh((log_base inverse_area) ** 2)`` if small else 0 -- delta uses the whole-mask inverse area, not the
    smallest lesion's. Empty mask: ``inverse_area = inf``, ``small = False``, ``delta = 0``.

    **Input.** A 2-D array, lesion = nonzero: bool, 0/1 and 0/255 give the same result. Binarising a lossy (JPEG)
    mask is the caller's job: :func:`read_mask` and the PolypGen reader keep ``grey > 127``. Raw JPEG grey levels
    passed here would count every faint compression artefact (1..127) as lesion, and the isolated ones as tiny
    lesions.

    **Estimator.** Lengths are in pixels of the working grid unless said otherwise.

    0. *Working grid.* ``f`` = :func:`polypgen_working_factor` ``(H, W, max_working_pixels)``, the smallest
       block size with at most ``max_working_pixels`` blocks (default 512 * 512, the grid the reference decided
       on; None = full resolution). A block is lesion if *any* of its pixels is, so no lesion disappears, and
       every area below is a sum of the blocks' *exact* lesion pixel counts, i.e. in pixels of the input mask.
       ``s = sqrt(H * W) / (512 f)`` converts a length on the 512 grid into working pixels. Only the lesions'
       bounding box is processed.
    1. *Erosion separates touching lesions.* Erosion by a disk of radius ``r`` is ``{dist > r}`` with ``dist``
       the Euclidean distance transform (outside the image counts as lesion, as the reference's
       ``BORDER_REFLECT``, so the border does not eat a lesion it cuts). Radii ``r_k = r0 * 1.3**k`` from
       ``r0 = max(1, 5 s)`` (the reference's 11 x 11 kernel on 512 x 512) while ``r_k < r_tau`` with ``r_tau =
       sqrt(H * W / (pi tau)) / f`` (a disk of the threshold area; a lesion that survives a larger erosion
       cannot be small). *Cores* at radius ``r`` = 8-connected components of ``{dist > r}``.
    2. *Regions* (connected components + distance transform). Start with the 8-connected components of the
       mask. At each radius, a region holding ``>= 2`` cores is split among them, every pixel going to the
       Euclidean-nearest core (distance-transform feature indices). So a lesion joined to another by a neck is
       separated when some ``r_k`` lies between the neck's half-width and its own inscribed radius: always when
       the inscribed radius is at least 1.3x the neck's half-width, never when it is not larger (a single radius,
       as in the paper, separates only necks narrower than 11 pixels of the 512 grid, whatever the lesions'
       sizes); a bump whose "neck" is as wide as itself stays part of its lesion. Components that no erosion
       leaves a core in (a tiny polyp, a thin bar) are regions as they are. ``A`` = the region's lesion pixels
       (its full extent, not its eroded core).
    3. *Detection: LoG blob detector* (``skimage.feature.blob_log``, a LoG detector in place of the paper's
       generalised LoG [8]). Regions are visited smallest first. A region no larger than ``H * W / tau`` is a
       lesion iff blob_log finds a blob on its lesion fraction (block fraction inside the region, 0 elsewhere,
       zero-padded): scale-normalised LoG ``> blob_threshold`` (0.25) at some ``sigma`` of
       ``logspace(sigma_min, sigma_max)`` (neighbours <= 1.3x apart), ``sigma_min = max(1, s)`` (one pixel of the
       512 grid), ``sigma_max = clip(half the region's shorter box side, sigma_min, r_tau / sqrt 2)`` (a disk of
       radius r peaks at r / sqrt 2, a bar at half its width). We evaluate blob_log's "at least one blob" as
       "the LoG cube's maximum > threshold", which is the same thing (see ``_has_blob``; a unit test compares it
       with skimage's blob_log). A disk scores about 0.74, a bar 0.48, one isolated pixel 1/pi = 0.32, so at
       512 x 512 every region is a lesion; what it rejects is specks that fill less than about one pixel of
       the 512 grid (compression or annotation noise in high-resolution frames); at that limit (specks of one or
       two 512-grid pixels) the working grid and full resolution can disagree. Shortcut with the same
       result: a region whose lesion fraction sums to less than ``0.9 * blob_threshold * pi * sigma_min**2`` is
       rejected without running the LoG (its normalised LoG is at most that sum over ``pi sigma**2``). A region
       larger than ``H * W / tau`` is accepted without the detector: it cannot make the mask small.
    4. ``A_min`` = the area of the first accepted region (the smallest detected lesion); none -> not small.

    Choices the tests pin down: the smallest *area* decides, not the smallest LoG *scale* (on a real mask the
    LoG finds small-scale blobs at corners and along the edges of large lesions); a thin bar is one lesion
    measured by its area (8 x 400 pixels on 512 x 512, inverse area 81.9, is not small; 3 x 300, 291, is),
    because tau comes from the PolypGen authors' size classes, which are areas, and a LoG reading of a bar's
    width as its size would make every elongated lesion small; a lesion cut by the image border is measured by
    its visible area (what the network has to segment); a ring is one lesion of the ring's area.

    **Cost.** One pass over the mask (bounding box, block counts), then at most ``max_working_pixels`` pixels,
    cropped to the lesions: one distance transform and one labelling per radius (about 6 radii), detector
    filtering on small crops only for regions that could be small, stopping at the first accepted one. About
    2-4 ms per 512 x 512 or 1080 x 1920 PolypGen-like mask on one core
    (``tests/benchmarks/test_difficulty_scan.py`` prints masks per second).

    **Differences from the reference** (``create_data_details`` / ``estimate_area`` in
    Trustworthy-AI-UU-NKI/Federated-Learning-Disentanglement ``src/data.py``: OpenCV ``SimpleBlobDetector`` plus
    a bounding-box walk):

    * it resizes every mask to 512 x 512 (bilinear, ignoring the aspect ratio) and hard-codes ``512 * 512``; we
      keep the aspect ratio, pool whole blocks, count exact pixels and use the mask's own ``H * W``;
    * its area is ``(x_max - x_min) * (y_max - y_min)`` from walking along the row and the column through the
      smallest keypoint's centre while the grey level is exactly 255: two chords, each one pixel short (a
      one-pixel chord gives area 0 and ZeroDivisionError), cut short by any JPEG grey value below 255 inside
      the lesion, and a sliver of a diagonal or irregular lesion. We count the region's pixels;
    * SimpleBlobDetector drops a blob whose centroid pixel is not lesion (``filterByColor``) and one whose
      contour encloses no area: a ring, a crescent or a one-pixel-wide line yields no keypoint, which the
      reference calls small (a ring's walk would start in the hole). A ring is one lesion of its area here;
    * it decides on the keypoint of smallest *scale*; we take the smallest *area* among detected lesions;
    * it detects on the un-eroded mask and, only if that was not small, again after one erosion (11 x 11, or
      15 x 15 when the whole-mask inverse area is < 20), which separates only necks narrower than the kernel;
      no keypoint at all means small there (a full-frame mask is "small"; none after the erosion raises
      IndexError). We erode at several radii and keep every lesion an erosion removes (components without a
      core are regions too), so one pass covers both; a mask without a detected lesion is not small;
    * an empty mask has inverse area 0 there; here ``inf``, with ``small = False`` and ``delta = 0``.
    """
    base = _check_base(base)
    tau = _check_tau(tau)
    erosion_radius, max_working_pixels, blob_threshold = _check_estimator_options(
        erosion_radius, max_working_pixels, blob_threshold)
    lesion = _lesion_of(mask)
    h, w = lesion.shape
    count = int(np.count_nonzero(lesion))
    if count == 0:
        return MaskDifficulty(height=int(h), width=int(w), lesion_pixels=0, inverse_area=math.inf, small=False,
                          delta=0.0)
    a_inv = h * w / count
    a_min = _scan_smallest_lesion(lesion, tau, erosion_radius, max_working_pixels, blob_threshold)
    small = a_min is not None and h * w / a_min >= tau
    delta = float(delta_from_inverse_area(a_inv, base)) if small else 0.0
    return MaskDifficulty(height=int(h), width=int(w), lesion_pixels=count, inverse_area=float(a_inv),
                          small=bool(small), delta=delta)


def _polypgen_difficulty(mask: np.ndarray, base: float, tau: float) -> MaskDifficulty:
    return polypgen_difficulty(mask, base=base, tau=tau)


_MODE_FUNCS: dict[str, Callable[[np.ndarray, float, float], MaskDifficulty]] = {
    "lits": lits_difficulty,
    "polypgen": _polypgen_difficulty,
}


def mode_defaults(mode: str) -> tuple[float, float]:
    """Default ``(base, tau)`` of a difficulty mode; ConfigError for an unknown mode."""
    try:
        return _MODE_DEFAULTS[mode]
    except KeyError:
        raise ConfigError(f"unknown difficulty mode {mode!r}; known modes: {', '.join(DIFFICULTY_MODES)}") from None


def mask_difficulty(mask: np.ndarray, mode: str = "lits", base: float | None = None,
                    tau: float | None = None) -> MaskDifficulty:
    """Difficulty of one mask in the given mode; ``base``/``tau`` default to the mode's paper values.

    ``"lits"`` -> :func:`lits_difficulty`, ``"polypgen"`` -> :func:`polypgen_difficulty` (default estimator
    options). Raises ConfigError for an unknown mode.
    """
    default_base, default_tau = mode_defaults(mode)
    return _MODE_FUNCS[mode](mask, default_base if base is None else base, default_tau if tau is None else tau)


def batch_eta(deltas: Any) -> float:
    """FedGS batch factor ``eta = 1 + (2 / N) * sum(deltas)``, N = number of images in the batch.

    Accepts a list, a numpy array or a torch tensor (any device) of per-image deltas.
    """
    if hasattr(deltas, "detach"):  # torch tensor, without importing torch here
        deltas = deltas.detach().cpu().numpy()
    arr = np.asarray(deltas, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError("batch_eta needs at least one delta (the batch is empty)")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0.0):
        raise ValueError(f"deltas must be finite and >= 0, got {arr.tolist()}")
    return float(1.0 + 2.0 / arr.size * arr.sum())


# --------------------------------------------------------------------------------------------- reading
def _extension(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def _to_2d(arr: np.ndarray, path: Path) -> np.ndarray:
    """Drop singleton axes (last first) until 2-D; more than 2 non-singleton axes is an error."""
    while arr.ndim > 2 and 1 in arr.shape:
        axis = max(i for i, n in enumerate(arr.shape) if n == 1)
        arr = np.squeeze(arr, axis=axis)
    if arr.ndim != 2:
        raise DataError(f"{path}: mask has shape {arr.shape}, expected a 2-D mask (H, W) "
                        "(singleton axes such as (H, W, 1) are accepted); save one 2-D slice per file")
    if arr.size == 0:
        raise DataError(f"{path}: mask has no pixels (shape {arr.shape}); save a non-empty 2-D mask")
    return arr


def _load_image(path: Path, ext: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        if ext in (".jpg", ".jpeg"):
            # JPEG is lossy: a 0/255 mask comes back with small nonzero values around the lesion edges,
            # so "nonzero" would grow the lesion. Binarise the grey level at > 127 instead.
            return np.asarray(img.convert("L")) > 127
        if img.mode in ("P", "PA"):
            img = img.convert("RGBA")
        arr = np.asarray(img)
        if img.mode in ("LA", "RGBA", "La", "RGBa"):
            arr = arr[..., :-1]  # ignore alpha: an opaque black background is still background
        if arr.ndim == 3:
            arr = np.any(arr != 0, axis=-1)  # a pixel is lesion if any colour channel is nonzero
        return arr


def _load_nifti(path: Path) -> np.ndarray:
    import nibabel as nib

    img = nib.load(str(path))
    return np.asanyarray(img.dataobj)


def read_mask(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read a 2-D binary lesion mask as a bool array (True = lesion).

    * ``.npy``: numeric array, nonzero = lesion (no pickled objects).
    * ``.png``: Pillow; nonzero in any colour channel = lesion (alpha ignored, palettes expanded).
    * ``.jpg`` / ``.jpeg``: Pillow, converted to grayscale and binarised at ``> 127`` (JPEG compression
      leaves small nonzero values near edges, so "nonzero" would be wrong).
    * ``.nii`` / ``.nii.gz``: nibabel, nonzero = lesion. NIfTI stores (x, y), so ``shape`` is (x, y); the
      difficulty does not depend on that orientation.

    Singleton axes are dropped (``(H, W, 1)`` or ``(1, H, W)`` is fine). Raises DataError naming the file for a
    missing file, an unsupported extension, an unreadable/corrupt file, NaN values, or more than 2 dimensions.
    """
    path = Path(path)
    ext = _extension(path)
    if ext not in MASK_EXTENSIONS:
        raise DataError(f"{path}: unsupported mask file type {ext or '(no extension)'!r}; "
                        f"convert it to one of {', '.join(MASK_EXTENSIONS)}")
    if not path.exists():
        raise DataError(f"{path}: mask file does not exist; check the path")
    if not path.is_file():
        raise DataError(f"{path}: is not a file; pass mask files, not directories")
    try:
        if ext == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif ext in (".nii", ".nii.gz"):
            arr = _load_nifti(path)
        else:
            arr = _load_image(path, ext)
    except Exception as e:  # any reader failure means the file is corrupt or not what its extension says
        raise DataError(f"{path}: cannot read mask ({type(e).__name__}: {e}); check that the file is a valid, "
                        f"complete {ext} file (re-export or re-download it)") from e
    arr = np.asarray(arr)
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{path}: mask has non-numeric dtype {arr.dtype}; save a bool/integer/float array")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise DataError(f"{path}: mask contains NaN or infinite values; save a binary (0/1) mask")
    arr = _to_2d(arr, path)
    return arr != 0
