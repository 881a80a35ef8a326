"""LiTS reader: NIfTI volumes -> 2-D tumour slices, FedGS difficulty manifest, on-disk cache, torch Dataset.

Input: ``volume-<i>.nii[.gz]`` + ``segmentation-<i>.nii[.gz]`` anywhere below the data root (labels 0
background, 1 liver, 2 tumour). Arrays are ``[X, Y, Z]``; axial slice ``k`` is ``volume[:, :, k]``.

Per case (volume):

1. The segmentation is read completely and validated (labels in {0, 1, 2}, same shape as the volume).
2. Slices whose tumour (label 2) pixel count is ``>= min_tumour_pixels`` are kept; the mask is ``label == 2``.
3. FedGS difficulty (inverse area, small flag, delta) is computed once per kept slice on the *native*
   tumour mask with :func:`fedseg.difficulty.lits_difficulty_from_counts` (vectorised) and stored in the
   manifest; training reuses it (it is not recomputed on resized or augmented masks).
4. Intensities: HU clipped to ``[hu_min, hu_max]`` and mapped to ``[-1, 1]`` by a fixed affine map
   ``(hu - centre) / half_width`` (not per-volume min-max, so a scanner's calibration stays visible).
5. Resize to ``image_size`` with ``torch.nn.functional.interpolate``: bilinear (antialiased when shrinking)
   for images; for masks the same interpolation of the 0/1 mask thresholded at 0.5 (area-like), so masks
   stay binary. No resize when the native size already matches.

Cache: one folder per (data root, case list, preprocessing, cache format) under the cache folder, holding
``images.npy`` ([N, S, S] float16), ``masks.npy`` ([N, S, S] uint8) and ``manifest.json`` (per-sample
records and a fingerprint of the inputs: file names, sizes, mtimes, preprocessing). Arrays are opened with
``mmap_mode="r"``. The cache is rebuilt when the fingerprint changes and reused otherwise; builders hold an
exclusive ``fcntl`` lock (readers a shared one), build into a temporary folder and rename it into place.

Every bad input raises :class:`fedseg.errors.DataError` naming the file or site and the fix.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedseg.data.cache import (building_folder, cache_folder, files_fingerprint, load_or_build, open_cache,
                               write_json_atomic)
from fedseg.data.config import DataSource, default_cache_dir, ensure_builtin_lits
from fedseg.data.dataset import CachedSegmentationDataset
from fedseg.data.splits import PARTS, Split, centre_for_site, load_split
from fedseg.difficulty import LITS_BASE, LITS_TAU, lits_difficulty_from_counts
from fedseg.errors import ConfigError, DataError

__all__ = ["CACHE_FORMAT_VERSION", "LiTSPreprocessing", "LiTSSliceDataset", "find_lits_cases", "load_lits_site",
           "load_lits_test_centre", "load_lits_cases", "resolve_lits_split", "read_lits_case",
           "tumour_slice_counts"]

log = logging.getLogger("fedseg.data.lits")

#: bump when the cache content or layout changes (old caches are then ignored and rebuilt)
CACHE_FORMAT_VERSION = 1

_VOL_RE = re.compile(r"^volume-(\d+)\.nii(\.gz)?$")
_SEG_RE = re.compile(r"^segmentation-(\d+)\.nii(\.gz)?$")


@dataclass(frozen=True)
class LiTSPreprocessing:
    """How LiTS slices are selected, scaled and resized, and the FedGS difficulty parameters."""

    image_size: int = 512
    hu_min: float = -200.0
    hu_max: float = 200.0
    min_tumour_pixels: int = 50
    base: float = LITS_BASE
    tau: float = LITS_TAU

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 8:
            raise ConfigError(f"LiTS image_size must be an integer >= 8, got {self.image_size!r}")
        if not (math.isfinite(self.hu_min) and math.isfinite(self.hu_max) and self.hu_min < self.hu_max):
            raise ConfigError(f"LiTS HU window needs finite hu_min < hu_max, got [{self.hu_min}, {self.hu_max}]")
        if (isinstance(self.min_tumour_pixels, bool) or not isinstance(self.min_tumour_pixels, int)
                or self.min_tumour_pixels < 0):
            raise ConfigError(f"min_tumour_pixels must be an integer >= 0, got {self.min_tumour_pixels!r}")
        if not (math.isfinite(self.base) and self.base > 0 and self.base != 1):
            raise ConfigError(f"difficulty base must be finite, > 0 and != 1, got {self.base}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ConfigError(f"small-lesion threshold tau must be finite and > 0, got {self.tau}")

    @property
    def hu_centre(self) -> float:
        return 0.5 * (self.hu_min + self.hu_max)

    @property
    def hu_half_width(self) -> float:
        return 0.5 * (self.hu_max - self.hu_min)

    def scale(self, hu: np.ndarray) -> np.ndarray:
        """Fixed intensity map: clip to [hu_min, hu_max], then (hu - centre) / half_width in [-1, 1] (float32)."""
        x = np.clip(np.asarray(hu, dtype=np.float32), self.hu_min, self.hu_max)
        return (x - np.float32(self.hu_centre)) / np.float32(self.hu_half_width)

    def to_json(self) -> dict[str, Any]:
        return {k: (float(v) if isinstance(v, float) else v) for k, v in asdict(self).items()}


# ------------------------------------------------------------------------------------------ discovery
def find_lits_cases(root: Path) -> dict[int, tuple[Path, Path]]:
    """Case id -> (volume path, segmentation path) for every ``volume-<i>.nii[.gz]`` below ``root``.

    Hidden folders (such as the ``.fedseg_cache``) are skipped. DataError for a missing or empty root, a
    volume without segmentation (or the reverse), or the same id found twice.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"LiTS data root {root} does not exist; point the site's data configuration "
                        f"(local/fedseg_data.json or $FEDSEG_DATA_CONFIG) at the folder with the LiTS NIfTI files")
    if not root.is_dir():
        raise DataError(f"LiTS data root {root} is not a folder; point \"root\" at the folder that holds "
                        f"volume-<i>.nii[.gz] and segmentation-<i>.nii[.gz]")
    vols: dict[int, Path] = {}
    segs: dict[int, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            for regex, found in ((_VOL_RE, vols), (_SEG_RE, segs)):
                m = regex.match(name)
                if m:
                    i = int(m.group(1))
                    path = Path(dirpath) / name
                    if i in found:
                        raise DataError(f"LiTS case {i} appears twice: {found[i]} and {path}; keep one copy "
                                        f"(e.g. remove the uncompressed or the .gz duplicate)")
                    found[i] = path
    only_vol = sorted(set(vols) - set(segs))
    if only_vol:
        i = only_vol[0]
        raise DataError(f"{vols[i]}: volume without segmentation (no segmentation-{i}.nii[.gz] below {root}"
                        f"{'; also cases ' + str(only_vol[1:10]) if len(only_vol) > 1 else ''}); add the "
                        f"segmentation file or remove the volume")
    only_seg = sorted(set(segs) - set(vols))
    if only_seg:
        i = only_seg[0]
        raise DataError(f"{segs[i]}: segmentation without volume (no volume-{i}.nii[.gz] below {root}"
                        f"{'; also cases ' + str(only_seg[1:10]) if len(only_seg) > 1 else ''}); add the "
                        f"volume file or remove the segmentation")
    if not vols:
        raise DataError(f"LiTS data root {root} contains no cases (volume-<i>.nii[.gz] with "
                        f"segmentation-<i>.nii[.gz]); copy the LiTS training batches there, or generate data with "
                        f"`fedseg data synth lits --out {root}`")
    return {i: (vols[i], segs[i]) for i in sorted(vols)}


# ------------------------------------------------------------------------------------------ reading
def _load_nifti(path: Path, what: str):
    import nibabel as nib

    try:
        return nib.load(str(path))
    except Exception as e:  # nibabel raises many types for bad headers / files
        raise DataError(f"{path}: cannot read LiTS {what} ({type(e).__name__}: {e}); the file is corrupt, "
                        f"truncated or not NIfTI -- re-download or re-extract it") from e


def _read_full(img, path: Path, what: str) -> np.ndarray:
    try:
        return np.asarray(img.dataobj)
    except Exception as e:  # truncated gzip: EOFError / zlib.error / OSError / ValueError
        raise DataError(f"{path}: cannot read the LiTS {what} data ({type(e).__name__}: {e}); the file is "
                        f"truncated or corrupt -- re-download or re-extract it") from e


def _check_uncompressed_size(img, path: Path, what: str) -> None:
    if str(path).endswith(".gz"):
        return
    hdr = img.header
    expected = int(hdr.get_data_offset()) + int(np.prod(img.shape)) * np.dtype(hdr.get_data_dtype()).itemsize
    size = path.stat().st_size
    if size < expected:
        raise DataError(f"{path}: LiTS {what} is truncated ({size} bytes, the header needs {expected}); "
                        f"re-download or re-copy the file")


def _check_labels(seg: np.ndarray, path: Path) -> None:
    if seg.dtype.kind in "iu":
        bad = (seg < 0) | (seg > 2)
    elif seg.dtype.kind == "f":
        bad = ~((seg == 0) | (seg == 1) | (seg == 2))
    elif seg.dtype.kind == "b":
        return
    else:
        raise DataError(f"{path}: segmentation has unsupported dtype {seg.dtype}; save integer labels 0/1/2")
    if bad.any():
        values = np.unique(seg[bad])[:10].tolist()
        raise DataError(f"{path}: segmentation has labels {values} outside {{0, 1, 2}} (LiTS: 0 background, "
                        f"1 liver, 2 tumour); fix or re-export the segmentation")


@dataclass
class _CaseSlices:
    case_id: int
    shape: tuple[int, int, int]
    slice_index: np.ndarray  # [n] int
    tumour_pixels: np.ndarray  # [n] int64
    images_hu: np.ndarray  # [n, X, Y] float32 HU
    masks: np.ndarray  # [n, X, Y] bool


def tumour_slice_counts(seg_path: Path) -> tuple[tuple[int, int, int], np.ndarray]:
    """Read and validate a segmentation; return (shape, tumour pixels per axial slice [Z])."""
    seg_img = _load_nifti(seg_path, "segmentation")
    if len(seg_img.shape) != 3:
        raise DataError(f"{seg_path}: segmentation has shape {seg_img.shape}, expected a 3-D [X, Y, Z] volume")
    seg = _read_full(seg_img, seg_path, "segmentation")
    _check_labels(seg, seg_path)
    return tuple(int(s) for s in seg.shape), (seg == 2).sum(axis=(0, 1), dtype=np.int64)


def read_lits_case(case_id: int, vol_path: Path, seg_path: Path, min_tumour_pixels: int) -> _CaseSlices:
    """Validated tumour slices of one case (HU images and binary tumour masks at native resolution).

    The whole segmentation is read and checked (labels, shape); a ``.nii.gz`` volume is read completely (so a
    truncated file is detected), an uncompressed one only over the tumour slab after a file-size check. NaN /
    inf is checked on the slices that are used.
    """
    vol_img = _load_nifti(vol_path, "volume")
    seg_img = _load_nifti(seg_path, "segmentation")
    if len(vol_img.shape) != 3:
        raise DataError(f"{vol_path}: volume has shape {vol_img.shape}, expected a 3-D [X, Y, Z] CT volume")
    if tuple(vol_img.shape) != tuple(seg_img.shape):
        raise DataError(f"{vol_path} has shape {tuple(vol_img.shape)} but {seg_path} has "
                        f"{tuple(seg_img.shape)}; volume and segmentation must match voxel for voxel -- check "
                        f"that the pair belongs together")
    seg = _read_full(seg_img, seg_path, "segmentation")
    _check_labels(seg, seg_path)
    counts = (seg == 2).sum(axis=(0, 1), dtype=np.int64)
    sel = np.flatnonzero(counts >= min_tumour_pixels)
    shape = tuple(int(s) for s in vol_img.shape)
    if sel.size == 0:
        _check_uncompressed_size(vol_img, vol_path, "volume")
        if str(vol_path).endswith(".gz"):
            _read_full(vol_img, vol_path, "volume")  # still detect a truncated / corrupt volume
        empty = np.zeros((0, shape[0], shape[1]), dtype=np.float32)
        return _CaseSlices(case_id, shape, sel, counts[sel], empty, empty.astype(bool))
    z0, z1 = int(sel[0]), int(sel[-1]) + 1
    if str(vol_path).endswith(".gz"):
        vol = _read_full(vol_img, vol_path, "volume")[:, :, z0:z1]  # gzip is sequential: read it all once
    else:
        _check_uncompressed_size(vol_img, vol_path, "volume")
        try:
            vol = np.asarray(vol_img.dataobj[:, :, z0:z1])
        except Exception as e:
            raise DataError(f"{vol_path}: cannot read the LiTS volume data ({type(e).__name__}: {e}); the file "
                            f"is truncated or corrupt -- re-download or re-extract it") from e
    vol = vol[:, :, sel - z0].astype(np.float32, copy=False)
    if vol.dtype.kind == "f" and not np.all(np.isfinite(vol)):
        bad = int(sel[int(np.flatnonzero(~np.isfinite(vol).reshape(-1, vol.shape[2]).all(0))[0])])
        raise DataError(f"{vol_path}: volume contains NaN or infinite values (first in slice {bad}); repair the "
                        f"file (e.g. replace NaN by -1024 HU) or exclude the case from the split")
    images = np.ascontiguousarray(vol.transpose(2, 0, 1))
    masks = np.ascontiguousarray((seg[:, :, sel] == 2).transpose(2, 0, 1))
    return _CaseSlices(case_id, shape, sel, counts[sel], images, masks)


def _resize(images: np.ndarray, masks: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """[n, H, W] float32 images / bool masks -> [n, size, size] float16 images, uint8 {0,1} masks."""
    n, h, w = images.shape
    if (h, w) == (size, size):
        return images.astype(np.float16), masks.astype(np.uint8)
    import torch.nn.functional as F

    down = size < max(h, w)
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]
        xi = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=down)
        m = torch.from_numpy(masks.astype(np.float32))[:, None]
        mi = F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False, antialias=down) >= 0.5
    return xi[:, 0].numpy().astype(np.float16), mi[:, 0].numpy().astype(np.uint8)


