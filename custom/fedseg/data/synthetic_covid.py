"""Synthetic COVID-19 lung-infection CT data (PPPML-HMI's segmentation task) as real NIfTI files.

:func:`synth_covid` writes the layout read by :mod:`fedseg.data.covid`::

    <out>/<hospital>/imagesTr/<case>.nii.gz   CT volume, int16 HU, array [X, Y, Z] (axial slice k = vol[:, :, k]),
                                              affine diag(-px, -px, thickness) + origin (LPS data in RAS world)
    <out>/<hospital>/labelsTr/<case>.nii.gz   infection mask, uint8 {0, 1}, same shape and affine
    <out>/synthetic.json                      preset, seed, hospital specs, every case's scanner settings and lesions

No ``split.json`` is written: the reader's automatic per-hospital 5-fold split applies (data_args ``fold``).

Each volume is a chest CT: air around a body ellipse (subcutaneous fat ~-100 HU, muscle ~40 HU), ribs (oblique
bone bands in the chest wall, ~500 HU), spine (cortical bone / marrow), descending aorta, heart (lower half),
trachea (upper third) and two lungs (~-860 HU parenchyma with a vessel network) whose cross-section grows from the
apex and whose floor is a diaphragm dome; soft tissue (~55 HU) below it. Infections are irregular 3-D blobs
inside the lungs (a sphere-like distance distorted by a smooth random field, so outlines are lobulated), placed
preferentially in the periphery of the lungs like COVID-19 opacities: ground-glass opacities (GGO, -720..-480 HU)
and consolidations (-120..10 HU; large GGOs may carry a consolidated core). Lesion radii come in three classes --
small 4-8 mm, medium 10-20 mm, large 24-45 mm -- mixed per hospital, so small lesions exist next to large ones.
The label is the blob restricted to the lung (intensity edges are soft, about half a voxel outside the label).

Five hospitals A-E differ like the paper's (section III-B: nine scanner models from Philips, GE and SIEMENS, slice
thicknesses 1.0, 1.25, 2.0, 3.3, 5.0 and 7.5 mm) in :data:`HOSPITALS`: HU calibration (scale / offset), noise
level and grain (correlated noise), reconstruction kernel (in-plane Gaussian blur for soft kernels, unsharp
masking for sharp "lung" kernels), in-plane field of view (so the pixel size differs at the same matrix size),
slice thickness (A mixes 1.25 and 5.0 mm, B 1.0, C 2.0, D 7.5, E 3.3 mm -- all six values of the paper) and the
lesion mix (A: many large consolidating lesions; D: small GGOs; ...). A and D (GE in this simulation) have the
strongest scanner offsets, echoing the paper's Fig. 3A (GE scans separate from the others).

Presets (:data:`PRESETS`; fields can be overridden through ``synth_covid(**overrides)``):

* ``"paper"``: 512 x 512 in-plane, 260-320 mm scan length, A 119, B 22, C 18, D 12, E 9 cases (180; the paper's
  range 9-119 -- its text says C had 9 cases while Table II is not public, so the assignment is ours);
* ``"quick"`` (built-in default): 96 x 96, 150-190 mm, A 9, B 7, C 6, D 5, E 5 cases (32; every hospital >= 5 so
  the automatic 5-fold split gives it train, val and test cases);
* ``"tiny"`` (unit tests): 40 x 40, 40-52 mm, 5 cases per hospital, written in well under 2 s.

The scan length of quick / tiny is shorter than a real chest; the anatomy is laid out relative to the scan length
(apex near the top, diaphragm near the bottom), while in-plane sizes and lesion radii are in true millimetres.
Through-plane partial-volume averaging is not simulated (each slice samples its centre plane).

Generation is vectorised numpy (whole slabs of 48 slices at a time; no per-voxel Python loop) and seeded:
``numpy.random.SeedSequence([seed, hospital index, case index])`` per volume, so the same seed gives the same arrays
and byte-identical files (gzip with ``mtime = 0``).
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

__all__ = [
    "HOSPITALS",
    "HOSPITAL_NAMES",
    "PRESETS",
    "SYNTH_VERSION",
    "CovidPreset",
    "HospitalSpec",
    "case_name",
    "make_case",
    "synth_covid",
]

#: bumped when the generated data changes for the same (preset, seed)
SYNTH_VERSION = 1

#: slabs of this many slices are rendered at once (bounds the memory of the 512 x 512 "paper" preset)
_CHUNK = 48


@dataclass(frozen=True)
class HospitalSpec:
    """Scanner, protocol and lesion mix of one synthetic hospital."""

    name: str
    scanner: str  # free text (which real scanner family it imitates)
    thickness_mm: tuple[float, ...]  # slice thickness, drawn per case from these values
    fov_mm: tuple[float, float]  # in-plane field of view range (pixel size = fov / matrix size)
    hu_scale: float  # HU' = hu_scale * HU + hu_offset (calibration)
    hu_offset: float
    noise_sigma: float  # HU, after blur / sharpening
    noise_grain_mm: float  # in-plane correlation of the noise (0: white)
    blur_mm: float  # in-plane Gaussian sigma of a soft reconstruction kernel (0: none)
    sharpen: float  # unsharp-mask gain of a sharp kernel (0: none)
    n_lesions: tuple[int, int]  # lesions per case, inclusive range
    p_small: float  # probability that a lesion is small (else medium or large)
    p_large: float  # probability that a lesion is large
    p_consolidation: float  # probability that a lesion is a consolidation (else GGO; large GGOs may get a core)


#: the five hospitals (names A-E as in the paper)
HOSPITALS: dict[str, HospitalSpec] = {
    "A": HospitalSpec("A", "GE-like (Discovery CT750 HD)", (1.25, 5.0), (330.0, 380.0), 1.04, -28.0, 20.0, 0.0,
                      0.0, 0.6, n_lesions=(2, 5), p_small=0.25, p_large=0.35, p_consolidation=0.45),
    "B": HospitalSpec("B", "Philips-like (iCT 256)", (1.0,), (340.0, 400.0), 1.00, 0.0, 12.0, 0.8,
                      0.6, 0.0, n_lesions=(2, 4), p_small=0.3, p_large=0.25, p_consolidation=0.25),
    "C": HospitalSpec("C", "Philips-like (Brilliance 16)", (2.0,), (320.0, 360.0), 0.98, 8.0, 16.0, 0.0,
                      0.9, 0.0, n_lesions=(1, 4), p_small=0.3, p_large=0.3, p_consolidation=0.3),
    "D": HospitalSpec("D", "GE-like (Optima CT520)", (7.5,), (360.0, 420.0), 0.95, 35.0, 26.0, 1.2,
                      1.4, 0.0, n_lesions=(2, 6), p_small=0.55, p_large=0.1, p_consolidation=0.15),
    "E": HospitalSpec("E", "SIEMENS-like (SOMATOM Scope)", (3.3,), (330.0, 370.0), 1.01, -6.0, 10.0, 0.6,
                      0.5, 0.3, n_lesions=(1, 3), p_small=0.35, p_large=0.3, p_consolidation=0.35),
}
HOSPITAL_NAMES = tuple(HOSPITALS)

#: lesion radius classes (in-plane radius in mm, uniform in the range)
_RADII_MM = {"small": (4.0, 8.0), "medium": (10.0, 20.0), "large": (24.0, 45.0)}


@dataclass(frozen=True)
class CovidPreset:
    """Size of a synthetic COVID data set (override fields through ``synth_covid(**overrides)``)."""

    size: int  # in-plane matrix (square)
    z_extent_mm: tuple[float, float]  # scan length range
    counts: tuple[int, int, int, int, int]  # cases of hospitals A-E


PRESETS: dict[str, CovidPreset] = {
    "paper": CovidPreset(size=512, z_extent_mm=(260.0, 320.0), counts=(119, 22, 18, 12, 9)),
    "quick": CovidPreset(size=96, z_extent_mm=(150.0, 190.0), counts=(9, 7, 6, 5, 5)),
    "tiny": CovidPreset(size=40, z_extent_mm=(40.0, 52.0), counts=(5, 5, 5, 5, 5)),
}


def _get_preset(preset: str, overrides: dict[str, Any]) -> CovidPreset:
    if preset not in PRESETS:
        raise ConfigError(f"unknown synthetic COVID preset {preset!r}; known presets: {', '.join(PRESETS)}")
    allowed = {f.name for f in dataclasses.fields(CovidPreset)}
    bad = sorted(set(overrides) - allowed)
    if bad:
        raise ConfigError(f"unknown synth_covid override(s) {bad}; allowed: {', '.join(sorted(allowed))}")
    p = dataclasses.replace(PRESETS[preset], **overrides)
    counts = tuple(int(c) for c in p.counts)
    if len(counts) != len(HOSPITALS) or min(counts) < 1:
        raise ConfigError(f"synthetic COVID counts must be {len(HOSPITALS)} positive case numbers (A-E), "
                          f"got {p.counts}")
    lo, hi = (float(v) for v in p.z_extent_mm)
    if int(p.size) < 16 or not (0 < lo <= hi):
        raise ConfigError(f"synthetic COVID preset needs size >= 16 and 0 < z_extent_mm[0] <= z_extent_mm[1]; got {p}")
    return dataclasses.replace(p, size=int(p.size), counts=counts, z_extent_mm=(lo, hi))


def case_name(hospital: str, index: int) -> str:
    """``A000001``-style case names (the paper shows cases such as A000069)."""
    return f"{hospital}{index + 1:06d}"


# ------------------------------------------------------------------------------------------ smooth random fields
class _Field:
    """Smooth random field (std ~1) on a coarse grid of ``spacing`` mm, evaluated by trilinear interpolation.

    ``at(rows, cols, zs)`` (1-D mm coordinates) returns the values on their tensor grid, so any window of the
    volume is consistent with any other (slabs and lesion boxes see the same field).
    """

    def __init__(self, rng: np.random.Generator, extent_mm: tuple[float, float, float], spacing: float) -> None:
        self.spacing = float(spacing)
        self.origin = tuple(-e / 2.0 - 2 * spacing for e in extent_mm[:2]) + (-2 * spacing,)
        shape = tuple(math.ceil(e / spacing) + 5 for e in extent_mm)
        g = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=1.0, mode="nearest")
        self.grid = g / max(float(g.std()), 1e-6)

    def _index(self, coords: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
        m = self.grid.shape[axis]
        pos = np.clip((np.asarray(coords, np.float64) - self.origin[axis]) / self.spacing, 0, m - 1.000001)
        lo = np.floor(pos).astype(np.int64)
        return lo, (pos - lo).astype(np.float32)

    def at(self, rows: np.ndarray, cols: np.ndarray, zs: np.ndarray) -> np.ndarray:
        # linear interpolation axis by axis with gathers (no BLAS: exact and thread-count independent)
        (lr, fr), (lc, fc), (lz, fz) = self._index(rows, 0), self._index(cols, 1), self._index(zs, 2)
        g = self.grid[lr.min():lr.max() + 2, lc.min():lc.max() + 2]
        lr, lc = lr - lr.min(), lc - lc.min()
        t = g[:, :, lz] * (1.0 - fz) + g[:, :, lz + 1] * fz  # [a, b, k]
        t = t[lr] * (1.0 - fr)[:, None, None] + t[lr + 1] * fr[:, None, None]  # [i, b, k]
        return t[:, lc] * (1.0 - fc)[None, :, None] + t[:, lc + 1] * fc[None, :, None]  # [i, j, k]


# ------------------------------------------------------------------------------------------ one case
@dataclass
class _Anatomy:
    a: float  # body lateral semi-axis (mm)
    b: float  # body antero-posterior semi-axis
    fat: float
    muscle: float
    lung_u: tuple[float, float]  # apex, base (u = z / length; dome centre is `dome` higher)
    dome: float
    lung_c: float  # lateral offset of the lung centres
    lung_r: float  # antero-posterior offset of the lung centres
    lung_ax: tuple[float, float]  # lateral, AP semi-axes of the right lung (left: x 0.92)
    rib_phase: float
    rib_count: float


def _draw_anatomy(rng: np.random.Generator) -> _Anatomy:
    a, b = float(rng.uniform(140, 172)), float(rng.uniform(100, 124))
    fat, muscle = float(rng.uniform(6, 18)), float(rng.uniform(8, 13))
    ai, bi = a - fat - muscle, b - fat - muscle
    return _Anatomy(a, b, fat, muscle, lung_u=(float(rng.uniform(0.0, 0.06)), float(rng.uniform(0.86, 0.95))),
                    dome=float(rng.uniform(0.08, 0.16)), lung_c=float(rng.uniform(0.44, 0.50)) * ai,
                    lung_r=float(rng.uniform(-0.02, 0.08)) * bi,
                    lung_ax=(float(rng.uniform(0.36, 0.42)) * ai, float(rng.uniform(0.74, 0.84)) * bi),
                    rib_phase=float(rng.uniform(0, 2 * math.pi)), rib_count=float(rng.uniform(8.0, 10.0)))


def _lung_scale(u: np.ndarray, an: _Anatomy) -> np.ndarray:
    """Cross-section scale of the lungs along the scan (0 above the apex, growing to 1 over 30% of the length)."""
    return np.sqrt(np.clip((u - an.lung_u[0]) / 0.3, 0.0, 1.0)).astype(np.float32)


def _lung_q(side: float, rows: np.ndarray, cols: np.ndarray, s: np.ndarray, an: _Anatomy) -> np.ndarray:
    """Normalised squared radius of one lung's elliptical cross-section, [n, n, k] (<= 1 inside)."""
    lx = an.lung_ax[0] * (1.0 if side < 0 else 0.92)
    ly = an.lung_ax[1]
    ss = np.maximum(s, 1e-3)[None, None, :]
    dc = (cols[None, :, None] - np.float32(side * an.lung_c)) / np.float32(lx)
    dr = (rows[:, None, None] - np.float32(an.lung_r)) / np.float32(ly)
    return (dc * dc + dr * dr) / (ss * ss)


