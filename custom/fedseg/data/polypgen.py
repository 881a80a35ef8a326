"""PolypGen reader: JPEG frames + masks of six centres, 5-fold splits, FedGS difficulty manifest, cache, Dataset.

Input layout (the public PolypGen release; the data root may also be one or two folders above the ``data_C<n>``
folders, e.g. ``PolypGen2021_MultiCenterData_v3/``)::

    data_C<n>/images_C<n>/<stem>.jpg         RGB frame (.jpg/.jpeg/.png/.tif/.tiff also accepted)
    data_C<n>/masks_C<n>/<stem>_mask.jpg     lesion mask, same size (any of those extensions)

Per image (computed once per centre and cached):

1. The frame is decoded with PIL and converted to RGB; the mask to grey (``max`` over colour channels, so a
   coloured mask counts too). Image and mask must have the same size.
2. Mask binarisation: lesion = ``gray > mask_threshold`` (default 127: JPEG masks are 0/255 plus compression
   artefacts). The mask must be binary *up to JPEG artefacts*; the rule (:func:`check_mask_binary`):
   mid-grey pixels (gray 64..191) are allowed within ``EDGE_BAND_PX`` = 4 px (Chebyshev) of the thresholded
   lesion boundary -- where JPEG ringing and anti-aliasing put them -- and at most
   ``MAX_STRAY_GREY_FRACTION`` = 0.5 % of the mask's pixels may be mid-grey elsewhere. A probability map, a
   soft mask or a photo saved as mask fails. A mask whose values are all <= the threshold but that has
   non-zero pixels on >= 0.1 % of its area (e.g. a 0/1 label PNG, or lesion drawn in dark grey) fails too,
   instead of silently becoming an empty mask.
3. FedGS difficulty with :func:`fedseg.difficulty.polypgen_difficulty` (blob-based small flag, ``base``,
   ``tau``) on the *native-resolution* binary mask, stored in the manifest (never recomputed on resized or
   augmented masks).
4. Colours scaled to [0, 1], resized to ``image_size`` x ``image_size`` (aspect not kept, as in the paper)
   with PIL's bilinear filter on float32 channels (antialiased when shrinking), then ImageNet-normalised
   ``(x - mean) / std``; stored as float16 [3, S, S]. Masks: area (box) average of the 0/1 mask when shrinking,
   bilinear when enlarging, then ``>= 0.5``; stored as uint8 {0, 1}. No resize when the size already matches.

Splits: centres 1-5 train/validate with ``n_folds``-fold cross-validation per centre, centre 6 is the test set.
A split is a data file (:func:`load_polypgen_split`)::

    {"dataset": "polypgen", "n_folds": 5,
     "centres": {"centre-1": {"folds": [["stem", ...], ... 5 lists], "excluded": ["stem"]},
                 "centre-6": {"test": ["stem", ...]}},
     "sites": {"site-1": "centre-1"}, "test_centre": "centre-6"}

``<root>/split.json`` is used when present (the generator writes one); otherwise an automatic split is written
once to ``<cache_dir>/polypgen_split.json`` and reused (:func:`automatic_polypgen_split`: the sorted stems of
each centre cut into ``n_folds`` contiguous blocks, like scikit-learn's unshuffled ``KFold`` used by the FedGS
reference code, which keeps consecutive frames of one patient/video mostly in one fold). Fold ``k`` of a
site: validation = its centre's fold ``k``, training = the other folds. Every image of a centre must be in
exactly one fold (or ``test``, or the explicit ``excluded`` list): nothing is silently dropped.

Cache: one folder per (data root, centre, image list, preprocessing, difficulty estimator version) --
independent of the fold, so the five folds of a cross-validation share it -- with ``images.npy``
[N, 3, S, S] float16, ``masks.npy`` [N, S, S] uint8 and ``manifest.json`` (records + fingerprint of file
names, sizes, mtimes and preprocessing), built under an ``fcntl`` lock and reused while the fingerprint
matches (:mod:`fedseg.data.cache`). A site's dataset is a row view of its centre's cache (no copy).

Every bad input raises :class:`fedseg.errors.DataError` naming the file or centre and the fix.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedseg.data.cache import (RowView, building_folder, cache_folder, files_fingerprint, load_or_build,
                               open_cache, write_json_atomic)
from fedseg.data.config import DataSource, default_cache_dir, ensure_builtin_polypgen, file_lock
from fedseg.data.dataset import CachedSegmentationDataset
from fedseg.data.splits import centre_for_site, parse_site_map
from fedseg.difficulty import POLYPGEN_BASE, POLYPGEN_TAU
from fedseg.errors import ConfigError, DataError

__all__ = [
    "CACHE_FORMAT_VERSION", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "MID_GREY", "EDGE_BAND_PX",
    "MAX_STRAY_GREY_FRACTION", "LABEL_LIKE_FRACTION", "DEFAULT_TEST_CENTRE", "PolypGenPreprocessing",
    "PolypGenDataset", "PolypGenSplit", "find_polypgen_centres", "centre_name", "centre_number",
    "read_polypgen_image", "read_polypgen_mask", "check_mask_binary", "load_polypgen_split",
    "automatic_polypgen_split", "resolve_polypgen", "load_polypgen_centre", "load_polypgen_site",
    "load_polypgen_test_centre", "polypgen_split_to_json", "require_centre",
]

log = logging.getLogger("fedseg.data.polypgen")

#: bump when the cache content or layout changes (old caches are then ignored and rebuilt)
CACHE_FORMAT_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
#: grey values that are neither clearly background nor clearly lesion
MID_GREY = (64, 191)
#: mid-grey pixels within this many pixels (Chebyshev) of the thresholded boundary are JPEG/anti-alias artefacts
EDGE_BAND_PX = 4
#: allowed fraction of a mask's pixels that are mid-grey outside the edge band
MAX_STRAY_GREY_FRACTION = 0.005
#: a mask with nothing above the threshold but non-zero pixels on at least this fraction is rejected
LABEL_LIKE_FRACTION = 0.001
DEFAULT_TEST_CENTRE = "centre-6"
_IGNORED_FILES = {"thumbs.db", "desktop.ini"}
_CENTRE_DIR_RE = re.compile(r"^data_C(\d+)$")
_CENTRE_NAME_RE = re.compile(r"^centre-(\d+)$")
_MAX_SEARCH_DEPTH = 3


# ------------------------------------------------------------------------------------------ preprocessing
@dataclass(frozen=True)
class PolypGenPreprocessing:
    """Resize, mask threshold, fold selection and FedGS difficulty parameters (ImageNet mean/std)."""

    image_size: int = 512
    fold: int = 0
    n_folds: int = 5
    mask_threshold: int = 127  # JPEG masks: lesion = gray > threshold
    base: float = POLYPGEN_BASE
    tau: float = POLYPGEN_TAU

    def __post_init__(self) -> None:
        def is_int(v: Any) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        if not is_int(self.image_size) or self.image_size < 8:
            raise ConfigError(f"PolypGen image_size must be an integer >= 8, got {self.image_size!r}")
        if not is_int(self.n_folds) or self.n_folds < 2:
            raise ConfigError(f"PolypGen n_folds must be an integer >= 2, got {self.n_folds!r}")
        if not is_int(self.fold) or not 0 <= self.fold < self.n_folds:
            raise ConfigError(f"PolypGen fold must be an integer in 0..{self.n_folds - 1} (n_folds = {self.n_folds}), "
                              f"got {self.fold!r}")
        if not is_int(self.mask_threshold) or not 0 <= self.mask_threshold <= 254:
            raise ConfigError(f"PolypGen mask_threshold must be an integer in 0..254, got {self.mask_threshold!r}")
        if not (math.isfinite(self.base) and self.base > 0 and self.base != 1):
            raise ConfigError(f"difficulty base must be finite, > 0 and != 1, got {self.base}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ConfigError(f"small-polyp threshold tau must be finite and > 0, got {self.tau}")

    def to_json(self) -> dict[str, Any]:
        return {k: (float(v) if isinstance(v, float) else int(v)) for k, v in asdict(self).items()}

    def cache_key(self) -> dict[str, Any]:
        """The settings that change the cached arrays and manifest (not the fold selection)."""
        return {"image_size": int(self.image_size), "mask_threshold": int(self.mask_threshold),
                "base": float(self.base), "tau": float(self.tau), "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD)}


# ------------------------------------------------------------------------------------------ discovery
def centre_name(n: int) -> str:
    """``3 -> "centre-3"`` (the split's name for ``data_C3``)."""
    return f"centre-{int(n)}"


def centre_number(name: str) -> int:
    """``"centre-3" -> 3``; DataError for other names."""
    m = _CENTRE_NAME_RE.match(str(name))
    if not m:
        raise DataError(f"PolypGen centre names are 'centre-<n>' (data_C<n> on disk), got {name!r}")
    return int(m.group(1))


def _find_centre_dirs(root: Path) -> dict[int, Path]:
    found: dict[int, Path] = {}

    def visit(folder: Path, depth: int) -> None:
        try:
            entries = sorted(folder.iterdir())
        except OSError as e:
            raise DataError(f"cannot list {folder} ({e}); check the PolypGen data root and its permissions") from e
        for p in entries:
            if p.name.startswith(".") or not p.is_dir():
                continue
            m = _CENTRE_DIR_RE.match(p.name)
            if m:
                n = int(m.group(1))
                if n in found:
                    raise DataError(f"PolypGen centre {n} appears twice: {found[n]} and {p}; keep one copy below "
                                    f"{root}")
                found[n] = p
            elif depth < _MAX_SEARCH_DEPTH and not p.name.startswith(("images_C", "masks_C")):
                visit(p, depth + 1)

    visit(root, 1)
    return found


def _list_files(folder: Path) -> list[Path]:
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.name.lower() in _IGNORED_FILES:
            continue
        if p.is_dir():
            raise DataError(f"{p}: unexpected folder inside {folder.name}/ (PolypGen centre folders hold image files "
                            f"only); move it out of {folder}")
        out.append(p)
    return out


def _scan_centre(n: int, folder: Path) -> list[tuple[Path, Path]]:
    img_dir, mask_dir = folder / f"images_C{n}", folder / f"masks_C{n}"
    for d, what in ((img_dir, "images"), (mask_dir, "masks")):
        if not d.is_dir():
            raise DataError(f"centre-{n}: {folder} has no {d.name}/ folder; a PolypGen centre folder holds "
                            f"images_C{n}/<stem>.jpg and masks_C{n}/<stem>_mask.jpg ({what} missing)")
    images: dict[str, Path] = {}
    for p in _list_files(img_dir):
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DataError(f"{p}: not an image file ({', '.join(IMAGE_EXTENSIONS)}) in the centre-{n} images "
                            f"folder; move it out of {img_dir}")
        if p.stem.endswith("_mask"):
            raise DataError(f"{p}: a mask file in the images folder of centre-{n}; move it to {mask_dir}")
        if p.stem in images:
            raise DataError(f"centre-{n}: image {p.stem!r} exists twice ({images[p.stem].name} and {p.name}); keep "
                            f"one of them")
        images[p.stem] = p
    masks: dict[str, Path] = {}
    for p in _list_files(mask_dir):
        if p.suffix.lower() not in IMAGE_EXTENSIONS or not p.stem.endswith("_mask"):
            raise DataError(f"{p}: masks of centre-{n} must be named <image stem>_mask.<ext> with ext one of "
                            f"{', '.join(IMAGE_EXTENSIONS)}; rename or move the file out of {mask_dir}")
        stem = p.stem[: -len("_mask")]
        if stem in masks:
            raise DataError(f"centre-{n}: mask {p.stem!r} exists twice ({masks[stem].name} and {p.name}); keep one")
        masks[stem] = p
    only_img = sorted(set(images) - set(masks))
    if only_img:
        more = f" (and {len(only_img) - 1} more: {', '.join(only_img[1:6])}...)" if len(only_img) > 1 else ""
        raise DataError(f"{images[only_img[0]]}: image without mask in centre-{n} (expected "
                        f"{mask_dir / (only_img[0] + '_mask.jpg')}){more}; add the mask or remove the image")
    only_mask = sorted(set(masks) - set(images))
    if only_mask:
        more = f" (and {len(only_mask) - 1} more)" if len(only_mask) > 1 else ""
        raise DataError(f"{masks[only_mask[0]]}: mask without image in centre-{n} (expected "
                        f"{img_dir / (only_mask[0] + '.jpg')}){more}; add the image or remove the mask")
    if not images:
        raise DataError(f"centre-{n}: {img_dir} contains no images; copy the centre's frames there "
                        f"(<stem>.jpg with masks_C{n}/<stem>_mask.jpg) or remove {folder}")
    return [(images[s], masks[s]) for s in sorted(images)]


def find_polypgen_centres(root: Path) -> dict[int, list[tuple[Path, Path]]]:
    """Centre number -> sorted ``(image, mask)`` pairs of every ``data_C<n>`` folder at or below ``root``.

    ``data_C<n>`` may sit directly in ``root`` or up to two folders deeper (hidden folders are skipped).
    DataError for a missing/empty root, a centre found twice, a centre folder without ``images_C<n>`` /
    ``masks_C<n>`` or without images, an image without mask or a mask without image, a duplicate stem, or a
    file that is not an image.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"PolypGen data root {root} does not exist; point the site's data configuration "
                        f"(local/fedseg_data.json or $FEDSEG_DATA_CONFIG) at the folder with data_C1 ... data_C6")
    if not root.is_dir():
        raise DataError(f"PolypGen data root {root} is not a folder; point \"root\" at the folder that holds "
                        f"data_C<n>/images_C<n>/ and data_C<n>/masks_C<n>/")
    dirs = _find_centre_dirs(root)
    if not dirs:
        raise DataError(f"PolypGen data root {root} contains no centre folders (data_C<n>/images_C<n>/*.jpg and "
                        f"data_C<n>/masks_C<n>/*_mask.jpg); copy the PolypGen release there, or generate data with "
                        f"`fedseg data synth polypgen --out {root}`")
    return {n: _scan_centre(n, dirs[n]) for n in sorted(dirs)}


# ------------------------------------------------------------------------------------------ reading
def _open_image(path: Path, what: str):
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(path)
        im.load()  # decode now: a truncated/corrupt file fails here, not later
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: cannot read the PolypGen {what} ({type(e).__name__}: {e}); the file is corrupt, "
                        f"truncated or not an image -- re-download or re-extract it") from e
    return im


def read_polypgen_image(path: Path) -> np.ndarray:
    """RGB frame as uint8 [H, W, 3] (greyscale / palette / RGBA / CMYK converted to RGB)."""
    im = _open_image(Path(path), "image")
    if im.mode not in ("RGB", "RGBA", "L", "LA", "P", "CMYK", "YCbCr"):
        raise DataError(f"{path}: unsupported image mode {im.mode!r} (e.g. 16-bit); save the frame as 8-bit RGB")
    return np.asarray(im.convert("RGB"))


def _mask_gray(path: Path) -> np.ndarray:
    im = _open_image(Path(path), "mask")
    if im.mode == "1":
        return np.asarray(im, dtype=np.uint8) * np.uint8(255)
    if im.mode in ("L", "LA"):
        return np.asarray(im.convert("L"))
    if im.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr"):
        return np.asarray(im.convert("RGB")).max(axis=2)
    raise DataError(f"{path}: unsupported mask mode {im.mode!r} (e.g. 16-bit); save the mask as 8-bit grey or RGB "
                    f"with 0 = background and 255 = polyp")


def check_mask_binary(gray: np.ndarray, threshold: int, path: Path | str = "mask") -> np.ndarray:
    """Lesion mask ``gray > threshold`` after checking that ``gray`` is binary up to JPEG artefacts (module doc).

    DataError (naming ``path``) when more than ``MAX_STRAY_GREY_FRACTION`` of the pixels are mid-grey
    (``MID_GREY``) farther than ``EDGE_BAND_PX`` from the thresholded boundary, or when nothing is above the
    threshold although at least ``LABEL_LIKE_FRACTION`` of the pixels are non-zero.
    """
    gray = np.asarray(gray)
    lesion = gray > threshold
    hw = gray.size
    lo, hi = MID_GREY
    mid = (gray >= lo) & (gray <= hi)
    n_mid = int(np.count_nonzero(mid))
    limit = MAX_STRAY_GREY_FRACTION * hw
    if n_mid > limit:
        from scipy import ndimage

        size = 2 * EDGE_BAND_PX + 1
        u8 = lesion.view(np.uint8)
        near_edge = ndimage.maximum_filter(u8, size=size, mode="nearest") != ndimage.minimum_filter(
            u8, size=size, mode="nearest")
        stray = int(np.count_nonzero(mid & ~near_edge))
        if stray > limit:
            raise DataError(f"{path}: mask is not binary: {stray} pixels ({stray / hw:.1%}) are mid-grey (gray "
                            f"{lo}-{hi}) farther than {EDGE_BAND_PX} px from the lesion boundary (JPEG artefacts "
                            f"stay near the boundary; at most {MAX_STRAY_GREY_FRACTION:.1%} allowed). This looks like "
                            f"a soft/probability map or an image saved as mask; save a 0/255 mask")
    if not lesion.any():
        nonzero = int(np.count_nonzero(gray))
        if nonzero >= LABEL_LIKE_FRACTION * hw and nonzero > 0:
            raise DataError(f"{path}: no pixel is above the mask threshold {threshold}, but {nonzero} pixels are "
                            f"non-zero (max {int(gray.max())}): a 0/1 label mask or a dark annotation would be read "
                            f"as empty; save masks as 0 = background, 255 = polyp (or lower mask_threshold)")
    return lesion


def read_polypgen_mask(path: Path, threshold: int = 127) -> np.ndarray:
    """Binary lesion mask (bool [H, W]) of a PolypGen mask file, checked by :func:`check_mask_binary`."""
    return check_mask_binary(_mask_gray(Path(path)), threshold, path)


def _resize_image(rgb: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, S, S] in [0, 1] (PIL bilinear on float channels; antialiased when shrinking)."""
    from PIL import Image

    x = rgb.astype(np.float32) * np.float32(1 / 255)
    if x.shape[:2] == (size, size):
        return np.ascontiguousarray(x.transpose(2, 0, 1))
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(x[:, :, c])).resize((size, size),
                                                                                           Image.BILINEAR))
                     for c in range(3)])


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """bool [H, W] -> uint8 {0,1} [S, S]: box (area) average when shrinking, bilinear when enlarging, >= 0.5."""
    from PIL import Image

    if mask.shape == (size, size):
        return mask.astype(np.uint8)
    shrink = size < max(mask.shape)
    f = Image.fromarray(mask.astype(np.float32)).resize((size, size), Image.BOX if shrink else Image.BILINEAR)
    return (np.asarray(f) >= 0.5).astype(np.uint8)