# ------------------------------------------------------------------------------------------ dataset
class LiTSSliceDataset(CachedSegmentationDataset):
    """2-D LiTS tumour slices of one site part (or the test centre), backed by the on-disk cache.

    Attributes: ``images`` [N, S, S] float16 (memmap, already scaled), ``masks`` [N, S, S] uint8 {0, 1},
    ``manifest`` (one dict per sample), ``delta`` float32 [N], ``small`` bool [N], ``nonempty`` bool [N]
    (the resized mask has a tumour pixel), ``site``, ``centre``, ``part``, ``cache_path``, ``prep``.
    Samples and :meth:`tensors` carry one image channel ([1, S, S]); see
    :class:`~fedseg.data.dataset.CachedSegmentationDataset`.
    """

    def __init__(self, images: np.ndarray, masks: np.ndarray, manifest: list[dict[str, Any]], *,
                 site: str | None, centre: str, part: str, prep: LiTSPreprocessing,
                 cache_path: Path | None = None, origin: str = "") -> None:
        if images.shape != masks.shape or images.ndim != 3 or len(manifest) != images.shape[0]:
            raise DataError(f"LiTS cache {cache_path}: images {images.shape}, masks {masks.shape} and "
                            f"{len(manifest)} manifest records disagree; delete the cache folder to rebuild it")
        super().__init__(images, masks, manifest, site=site, centre=centre, part=part, prep=prep,
                         cache_path=cache_path, origin=origin)

    def summary(self) -> dict[str, Any]:
        n = len(self)
        return {"site": self.site, "centre": self.centre, "part": self.part, "slices": n,
                "volumes": len({r["case_id"] for r in self.manifest}),
                "small": int(self.small.sum()), "small_fraction": float(self.small.mean()) if n else None,
                "cache": str(self.cache_path) if self.cache_path else None}

    # memmaps pickle as full copies; send the cache folder instead (DataLoader workers with spawn)
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.cache_path is not None and isinstance(self.images, np.memmap):
            state["images"] = None
            state["masks"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.images is None:
            self.images = np.load(self.cache_path / "images.npy", mmap_mode="r")
            self.masks = np.load(self.cache_path / "masks.npy", mmap_mode="r")


# ------------------------------------------------------------------------------------------ cache
def _fingerprint(cases: dict[int, tuple[Path, Path]], ids: list[int], prep: LiTSPreprocessing) -> str:
    return files_fingerprint(((i, cases[i]) for i in ids), {"format": CACHE_FORMAT_VERSION, "prep": prep.to_json()})


def _cache_folder(cache_dir: Path, root: Path, ids: list[int], centre: str, part: str,
                  prep: LiTSPreprocessing) -> Path:
    key = {"dataset": "lits", "root": str(root.resolve()), "ids": ids, "prep": prep.to_json(),
           "format": CACHE_FORMAT_VERSION}
    return cache_folder(cache_dir, "lits", f"{centre}_{part}", key)


def _open_cache(folder: Path, fingerprint: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]] | None:
    def spec(manifest: dict[str, Any]):
        n, s = int(manifest["n"]), int(manifest["image_size"])
        return {"images": ((n, s, s), np.float16), "masks": ((n, s, s), np.uint8)}

    opened = open_cache(folder, fingerprint, CACHE_FORMAT_VERSION, spec)
    if opened is None:
        return None
    arrays, manifest = opened
    return arrays["images"], arrays["masks"], manifest


