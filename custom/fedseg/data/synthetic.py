"""Synthetic LiTS-format data: real NIfTI files with heterogeneity we control.

:func:`synth_lits` writes ``volume-<i>.nii.gz`` (int16 Hounsfield units, affine/pixdim = in-plane pixel size
and the centre's slice thickness) and ``segmentation-<i>.nii.gz`` (uint8: 0 background, 1 liver, 2 tumour),
plus ``split.json`` (sites ``site-1..site-4`` -> ``centre-1..centre-4``, test centre ``centre-5``) and
``synthetic.json`` (the generation parameters and every tumour drawn). Arrays are ``[X, Y, Z]`` like LiTS:
``volume[:, :, k]`` is axial slice ``k`` (rows anterior -> posterior, columns right -> left of the image).

Each axial slice stack looks like an abdominal CT: air outside a body ellipse, subcutaneous fat (~-100 HU),
abdominal wall muscle (~50 HU), a visceral fat/bowel mixture, a liver (~60 HU, contrast-enhanced vessels)
whose outline changes along z, spleen, stomach with a gas cap, kidneys, aorta/IVC, vertebra and ribs
(~700 HU cortical bone). Tumours are hypodense (~5-30 HU) 3-D ellipsoids placed inside the liver and
labelled only where they overlap it.

Heterogeneity per centre (see :data:`CENTRE_SPECS`):

* scanner style: intensity scale/offset (HU calibration), noise sigma, in-plane blur (reconstruction
  kernel), slice thickness (so the number of slices of a similar body length differs);
* tumour-size mix: ``centre-1`` rich in large tumours (small ones rare), ``centre-2`` and ``centre-3``
  medium tumours with small ones rare, ``centre-4`` mixed, test ``centre-5`` mixed with a meaningful share of
  small tumours (so DiceS is measurable).

"Small" follows FedGS' LiTS rule ``a_inv = H * W / tumour_pixels >= 1000`` on the native slice: with the
field of view fixed at 360 mm this is a cross-section below ~130 mm^2 (65.5 px at 256 x 256, 16.4 px at
128 x 128) for every preset.

Presets:

* ``"quick"``: 256 x 256 in-plane, 24-40 slices; centres 1-4 with 6 volumes each (5 train + 1 val) and
  centre 5 with 6 test volumes (30 volumes). The 512 x 512 default ``min_tumour_pixels = 50`` corresponds to
  ~12 px at 256 x 256 (50 / 4), so the quick jobs use ``min_tumour_pixels = 12``
  (:data:`RECOMMENDED_MIN_TUMOUR_PIXELS`).
* ``"tiny"`` (tests): 128 x 128, 2 volumes per centre (1 train + 1 val; 2 test volumes for centre 5), about
  10-16 slices; small and large tumours still occur; use ``min_tumour_pixels = 3``.

Generation is seeded (``numpy.random.SeedSequence([seed, case_id])`` per volume): the same seed gives the
same arrays, and the files are byte-identical too (gzip written with ``mtime = 0``).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from fedseg.errors import ConfigError

__all__ = ["SYNTH_VERSION", "CentreSpec", "LiTSPreset", "PRESETS", "CENTRE_SPECS", "RECOMMENDED_MIN_TUMOUR_PIXELS",
           "synth_lits", "preset_layout"]

#: bumped when the generated data changes for the same (preset, seed)
SYNTH_VERSION = 1

#: min_tumour_pixels that corresponds to the paper's 50 px at 512 x 512 for each preset's in-plane size
RECOMMENDED_MIN_TUMOUR_PIXELS = {"quick": 12, "tiny": 3}

# HU of the tissue classes before the scanner transform
_HU = {
    "air": -1000.0, "fat": -100.0, "muscle": 50.0, "cavity": -35.0, "liver": 60.0, "vessel": 150.0,
    "spleen": 50.0, "kidney": 160.0, "aorta": 170.0, "ivc": 110.0, "stomach": 15.0, "gas": -900.0,
    "bone": 700.0, "marrow": 240.0, "csf": 15.0,
}


@dataclass(frozen=True)
class CentreSpec:
    """Scanner style and tumour-size mix of one synthetic centre."""

    name: str
    hu_scale: float  # HU' = hu_scale * HU + hu_offset (calibration)
    hu_offset: float
    noise_sigma: float  # HU, white noise after blur
    blur_mm: float  # in-plane Gaussian blur sigma (reconstruction kernel), mm
    thickness_mm: float  # slice thickness at the "quick" preset (scaled by the preset's thickness_scale)
    n_large: tuple[int, int]  # tumours per volume of each size class, inclusive range
    n_medium: tuple[int, int]
    n_small: tuple[int, int]
    tumour_contrast: tuple[float, float]  # liver HU minus tumour HU, range


#: centre -> style and tumour mix. Radii: large 15-26 mm, medium 9-14 mm, small 3.8-5.8 mm (in-plane).
CENTRE_SPECS: dict[str, CentreSpec] = {
    "centre-1": CentreSpec("centre-1", 1.00, 0.0, 6.0, 0.8, 3.2, n_large=(1, 2), n_medium=(0, 1), n_small=(0, 0),
                           tumour_contrast=(40.0, 55.0)),
    "centre-2": CentreSpec("centre-2", 1.08, 12.0, 12.0, 1.4, 3.6, n_large=(0, 1), n_medium=(2, 3), n_small=(0, 0),
                           tumour_contrast=(35.0, 50.0)),
    "centre-3": CentreSpec("centre-3", 0.92, -15.0, 18.0, 0.0, 4.4, n_large=(0, 1), n_medium=(1, 3), n_small=(0, 1),
                           tumour_contrast=(30.0, 45.0)),
    "centre-4": CentreSpec("centre-4", 1.03, -5.0, 9.0, 1.9, 4.0, n_large=(0, 1), n_medium=(1, 2), n_small=(1, 2),
                           tumour_contrast=(35.0, 55.0)),
    "centre-5": CentreSpec("centre-5", 0.97, 8.0, 14.0, 1.0, 3.8, n_large=(0, 1), n_medium=(1, 2), n_small=(3, 5),
                           tumour_contrast=(35.0, 55.0)),
}
_RADII_MM = {"large": (15.0, 26.0), "medium": (9.0, 14.0), "small": (3.8, 5.8)}


@dataclass(frozen=True)
class LiTSPreset:
    """Size of a synthetic LiTS data set (fields can be overridden through ``synth_lits(**overrides)``)."""

    size: int  # in-plane pixels (square)
    fov_mm: float  # in-plane field of view (fixed, so "small" means the same physical size at every size)
    z_extent_mm: tuple[float, float]  # scanned body length range; slices = round(length / thickness)
    thickness_scale: float  # multiplies every centre's slice thickness
    train_volumes: int  # per training centre (centres 1-4)
    val_volumes: int
    test_volumes: int  # of the test centre (centre 5)


PRESETS: dict[str, LiTSPreset] = {
    "quick": LiTSPreset(size=256, fov_mm=360.0, z_extent_mm=(112.0, 124.0), thickness_scale=1.0,
                        train_volumes=5, val_volumes=1, test_volumes=6),
    "tiny": LiTSPreset(size=128, fov_mm=360.0, z_extent_mm=(76.0, 84.0), thickness_scale=1.5,
                       train_volumes=1, val_volumes=1, test_volumes=2),
}
TRAIN_CENTRES = ("centre-1", "centre-2", "centre-3", "centre-4")
TEST_CENTRE = "centre-5"


def _get_preset(preset: str, overrides: dict[str, Any]) -> LiTSPreset:
    if preset not in PRESETS:
        raise ConfigError(f"unknown synthetic LiTS preset {preset!r}; known presets: {', '.join(PRESETS)}")
    p = PRESETS[preset]
    allowed = {f.name for f in dataclasses.fields(LiTSPreset)}
    bad = sorted(set(overrides) - allowed)
    if bad:
        raise ConfigError(f"unknown synth_lits override(s) {bad}; allowed: {', '.join(sorted(allowed))}")
    p = dataclasses.replace(p, **overrides)
    if p.size < 32 or p.train_volumes < 1 or p.val_volumes < 0 or p.test_volumes < 1:
        raise ConfigError(f"synthetic LiTS preset needs size >= 32, >= 1 train and >= 1 test volume; got {p}")
    return p


def preset_layout(preset: LiTSPreset) -> list[tuple[int, str, str]]:
    """``(case_id, centre, part)`` of every volume: centres 1-4 train then val, then centre 5 test."""
    out: list[tuple[int, str, str]] = []
    for centre in TRAIN_CENTRES:
        out += [(len(out) + i, centre, "train") for i in range(preset.train_volumes)]
        out += [(len(out) + i, centre, "val") for i in range(preset.val_volumes)]
    out += [(len(out) + i, TEST_CENTRE, "test") for i in range(preset.test_volumes)]
    return out


# ------------------------------------------------------------------------------------------ geometry helpers
def _ell(xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, ax: float, ay: float, angle: float = 0.0
         ) -> tuple[tuple[slice, slice], np.ndarray]:
    """Bounding window of an ellipse and its normalised radius^2 there (<= 1 inside).

    ``xs``/``ys`` are the (sorted) column/row coordinates in mm; only the window is computed, so small
    structures cost little.
    """
    r = max(ax, ay)
    c0, c1 = np.searchsorted(xs, cx - r), np.searchsorted(xs, cx + r, side="right")
    r0, r1 = np.searchsorted(ys, cy - r), np.searchsorted(ys, cy + r, side="right")
    dx = xs[None, c0:c1] - np.float32(cx)
    dy = ys[r0:r1, None] - np.float32(cy)
    if angle:
        c, s = np.float32(math.cos(angle)), np.float32(math.sin(angle))
        dx, dy = c * dx + s * dy, c * dy - s * dx
    return (slice(r0, r1), slice(c0, c1)), (dx / np.float32(ax)) ** 2 + (dy / np.float32(ay)) ** 2


def _paint(sl: np.ndarray, xs: np.ndarray, ys: np.ndarray, value: float, cx: float, cy: float, ax: float,
           ay: float, angle: float = 0.0, within: np.ndarray | None = None, extra=None) -> None:
    """Set ``sl`` to ``value`` inside an ellipse (optionally only where ``within`` and ``extra(window)``)."""
    w, q = _ell(xs, ys, cx, cy, ax, ay, angle)
    inside = q <= 1.0
    if within is not None:
        inside &= within[w]
    if extra is not None:
        inside &= extra(w)
    sl[w][inside] = value


def _interp_matrix(n: int, m: int) -> np.ndarray:
    """(n, m) linear interpolation weights from m periodic coarse samples to n fine samples."""
    pos = (np.arange(n) + 0.5) * m / n - 0.5
    lo = np.floor(pos).astype(int)
    f = (pos - lo).astype(np.float32)
    w = np.zeros((n, m), dtype=np.float32)
    w[np.arange(n), lo % m] += 1 - f
    w[np.arange(n), (lo + 1) % m] += f
    return w


def _smooth_field(rng: np.random.Generator, nz: int, n: int, coarse: int, sigma: tuple[float, float, float]) -> np.ndarray:
    """Low-frequency texture in about [-1, 1], shape (nz, n, n)."""
    g = rng.standard_normal((nz, coarse, coarse)).astype(np.float32)
    g = ndimage.gaussian_filter(g, sigma=sigma, mode="wrap")
    g /= max(float(g.std()), 1e-6)
    w = _interp_matrix(n, coarse)
    return np.clip(np.einsum("ia,zab,jb->zij", w, g, w, optimize=True), -3, 3) / 2.0


@dataclass
class _Anatomy:
    """Per-volume random anatomy parameters (mm, image frame: x = column, y = row, origin at the centre)."""

    body_a: float
    body_b: float
    fat: float
    liver_c: tuple[float, float]
    liver_ax: tuple[float, float]
    liver_u: tuple[float, float]  # liver present for u in [u0, u1] (u = z / length)
    harm: tuple[float, float, float, float]  # amplitudes a2, a3 and phases at u=0
    harm_drift: tuple[float, float]
    spine_y: float
    vessels: list[tuple[float, float, float, float, float]]  # x0, y0, dx/du, dy/du, radius


def _draw_anatomy(rng: np.random.Generator) -> _Anatomy:
    a = float(rng.uniform(138, 158))
    b = float(rng.uniform(98, 114))
    fat = float(rng.uniform(9, 22))
    liver_c = (float(rng.uniform(-62, -48)), float(rng.uniform(-18, -4)))
    liver_ax = (float(rng.uniform(58, 70)), float(rng.uniform(56, 68)))
    liver_u = (float(rng.uniform(0.02, 0.08)), float(rng.uniform(0.90, 0.98)))
    harm = (float(rng.uniform(0.04, 0.10)), float(rng.uniform(0.03, 0.08)), float(rng.uniform(0, 2 * math.pi)),
            float(rng.uniform(0, 2 * math.pi)))
    drift = (float(rng.uniform(-2.0, 2.0)), float(rng.uniform(-2.5, 2.5)))
    spine_y = b - fat - float(rng.uniform(28, 36))
    vessels = []
    for _ in range(int(rng.integers(3, 6))):
        vessels.append((liver_c[0] + float(rng.uniform(-30, 30)), liver_c[1] + float(rng.uniform(-25, 25)),
                        float(rng.uniform(-25, 25)), float(rng.uniform(-25, 25)), float(rng.uniform(1.8, 3.6))))
    return _Anatomy(a, b, fat, liver_c, liver_ax, liver_u, harm, drift, spine_y, vessels)


def _liver_mask(xs: np.ndarray, ys: np.ndarray, u: float, an: _Anatomy, inner: np.ndarray) -> np.ndarray:
    liver = np.zeros(inner.shape, dtype=bool)
    u0, u1 = an.liver_u
    if not (u0 < u < u1):
        return liver
    t = (u - u0) / (u1 - u0)
    prof = math.sin(math.pi * t ** 0.75) ** 0.6  # bulkier cranially, tapering caudally
    cx = an.liver_c[0] + 10.0 * t  # moves medially and anteriorly going down
    cy = an.liver_c[1] - 6.0 * t
    a2, a3, p2, p3 = an.harm
    reach = prof * (1.0 + a2 + a3)
    w, _ = _ell(xs, ys, cx, cy, an.liver_ax[0] * reach, an.liver_ax[1] * reach)
    dx = (xs[None, w[1]] - np.float32(cx)) / np.float32(an.liver_ax[0])
    dy = (ys[w[0], None] - np.float32(cy)) / np.float32(an.liver_ax[1])
    rho = np.sqrt(dx * dx + dy * dy)
    theta = np.arctan2(dy, dx)
    r = 1.0 + a2 * np.cos(2 * theta + p2 + an.harm_drift[0] * u) + a3 * np.cos(3 * theta + p3 + an.harm_drift[1] * u)
    liver[w] = rho <= prof * r
    if t < 0.55:  # left lobe crosses the midline in the upper part
        q = math.sin(math.pi * t / 0.55) ** 0.8
        if q > 0.05:
            _paint(liver, xs, ys, True, cx + 62.0, cy - 22.0, 48.0 * q, 22.0 * q, angle=-0.25)
    return liver & inner


# ------------------------------------------------------------------------------------------ one volume
def _make_volume(case_id: int, centre: CentreSpec, preset: LiTSPreset, seed: int
                 ) -> tuple[np.ndarray, np.ndarray, float, float, list[dict[str, Any]]]:
    """Return (hu int16 [X, Y, Z], labels uint8 [X, Y, Z], pixel mm, slice thickness mm, tumour records)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(case_id), 0x115]))
    n = preset.size
    px = preset.fov_mm / n
    thickness = centre.thickness_mm * preset.thickness_scale
    length = float(rng.uniform(*preset.z_extent_mm))
    nz = max(4, int(round(length / thickness)))
    xs = ((np.arange(n) + 0.5) * px - preset.fov_mm / 2).astype(np.float32)  # column / row coordinates, mm
    ys = xs
    an = _draw_anatomy(rng)
    us = (np.arange(nz) + 0.5) / nz
    H = _HU

    hu = np.empty((nz, n, n), dtype=np.float32)
    liver = np.zeros((nz, n, n), dtype=bool)
    cavity = np.zeros((nz, n, n), dtype=bool)
    rib_phase = float(rng.uniform(0, 2 * math.pi))
    for k, u in enumerate(us):
        wob = 1.0 + 0.03 * math.sin(2 * math.pi * u + rib_phase)
        a, b = an.body_a * wob, an.body_b * wob
        sl = np.full((n, n), H["air"], dtype=np.float32)
        _paint(sl, xs, ys, H["fat"], 0.0, 4.0, a, b)
        _paint(sl, xs, ys, H["muscle"], 0.0, 4.0, a - an.fat, b - an.fat)
        w, q = _ell(xs, ys, 0.0, 4.0, a - an.fat - 9.0, b - an.fat - 9.0)
        inner = np.zeros((n, n), dtype=bool)
        inner[w] = q <= 1.0
        sl[inner] = H["cavity"]
        cavity[k] = inner
        sy = an.spine_y
        # spine: paraspinal muscles, vertebral body (cortex + marrow), canal in a bony ring, aorta, IVC
        _paint(sl, xs, ys, H["muscle"], -36.0, sy + 22.0, 24.0, 19.0)
        _paint(sl, xs, ys, H["muscle"], 36.0, sy + 22.0, 24.0, 19.0)
        _paint(sl, xs, ys, H["bone"], 0.0, sy, 18.0, 16.0)
        _paint(sl, xs, ys, H["marrow"], 0.0, sy, 18.0 * 0.85, 16.0 * 0.85)
        _paint(sl, xs, ys, H["bone"], 0.0, sy + 25.0, 11.0, 10.0)
        _paint(sl, xs, ys, H["csf"], 0.0, sy + 25.0, 11.0 * 0.65, 10.0 * 0.65)
        _paint(sl, xs, ys, H["aorta"], -9.0, sy - 27.0, 11.0, 11.0)
        _paint(sl, xs, ys, H["ivc"], -34.0, sy - 24.0, 11.0, 9.0)
        if u > 0.42:  # kidneys in the lower part
            kq = min(1.0, math.sin(math.pi * (u - 0.42) / 0.6) + 0.2)
            for side in (-1.0, 1.0):
                _paint(sl, xs, ys, H["kidney"], side * 62.0, sy - 4.0, 27.0 * kq, 17.0 * kq, angle=side * 0.5)
        if u < 0.55:  # spleen and stomach (with a gas cap) in the upper part
            sq = math.sin(math.pi * (u + 0.1) / 0.65)
            _paint(sl, xs, ys, H["spleen"], 88.0, 14.0, 30.0 * sq, 48.0 * sq, angle=0.4, within=inner)
            _paint(sl, xs, ys, H["stomach"], 42.0, -42.0, 42.0 * sq, 30.0 * sq, angle=-0.3, within=inner)
            gas_y = np.float32(-42.0 - 12.0 * sq)
            _paint(sl, xs, ys, H["gas"], 42.0, -42.0, 42.0 * sq, 30.0 * sq, angle=-0.3, within=inner,
                   extra=lambda win: ys[win[0], None] < gas_y)
        # ribs: small bone ellipses just inside the wall
        n_ribs = 9
        for r in range(n_ribs):
            ang = math.pi * (0.05 + 0.9 * r / (n_ribs - 1)) + 0.25 * math.sin(3 * u + rib_phase + r)
            rx, ry = (a - an.fat - 4.0) * math.cos(ang + math.pi), (b - an.fat - 4.0) * math.sin(ang + math.pi)
            if u < 0.6 or r in (0, n_ribs - 1):
                _paint(sl, xs, ys, H["bone"], rx, ry + 4.0, 7.0, 4.5, angle=ang)
        lv = _liver_mask(xs, ys, float(u), an, inner)
        sl[lv] = H["liver"]
        for (vx, vy, ddx, ddy, vr) in an.vessels:
            _paint(sl, xs, ys, H["vessel"], vx + ddx * u, vy + ddy * u, vr, vr, within=lv)
        liver[k] = lv
        hu[k] = sl

    # tumours: 3-D ellipsoids placed inside the liver, labelled where they overlap it
    labels = liver.astype(np.uint8)
    zc = (np.arange(nz, dtype=np.float32) + 0.5) * thickness
    tumours: list[dict[str, Any]] = []
    kinds = (["large"] * int(rng.integers(centre.n_large[0], centre.n_large[1] + 1))
             + ["medium"] * int(rng.integers(centre.n_medium[0], centre.n_medium[1] + 1))
             + ["small"] * int(rng.integers(centre.n_small[0], centre.n_small[1] + 1)))
    if not kinds:
        kinds = ["medium"]
    liver_slices = np.flatnonzero(liver.reshape(nz, -1).any(1))
    for kind in kinds:
        r_in = float(rng.uniform(*_RADII_MM[kind]))
        rx = r_in * float(rng.uniform(0.8, 1.2))
        ry = r_in * float(rng.uniform(0.8, 1.2))
        rz = r_in * float(rng.uniform(0.8, 1.2))
        angle = float(rng.uniform(0, math.pi))
        # centre slice: inside the liver, away from its cranial/caudal tips
        lo, hi = int(liver_slices[0]), int(liver_slices[-1])
        margin = max(1, int(0.15 * (hi - lo)))
        k0 = int(rng.integers(lo + margin, max(lo + margin + 1, hi - margin + 1)))
        dist = ndimage.distance_transform_edt(liver[k0]) * px
        need = min(0.7 * r_in, 0.8 * float(dist.max()))
        cand = np.flatnonzero(dist.ravel() >= need)
        if cand.size == 0:
            continue
        pick = int(cand[int(rng.integers(cand.size))])
        cy, cx = float(ys[pick // n]), float(xs[pick % n])
        cz = float(zc[k0] + rng.uniform(-0.5, 0.5) * thickness)
        contrast = float(rng.uniform(*centre.tumour_contrast))
        t_hu = H["liver"] - contrast
        for k in np.flatnonzero(np.abs(zc - cz) < rz):
            dzn = float((zc[k] - cz) / rz) ** 2
            w, q = _ell(xs, ys, cx, cy, rx, ry, angle)
            rho2 = q + np.float32(dzn)
            lv = liver[k][w]
            inside = (rho2 <= 1.0) & lv
            if not inside.any():
                continue
            # soft edge (~1 px) for the intensity, hard edge for the label
            edge = np.clip((1.0 - np.sqrt(rho2)) * np.float32(min(rx, ry) / px) + 0.5, 0.0, 1.0) * lv
            val = np.where(rho2 < 0.2, t_hu - 12.0, t_hu) if kind == "large" else t_hu  # necrotic core
            view = hu[k][w]
            view *= 1.0 - edge
            view += val * edge
            labels[k][w][inside] = 2
        tumours.append({"kind": kind, "centre_mm": [round(cx, 2), round(cy, 2), round(cz, 2)],
                        "radii_mm": [round(rx, 2), round(ry, 2), round(rz, 2)], "angle": round(angle, 3),
                        "hu": round(t_hu, 1)})

    # texture: visceral fat/bowel mixture in the cavity, mild parenchymal texture elsewhere in soft tissue
    tex = _smooth_field(rng, nz, n, coarse=max(8, n // 10), sigma=(0.7, 1.2, 1.2))
    amp = np.where(cavity & (hu == H["cavity"]), np.float32(45.0),
                   np.where((hu > -300) & (hu < 300), np.float32(5.0), np.float32(0.0)))
    hu += amp * tex
    # scanner: calibration, reconstruction blur, noise
    hu *= np.float32(centre.hu_scale)
    hu += np.float32(centre.hu_offset)
    if centre.blur_mm > 0:
        hu = ndimage.gaussian_filter(hu, sigma=(0.0, centre.blur_mm / px, centre.blur_mm / px), mode="nearest")
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(centre.noise_sigma)
    vol = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    # [Z, row, col] -> [X(row), Y(col), Z] like LiTS volume[:, :, k]
    return (np.ascontiguousarray(vol.transpose(1, 2, 0)), np.ascontiguousarray(labels.transpose(1, 2, 0)),
            px, thickness, tumours)


# ------------------------------------------------------------------------------------------ writing
def _write_nifti_gz(path: Path, arr: np.ndarray, px: float, thickness: float) -> None:
    import nibabel as nib

    affine = np.diag([px, px, thickness, 1.0])
    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units("mm")
    img.header.set_data_dtype(arr.dtype)
    data = gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)  # mtime 0: byte-identical reruns
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def synth_lits(out_dir: str | Path, preset: str = "quick", seed: int = 0, progress: bool = True,
               **overrides: Any) -> Path:
    """Write a synthetic LiTS-format data set into ``out_dir`` (created if needed) and return its path.

    ``overrides`` replace fields of the preset (:class:`LiTSPreset`: ``size``, ``fov_mm``, ``z_extent_mm``,
    ``thickness_scale``, ``train_volumes``, ``val_volumes``, ``test_volumes``). See the module docstring for
    what is generated; ``min_tumour_pixels = 12`` matches the paper's 50 px for "quick" (256 x 256), ``3`` for
    "tiny".
    """
    from tqdm.auto import tqdm

    p = _get_preset(preset, overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layout = preset_layout(p)
    centres: dict[str, dict[str, list[int]]] = {c: {"train": [], "val": [], "test": []}
                                                for c in (*TRAIN_CENTRES, TEST_CENTRE)}
    cases_meta = []
    with tqdm(total=len(layout), desc=f"synth lits ({preset})", unit="vol", disable=not progress) as bar:
        for case_id, centre, part in layout:
            vol, lab, px, thick, tumours = _make_volume(case_id, CENTRE_SPECS[centre], p, seed)
            _write_nifti_gz(out / f"volume-{case_id}.nii.gz", vol, px, thick)
            _write_nifti_gz(out / f"segmentation-{case_id}.nii.gz", lab, px, thick)
            centres[centre][part].append(case_id)
            cases_meta.append({"case_id": case_id, "centre": centre, "part": part, "shape": list(vol.shape),
                               "pixel_mm": round(px, 4), "slice_thickness_mm": round(thick, 3), "tumours": tumours})
            bar.update(1)
    split = {
        "dataset": "lits",
        "description": (f"synthetic LiTS ({preset} preset, seed {seed}): centres 1-4 train/val "
                        f"({p.train_volumes}/{p.val_volumes} volumes each), centre 5 test ({p.test_volumes} volumes); "
                        f"volumes numbered consecutively by centre"),
        "centres": centres,
        "sites": {f"site-{i + 1}": c for i, c in enumerate(TRAIN_CENTRES)},
        "test_centre": TEST_CENTRE,
    }
    _write_json(out / "split.json", split)
    _write_json(out / "synthetic.json", {
        "generator": "fedseg.data.synthetic.synth_lits", "version": SYNTH_VERSION, "preset": preset, "seed": seed,
        "parameters": dataclasses.asdict(p),
        "recommended_min_tumour_pixels": RECOMMENDED_MIN_TUMOUR_PIXELS.get(preset),
        "centres": {c: dataclasses.asdict(s) for c, s in CENTRE_SPECS.items()},
        "cases": cases_meta,
    })
    return out