def _normalise(x: np.ndarray) -> np.ndarray:
    mean = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, np.float32)[:, None, None]
    return ((x - mean) / std).astype(np.float16)


# ------------------------------------------------------------------------------------------ splits
@dataclass
class PolypGenCentreSplit:
    """Folds (training centres), test list (test centre) and deliberately excluded stems of one centre."""

    folds: list[list[str]] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)

    def stems(self) -> list[str]:
        """Every used (non-excluded) stem, sorted."""
        return sorted([s for f in self.folds for s in f] + list(self.test))


@dataclass
class PolypGenSplit:
    """Centre -> folds/test stems, FLARE site -> centre, the test centre (format: module docstring)."""

    n_folds: int
    centres: dict[str, PolypGenCentreSplit]
    sites: dict[str, str]
    test_centre: str | None
    source: str = ""
    description: str = ""

    def fold_of(self, centre: str) -> dict[str, int]:
        return {s: k for k, f in enumerate(self.centres[centre].folds) for s in f}

    def part(self, centre: str, part: str, fold: int) -> list[str]:
        """Stems of ``part`` ("train": the folds other than ``fold``; "val": fold ``fold``; "test")."""
        c = self.centres[centre]
        if part == "test":
            return sorted(c.test)
        if not c.folds:
            return []
        if part == "val":
            return sorted(c.folds[fold])
        if part == "train":
            return sorted(s for k, f in enumerate(c.folds) if k != fold for s in f)
        raise ConfigError(f"unknown PolypGen part {part!r}; parts are train, val, test")