def _build_cache(folder: Path, cases: dict[int, tuple[Path, Path]], ids: list[int], root: Path, centre: str,
                 part: str, prep: LiTSPreprocessing, fingerprint: str, progress: bool) -> dict[str, Any]:
    """Read the cases, write images/masks/manifest into a temporary folder, rename it to ``folder``."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    with building_folder(folder) as tmp:
        s = prep.image_size
        records: list[dict[str, Any]] = []
        chunks: list[tuple[Path, Path, int]] = []
        empty_cases: list[int] = []
        for case_id in tqdm(ids, desc=f"lits {centre}/{part}", unit="vol", disable=not progress):
            vol_path, seg_path = cases[case_id]
            cs = read_lits_case(case_id, vol_path, seg_path, prep.min_tumour_pixels)
            n = int(cs.slice_index.size)
            if n == 0:
                empty_cases.append(case_id)
                continue
            h, w = cs.shape[0], cs.shape[1]
            a_inv, small, delta = lits_difficulty_from_counts(cs.tumour_pixels, h, w, base=prep.base, tau=prep.tau)
            imgs, msks = _resize(prep.scale(cs.images_hu), cs.masks, s)
            mask_pixels = msks.reshape(n, -1).sum(axis=1, dtype=np.int64)
            ci, cm = tmp / f"chunk-{case_id}-img.npy", tmp / f"chunk-{case_id}-mask.npy"
            np.save(ci, imgs)
            np.save(cm, msks)
            chunks.append((ci, cm, n))
            for j in range(n):
                ai = float(a_inv[j])
                records.append({
                    "site": None, "centre": centre, "split": part, "case_id": int(case_id),
                    "slice_index": int(cs.slice_index[j]), "tumour_pixels": int(cs.tumour_pixels[j]),
                    "height": int(h), "width": int(w), "inverse_area": ai if math.isfinite(ai) else None,
                    "small": bool(small[j]), "delta": float(delta[j]), "mask_pixels": int(mask_pixels[j]),
                    "volume": vol_path.name,
                })
        total = len(records)
        if total == 0:
            np.save(tmp / "images.npy", np.zeros((0, s, s), dtype=np.float16))
            np.save(tmp / "masks.npy", np.zeros((0, s, s), dtype=np.uint8))
        else:
            images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.float16, shape=(total, s, s))
            masks = np.lib.format.open_memmap(tmp / "masks.npy", mode="w+", dtype=np.uint8, shape=(total, s, s))
            off = 0
            for ci, cm, n in chunks:
                images[off:off + n] = np.load(ci)
                masks[off:off + n] = np.load(cm)
                ci.unlink()
                cm.unlink()
                off += n
            images.flush()
            masks.flush()
            del images, masks
        manifest = {
            "format_version": CACHE_FORMAT_VERSION, "fingerprint": fingerprint, "dataset": "lits",
            "root": str(root), "centre": centre, "part": part, "case_ids": ids, "prep": prep.to_json(),
            "n": total, "image_size": s, "volumes_read": len(ids), "volumes_without_tumour_slices": empty_cases,
            "build_seconds": round(time.perf_counter() - t0, 3), "build_id": uuid.uuid4().hex, "samples": records,
        }
        write_json_atomic(tmp / "manifest.json", manifest)
    log.info("built LiTS cache %s (%d slices from %d volumes) in %.1f s", folder, total, len(ids),
             time.perf_counter() - t0)
    return manifest


def load_lits_cases(root: Path, cases: dict[int, tuple[Path, Path]], ids: list[int], *, centre: str, part: str,
                    site: str | None, prep: LiTSPreprocessing, cache_dir: Path, progress: bool = False,
                    origin: str = "") -> LiTSSliceDataset:
    """Dataset of the tumour slices of ``ids`` (cached; built on first use or when the inputs change)."""
    ids = sorted(int(i) for i in ids)
    missing = [i for i in ids if i not in cases]
    if missing:
        raise DataError(f"LiTS cases {missing[:20]} are not in {root}; add the files or fix the split")
    folder = _cache_folder(cache_dir, root, ids, centre, part, prep)
    fingerprint = _fingerprint(cases, ids, prep)
    opened = load_or_build(
        folder, lambda: _open_cache(folder, fingerprint),
        lambda: _build_cache(folder, cases, ids, root, centre, part, prep, fingerprint, progress), "LiTS")
    images, masks, manifest = opened
    records = manifest["samples"]
    for r in records:
        r["site"] = site
    return LiTSSliceDataset(images, masks, records, site=site, centre=centre, part=part, prep=prep,
                            cache_path=folder, origin=origin)


# ------------------------------------------------------------------------------------------ public loaders
def resolve_lits_split(source: DataSource, progress: bool = False
                       ) -> tuple[Path, dict[int, tuple[Path, Path]], Split]:
    """Data root (generating the built-in data if needed), its cases and the validated split."""
    if source.dataset != "lits":
        raise ConfigError(f"data source for {source.dataset!r} passed to the LiTS loader ({source.origin})")
    root = Path(source.root) if source.root is not None else ensure_builtin_lits(progress=progress)
    try:
        cases = find_lits_cases(root)
    except DataError as e:
        raise DataError(f"{e} [data source: {source.origin}]") from e
    split = load_split(source.split, root, list(cases))
    return root, cases, split


def _check_part(part: str) -> str:
    if part not in PARTS:
        raise ConfigError(f"unknown split part {part!r}; parts are {', '.join(PARTS)}")
    return part


def load_lits_site(source: DataSource, site_name: str, part: str, prep: LiTSPreprocessing,
                   progress: bool = False) -> LiTSSliceDataset:
    """The tumour slices of ``part`` ("train", "val" or "test") of the centre that ``site_name`` holds.

    DataError when the train part is empty or yields no tumour slice (with the number of volumes read and
    the ``min_tumour_pixels`` setting). An empty val/test part gives an empty dataset.
    """
    _check_part(part)
    root, cases, split = resolve_lits_split(source, progress)
    centre = centre_for_site(split, site_name, source.centre)
    ids = split.ids(centre, part)
    if part == "train" and not ids:
        raise DataError(f"site {site_name}: centre {centre} has no training cases in the split {split.source}; "
                        f"map the site to a training centre (\"centre\" in its data configuration)")
    cache_dir = default_cache_dir(source, root)
    ds = load_lits_cases(root, cases, ids, centre=centre, part=part, site=site_name, prep=prep,
                         cache_dir=cache_dir, progress=progress, origin=source.origin)
    if part == "train" and len(ds) == 0:
        raise DataError(f"site {site_name} (centre {centre}, data from {source.origin}): read {len(ids)} volume(s) "
                        f"from {root} and found no slice with >= {prep.min_tumour_pixels} tumour (label 2) pixels; "
                        f"check the segmentations or lower min_tumour_pixels")
    return ds


def load_lits_test_centre(source: DataSource, prep: LiTSPreprocessing, progress: bool = False) -> LiTSSliceDataset:
    """The tumour slices of the split's test centre ("test" part), for the server-side evaluation."""
    root, cases, split = resolve_lits_split(source, progress)
    if split.test_centre is None:
        raise DataError(f"the split {split.source} has no test centre; use a split with \"test_centre\" (e.g. "
                        f"\"paper\") for server-side testing")
    ids = split.ids(split.test_centre, "test")
    if not ids:
        raise DataError(f"test centre {split.test_centre} of the split {split.source} lists no test cases")
    cache_dir = default_cache_dir(source, root)
    ds = load_lits_cases(root, cases, ids, centre=split.test_centre, part="test", site=None, prep=prep,
                         cache_dir=cache_dir, progress=progress, origin=source.origin)
    if len(ds) == 0:
        raise DataError(f"test centre {split.test_centre} (data from {source.origin}): {len(ids)} volume(s) read "
                        f"from {root}, none has a slice with >= {prep.min_tumour_pixels} tumour pixels")
    return ds