def _draw_lesions(rng: np.random.Generator, spec: HospitalSpec, an: _Anatomy, length: float) -> list[dict[str, Any]]:
    n = int(rng.integers(spec.n_lesions[0], spec.n_lesions[1] + 1))
    lesions = []
    for _ in range(n):
        r = float(rng.uniform())
        kind = "small" if r < spec.p_small else ("large" if r < spec.p_small + spec.p_large else "medium")
        radius = float(rng.uniform(*_RADII_MM[kind]))
        side = -1.0 if rng.uniform() < 0.5 else 1.0
        u = float(rng.uniform(an.lung_u[0] + 0.25, an.lung_u[1] - an.dome - 0.02))
        s = float(np.sqrt(np.clip((u - an.lung_u[0]) / 0.3, 0.0, 1.0)))
        # periphery and posterior bias (subpleural, dependent opacities)
        # rows grow posteriorly (+pi/2 points to the back); mean pi/3 = lateral-posterior for the lung at +columns,
        # mirrored for the other lung
        theta = float(rng.vonmises(math.pi / 3, 1.0))
        theta = theta if side > 0 else math.pi - theta
        rho = float(rng.uniform(0.45, 0.92))
        lx = an.lung_ax[0] * (1.0 if side < 0 else 0.92) * s
        ly = an.lung_ax[1] * s
        cc = side * an.lung_c + rho * lx * math.cos(theta)
        cr = an.lung_r + rho * ly * math.sin(theta)
        consolidation = bool(rng.uniform() < spec.p_consolidation)
        core = bool(kind == "large" and not consolidation and rng.uniform() < 0.5)
        lesions.append({
            "kind": kind, "type": "consolidation" if consolidation else ("ggo+core" if core else "ggo"),
            "centre_mm": [round(cr, 2), round(cc, 2), round(u * length, 2)],
            "radii_mm": [round(radius * float(rng.uniform(0.75, 1.25)), 2), round(radius * float(rng.uniform(0.75, 1.25)), 2),
                         round(radius * float(rng.uniform(0.6, 1.2)), 2)],
            "hu": round(float(rng.uniform(-120, 10)) if consolidation else float(rng.uniform(-720, -480)), 1),
            "core_hu": round(float(rng.uniform(-100, 0)), 1) if core else None,
            "irregularity": round(float(rng.uniform(0.25, 0.45)), 3),
        })
    return lesions