def polypgen_split_to_json(split: PolypGenSplit) -> dict[str, Any]:
    """The JSON object of a split (the file format in the module docstring)."""
    centres: dict[str, Any] = {}
    for name, c in split.centres.items():
        entry: dict[str, Any] = {}
        if c.folds:
            entry["folds"] = [sorted(f) for f in c.folds]
        if c.test:
            entry["test"] = sorted(c.test)
        if c.excluded:
            entry["excluded"] = sorted(c.excluded)
        centres[name] = entry
    out: dict[str, Any] = {"dataset": "polypgen"}
    if split.description:
        out["description"] = split.description
    out.update({"n_folds": split.n_folds, "centres": centres, "sites": dict(split.sites),
                "test_centre": split.test_centre})
    return out


def _default_sites(centres: Iterable[str], test_centre: str | None) -> dict[str, str]:
    return {f"site-{centre_number(c)}": c for c in sorted(centres, key=centre_number) if c != test_centre}


def automatic_polypgen_split(centres: dict[int, list[tuple[Path, Path]]], n_folds: int,
                             test_centre: str = DEFAULT_TEST_CENTRE, source: str = "automatic split"
                             ) -> PolypGenSplit:
    """Folds from the sorted stems of each centre on disk: ``n_folds`` contiguous blocks (the first
    ``n % n_folds`` blocks one longer), like scikit-learn's ``KFold(n_folds)`` without shuffling; the test
    centre's images all go to ``test``. Sites ``site-<n>`` -> ``centre-<n>`` for the training centres."""
    out: dict[str, PolypGenCentreSplit] = {}
    for n, pairs in sorted(centres.items()):
        stems = sorted(p[0].stem for p in pairs)
        name = centre_name(n)
        if name == test_centre:
            out[name] = PolypGenCentreSplit(test=stems)
            continue
        sizes = [len(stems) // n_folds + (1 if k < len(stems) % n_folds else 0) for k in range(n_folds)]
        bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        out[name] = PolypGenCentreSplit(folds=[stems[bounds[k]:bounds[k + 1]] for k in range(n_folds)])
    return PolypGenSplit(n_folds=n_folds, centres=out, sites=_default_sites(out, test_centre), test_centre=test_centre,
                         source=source, description=f"automatic: {n_folds} contiguous folds of the sorted image "
                                                    f"names per centre (unshuffled KFold); {test_centre} = test")


def _stem_list(value: Any, where: str, path: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise DataError(f"{path}: {where} must be a list of image stems (file names without extension), "
                        f"got {value!r:.80}")
    return list(value)


def _parse_split(data: Any, path: str) -> PolypGenSplit:
    if not isinstance(data, dict):
        raise DataError(f"{path}: a PolypGen split file must be a JSON object with \"n_folds\", \"centres\", "
                        f"\"sites\", \"test_centre\"")
    unknown = sorted(set(data) - {"dataset", "description", "n_folds", "centres", "sites", "test_centre", "comment"})
    if unknown:
        raise DataError(f"{path}: unknown key(s) {unknown} in the split file; allowed: dataset, description, "
                        f"n_folds, centres, sites, test_centre")
    if data.get("dataset", "polypgen") != "polypgen":
        raise DataError(f"{path}: this split is for dataset {data.get('dataset')!r}, not PolypGen; use a PolypGen "
                        f"split (or \"split\": null for the automatic one)")
    n_folds = data.get("n_folds", 5)
    if isinstance(n_folds, bool) or not isinstance(n_folds, int) or n_folds < 2:
        raise DataError(f"{path}: \"n_folds\" must be an integer >= 2, got {n_folds!r}")
    raw = data.get("centres")
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{path}: \"centres\" must be a non-empty object like "
                        f'{{"centre-1": {{"folds": [["img1"], ["img2"], ...]}}, "centre-6": {{"test": ["img9"]}}}}')
    centres: dict[str, PolypGenCentreSplit] = {}
    for name, parts in raw.items():
        if not _CENTRE_NAME_RE.match(str(name)):
            raise DataError(f"{path}: centre {name!r} is not named 'centre-<n>' (the data_C<n> folder it reads)")
        if not isinstance(parts, dict):
            raise DataError(f"{path}: centres[{name!r}] must be an object with \"folds\" and/or \"test\"")
        bad = sorted(set(parts) - {"folds", "test", "excluded"})
        if bad:
            raise DataError(f"{path}: centres[{name!r}] has unknown key(s) {bad}; allowed: folds, test, excluded")
        folds_raw = parts.get("folds", [])
        if not isinstance(folds_raw, list) or (folds_raw and len(folds_raw) != n_folds):
            raise DataError(f"{path}: centres[{name!r}][\"folds\"] must be a list of {n_folds} stem lists (n_folds), "
                            f"got {len(folds_raw) if isinstance(folds_raw, list) else type(folds_raw).__name__}")
        c = PolypGenCentreSplit(
            folds=[_stem_list(f, f"centres[{name!r}][\"folds\"][{k}]", path) for k, f in enumerate(folds_raw)],
            test=_stem_list(parts.get("test", []), f"centres[{name!r}][\"test\"]", path),
            excluded=_stem_list(parts.get("excluded", []), f"centres[{name!r}][\"excluded\"]", path))
        seen: dict[str, str] = {}
        for where, stems in [(f"fold {k}", f) for k, f in enumerate(c.folds)] + [("test", c.test),
                                                                               ("excluded", c.excluded)]:
            for s in stems:
                if s in seen:
                    raise DataError(f"{path}: image {s!r} of {name} is listed twice ({seen[s]} and {where}); each "
                                    f"image belongs to exactly one fold (or test / excluded)")
                seen[s] = where
        centres[str(name)] = c
    test_centre = data.get("test_centre", DEFAULT_TEST_CENTRE if DEFAULT_TEST_CENTRE in centres else None)
    if test_centre is not None and (not isinstance(test_centre, str) or test_centre not in centres):
        raise DataError(f"{path}: test_centre {test_centre!r} is not one of the centres ({', '.join(centres)})")
    sites_raw = data.get("sites")
    if sites_raw is None:
        sites = _default_sites(centres, test_centre)
    else:
        sites = parse_site_map(sites_raw, centres, path)
    return PolypGenSplit(n_folds=n_folds, centres=centres, sites=sites, test_centre=test_centre, source=path,
                         description=str(data.get("description", "") or ""))


def _validate_against_disk(split: PolypGenSplit, on_disk: dict[int, list[tuple[Path, Path]]], root: Path) -> None:
    """Every listed stem exists and every image on disk is listed, for the centres present on disk."""
    for name, c in split.centres.items():
        n = centre_number(name)
        if n not in on_disk:
            continue  # a centre of another site's data; checked when some site needs it
        disk = {p[0].stem for p in on_disk[n]}
        listed = set(c.stems()) | set(c.excluded)
        missing = sorted(listed - disk)
        if missing:
            shown = ", ".join(missing[:10]) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
            raise DataError(f"{split.source}: image(s) {shown} of {name} are in the split but not in "
                            f"{root}/data_C{n}/images_C{n}/; add the files, or fix the split")
        unlisted = sorted(disk - listed)
        if unlisted:
            shown = ", ".join(unlisted[:10]) + (f", ... ({len(unlisted)} in all)" if len(unlisted) > 10 else "")
            raise DataError(f"{split.source}: image(s) {shown} of data_C{n} (in {root}) are in no fold, test or "
                            f"excluded list of {name}; add them to the split (\"excluded\" to leave them out on "
                            f"purpose) or remove the split file to use the automatic split")


def _auto_split_path(cache_dir: Path, n_folds: int) -> Path:
    return Path(cache_dir) / ("polypgen_split.json" if n_folds == 5 else f"polypgen_split_{n_folds}folds.json")


def _automatic_split_file(cache_dir: Path, root: Path, on_disk: dict[int, list[tuple[Path, Path]]],
                          n_folds: int) -> PolypGenSplit:
    """The automatic split, written once to the cache folder and reused while it matches the data."""
    path = _auto_split_path(cache_dir, n_folds)
    fresh = automatic_polypgen_split(on_disk, n_folds, source=str(path))
    want = polypgen_split_to_json(fresh)
    want["description"] = f"{fresh.description} (of {root})"
    with file_lock(path.with_name(path.name + ".lock")):
        try:
            current = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except (OSError, json.JSONDecodeError):
            current = None
        if current != want:
            if current is not None:
                log.warning("PolypGen automatic split %s no longer matches the images in %s; rewriting it", path, root)
            write_json_atomic(path, want, indent=1)
    fresh.description = want["description"]
    return fresh


def load_polypgen_split(spec: str | Path | None, root: Path, on_disk: dict[int, list[tuple[Path, Path]]],
                        n_folds: int, cache_dir: Path | None = None) -> PolypGenSplit:
    """Load and validate the split ``spec``: ``None`` (``<root>/split.json`` if present, else automatic),
    ``"auto"`` (automatic, written to ``<cache_dir>/polypgen_split.json``) or a path to a split JSON.

    DataError (naming the split file) for a malformed file, an image listed twice, listed images that are not on
    disk, images on disk that are in no fold (nothing is dropped silently), ``n_folds`` different from the
    preprocessing's, or ``"paper"`` (there is no packaged PolypGen split).
    """
    root = Path(root)
    if spec is None:
        candidate = root / "split.json"
        spec = candidate if candidate.is_file() else "auto"
    if isinstance(spec, str) and spec == "paper":
        raise DataError("there is no packaged \"paper\" split for PolypGen (the FedGS split files are not public "
                        "in a reusable form); use \"split\": null (root/split.json or automatic), \"auto\", or a "
                        "split JSON file")
    if isinstance(spec, str) and spec == "auto":
        if cache_dir is None:
            return automatic_polypgen_split(on_disk, n_folds, source=f"automatic split of {root}")
        return _automatic_split_file(cache_dir, root, on_disk, n_folds)
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"split file {path} does not exist; use null, \"auto\" or the path of a PolypGen split JSON")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read split file ({e}); fix or replace it") from e
    split = _parse_split(data, str(path))
    if split.n_folds != n_folds:
        raise DataError(f"{path}: the split has {split.n_folds} folds but the preprocessing asks for n_folds = "
                        f"{n_folds}; set data_args n_folds = {split.n_folds} or use a split with {n_folds} folds")
    _validate_against_disk(split, on_disk, root)
    return split


