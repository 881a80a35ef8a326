"""COVID-19 lung-infection CT (PPPML-HMI segmentation task): NIfTI reader, isotropic cubes, 2.5D samples.

Layout (real data and :func:`fedseg.data.synthetic_covid.synth_covid` alike)::

    <root>/<hospital>/imagesTr/<case>.nii[.gz]   CT volume in HU, any shape and spacing (affine carries the spacing)
    <root>/<hospital>/labelsTr/<case>.nii[.gz]   infection mask {0, 1}, same shape and affine
    <root>/split.json                            optional (format below); else automatic per-hospital 5-fold

Every non-hidden sub-folder of ``root`` with an ``imagesTr`` or ``labelsTr`` folder is a hospital (the paper's A-E).
An image named ``<case>_0000.nii.gz`` (nnU-Net style) matches the label ``<case>.nii.gz``. Arrays are used in the
file's own array order ``[X, Y, Z]`` (axial slice ``k`` is ``vol[:, :, k]``); nothing is reoriented, so a
prediction written back with the original affine lies exactly on the input.

Validation (every problem is a :class:`~fedseg.errors.DataError` naming the file and the fix): missing root or
``imagesTr`` / ``labelsTr`` folders, an image without label (or the reverse), a case present twice (``.nii`` and
``.nii.gz``), unreadable / corrupt / truncated NIfTI, a volume that is not 3-D, image and label with different
shapes or affines, a label with values other than 0 and 1, NaN / inf intensities.

Preprocessing (:class:`CovidPreprocessing`, the ``data_args``), computed once per hospital and cached:

1. HU (nibabel applies the header's scaling) are resampled with ``scipy.ndimage.zoom`` (linear, ``grid_mode``,
   with an anti-aliasing Gaussian of sigma ``(factor - 1) / 2`` along every axis that shrinks) to a cube of
   ``volume_size`` voxels per side -- the paper's "machine-agnostic standard space" (512^3 in the paper; 64^3 at
   quick scale). Like the paper, the cube does not keep the physical aspect ratio: every scan fills it.
2. Labels: the same resampling of the 0/1 mask, thresholded at 0.5 (an area-like rule that keeps masks binary).
3. A lung estimate on the HU cube (air-like voxels, HU < -500, enclosed by the body in their axial slice) gives
   each axial slice's lung fraction; it is only used to choose samples.
4. Intensities: ``intensity="window"`` (default) clips HU to ``[hu_min, hu_max]`` = [-1000, 400] (a lung window)
   and maps it linearly to [0, 1] -- a fixed map, so each scanner's calibration stays visible (the heterogeneity
   the paper studies); ``intensity="zscore"`` clips to the same window, then subtracts the mean and divides by the
   standard deviation of the volume's body voxels (HU > -500), per volume.

Cache: one folder per hospital and cube-affecting settings (``volume_size``, ``intensity``, ``hu_min``,
``hu_max``) under the cache folder, holding ``images.npy`` ([n, S, S, S] float16), ``masks.npy`` ([n, S, S, S]
uint8) and ``manifest.json`` (per case: files, original shape, affine and spacing, axial lung fractions and the
infection pixel counts of every slice of every view; a fingerprint of the files' names, sizes and mtimes and of those
settings). It is built once under an exclusive ``fcntl`` lock into a temporary folder that is renamed into place
(:mod:`fedseg.data.cache`); a change of the files or of those settings builds a new folder. The other data_args
(``offsets``, ``fold``, ``min_lung_fraction``, ``base``, ``tau``) only change how samples are drawn from the cubes,
so they reuse the cache.

Splits: ``<root>/split.json`` (or the data configuration's ``split`` path)::

    {"dataset": "covid",
     "hospitals": {"A": {"train": ["A000001", ...], "val": [...], "test": [...]}, ...},
     "sites": {"site-1": "A", ...}}          # optional

else the automatic per-hospital 5-fold split: a hospital's cases, sorted by name and shuffled with a fixed seed
derived from the hospital name, are dealt into 5 contiguous blocks (``numpy.array_split``); with ``fold = f``
the test part is block ``f``, validation block ``(f + 1) % 5`` (the neighbour block, >= 1 case) and training the
other three. It needs >= 5 cases per hospital (the paper's smallest hospital has 9).

Site -> hospital: ``site-i`` -> the i-th hospital in sorted order (site-1..site-5 -> A..E), or the split file's
``sites``, or the ``"centre"`` key of the site's data configuration (highest priority). Each site has train, val
and test parts (``fedseg.sitedata.site_parts("covid")``). The server's test set (:func:`load_covid_test`) is the
union of every hospital's test part: the same cases the sites test on, so the server-side number is the pooled
test Dice of all hospitals.

2.5D samples (:class:`Covid25DDataset`): sample ``i`` = (case, index ``k``) holds ALL THREE VIEWS at index ``k``
of the cube ``[X, Y, Z]``: view ``xy`` (axial) slices along Z (``cube[:, :, k]``), ``yz`` (sagittal) along X
(``cube[k]``), ``xz`` (coronal) along Y (``cube[:, k, :]``). ``x[v]`` stacks the 5 slices at ``k + offsets``
(clamped to the cube: edge replication) and ``y[v]`` is the mask of the central slice ``k``. ``offsets`` are in
cube voxels; default (-2, -1, 0, 1, 2). The authors' code takes -5, -2, 0, 2, 5 mm on volumes resampled to 1 mm;
in the 512^3 standard space a voxel is about 0.6-0.8 mm (a 300-400 mm scan over 512 voxels), so
``offsets="paper"`` (= (-5, -2, 0, 2, 5) voxels) is that choice at paper scale; at quick scale (64 voxels over
~350 mm, ~5.5 mm per voxel) the default +-1, +-2 voxels span +-5.5 and +-11 mm, the nearest equivalent with distinct
slices (:func:`offsets_from_mm` converts millimetres for a given extent).
Indices kept: every ``k`` whose axial slice has a lung fraction >= ``min_lung_fraction`` (default 0.01), plus every
``k`` where any view's central slice has infection (no infection slice is ever dropped); indices outside the chest
(above the apex, below the diaphragm) are dropped. FedGS difficulty per sample (``delta``, ``small``) comes from the
axial central mask with the LiTS rule (:func:`fedseg.difficulty.lits_difficulty_from_counts` on the cube's S x S
slice); ``nonempty`` = that mask has infection.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedseg.data.cache import (
    building_folder,
    cache_folder,
    files_fingerprint,
    load_or_build,
    open_cache,
    write_json_atomic,
)
from fedseg.data.config import DataSource, default_cache_dir, ensure_builtin_covid
from fedseg.difficulty import LITS_BASE, LITS_TAU, lits_difficulty_from_counts
from fedseg.errors import ConfigError, DataError

__all__ = [
    "CACHE_FORMAT_VERSION",
    "DEFAULT_OFFSETS",
    "N_FOLDS",
    "PAPER_OFFSETS",
    "VIEWS",
    "VIEW_AXES",
    "Covid25DDataset",
    "CovidPreprocessing",
    "CovidSplit",
    "augment_covid_batch",
    "find_covid_cases",
    "load_covid_cases",
    "load_covid_site",
    "load_covid_split",
    "load_covid_test",
    "lung_mask",
    "offsets_from_mm",
    "preprocess_volume",
    "read_covid_case",
    "read_covid_image",
    "resample",
    "resolve_covid",
    "view_slabs",
]

log = logging.getLogger("fedseg.data.covid")

#: bump when the cache content or layout changes
CACHE_FORMAT_VERSION = 1
#: the three views, in the order of the sample's view axis, and the cube axis each one slices along
VIEWS = ("xy", "yz", "xz")
VIEW_AXES = {"xy": 2, "yz": 0, "xz": 1}
DEFAULT_OFFSETS = (-2, -1, 0, 1, 2)
#: the authors' -5, -2, 0, 2, 5 (mm on 1 mm volumes), as voxels of the 512^3 standard space
PAPER_OFFSETS = (-5, -2, 0, 2, 5)
N_FOLDS = 5
N_SLICES = 5
_PARTS = ("train", "val", "test")
_NII = re.compile(r"^(?P<stem>.+?)\.nii(\.gz)?$")


def _int_like(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


@dataclass(frozen=True)
class CovidPreprocessing:
    """data_args of the COVID data set (see the module docstring)."""

    volume_size: int = 64  # cube side in voxels (paper: 512)
    intensity: str = "window"  # "window": clip [hu_min, hu_max] -> [0, 1]; "zscore": clip, then per-volume z-score
    hu_min: float = -1000.0
    hu_max: float = 400.0
    offsets: Any = DEFAULT_OFFSETS  # 5 slice offsets in cube voxels, or "paper" (= PAPER_OFFSETS)
    fold: int = 0  # automatic 5-fold split: test block (0..4)
    min_lung_fraction: float = 0.01  # keep indices whose axial slice has at least this lung fraction
    base: float = LITS_BASE  # FedGS difficulty (LiTS rule on the axial central mask)
    tau: float = LITS_TAU

    def __post_init__(self) -> None:
        if not _int_like(self.volume_size) or self.volume_size < 16:
            raise ConfigError(f"covid volume_size must be an integer >= 16 (cube side in voxels; quick 64, "
                              f"paper 512), got {self.volume_size!r}")
        if self.intensity not in ("window", "zscore"):
            raise ConfigError(f"covid intensity must be \"window\" or \"zscore\", got {self.intensity!r}")
        if not (math.isfinite(self.hu_min) and math.isfinite(self.hu_max) and self.hu_min < self.hu_max):
            raise ConfigError(f"covid HU window needs finite hu_min < hu_max, got [{self.hu_min}, {self.hu_max}]")
        offs = self.offsets
        if isinstance(offs, str):
            if offs != "paper":
                raise ConfigError(f"covid offsets must be 5 integers (cube voxels) or \"paper\", got {offs!r}")
            offs = PAPER_OFFSETS
        if not isinstance(offs, (list, tuple)) or not all(_int_like(o) for o in offs):
            raise ConfigError(f"covid offsets must be 5 integers (cube voxels) or \"paper\", got {self.offsets!r}")
        offs = tuple(int(o) for o in offs)
        if len(offs) != N_SLICES or len(set(offs)) != N_SLICES or max(abs(o) for o in offs) >= self.volume_size:
            raise ConfigError(f"covid offsets must be {N_SLICES} distinct integers with |offset| < volume_size "
                              f"(the 2.5D U-Net takes {N_SLICES} slices), got {self.offsets!r}")
        object.__setattr__(self, "offsets", offs)
        if not _int_like(self.fold) or not 0 <= self.fold < N_FOLDS:
            raise ConfigError(f"covid fold must be an integer in 0..{N_FOLDS - 1}, got {self.fold!r}")
        if not (math.isfinite(self.min_lung_fraction) and 0.0 <= self.min_lung_fraction <= 1.0):
            raise ConfigError(f"covid min_lung_fraction must be in [0, 1], got {self.min_lung_fraction}")
        if not (math.isfinite(self.base) and self.base > 0 and self.base != 1):
            raise ConfigError(f"difficulty base must be finite, > 0 and != 1, got {self.base}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ConfigError(f"small-lesion threshold tau must be finite and > 0, got {self.tau}")

    def cache_key(self) -> dict[str, Any]:
        """The settings that change the cached cubes (the others only change how samples are drawn)."""
        return {"volume_size": int(self.volume_size), "intensity": self.intensity, "hu_min": float(self.hu_min),
                "hu_max": float(self.hu_max)}

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["offsets"] = list(self.offsets)
        return d


def offsets_from_mm(offsets_mm: Sequence[float], volume_size: int, extent_mm: float) -> tuple[int, ...]:
    """Slice offsets in millimetres -> cube voxels for a cube of ``volume_size`` over ``extent_mm`` (rounded).

    >>> offsets_from_mm((-5, -2, 0, 2, 5), 512, 512.0)   # 1 mm voxels: the authors' setting
    (-5, -2, 0, 2, 5)
    """
    if volume_size <= 0 or extent_mm <= 0:
        raise ValueError("volume_size and extent_mm must be positive")
    return tuple(round(float(m) * volume_size / float(extent_mm)) for m in offsets_mm)


# ------------------------------------------------------------------------------------------ discovery
def _stem(name: str) -> str | None:
    m = _NII.match(name)
    return m.group("stem") if m else None


def _scan_folder(folder: Path, strip_channel: bool) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        stem = _stem(p.name)
        if stem is None:
            continue
        if strip_channel and stem.endswith("_0000"):
            stem = stem[:-5]
        if stem in out:
            raise DataError(f"case {stem!r} appears twice in {folder}: {out[stem].name} and {p.name}; keep one "
                            f"copy (e.g. remove the uncompressed or the .gz duplicate)")
        out[stem] = p
    return out


def find_covid_cases(root: Path) -> dict[str, dict[str, tuple[Path, Path]]]:
    """Hospital -> case -> (image path, label path), for the layout in the module docstring."""
    root = Path(root)
    fix = f"generate data with `fedseg data synth covid --out {root}` or point \"root\" at the COVID data folder"
    if not root.exists():
        raise DataError(f"COVID data root {root} does not exist; {fix}")
    if not root.is_dir():
        raise DataError(f"COVID data root {root} is not a folder; {fix}")
    found: dict[str, dict[str, tuple[Path, Path]]] = {}
    for hdir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        img_dir, lab_dir = hdir / "imagesTr", hdir / "labelsTr"
        if not img_dir.is_dir() and not lab_dir.is_dir():
            continue
        if not img_dir.is_dir():
            raise DataError(f"hospital folder {hdir} has labelsTr/ but no imagesTr/ folder; put the CT volumes in "
                            f"{img_dir} (same file names as the labels)")
        if not lab_dir.is_dir():
            raise DataError(f"hospital folder {hdir} has imagesTr/ but no labelsTr/ folder; put the infection masks "
                            f"in {lab_dir} (same file names as the images)")
        images, labels = _scan_folder(img_dir, True), _scan_folder(lab_dir, False)
        only_img = sorted(set(images) - set(labels))
        if only_img:
            raise DataError(f"{images[only_img[0]]}: image without label (no {lab_dir}/{only_img[0]}.nii[.gz]"
                            f"{'; also ' + ', '.join(only_img[1:10]) if len(only_img) > 1 else ''}); add the "
                            f"infection mask or remove the image")
        only_lab = sorted(set(labels) - set(images))
        if only_lab:
            raise DataError(f"{labels[only_lab[0]]}: label without image (no {img_dir}/{only_lab[0]}.nii[.gz]"
                            f"{'; also ' + ', '.join(only_lab[1:10]) if len(only_lab) > 1 else ''}); add the CT "
                            f"volume or remove the label")
        if not images:
            raise DataError(f"hospital folder {hdir} has no cases in imagesTr/ and labelsTr/ (*.nii or *.nii.gz); "
                            f"add cases or remove the folder")
        found[hdir.name] = {c: (images[c], labels[c]) for c in sorted(images)}
    if not found:
        raise DataError(f"COVID data root {root} has no hospital folders (<hospital>/imagesTr and "
                        f"<hospital>/labelsTr); {fix}")
    return found


# ------------------------------------------------------------------------------------------ reading
def _load(path: Path, what: str):
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises many types for bad headers / files
        raise DataError(f"{path}: cannot read the COVID {what} ({type(e).__name__}: {e}); the file is corrupt, "
                        f"truncated or not NIfTI -- re-export or re-copy it") from e
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3 or min(shape) < 1:
        raise DataError(f"{path}: the COVID {what} has shape {tuple(img.shape)}, expected a 3-D [X, Y, Z] volume; "
                        f"export one volume per file")
    return img, shape


def _data(img, path: Path, what: str, shape: tuple[int, ...]) -> np.ndarray:
    if not str(path).endswith(".gz"):
        hdr = img.header
        need = int(hdr.get_data_offset()) + int(np.prod(img.shape)) * np.dtype(hdr.get_data_dtype()).itemsize
        if path.stat().st_size < need:
            raise DataError(f"{path}: the COVID {what} is truncated ({path.stat().st_size} bytes, the header needs "
                            f"{need}); re-export or re-copy the file")
    try:
        arr = np.asanyarray(img.dataobj)
    except Exception as e:  # truncated gzip: EOFError / zlib.error / OSError / ValueError
        raise DataError(f"{path}: cannot read the COVID {what} data ({type(e).__name__}: {e}); the file is "
                        f"truncated or corrupt -- re-export or re-copy it") from e
    return np.asarray(arr).reshape(shape)


def read_covid_image(image_path: Path) -> np.ndarray:
    """Validated HU volume (float32 [X, Y, Z]) of one image without label (e.g. for ``fedseg predict``)."""
    image_path = Path(image_path)
    img, shape = _load(image_path, "image")
    x = _data(img, image_path, "image", shape).astype(np.float32, copy=False)
    if not np.all(np.isfinite(x)):
        raise DataError(f"{image_path}: the CT volume contains NaN or infinite values; repair it (e.g. replace NaN "
                        f"by -1024 HU) or remove the case")
    return x


def read_covid_case(image_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated (HU float32 [X, Y, Z], mask uint8 {0, 1} [X, Y, Z], affine 4x4) of one case."""
    image_path, label_path = Path(image_path), Path(label_path)
    img, ishape = _load(image_path, "image")
    lab, lshape = _load(label_path, "label")
    if ishape != lshape:
        raise DataError(f"{image_path} has shape {ishape} but its label {label_path} has {lshape}; image and label "
                        f"must match voxel for voxel -- check that the pair belongs together or resample the label")
    if not np.allclose(img.affine, lab.affine, rtol=1e-4, atol=1e-3):
        raise DataError(f"{image_path} and its label {label_path} have different affines (voxel spacing / "
                        f"orientation / origin: {np.round(img.affine, 3).tolist()} vs "
                        f"{np.round(lab.affine, 3).tolist()}); save the label with the image's header")
    if abs(np.linalg.det(img.affine[:3, :3])) < 1e-9:
        raise DataError(f"{image_path}: the affine is singular (zero voxel spacing); fix the NIfTI header")
    y = _data(lab, label_path, "label", lshape)
    if y.dtype.kind == "b":
        mask = y.astype(np.uint8)
    elif y.dtype.kind in "iuf":
        bad = ~((y == 0) | (y == 1))
        if bad.any():
            values = np.unique(y[bad])[:8].tolist()
            raise DataError(f"{label_path}: the infection mask has values {values} besides 0 and 1; save a binary "
                            f"mask (e.g. label > 0, or pick the infection label of a multi-class file)")
        mask = (y == 1).astype(np.uint8)
    else:
        raise DataError(f"{label_path}: unsupported label dtype {y.dtype}; save integer 0/1 labels")
    x = _data(img, image_path, "image", ishape).astype(np.float32, copy=False)
    if not np.all(np.isfinite(x)):
        raise DataError(f"{image_path}: the CT volume contains NaN or infinite values; repair it (e.g. replace NaN "
                        f"by -1024 HU) or remove the case")
    return x, mask, np.asarray(img.affine, dtype=np.float64)