def make_case(hospital: str, index: int, preset: CovidPreset, seed: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """One synthetic case: (HU int16 [X, Y, Z], infection mask uint8 [X, Y, Z], affine 4x4, metadata)."""
    spec = HOSPITALS[hospital]
    h_index = HOSPITAL_NAMES.index(hospital)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), h_index, int(index), 0xC0D]))
    n = preset.size
    fov = float(rng.uniform(*spec.fov_mm))
    px = fov / n
    thickness = float(spec.thickness_mm[int(rng.integers(len(spec.thickness_mm)))])
    length = float(rng.uniform(*preset.z_extent_mm))
    nz = max(4, round(length / thickness))
    length = nz * thickness
    rows = ((np.arange(n) + 0.5) * px - fov / 2).astype(np.float32)
    cols = rows.copy()
    zs_all = ((np.arange(nz) + 0.5) * thickness).astype(np.float32)
    an = _draw_anatomy(rng)
    lesions = _draw_lesions(rng, spec, an, length)
    extent = (fov, fov, length)
    tex = _Field(rng, extent, 14.0)
    vessels = _Field(rng, extent, 7.0)
    shape_f = _Field(rng, extent, 9.0)
    les_tex = _Field(rng, extent, 5.0)
    noise_seed = np.random.SeedSequence([int(seed), h_index, int(index), 0x5EED])
    noise_rng = np.random.default_rng(noise_seed)

    hu = np.empty((n, n, nz), dtype=np.int16)
    lab = np.zeros((n, n, nz), dtype=np.uint8)
    ai, bi = an.a - an.fat - an.muscle, an.b - an.fat - an.muscle
    R = rows[:, None, None]
    C = cols[None, :, None]
    theta = np.arctan2(rows[:, None] * np.float32(ai / bi), cols[None, :])[:, :, None]
    for z0 in range(0, nz, _CHUNK):
        z1 = min(nz, z0 + _CHUNK)
        zs = zs_all[z0:z1]
        u = zs / np.float32(length)
        U = u[None, None, :]
        wob = (1.0 + 0.04 * np.sin(np.pi * u))[None, None, :].astype(np.float32)
        body_q = (C / (an.a * wob)) ** 2 + (R / (an.b * wob)) ** 2
        musc_q = (C / ((an.a - an.fat) * wob)) ** 2 + (R / ((an.b - an.fat) * wob)) ** 2
        inner_q = (C / (ai * wob)) ** 2 + (R / (bi * wob)) ** 2
        t = tex.at(rows, cols, zs)
        x = np.full((n, n, z1 - z0), -1000.0, dtype=np.float32)
        table = (R > an.b + 12) & (R < an.b + 18) & (np.abs(C) < 0.8 * fov / 2)
        x[np.broadcast_to(table, x.shape)] = 80.0  # patient table
        body = body_q <= 1.0
        x = np.where(body, np.float32(-100.0) + 12.0 * t, x)
        x = np.where(musc_q <= 1.0, np.float32(42.0) + 6.0 * t, x)
        inner = inner_q <= 1.0
        x = np.where(inner, np.float32(45.0) + 8.0 * t, x)  # mediastinum / upper abdomen soft tissue
        # ribs: oblique bone bands in the chest wall (both sides symmetric), above the diaphragm region
        shell = (inner_q > 0.80) & (inner_q <= 0.96) & (U < an.lung_u[1])
        band = np.sin(2 * np.pi * (an.rib_count * U + 1.1 * np.abs(np.cos(theta))) + an.rib_phase) > 0.55
        x = np.where(shell & band & (R < 0.85 * bi), np.float32(480.0), x)
        # spine, aorta, heart, trachea
        sy = bi - 22.0
        x = np.where((C / 16.0) ** 2 + ((R - sy) / 15.0) ** 2 <= 1.0, np.float32(650.0), x)
        x = np.where((C / 12.0) ** 2 + ((R - sy) / 11.0) ** 2 <= 1.0, np.float32(220.0), x)
        x = np.where(((C - 24.0) / 11.0) ** 2 + ((R - sy + 34.0) / 11.0) ** 2 <= 1.0, np.float32(48.0), x)
        heart_s = np.clip((U - 0.38) / 0.2, 0.0, 1.0) * np.float32(1.0)
        heart_q = ((C - 0.12 * ai) / (0.40 * ai * np.maximum(heart_s, 1e-3))) ** 2 \
            + ((R + 0.22 * bi) / (0.48 * bi * np.maximum(heart_s, 1e-3))) ** 2
        heart = (heart_q <= 1.0) & (heart_s > 0.05)
        x = np.where(heart, np.float32(40.0) + 5.0 * t, x)
        trachea = ((C / 8.0) ** 2 + ((R + 0.12 * bi) / 8.0) ** 2 <= 1.0) & (U < 0.35)
        # lungs with diaphragm domes
        s = _lung_scale(u, an)
        lung = np.zeros(x.shape, dtype=bool)
        for side in (-1.0, 1.0):
            q = _lung_q(side, rows, cols, s, an)
            lung |= (q <= 1.0) & (U >= an.lung_u[0]) & (U <= an.lung_u[1] - an.dome * (1.0 - np.minimum(q, 1.0)))
        lung &= inner & ~heart & (inner_q <= 0.80)
        v = vessels.at(rows, cols, zs)
        x = np.where(lung, np.float32(-860.0) + 25.0 * t, x)
        x = np.where(lung & (np.abs(v) < 0.07), np.float32(-60.0), x)
        x = np.where(trachea & inner, np.float32(-990.0), x)
        # infections
        ys_lab = lab[:, :, z0:z1]
        for les in lesions:
            cr, cc, cz = les["centre_mm"]
            rr, rc, rz = les["radii_mm"]
            reach = 1.1 + les["irregularity"] * 3.0
            k0, k1 = np.searchsorted(zs, cz - rz * reach), np.searchsorted(zs, cz + rz * reach, side="right")
            r0, r1 = np.searchsorted(rows, cr - rr * reach), np.searchsorted(rows, cr + rr * reach, side="right")
            c0, c1 = np.searchsorted(cols, cc - rc * reach), np.searchsorted(cols, cc + rc * reach, side="right")
            if k0 >= k1 or r0 >= r1 or c0 >= c1:
                continue
            wr, wc, wz = rows[r0:r1], cols[c0:c1], zs[k0:k1]
            d = np.sqrt(((wr[:, None, None] - cr) / rr) ** 2 + ((wc[None, :, None] - cc) / rc) ** 2
                        + ((wz[None, None, :] - cz) / rz) ** 2)
            qq = d + np.float32(les["irregularity"]) * np.clip(shape_f.at(wr, wc, wz), -3, 3)
            lw = lung[r0:r1, c0:c1, k0:k1]
            inside = (qq < 1.0) & lw
            if not inside.any():
                continue
            w = np.clip(0.5 + (1.0 - qq) * 4.0, 0.0, 1.0) * lw
            val = np.float32(les["hu"]) + 35.0 * les_tex.at(wr, wc, wz)
            if les["core_hu"] is not None:
                val = np.where(qq < 0.45, np.float32(les["core_hu"]), val)
            win = x[r0:r1, c0:c1, k0:k1]
            x[r0:r1, c0:c1, k0:k1] = win * (1.0 - w) + val * w
            ys_lab[r0:r1, c0:c1, k0:k1] |= inside.astype(np.uint8)
        # scanner: calibration, reconstruction kernel, noise (in-plane operations only: slab-safe)
        x *= np.float32(spec.hu_scale)
        x += np.float32(spec.hu_offset)
        if spec.blur_mm > 0:
            x = ndimage.gaussian_filter(x, sigma=(spec.blur_mm / px, spec.blur_mm / px, 0.0), mode="nearest")
        if spec.sharpen > 0:
            x += np.float32(spec.sharpen) * (x - ndimage.gaussian_filter(x, sigma=(1.0, 1.0, 0.0), mode="nearest"))
        noise = noise_rng.standard_normal(x.shape, dtype=np.float32)
        if spec.noise_grain_mm > 0:
            g = spec.noise_grain_mm / px
            noise = ndimage.gaussian_filter(noise, sigma=(g, g, 0.0), mode="wrap")
            noise /= max(float(noise.std()), 1e-6)
        x += noise * np.float32(spec.noise_sigma)
        hu[:, :, z0:z1] = np.clip(np.rint(x), -1024, 3071).astype(np.int16)
    affine = np.array([[-px, 0, 0, fov / 2 - px / 2], [0, -px, 0, fov / 2 - px / 2],
                       [0, 0, thickness, -length / 2 + thickness / 2], [0, 0, 0, 1]], dtype=np.float64)
    meta = {"pixel_mm": round(px, 4), "slice_thickness_mm": thickness, "shape": [n, n, nz],
            "fov_mm": round(fov, 2), "infection_voxels": int(lab.sum()), "lesions": lesions}
    return hu, lab, affine, meta