# ------------------------------------------------------------------------------------------ dataset
class PolypGenDataset(CachedSegmentationDataset):
    """PolypGen frames of one site part (or the test centre), a row view of the centre's on-disk cache.

    Attributes: ``images`` [N, 3, S, S] float16 (ImageNet-normalised; a :class:`~fedseg.data.cache.RowView` of
    the memmap), ``masks`` [N, S, S] uint8 {0, 1}, ``manifest`` (one dict per image: site, centre, split, fold,
    image, mask, height, width, lesion_pixels, inverse_area, small, delta, stem, mask_pixels), ``delta`` float32
    [N], ``small`` bool [N], ``nonempty`` bool [N] (the resized mask has a polyp pixel), ``site``, ``centre``,
    ``part``, ``fold``, ``prep``, ``cache_path``. Samples and :meth:`tensors` keep the three image channels; see
    :class:`~fedseg.data.dataset.CachedSegmentationDataset`.
    """

    image_has_channels = True

    def __init__(self, images: Any, masks: Any, manifest: list[dict[str, Any]], *, site: str | None, centre: str,
                 part: str, fold: int | None, prep: PolypGenPreprocessing, cache_path: Path | None = None,
                 origin: str = "") -> None:
        n = len(manifest)
        s = prep.image_size
        if tuple(images.shape) != (n, 3, s, s) or tuple(masks.shape) != (n, s, s):
            raise DataError(f"PolypGen cache {cache_path}: images {tuple(images.shape)}, masks {tuple(masks.shape)} "
                            f"and {n} manifest records disagree; delete the cache folder to rebuild it")
        self.fold = fold
        super().__init__(images, masks, manifest, site=site, centre=centre, part=part, prep=prep,
                         cache_path=cache_path, origin=origin)

    def summary(self) -> dict[str, Any]:
        n = len(self)
        return {"site": self.site, "centre": self.centre, "part": self.part, "fold": self.fold, "images": n,
                "small": int(self.small.sum()), "small_fraction": float(self.small.mean()) if n else None,
                "empty": int((~self.nonempty).sum()), "cache": str(self.cache_path) if self.cache_path else None}

    # memmaps pickle as full copies; send the cache folder and the rows instead (DataLoader workers with spawn)
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.cache_path is not None and isinstance(self.images, RowView):
            state["images"] = ("rows", self.images.rows)
            state["masks"] = ("rows", self.masks.rows)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if isinstance(self.images, tuple) and self.images[0] == "rows":
            self.images = RowView(_load_npy(self.cache_path / "images.npy"), self.images[1])
            self.masks = RowView(_load_npy(self.cache_path / "masks.npy"), self.masks[1])


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except ValueError:  # a zero-length array cannot be memory-mapped
        return np.load(path)