# ------------------------------------------------------------------------------------------ preprocessing
def resample(arr: np.ndarray, shape: Sequence[int], order: int = 1, antialias: bool = True) -> np.ndarray:
    """``scipy.ndimage.zoom`` of ``arr`` to exactly ``shape`` (float32; ``grid_mode``: voxel areas align).

    With ``antialias`` a Gaussian of sigma ``(1 / factor - 1) / 2`` is applied first along every axis that shrinks.
    """
    from scipy import ndimage

    x = np.asarray(arr, dtype=np.float32)
    shape = tuple(int(s) for s in shape)
    if x.shape == shape:
        return x.copy()
    factors = [o / i for o, i in zip(shape, x.shape)]
    if antialias:
        sigma = [max(0.0, (1.0 / f - 1.0) / 2.0) for f in factors]
        if any(s > 0 for s in sigma):
            x = ndimage.gaussian_filter(x, sigma=sigma, mode="nearest")
    out = ndimage.zoom(x, factors, order=order, mode="nearest", grid_mode=True)
    if out.shape != shape:  # pragma: no cover - zoom rounds round(in * out / in) == out
        raise RuntimeError(f"resampling produced {out.shape}, expected {shape}")
    return out


def resample_mask(mask: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Binary mask to ``shape``: linear (anti-aliased) resampling of the 0/1 mask thresholded at 0.5 (uint8)."""
    return (resample(np.asarray(mask, np.float32), shape, order=1, antialias=True) >= 0.5).astype(np.uint8)


def lung_mask(hu_cube: np.ndarray) -> np.ndarray:
    """Air-like voxels (HU < -500) enclosed by the body (HU > -500) in their axial slice ``[:, :, k]``."""
    from scipy import ndimage

    body = hu_cube > -500.0
    st = np.zeros((3, 3, 3), dtype=bool)
    st[:, :, 1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]  # in-plane connectivity only: slice by slice, one call
    return ndimage.binary_fill_holes(body, structure=st) & ~body


def _intensity(hu_cube: np.ndarray, prep: CovidPreprocessing) -> np.ndarray:
    x = np.clip(hu_cube, prep.hu_min, prep.hu_max)
    if prep.intensity == "window":
        return (x - np.float32(prep.hu_min)) / np.float32(prep.hu_max - prep.hu_min)
    body = x > -500.0
    vals = x[body] if body.any() else x.ravel()
    return (x - np.float32(vals.mean())) / np.float32(max(float(vals.std()), 1e-3))


def preprocess_volume(hu: np.ndarray, prep: CovidPreprocessing) -> tuple[np.ndarray, np.ndarray]:
    """HU volume [X, Y, Z] -> (intensity cube float32 [S, S, S], lung estimate bool [S, S, S])."""
    s = prep.volume_size
    cube_hu = resample(hu, (s, s, s), order=1, antialias=True)
    return _intensity(cube_hu, prep).astype(np.float32, copy=False), lung_mask(cube_hu)


def view_slabs(cube: np.ndarray, view: int, ks: np.ndarray, offsets: Sequence[int]) -> np.ndarray:
    """Slabs ``[len(ks), 5, S, S]`` of view ``view`` (0 xy, 1 yz, 2 xz) at indices ``ks`` (edge-replicated)."""
    axis = VIEW_AXES[VIEWS[view]]
    moved = np.moveaxis(cube, axis, 0)
    d = moved.shape[0]
    idx = np.clip(np.asarray(ks, np.int64)[:, None] + np.asarray(offsets, np.int64)[None, :], 0, d - 1)
    return np.asarray(moved[idx.ravel()]).reshape(idx.shape + moved.shape[1:])


def view_slices(cube: np.ndarray, view: int, ks: np.ndarray) -> np.ndarray:
    """Central slices ``[len(ks), S, S]`` of view ``view`` at indices ``ks``."""
    return np.asarray(np.moveaxis(cube, VIEW_AXES[VIEWS[view]], 0)[np.asarray(ks, np.int64)])


# ------------------------------------------------------------------------------------------ splits
@dataclass
class CovidSplit:
    """Hospital -> part -> case names, the site -> hospital mapping and where the split came from."""

    hospitals: dict[str, dict[str, list[str]]]
    sites: dict[str, str]
    source: str

    def cases(self, hospital: str, part: str) -> list[str]:
        return list(self.hospitals[hospital][part])


def _auto_parts(hospital: str, cases: list[str], fold: int) -> dict[str, list[str]]:
    if len(cases) < N_FOLDS:
        raise DataError(f"hospital {hospital} has {len(cases)} case(s); the automatic {N_FOLDS}-fold split needs at "
                        f"least {N_FOLDS} (every part >= 1 case); add cases or write <root>/split.json")
    rng = np.random.default_rng(np.random.SeedSequence([zlib.crc32(hospital.encode("utf-8")), 0xF01D]))
    order = [cases[i] for i in rng.permutation(len(cases))]
    blocks = np.array_split(np.arange(len(order)), N_FOLDS)
    test, val = set(blocks[fold].tolist()), set(blocks[(fold + 1) % N_FOLDS].tolist())
    return {"train": sorted(order[i] for i in range(len(order)) if i not in test and i not in val),
            "val": sorted(order[i] for i in val), "test": sorted(order[i] for i in test)}


def _default_sites(hospitals: Sequence[str]) -> dict[str, str]:
    return {f"site-{i + 1}": h for i, h in enumerate(sorted(hospitals))}


def load_covid_split(split: str | None, root: Path, found: dict[str, dict[str, tuple[Path, Path]]],
                     fold: int = 0) -> CovidSplit:
    """``split``: None (``<root>/split.json`` if present, else automatic), ``"auto"`` or a path to a split JSON."""
    if split == "paper":
        raise DataError("the COVID data set has no packaged \"paper\" split (the hospitals' data are private); use "
                        "\"split\": \"auto\" (per-hospital 5-fold), null or a path to a split JSON")
    path: Path | None = None
    if split is None:
        cand = Path(root) / "split.json"
        path = cand if cand.is_file() else None
    elif split != "auto":
        path = Path(split)
        if not path.is_file():
            raise DataError(f"COVID split file {path} does not exist; fix the data configuration's \"split\"")
    if path is None:
        parts = {h: _auto_parts(h, list(cases), fold) for h, cases in found.items()}
        return CovidSplit(parts, _default_sites(found), f"automatic {N_FOLDS}-fold split per hospital (fold {fold})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read the COVID split ({e}); fix the JSON") from e
    hosp = data.get("hospitals") if isinstance(data, dict) else None
    if not isinstance(hosp, dict) or not hosp:
        raise DataError(f"{path}: a COVID split needs \"hospitals\": {{\"A\": {{\"train\": [...], \"val\": [...], "
                        f"\"test\": [...]}}, ...}}")
    seen: dict[str, str] = {}
    parts_out: dict[str, dict[str, list[str]]] = {}
    for h, parts in hosp.items():
        if h not in found:
            raise DataError(f"{path}: hospital {h!r} is not a folder of {root} (found: {', '.join(found)}); fix the "
                            f"split or add the folder")
        if not isinstance(parts, dict) or set(parts) - set(_PARTS):
            raise DataError(f"{path}: hospitals[{h!r}] must map parts {list(_PARTS)} to lists of case names")
        parts_out[h] = {}
        for part in _PARTS:
            names = parts.get(part, [])
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise DataError(f"{path}: hospitals[{h!r}][{part!r}] must be a list of case names")
            for n in names:
                if n not in found[h]:
                    raise DataError(f"{path}: case {n!r} of hospital {h} is not in {root / h / 'imagesTr'}; fix the "
                                    f"split or add the case")
                if n in seen:
                    raise DataError(f"{path}: case {n!r} of hospital {h} is listed twice ({seen[n]} and {part}); "
                                    f"each case belongs to one part")
                seen[n] = part
            parts_out[h][part] = sorted(names)
    sites = data.get("sites")
    if sites is None:
        sites = _default_sites(parts_out)
    elif not isinstance(sites, dict) or not all(isinstance(v, str) and v in parts_out for v in sites.values()):
        raise DataError(f"{path}: \"sites\" must map FLARE site names to hospitals of the split "
                        f"({', '.join(parts_out)}), e.g. {{\"site-1\": \"A\"}}")
    return CovidSplit(parts_out, dict(sites), str(path))


def _hospital_for_site(split: CovidSplit, site_name: str, centre: str | None, origin: str) -> str:
    if centre is not None:
        if centre not in split.hospitals:
            raise DataError(f"site {site_name}: \"centre\" {centre!r} (from {origin}) is not a hospital of the split "
                            f"({', '.join(split.hospitals)}); fix the site's data configuration")
        return centre
    if site_name not in split.sites:
        raise DataError(f"site {site_name} has no hospital: the split {split.source} maps "
                        f"{', '.join(f'{s}->{h}' for s, h in split.sites.items())}; set \"centre\" for this site in "
                        f"its data configuration (local/fedseg_data.json) or add it to the split's \"sites\"")
    return split.sites[site_name]


# ------------------------------------------------------------------------------------------ cache
def _hospital_cache(root: Path, hospital: str, cases: dict[str, tuple[Path, Path]], prep: CovidPreprocessing,
                    cache_dir: Path, progress: bool) -> tuple[np.ndarray, np.ndarray, dict[str, Any], Path]:
    names = sorted(cases)
    key = {"dataset": "covid", "root": str(Path(root).resolve()), "hospital": hospital, "cases": names,
           "prep": prep.cache_key(), "format": CACHE_FORMAT_VERSION}
    folder = cache_folder(cache_dir, "covid", hospital, key)
    fingerprint = files_fingerprint(((n, cases[n]) for n in names),
                                    {"format": CACHE_FORMAT_VERSION, "prep": prep.cache_key()})

    def spec(manifest: dict[str, Any]):
        n, s = int(manifest["n"]), int(manifest["volume_size"])
        return {"images": ((n, s, s, s), np.float16), "masks": ((n, s, s, s), np.uint8)}

    def open_fn():
        opened = open_cache(folder, fingerprint, CACHE_FORMAT_VERSION, spec)
        return None if opened is None else (opened[0]["images"], opened[0]["masks"], opened[1])

    def build_fn() -> None:
        _build_hospital_cache(folder, root, hospital, cases, names, prep, fingerprint, progress)

    images, masks, manifest = load_or_build(folder, open_fn, build_fn, "COVID")
    return images, masks, manifest, folder


def _build_hospital_cache(folder: Path, root: Path, hospital: str, cases: dict[str, tuple[Path, Path]],
                          names: list[str], prep: CovidPreprocessing, fingerprint: str, progress: bool) -> None:
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    s = prep.volume_size
    with building_folder(folder) as tmp:
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.float16, shape=(len(names), s, s, s))
        masks = np.lib.format.open_memmap(tmp / "masks.npy", mode="w+", dtype=np.uint8, shape=(len(names), s, s, s))
        records = []
        for row, name in enumerate(tqdm(names, desc=f"covid {hospital} -> {s}^3", unit="vol", disable=not progress)):
            img_path, lab_path = cases[name]
            hu, lab, affine = read_covid_case(img_path, lab_path)
            cube, lung = preprocess_volume(hu, prep)
            mcube = resample_mask(lab, (s, s, s))
            images[row] = cube.astype(np.float16)
            masks[row] = mcube
            zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
            records.append({
                "case": name, "row": row, "image": str(img_path.relative_to(root)),
                "label": str(lab_path.relative_to(root)), "shape": list(hu.shape),
                "spacing_mm": [round(float(z), 5) for z in zooms], "affine": np.round(affine, 6).tolist(),
                "infection_voxels": int(lab.sum()),
                "lung_axial": np.round(lung.mean(axis=(0, 1)), 5).tolist(),
                "infection": {v: mcube.sum(axis=tuple(a for a in range(3) if a != VIEW_AXES[v]),
                                           dtype=np.int64).tolist() for v in VIEWS},
            })
            del hu, lab, cube, lung, mcube
        images.flush()
        masks.flush()
        del images, masks
        manifest = {"format_version": CACHE_FORMAT_VERSION, "fingerprint": fingerprint, "dataset": "covid",
                    "root": str(root), "hospital": hospital, "prep": prep.cache_key(), "n": len(names),
                    "volume_size": s, "build_seconds": round(time.perf_counter() - t0, 3),
                    "build_id": uuid.uuid4().hex, "cases": records}
        write_json_atomic(tmp / "manifest.json", manifest)
    log.info("built COVID cache %s (%d volumes -> %d^3) in %.1f s", folder, len(names), s, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------ dataset
@dataclass
class _Case:
    name: str
    hospital: str
    row: int
    cache_path: Path
    record: dict[str, Any]
    image: Any = None  # [S, S, S] float16 memmap row
    mask: Any = None  # [S, S, S] uint8 memmap row

    def open(self) -> None:
        self.image = np.load(self.cache_path / "images.npy", mmap_mode="r")[self.row]
        self.mask = np.load(self.cache_path / "masks.npy", mmap_mode="r")[self.row]


class _SampleArray:
    """Read-only array-like over the samples (``images``: [N, 3, 5, S, S], ``masks``: [N, 3, S, S], float32)."""

    def __init__(self, ds: Covid25DDataset, which: str) -> None:
        self._ds, self._which = ds, which

    @property
    def shape(self) -> tuple[int, ...]:
        s = self._ds.prep.volume_size
        return (len(self._ds), 3, N_SLICES, s, s) if self._which == "x" else (len(self._ds), 3, s, s)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, key: Any) -> np.ndarray:
        idx = np.arange(len(self._ds))[key]
        x, y = self._ds._gather(np.atleast_1d(idx))
        out = x if self._which == "x" else y
        return out[0] if np.ndim(idx) == 0 else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[np.arange(len(self))]
        return out.astype(dtype, copy=False) if dtype is not None else out


class Covid25DDataset(torch.utils.data.Dataset):
    """2.5D samples of the cases of one site part (or the server's test union); see the module docstring.

    Attributes: ``cases`` (list of case records), ``sample_case`` / ``sample_index`` [N] (case position and cube index
    ``k`` of each sample), ``delta`` float32 [N], ``small`` bool [N], ``nonempty`` bool [N] (axial central mask),
    ``images`` / ``masks`` (lazy array-likes [N, 3, 5, S, S] / [N, 3, S, S]), ``prep``, ``site``, ``centre``,
    ``part``. Hooks: :meth:`batch` (training batches) and :meth:`evaluate` (fused 3-D evaluation per case).
    """

    def __init__(self, cases: list[_Case], prep: CovidPreprocessing, *, site: str | None, centre: str, part: str,
                 origin: str = "") -> None:
        self.cases = cases
        self.prep = prep
        self.site, self.centre, self.part, self.origin = site, centre, part, origin
        s = prep.volume_size
        sc, sk, sn = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for ci, c in enumerate(cases):
            lung = np.asarray(c.record["lung_axial"], np.float64)
            inf = np.stack([np.asarray(c.record["infection"][v], np.int64) for v in VIEWS])  # [3, S]
            keep = np.flatnonzero((lung >= prep.min_lung_fraction) | (inf > 0).any(axis=0))
            sc.append(np.full(keep.size, ci, np.int64))
            sk.append(keep)
            sn.append(inf[0, keep])  # axial (xy) infection pixels of the central slice
        self.sample_case = np.concatenate(sc)
        self.sample_index = np.concatenate(sk)
        counts = np.concatenate(sn)
        _, small, delta = lits_difficulty_from_counts(counts, s, s, base=prep.base, tau=prep.tau)
        self.delta = delta.astype(np.float32)
        self.small = np.asarray(small, bool)
        self.nonempty = counts > 0
        self.images = _SampleArray(self, "x")
        self.masks = _SampleArray(self, "y")

    # ---------------------------------------------------------------- access
    def __len__(self) -> int:
        return int(self.sample_case.size)

    def _gather(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(idx, np.int64).reshape(-1)
        s = self.prep.volume_size
        x = np.empty((idx.size, 3, N_SLICES, s, s), np.float32)
        y = np.empty((idx.size, 3, s, s), np.float32)
        cs, ks = self.sample_case[idx], self.sample_index[idx]
        for ci in np.unique(cs):  # one read per case and view for all of the batch's samples of that case
            rows = np.flatnonzero(cs == ci)
            case = self.cases[int(ci)]
            for v in range(3):
                x[rows, v] = view_slabs(case.image, v, ks[rows], self.prep.offsets)
                y[rows, v] = view_slices(case.mask, v, ks[rows])
        return x, y

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 tensors x [B, 3, 5, S, S] and y [B, 3, S, S] of samples ``idx``."""
        x, y = self._gather(idx)
        return torch.from_numpy(x), torch.from_numpy(y)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if i < 0:
            i += len(self)
        x, y = self._gather(np.array([i]))
        return {"image": torch.from_numpy(x[0]), "mask": torch.from_numpy(y[0]),
                "delta": torch.tensor(self.delta[i], dtype=torch.float32), "small": torch.tensor(bool(self.small[i])),
                "index": i}

    def case_cube(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(intensity cube float32 [S, S, S], mask uint8 [S, S, S]) of case ``i``."""
        c = self.cases[i]
        return np.asarray(c.image, dtype=np.float32), np.asarray(c.mask, dtype=np.uint8)

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, device: torch.device, batch_size: int = 16) -> dict[str, Any]:
        """Fused 3-D evaluation of every case (see :func:`fedseg.volume_inference.predict_volume`).

        ``dice`` = mean over cases of the volumetric Dice of the fused cube prediction, ``n`` = cases;
        ``dice_s`` / ``dice_l`` = mean 2-D Dice of the fused prediction's axial slices whose truth is non-empty and
        small / not small (LiTS rule), ``n_small`` / ``n_large`` those slice counts; ``per_case_dice`` case -> Dice.
        """
        from fedseg.metrics import dice_per_image, summarize_dice
        from fedseg.volume_inference import predict_volume

        s = self.prep.volume_size
        per_case: dict[str, float] = {}
        sd, ss, sn = [], [], []
        for i, case in enumerate(self.cases):
            cube, truth = self.case_cube(i)
            fused, _ = predict_volume(model, cube, self.prep.offsets, device, batch_size, return_probs=False)
            p, t = fused.astype(bool), truth.astype(bool)
            total = int(p.sum()) + int(t.sum())
            per_case[case.name] = 1.0 if total == 0 else 2.0 * int((p & t).sum()) / total
            pa = torch.from_numpy(np.ascontiguousarray(p.transpose(2, 0, 1)))
            ta = torch.from_numpy(np.ascontiguousarray(t.transpose(2, 0, 1)))
            sd.append(dice_per_image(pa, ta).numpy())
            counts = t.sum(axis=(0, 1), dtype=np.int64)
            ss.append(lits_difficulty_from_counts(counts, s, s, base=self.prep.base, tau=self.prep.tau)[1])
            sn.append(counts > 0)
        if not self.cases:
            return {"dice": None, "dice_s": None, "dice_l": None, "n": 0, "n_small": 0, "n_large": 0,
                    "n_slices": 0, "per_case_dice": {}}
        summary = summarize_dice(np.concatenate(sd), np.concatenate(ss), np.concatenate(sn))
        summary["n_slices"] = summary["n"]
        summary["dice"] = float(np.mean(list(per_case.values())))
        summary["n"] = len(self.cases)
        summary["per_case_dice"] = per_case
        return summary

    # ---------------------------------------------------------------- misc
    def summary(self) -> dict[str, Any]:
        n = len(self)
        return {"site": self.site, "centre": self.centre, "part": self.part, "cases": len(self.cases),
                "samples": n, "nonempty": int(self.nonempty.sum()), "small": int(self.small.sum()),
                "small_fraction": float(self.small.mean()) if n else None, "volume_size": self.prep.volume_size}

    def __getstate__(self) -> dict[str, Any]:  # memmaps pickle as copies: reopen from the cache instead
        state = dict(self.__dict__)
        state["cases"] = [_Case(c.name, c.hospital, c.row, c.cache_path, c.record) for c in self.cases]
        del state["images"], state["masks"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        for c in self.cases:
            c.open()
        self.images = _SampleArray(self, "x")
        self.masks = _SampleArray(self, "y")


# ------------------------------------------------------------------------------------------ public loaders
def resolve_covid(source: DataSource, fold: int = 0, progress: bool = False
                  ) -> tuple[Path, dict[str, dict[str, tuple[Path, Path]]], CovidSplit]:
    """Data root (generating the built-in data if needed), its hospitals' cases and the validated split."""
    if source.dataset != "covid":
        raise ConfigError(f"data source for {source.dataset!r} passed to the COVID loader ({source.origin})")
    root = Path(source.root) if source.root is not None else ensure_builtin_covid(progress=progress)
    try:
        found = find_covid_cases(root)
        split = load_covid_split(source.split, root, found, fold)
    except DataError as e:
        raise DataError(f"{e} [data source: {source.origin}]") from e
    return root, found, split


def load_covid_cases(root: Path, found: dict[str, dict[str, tuple[Path, Path]]], selection: dict[str, list[str]],
                     *, prep: CovidPreprocessing, cache_dir: Path, site: str | None, centre: str, part: str,
                     progress: bool = False, origin: str = "") -> Covid25DDataset:
    """Dataset of the cases ``selection`` (hospital -> case names), from the hospitals' cubes (cached)."""
    cases: list[_Case] = []
    for hospital in sorted(selection):
        names = selection[hospital]
        if not names:
            continue
        if hospital not in found:
            raise DataError(f"hospital {hospital!r} is not a folder of {root}; fix the split or the site's centre")
        images, masks, manifest, folder = _hospital_cache(root, hospital, found[hospital], prep, cache_dir, progress)
        by_name = {r["case"]: r for r in manifest["cases"]}
        for name in sorted(names):
            rec = by_name[name]
            cases.append(_Case(name, hospital, int(rec["row"]), folder, rec, images[int(rec["row"])],
                               masks[int(rec["row"])]))
    return Covid25DDataset(cases, prep, site=site, centre=centre, part=part, origin=origin)


def load_covid_site(source: DataSource, site_name: str, part: str, prep: CovidPreprocessing,
                    progress: bool = False) -> Covid25DDataset:
    """``part`` ("train", "val" or "test") of the hospital that ``site_name`` holds (2.5D samples, cached cubes)."""
    if part not in _PARTS:
        raise ConfigError(f"unknown COVID split part {part!r}; parts are {', '.join(_PARTS)}")
    root, found, split = resolve_covid(source, prep.fold, progress)
    hospital = _hospital_for_site(split, site_name, source.centre, source.origin)
    names = split.cases(hospital, part)
    if part == "train" and not names:
        raise DataError(f"site {site_name}: hospital {hospital} has no training cases in the split {split.source}; "
                        f"map the site to another hospital (\"centre\" in its data configuration) or fix the split")
    ds = load_covid_cases(root, found, {hospital: names}, prep=prep, cache_dir=default_cache_dir(source, root),
                          site=site_name, centre=hospital, part=part, progress=progress, origin=source.origin)
    if part == "train" and len(ds) == 0:
        raise DataError(f"site {site_name} (hospital {hospital}, data from {source.origin}): {len(names)} training "
                        f"volume(s) gave no sample with lung >= {prep.min_lung_fraction} of an axial slice; check "
                        f"that the images are chest CT in HU, or lower min_lung_fraction")
    return ds


def load_covid_test(source: DataSource, prep: CovidPreprocessing, progress: bool = False) -> Covid25DDataset:
    """The server's test set: the union of every hospital's test part (centre ``"all"``)."""
    root, found, split = resolve_covid(source, prep.fold, progress)
    selection = {h: split.cases(h, "test") for h in split.hospitals}
    if not any(selection.values()):
        raise DataError(f"the COVID split {split.source} lists no test cases; add \"test\" cases to split.json")
    return load_covid_cases(root, found, selection, prep=prep, cache_dir=default_cache_dir(source, root), site=None,
                            centre="all", part="test", progress=progress, origin=source.origin)


# ------------------------------------------------------------------------------------------ augmentation
def augment_covid_batch(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, p: float = 0.5,
                        scale: float = 0.1, shift: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """In-plane dihedral transforms and intensity jitter of 2.5D batches x [B, 3, 5, S, S], y [B, 3, S, S].

    For each (sample, view) independently: with probability ``p`` one of the 7 non-identity elements of the
    square's symmetry group (rot90 by 1-3 quarter turns, optionally after a flip of the last axis), applied
    identically to the 5 slices of x and to the mask in y (exact: flips / rot90 only, masks stay binary). Then
    per (sample, view) ``x * a + b`` with ``a`` uniform in [1 - scale, 1 + scale], ``b`` uniform in [-shift, shift]
    (intensity units: the [0, 1] window). Randomness only from ``generator``; the same numbers are drawn whatever
    ``p`` is.
    """
    if x.ndim != 5 or y.ndim != 4 or x.shape[:2] != y.shape[:2] or x.shape[-2:] != y.shape[-2:]:
        raise ValueError(f"augment_covid_batch expects x [B, 3, 5, S, S] and y [B, 3, S, S], got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"augment_covid_batch needs square slices, got {tuple(x.shape[-2:])}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    b, v = x.shape[:2]
    gdev = generator.device
    u = torch.rand(4, b, v, generator=generator, device=gdev).to(x.device)
    elem = torch.where(u[0] < p, 1 + (u[1] * 7).long().clamp(max=6), torch.zeros_like(u[1], dtype=torch.long))
    xs, ys = x.clone(), y.clone()
    for e in range(1, 8):
        sel = elem == e
        if not bool(sel.any()):
            continue
        k, flip = e % 4, e >= 4
        xe, ye = x[sel], y[sel]  # [m, 5, S, S], [m, S, S]
        if flip:
            xe, ye = xe.flip(-1), ye.flip(-1)
        xs[sel] = torch.rot90(xe, k, dims=(-2, -1))
        ys[sel] = torch.rot90(ye, k, dims=(-2, -1))
    a = (1.0 + (u[2] * 2 - 1) * scale).to(x.dtype).view(b, v, 1, 1, 1)
    c = ((u[3] * 2 - 1) * shift).to(x.dtype).view(b, v, 1, 1, 1)
    return xs * a + c, ys

