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
* ``"polypgen"`` (``l = 100``, ``tau = 150``): blob-based (smallest detected lesion); not available yet.

An empty mask has ``a_inv = inf``, ``s = 0`` and ``delta = 0``: it never raises.

Difficulty is a property of the stored mask: compute it once per dataset (see
:func:`lits_difficulty_from_counts`, vectorised for the manifest builder) rather than per step on
augmented masks. This module needs numpy only (Pillow / nibabel are imported by :func:`read_mask`).
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
#: every difficulty mode fedseg knows about (some may not be implemented yet, see :func:`mask_difficulty`)
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


def _polypgen_difficulty(mask: np.ndarray, base: float, tau: float) -> MaskDifficulty:
    raise NotImplementedError(
        "PolypGen difficulty mode is not available yet: the blob-based small-polyp classifier lands in a "
        "later release; use mode 'lits' (whole-mask inverse area) meanwhile")


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

    Raises ConfigError for an unknown mode and NotImplementedError for ``"polypgen"`` (not available yet).
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