# ------------------------------------------------------------------------------------------ cache
def _difficulty_module() -> Any:
    from fedseg import difficulty

    return difficulty


def _difficulty(mask: np.ndarray, base: float, tau: float):
    return _difficulty_module().polypgen_difficulty(mask, base=base, tau=tau)


def _process_pair(img_path: Path, mask_path: Path, prep: PolypGenPreprocessing
                  ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    rgb = read_polypgen_image(img_path)
    lesion = read_polypgen_mask(mask_path, prep.mask_threshold)
    if rgb.shape[:2] != lesion.shape:
        raise DataError(f"{img_path} is {rgb.shape[1]}x{rgb.shape[0]} (WxH) but its mask {mask_path} is "
                        f"{lesion.shape[1]}x{lesion.shape[0]}; image and mask must match pixel for pixel -- check "
                        f"that the pair belongs together (or re-export the mask at the image size)")
    d = _difficulty(lesion, prep.base, prep.tau)
    image = _normalise(_resize_image(rgb, prep.image_size))
    mask = _resize_mask(lesion, prep.image_size)
    rec = d.to_json_dict()
    rec["mask_pixels"] = int(mask.sum())
    return image, mask, rec


def _workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _build_centre_cache(folder: Path, root: Path, centre: str, pairs: Sequence[tuple[Path, Path]],
                        prep: PolypGenPreprocessing, fingerprint: str, progress: bool) -> None:
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    n, s = len(pairs), prep.image_size
    with building_folder(folder) as tmp:
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.float16, shape=(n, 3, s, s))
        masks = np.lib.format.open_memmap(tmp / "masks.npy", mode="w+", dtype=np.uint8, shape=(n, s, s))
        records: list[dict[str, Any]] = []
        # decoding (PIL) and the checks release the GIL for much of the work: a few threads, results in order
        pool = ThreadPoolExecutor(max_workers=_workers())
        try:
            with tqdm(total=n, desc=f"polypgen {centre}", unit="img", disable=not progress) as bar:
                results = pool.map(lambda pm: _process_pair(pm[0], pm[1], prep), pairs)
                for i, ((img_path, mask_path), (image, mask, rec)) in enumerate(zip(pairs, results)):
                    images[i] = image
                    masks[i] = mask
                    records.append({"stem": img_path.stem, "centre": centre,
                                    "image": img_path.relative_to(root).as_posix(),
                                    "mask": mask_path.relative_to(root).as_posix(), **rec})
                    bar.update(1)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # a bad file stops the build without reading the rest
        images.flush()
        masks.flush()
        del images, masks
        write_json_atomic(tmp / "manifest.json", {
            "format_version": CACHE_FORMAT_VERSION, "fingerprint": fingerprint, "dataset": "polypgen",
            "root": str(root), "centre": centre, "prep": prep.cache_key(), "n": n, "image_size": s,
            "difficulty_estimator_version": int(getattr(_difficulty_module(), "POLYPGEN_ESTIMATOR_VERSION", 0)),
            "build_seconds": round(time.perf_counter() - t0, 3), "build_id": uuid.uuid4().hex, "samples": records,
        })
    log.info("built PolypGen cache %s (%d images) in %.1f s", folder, n, time.perf_counter() - t0)