# ------------------------------------------------------------------------------------------ writing
def _write_nifti_gz(path: Path, arr: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units("mm")
    img.header.set_data_dtype(arr.dtype)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    data = gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)  # mtime 0: byte-identical reruns
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def synth_covid(out_dir: str | Path, preset: str = "quick", seed: int = 0, progress: bool = True,
                **overrides: Any) -> Path:
    """Write a synthetic COVID data set (hospitals A-E, NIfTI) into ``out_dir`` (created if needed); return it.

    ``overrides`` replace fields of the preset (:class:`CovidPreset`: ``size``, ``z_extent_mm``, ``counts``), e.g.
    ``synth_covid(out, "paper", size=64)`` writes the paper's 180 cases at a small matrix size.
    """
    from tqdm.auto import tqdm

    p = _get_preset(preset, overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cases_meta: dict[str, list[dict[str, Any]]] = {}
    with tqdm(total=sum(p.counts), desc=f"synth covid ({preset})", unit="vol", disable=not progress) as bar:
        for hospital, count in zip(HOSPITAL_NAMES, p.counts):
            img_dir, lab_dir = out / hospital / "imagesTr", out / hospital / "labelsTr"
            img_dir.mkdir(parents=True, exist_ok=True)
            lab_dir.mkdir(parents=True, exist_ok=True)
            cases_meta[hospital] = []
            for i in range(count):
                name = case_name(hospital, i)
                hu, lab, affine, meta = make_case(hospital, i, p, seed)
                _write_nifti_gz(img_dir / f"{name}.nii.gz", hu, affine)
                _write_nifti_gz(lab_dir / f"{name}.nii.gz", lab, affine)
                cases_meta[hospital].append({"case": name, **meta})
                bar.update(1)
    info = {
        "generator": "fedseg.data.synthetic_covid.synth_covid", "version": SYNTH_VERSION, "preset": preset,
        "seed": int(seed), "parameters": dataclasses.asdict(p),
        "hospitals": {h: dataclasses.asdict(s) for h, s in HOSPITALS.items()},
        "cases": cases_meta,
    }
    tmp = out / f"synthetic.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out / "synthetic.json")
    return out