def load_polypgen_centre(root: Path, centre: str, pairs: Sequence[tuple[Path, Path]], prep: PolypGenPreprocessing,
                         cache_dir: Path, progress: bool = False
                         ) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]], Path]:
    """(images memmap, masks memmap, per-image records, cache folder) of ``pairs`` (sorted by stem), cached."""
    root = Path(root)
    pairs = sorted(pairs, key=lambda p: p[0].stem)
    stems = [p[0].stem for p in pairs]
    from fedseg import difficulty

    # a new small-polyp estimator gives new manifests: its version is part of the cache key
    estimator = int(getattr(difficulty, "POLYPGEN_ESTIMATOR_VERSION", 0))
    key = {"dataset": "polypgen", "root": str(root.resolve()), "centre": centre, "stems": stems,
           "prep": prep.cache_key(), "estimator": estimator, "format": CACHE_FORMAT_VERSION}
    folder = cache_folder(cache_dir, "polypgen", centre, key)
    fingerprint = files_fingerprint(((p[0].stem, p) for p in pairs),
                                    {"format": CACHE_FORMAT_VERSION, "prep": prep.cache_key(), "estimator": estimator})

    def spec(manifest: dict[str, Any]):
        n, s = int(manifest["n"]), int(manifest["image_size"])
        return {"images": ((n, 3, s, s), np.float16), "masks": ((n, s, s), np.uint8)}

    arrays, manifest = load_or_build(
        folder, lambda: open_cache(folder, fingerprint, CACHE_FORMAT_VERSION, spec),
        lambda: _build_centre_cache(folder, root, centre, pairs, prep, fingerprint, progress), "PolypGen")
    return arrays["images"], arrays["masks"], manifest["samples"], folder


# ------------------------------------------------------------------------------------------ public loaders
def resolve_polypgen(source: DataSource, prep: PolypGenPreprocessing, progress: bool = False
                     ) -> tuple[Path, dict[int, list[tuple[Path, Path]]], PolypGenSplit, Path]:
    """(data root, centres on disk, validated split, cache folder); generates the built-in data if needed."""
    if source.dataset != "polypgen":
        raise ConfigError(f"data source for {source.dataset!r} passed to the PolypGen loader ({source.origin})")
    root = Path(source.root) if source.root is not None else ensure_builtin_polypgen(progress=progress)
    try:
        on_disk = find_polypgen_centres(root)
    except DataError as e:
        raise DataError(f"{e} [data source: {source.origin}]") from e
    cache_dir = default_cache_dir(source, root)
    split = load_polypgen_split(source.split, root, on_disk, prep.n_folds, cache_dir)
    return root, on_disk, split, cache_dir


def require_centre(root: Path, on_disk: dict[int, list[tuple[Path, Path]]], split: PolypGenSplit, centre: str,
                    who: str, origin: str) -> None:
    n = centre_number(centre)
    if n not in on_disk:
        present = ", ".join(f"data_C{k}" for k in sorted(on_disk)) or "none"
        raise DataError(f"{who} needs {centre}, but {root} has no data_C{n}/ folder (found: {present}; split "
                        f"{split.source}, data from {origin}); point the data root at the folder that holds "
                        f"data_C{n}/images_C{n}/ and data_C{n}/masks_C{n}/, or map the site to a centre that is "
                        f"present")
    if centre not in split.centres:
        raise DataError(f"{who} needs {centre}, which the split {split.source} does not list (centres: "
                        f"{', '.join(split.centres)}); add it to the split or remove the split file to use the "
                        f"automatic one")


def _dataset(root: Path, on_disk: dict[int, list[tuple[Path, Path]]], split: PolypGenSplit, cache_dir: Path,
             centre: str, part: str, stems: list[str], site: str | None, prep: PolypGenPreprocessing, who: str,
             origin: str, progress: bool) -> PolypGenDataset:
    require_centre(root, on_disk, split, centre, who, origin)
    wanted = set(split.centres[centre].stems())
    pairs = [p for p in on_disk[centre_number(centre)] if p[0].stem in wanted]
    images, masks, records, folder = load_polypgen_centre(root, centre, pairs, prep, cache_dir, progress)
    row_of = {r["stem"]: i for i, r in enumerate(records)}
    rows = np.array([row_of[s] for s in sorted(stems)], dtype=np.int64)
    fold_of = split.fold_of(centre)
    manifest = []
    for i in rows:
        r = dict(records[int(i)])
        r.update(site=site, centre=centre, split=part, fold=fold_of.get(r["stem"]) if part != "test" else None)
        manifest.append(r)
    return PolypGenDataset(RowView(images, rows), RowView(masks, rows), manifest, site=site, centre=centre,
                           part=part, fold=prep.fold if part != "test" else None, prep=prep, cache_path=folder,
                           origin=origin)


def load_polypgen_site(source: DataSource, site_name: str, part: str, prep: PolypGenPreprocessing,
                       progress: bool = False) -> PolypGenDataset:
    """Fold ``prep.fold`` of the centre that ``site_name`` holds: ``part="train"`` (the other folds) or ``"val"``.

    DataError when the site's centre is missing on disk, is the test centre, or has no training images for
    this fold. An empty validation fold gives an empty dataset.
    """
    if part not in ("train", "val"):
        raise ConfigError(f"PolypGen sites have parts 'train' and 'val' (fold {prep.fold}), got {part!r}; the test "
                          f"centre is loaded with load_polypgen_test_centre")
    root, on_disk, split, cache_dir = resolve_polypgen(source, prep, progress)
    centre = centre_for_site(split, site_name, source.centre)  # type: ignore[arg-type]
    if centre == split.test_centre:
        raise DataError(f"site {site_name}: {centre} is the test centre of the split {split.source}; map the site to "
                        f"a training centre (\"centre\" in its data configuration or the split's \"sites\")")
    require_centre(root, on_disk, split, centre, f"site {site_name}", source.origin)
    stems = split.part(centre, part, prep.fold)
    if part == "train" and not stems:
        raise DataError(f"site {site_name}: {centre} has no training images for fold {prep.fold} in the split "
                        f"{split.source}; the centre needs images in at least two folds")
    return _dataset(root, on_disk, split, cache_dir, centre, part, stems, site_name, prep, f"site {site_name}",
                    source.origin, progress)


def load_polypgen_test_centre(source: DataSource, prep: PolypGenPreprocessing, progress: bool = False
                              ) -> PolypGenDataset:
    """Every image of the split's test centre (``centre-6`` by default), for the server-side evaluation."""
    root, on_disk, split, cache_dir = resolve_polypgen(source, prep, progress)
    if split.test_centre is None:
        raise DataError(f"the split {split.source} has no test centre; add \"test_centre\" (e.g. \"centre-6\" with "
                        f"its \"test\" list)")
    require_centre(root, on_disk, split, split.test_centre, "the test-centre evaluation", source.origin)
    stems = split.part(split.test_centre, "test", prep.fold)
    if not stems:
        raise DataError(f"test centre {split.test_centre} of the split {split.source} lists no test images")
    return _dataset(root, on_disk, split, cache_dir, split.test_centre, "test", stems, None, prep,
                    "the test-centre evaluation", source.origin, progress)
