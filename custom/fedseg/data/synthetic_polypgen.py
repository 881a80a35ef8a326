"""Synthetic PolypGen-format data: RGB JPEG colonoscopy-like frames and JPEG masks with heterogeneity we control.

:func:`synth_polypgen` writes the real PolypGen layout (six centres, single frames)::

    data_C<n>/images_C<n>/C<n>_<i>.jpg          RGB frame (JPEG)
    data_C<n>/masks_C<n>/C<n>_<i>_mask.jpg      lesion mask (JPEG, 0 background / 255 polyp, grey JPEG artefacts)
    split.json                                  5 folds per centre 1-5, centre 6 = test (fedseg.data.polypgen format)
    synthetic.json                              preset, seed, centre styles and every polyp drawn

A frame: pinkish mucosa with low-frequency colour variation and a fine vessel network, a dark lumen with
circular folds around it (shaded ridges), polyps as brighter/redder domes with Lambertian shading, a dark rim
and specular highlights, more highlights on folds, vignetting, then the centre's endoscope style.

Heterogeneity per centre (:data:`CENTRE_STYLES`):

* endoscope style: resolution and aspect (``centre-1``/``centre-6`` 5:4 like the 1350 x 1080 frames of the
  real data, scaled down; ``centre-3``/``centre-5`` 4:3; ``centre-2``/``centre-4`` square), field-of-view
  border (octagon, circle or none), colour cast, illumination gain and gamma, vignetting, blur, sensor
  noise and JPEG quality;
* lesion-size mix: the share of frames with at least one *small* polyp (``p_small``: 10-30 %, a minority in
  every centre, as in the FedGS supplementary Fig. 1(a)), the area range of large polyps, and a few frames
  without polyp. Small-polyp frames are of three kinds: isolated small polyp(s), a small polyp *attached* to
  a large one (one connected mask; the FedGS paper's hard case), and a small polyp next to a separate large
  one. Every centre has at least one small-polyp frame and, with >= 2 of them, at least one attached one.

"Small" is meant in FedGS' PolypGen sense, ``H * W / area(smallest polyp) >= tau = 150``: small polyps cover
``1/900 .. 1/320`` of the frame (inverse area 320-900; ``1/600 .. 1/300`` for "tiny"), large ones 1-30 %
(inverse area 3-95), so the classification has a wide margin on both sides of tau. An attached small polyp
overlaps the large one (its centre :data:`ATTACH_OFFSET` radii outside the large boundary): one connected mask
with a neck about one small-polyp radius wide, the case the FedGS blob detector erodes the mask for.

Presets (:data:`PRESETS`): ``"quick"`` (CPU demo: 36/32/40/30/34 frames in centres 1-5, 40 test frames in
centre 6, native 256-384 px) and ``"tiny"`` (tests: 6-8 frames per centre at 0.4x the quick resolution, still
with small and large polyps). Generation is seeded (``numpy.random.SeedSequence([seed, centre, frame])`` per
frame) and reproducible: the same seed writes byte-identical files.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedseg.errors import ConfigError

__all__ = ["SYNTH_VERSION", "CentreStyle", "PolypGenPreset", "PRESETS", "CENTRE_STYLES", "TRAIN_CENTRES",
           "TEST_CENTRE", "N_FOLDS", "ATTACH_OFFSET", "synth_polypgen", "plan_polypgen"]

#: bumped when the generated data changes for the same (preset, seed)
SYNTH_VERSION = 1
N_FOLDS = 5
TRAIN_CENTRES = ("centre-1", "centre-2", "centre-3", "centre-4", "centre-5")
TEST_CENTRE = "centre-6"
CENTRES = (*TRAIN_CENTRES, TEST_CENTRE)


@dataclass(frozen=True)
class CentreStyle:
    """Endoscope style and lesion-size mix of one synthetic centre."""

    name: str
    size: tuple[int, int]  # (width, height) at the "quick" preset (scaled by the preset's ``scale``)
    border: str  # field-of-view border: "octagon", "circle" or "none"
    cast: tuple[float, float, float]  # per-channel gain (colour cast)
    gain: float  # illumination
    gamma: float
    vignette: float  # 0..1, brightness loss in the corners
    blur: float  # Gaussian sigma, px at the quick resolution
    noise: float  # sensor noise sigma (colours in [0, 1])
    jpeg_quality: int
    p_small: float  # share of frames with >= 1 small polyp
    large_area: tuple[float, float]  # area-fraction range of large polyps (log-uniform)
    p_empty: float  # share of frames without polyp


#: centre -> style. Sizes: 5:4 (the real 1350 x 1080 frames, scaled), 4:3 and square.
CENTRE_STYLES: dict[str, CentreStyle] = {
    "centre-1": CentreStyle("centre-1", (320, 256), "octagon", (1.06, 0.97, 0.90), 1.00, 1.00, 0.35, 0.6, 0.010,
                            90, p_small=0.15, large_area=(0.03, 0.30), p_empty=0.03),
    "centre-2": CentreStyle("centre-2", (288, 288), "circle", (0.94, 1.00, 1.10), 1.08, 0.95, 0.25, 0.0, 0.015,
                            85, p_small=0.25, large_area=(0.02, 0.15), p_empty=0.0),
    "centre-3": CentreStyle("centre-3", (352, 264), "none", (1.12, 0.90, 0.96), 0.95, 1.05, 0.60, 1.2, 0.020,
                            75, p_small=0.10, large_area=(0.04, 0.25), p_empty=0.03),
    "centre-4": CentreStyle("centre-4", (256, 256), "circle", (1.00, 1.03, 0.82), 0.85, 1.00, 0.30, 0.3, 0.010,
                            92, p_small=0.30, large_area=(0.015, 0.12), p_empty=0.0),
    "centre-5": CentreStyle("centre-5", (384, 288), "octagon", (1.02, 0.95, 1.00), 1.12, 0.90, 0.40, 0.8, 0.012,
                            88, p_small=0.20, large_area=(0.02, 0.20), p_empty=0.03),
    "centre-6": CentreStyle("centre-6", (320, 256), "none", (0.98, 0.97, 1.04), 1.00, 1.00, 0.45, 0.5, 0.012,
                            90, p_small=0.30, large_area=(0.02, 0.20), p_empty=0.03),
}


@dataclass(frozen=True)
class PolypGenPreset:
    """Size of a synthetic PolypGen data set (fields can be overridden through ``synth_polypgen(**overrides)``)."""

    scale: float  # multiplies every centre's quick resolution
    images: tuple[int, int, int, int, int, int]  # frames per centre, centres 1..6 (centre 6 = test)
    small_area: tuple[float, float]  # area-fraction range of small polyps (log-uniform)
    mask_quality: int = 95  # JPEG quality of the masks (real PolypGen masks are JPEG too)


PRESETS: dict[str, PolypGenPreset] = {
    "quick": PolypGenPreset(scale=1.0, images=(36, 32, 40, 30, 34, 40), small_area=(1 / 900, 1 / 320)),
    "tiny": PolypGenPreset(scale=0.4, images=(7, 6, 7, 6, 7, 8), small_area=(1 / 600, 1 / 300)),
}
_KINDS = ("large", "small", "attached", "large+small", "empty")
#: an attached small polyp's centre lies this many of its radii outside the large polyp's boundary: the two
#: overlap and form one connected mask with a neck about one small-polyp radius wide
ATTACH_OFFSET = 0.85


def _get_preset(preset: str, overrides: dict[str, Any]) -> PolypGenPreset:
    if preset not in PRESETS:
        raise ConfigError(f"unknown synthetic PolypGen preset {preset!r}; known presets: {', '.join(PRESETS)}")
    allowed = {f.name for f in dataclasses.fields(PolypGenPreset)}
    bad = sorted(set(overrides) - allowed)
    if bad:
        raise ConfigError(f"unknown synth_polypgen override(s) {bad}; allowed: {', '.join(sorted(allowed))}")
    p = dataclasses.replace(PRESETS[preset], **overrides)
    if len(p.images) != len(CENTRES) or min(p.images[:5]) < N_FOLDS or p.images[5] < 1:
        raise ConfigError(f"synthetic PolypGen needs {len(CENTRES)} image counts with >= {N_FOLDS} frames in each "
                          f"training centre (one per fold) and >= 1 test frame; got images={p.images}")
    if not (0.1 <= p.scale <= 4.0):
        raise ConfigError(f"synthetic PolypGen scale must be in [0.1, 4], got {p.scale}")
    return p


def _frame_size(style: CentreStyle, preset: PolypGenPreset) -> tuple[int, int]:
    """(width, height), rounded to even numbers, at least 32 px."""
    return tuple(max(32, 2 * round(v * preset.scale / 2)) for v in style.size)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ plan
def plan_polypgen(preset: str = "quick", seed: int = 0, **overrides: Any) -> dict[str, list[dict[str, Any]]]:
    """Per centre, the frames to draw: ``{"stem", "kind", "fold"|None}`` (no pixels are rendered).

    Kinds: ``large`` (1-2 large polyps), ``small`` (1-2 isolated small polyps), ``attached`` (a large polyp
    with a small one attached), ``large+small`` (separate large and small polyps), ``empty`` (no polyp). The
    number of small-polyp frames is ``round(p_small * n)`` clipped to ``[1, (n - 1) // 2]`` (so small frames
    are a minority and never absent); of these ``max(1, round(0.35 k))`` are ``attached`` when k >= 2 and
    ``round(0.2 k)`` are ``large+small`` when k >= 3. Folds (centres 1-5) are stratified: small-polyp frames
    are dealt round-robin over the folds first, then the rest.
    """
    p = _get_preset(preset, overrides)
    out: dict[str, list[dict[str, Any]]] = {}
    for ci, centre in enumerate(CENTRES):
        style = CENTRE_STYLES[centre]
        n = p.images[ci]
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), ci + 1, 0x9017]))
        n_small = int(min(max(1, round(style.p_small * n)), (n - 1) // 2))
        n_empty = int(min(round(style.p_empty * n), n - n_small - 1))
        n_attached = 0 if n_small < 2 else max(1, round(0.35 * n_small))
        n_both = round(0.20 * n_small) if n_small >= 3 else 0
        kinds = (["attached"] * n_attached + ["large+small"] * n_both + ["small"] * (n_small - n_attached - n_both)
                 + ["empty"] * n_empty + ["large"] * (n - n_small - n_empty))
        kinds = [kinds[i] for i in rng.permutation(n)]  # random positions, fixed counts
        tag = f"C{ci + 1}"
        frames = [{"stem": f"{tag}_{i:04d}", "kind": kinds[i], "fold": None} for i in range(n)]
        if centre != TEST_CENTRE:
            small_idx = [i for i in range(n) if kinds[i] in ("small", "attached", "large+small")]
            other_idx = [i for i in range(n) if i not in small_idx]
            dealt = list(rng.permutation(small_idx)) + list(rng.permutation(other_idx))
            start = int(rng.integers(N_FOLDS))
            for k, i in enumerate(dealt):
                frames[int(i)]["fold"] = (start + k) % N_FOLDS
        out[centre] = frames
    return out


# ------------------------------------------------------------------------------------------ rendering helpers
def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: float, channels: int = 1) -> np.ndarray:
    """Smooth noise of unit std, shape (channels, h, w); ``cells`` coarse cells along the shorter side.

    A coarse Gaussian grid, lightly smoothed, upsampled bicubically with PIL (no BLAS: small matrix products
    are pathologically slow with OpenBLAS threads on a busy machine).
    """
    from PIL import Image
    from scipy import ndimage

    gh = max(3, int(round(cells * h / min(h, w))) + 3)
    gw = max(3, int(round(cells * w / min(h, w))) + 3)
    g = rng.standard_normal((channels, gh, gw)).astype(np.float32)
    g = ndimage.gaussian_filter(g, sigma=(0, 0.8, 0.8), mode="reflect")
    f = np.stack([np.asarray(Image.fromarray(g[c], mode="F").resize((w, h), Image.BICUBIC)) for c in range(channels)])
    f -= f.mean()
    f /= max(float(f.std()), 1e-6)
    return f


def _fov_mask(h: int, w: int, border: str) -> np.ndarray:
    """Field of view of the endoscope (True = image content): octagon, circle or the whole frame."""
    yy = (np.arange(h, dtype=np.float32)[:, None] + 0.5 - h / 2) / (h / 2)
    xx = (np.arange(w, dtype=np.float32)[None, :] + 0.5 - w / 2) / (w / 2)
    if border == "circle":
        r = min(h, w) / 2 * 1.06  # slightly larger than the inscribed circle: the corners are black
        return (xx * w / 2) ** 2 + (yy * h / 2) ** 2 <= r * r
    if border == "octagon":
        return np.abs(xx) + np.abs(yy) <= 1.62
    return np.ones((h, w), dtype=bool)


@dataclass
class _Polyp:
    kind: str  # "large" or "small"
    cx: float
    cy: float
    ax: float
    ay: float
    angle: float
    harm: tuple[float, float, float, float]  # boundary harmonics a2, a3 and phases
    tint: tuple[float, float, float]
    attached_to: int | None = None

    def radius_towards(self, theta: float) -> float:
        """Boundary radius (px) of this polyp in image direction ``theta``."""
        t = theta - self.angle
        c, s = math.cos(t), math.sin(t)
        base = 1.0 / math.sqrt((c / self.ax) ** 2 + (s / self.ay) ** 2)
        a2, a3, p2, p3 = self.harm
        return base * (1 + a2 * math.cos(2 * t + p2) + a3 * math.cos(3 * t + p3))

    def rho(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Normalised radius (<= 1 inside) on the grid ``ys[:, None]``, ``xs[None, :]``."""
        dx = xs[None, :] - np.float32(self.cx)
        dy = ys[:, None] - np.float32(self.cy)
        c, s = np.float32(math.cos(self.angle)), np.float32(math.sin(self.angle))
        u, v = c * dx + s * dy, -s * dx + c * dy
        t = np.arctan2(v, u)
        a2, a3, p2, p3 = self.harm
        r = np.sqrt((u / np.float32(self.ax)) ** 2 + (v / np.float32(self.ay)) ** 2)
        return r / (1 + a2 * np.cos(2 * t + p2) + a3 * np.cos(3 * t + p3))

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind, "centre_xy": [round(self.cx, 2), round(self.cy, 2)],
                "axes": [round(self.ax, 2), round(self.ay, 2)], "angle": round(self.angle, 3),
                "area_px": round(math.pi * self.ax * self.ay, 1), "attached_to": self.attached_to}


def _draw_polyp(rng: np.random.Generator, kind: str, area: float, h: int, w: int, fov: np.ndarray,
                others: list[_Polyp], attach: _Polyp | None = None) -> _Polyp:
    e = float(rng.uniform(0.65, 1.0))
    ax = math.sqrt(area / (math.pi * e))
    ay = e * ax
    angle = float(rng.uniform(0, math.pi))
    harm = ((float(rng.uniform(0.0, 0.10)), float(rng.uniform(0.0, 0.06)), float(rng.uniform(0, 2 * math.pi)),
             float(rng.uniform(0, 2 * math.pi))) if kind == "large" else (0.0, 0.0, 0.0, 0.0))
    tint = (float(rng.uniform(1.04, 1.14)), float(rng.uniform(0.80, 0.95)), float(rng.uniform(0.80, 0.95)))
    r_ext = max(ax, ay)
    for _ in range(200):
        if attach is not None:  # on the boundary of the large polyp, overlapping it a little (neck ~ 1 radius)
            theta = float(rng.uniform(0, 2 * math.pi))
            d = attach.radius_towards(theta) + ATTACH_OFFSET * r_ext
            cx, cy = attach.cx + d * math.cos(theta), attach.cy + d * math.sin(theta)
        elif kind == "large":
            cx, cy = float(rng.uniform(0.25, 0.75)) * w, float(rng.uniform(0.25, 0.75)) * h
        else:
            cx, cy = float(rng.uniform(0.12, 0.88)) * w, float(rng.uniform(0.12, 0.88)) * h
        ix, iy = int(cx), int(cy)
        if not (r_ext + 1 <= cx <= w - r_ext - 1 and r_ext + 1 <= cy <= h - r_ext - 1):
            if kind == "small":
                continue  # small polyps lie fully inside the frame
        if not (0 <= ix < w and 0 <= iy < h and fov[iy, ix]):
            continue
        clear = True
        for o in others:
            if o is attach:
                continue
            gap = math.hypot(cx - o.cx, cy - o.cy) - o.radius_towards(math.atan2(cy - o.cy, cx - o.cx)) - r_ext
            if gap < 4.0:
                clear = False
                break
        if clear:
            return _Polyp(kind, cx, cy, ax, ay, angle, harm, tint)
    # fallback: anywhere inside the field of view (may touch another polyp)
    ys, xs = np.nonzero(fov)
    k = int(rng.integers(ys.size))
    return _Polyp(kind, float(xs[k]), float(ys[k]), ax, ay, angle, harm, tint)


def _render(rng: np.random.Generator, style: CentreStyle, preset: PolypGenPreset, kind: str
            ) -> tuple[np.ndarray, np.ndarray, list[_Polyp]]:
    """One frame: (RGB uint8 [H, W, 3], mask bool [H, W], polyps)."""
    from scipy import ndimage

    w, h = _frame_size(style, preset)
    hw = float(h * w)
    s = min(h, w)
    xs = np.arange(w, dtype=np.float32) + 0.5
    ys = np.arange(h, dtype=np.float32) + 0.5
    fov = _fov_mask(h, w, style.border)

    # ---- polyps (geometry first)
    polyps: list[_Polyp] = []

    def large_area() -> float:
        lo, hi = style.large_area
        return hw * math.exp(rng.uniform(math.log(lo), math.log(hi)))

    def small_area() -> float:
        lo, hi = preset.small_area
        return hw * math.exp(rng.uniform(math.log(lo), math.log(hi)))

    if kind == "large":
        polyps.append(_draw_polyp(rng, "large", large_area(), h, w, fov, polyps))
        if rng.random() < 0.2:
            polyps.append(_draw_polyp(rng, "large", large_area() * 0.7, h, w, fov, polyps))
    elif kind == "small":
        for _ in range(1 + int(rng.random() < 0.3)):
            polyps.append(_draw_polyp(rng, "small", small_area(), h, w, fov, polyps))
    elif kind == "attached":
        big = _draw_polyp(rng, "large", large_area(), h, w, fov, polyps)
        polyps.append(big)
        sm = _draw_polyp(rng, "small", small_area(), h, w, fov, polyps, attach=big)
        sm.attached_to = 0
        polyps.append(sm)
    elif kind == "large+small":
        polyps.append(_draw_polyp(rng, "large", large_area(), h, w, fov, polyps))
        polyps.append(_draw_polyp(rng, "small", small_area(), h, w, fov, polyps))
    elif kind != "empty":  # pragma: no cover - plan_polypgen only produces known kinds
        raise ValueError(kind)

    # ---- mucosa: base colour with low-frequency variation, vessels
    base = np.array([rng.uniform(0.76, 0.86), rng.uniform(0.40, 0.50), rng.uniform(0.36, 0.46)], np.float32)
    low = _smooth_noise(rng, h, w, cells=3, channels=3)
    col = base[:, None, None] * (1 + 0.07 * low[0])[None] + 0.025 * low
    vein = _smooth_noise(rng, h, w, cells=s / 18)[0]
    vessel = np.exp(-(vein / 0.07) ** 2) * (0.5 + 0.5 * np.clip(_smooth_noise(rng, h, w, cells=2)[0], -1, 1))
    col *= 1 - vessel[None] * np.array([0.15, 0.35, 0.30], np.float32)[:, None, None]

    # ---- lumen and folds: dark tunnel, shaded rings around it
    lx = float(rng.uniform(-0.2, 1.2)) * w
    ly = float(rng.uniform(-0.2, 1.2)) * h
    warp = _smooth_noise(rng, h, w, cells=2.5)[0]
    d = np.sqrt((xs[None, :] - lx) ** 2 + (ys[:, None] - ly) ** 2) * (1 + 0.12 * warp)
    lr = float(rng.uniform(0.12, 0.28)) * s
    period = float(rng.uniform(0.22, 0.38)) * s
    ring = np.sin(2 * math.pi * d / period + float(rng.uniform(0, 2 * math.pi)) + 0.8 * warp)
    envelope = np.exp(-d / (float(rng.uniform(1.5, 3.0)) * s))  # folds fade away from the lumen
    ring *= envelope
    shade = (1 - 0.85 * np.exp(-(d / lr) ** 2)) * (1 + 0.10 * ring + 0.12 * np.clip(ring, 0, 1) ** 6)
    shade *= 0.85 + 0.25 * np.clip(d / (1.2 * s), 0, 1)  # mucosa close to the tip is brighter
    fine = _smooth_noise(rng, h, w, cells=s / 6)[0]
    shade *= 1 + 0.03 * fine
    spec = np.clip(ring, 0, 1) ** 40 * (fine > 1.8)  # glints on fold ridges

    # ---- polyps: domes with shading, dark rim, highlights
    mask = np.zeros((h, w), dtype=bool)
    light = np.array([rng.uniform(-0.5, 0.5), rng.uniform(-0.6, -0.2), 1.0], np.float32)
    light /= np.linalg.norm(light)
    for pol in polyps:
        r_ext = max(pol.ax, pol.ay) * 1.25 + 4
        c0, c1 = max(0, int(pol.cx - r_ext)), min(w, int(pol.cx + r_ext) + 1)
        r0, r1 = max(0, int(pol.cy - r_ext)), min(h, int(pol.cy + r_ext) + 1)
        if c0 >= c1 or r0 >= r1:
            continue
        rho = pol.rho(xs[c0:c1], ys[r0:r1])
        inside = rho <= 1.0
        mask[r0:r1, c0:c1] |= inside
        size = min(pol.ax, pol.ay)
        hgt = np.sqrt(np.clip(1 - rho ** 2, 0, 1)) * np.float32(size * 0.8)
        gy, gx = np.gradient(hgt)
        nz = 1.0 / np.sqrt(gx ** 2 + gy ** 2 + 1)
        lamb = np.clip((-gx * light[0] - gy * light[1] + light[2]) * nz, 0, 1)
        alpha = np.clip((1 - rho) * np.float32(size) + 0.5, 0, 1)  # ~1 px soft edge for the colour
        tint = np.array(pol.tint, np.float32)[:, None, None]
        texture = 1 + 0.05 * _smooth_noise(rng, r1 - r0, c1 - c0, cells=max(2.0, size / 3))[0]
        pcol = col[:, r0:r1, c0:c1] * tint * (0.80 + 0.45 * lamb)[None] * texture[None]
        view = col[:, r0:r1, c0:c1]
        view *= 1 - alpha[None]
        view += pcol * alpha[None]
        rim = np.exp(-(((rho - 1.0) * np.float32(size)) / 1.8) ** 2) * (rho > 1)
        shade[r0:r1, c0:c1] *= 1 - 0.22 * rim
        spec[r0:r1, c0:c1] = np.maximum(spec[r0:r1, c0:c1], lamb ** 60 * inside)
    mask &= fov

    # ---- scattered specular spots (wet mucosa)
    for _ in range(int(rng.integers(2, 9))):
        sx, sy = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        sr = float(rng.uniform(0.004, 0.015)) * s + 0.6
        c0, c1 = max(0, int(sx - 3 * sr)), min(w, int(sx + 3 * sr) + 1)
        r0, r1 = max(0, int(sy - 3 * sr)), min(h, int(sy + 3 * sr) + 1)
        g = np.exp(-(((xs[None, c0:c1] - sx) / (1.6 * sr)) ** 2 + ((ys[r0:r1, None] - sy) / sr) ** 2))
        spec[r0:r1, c0:c1] = np.maximum(spec[r0:r1, c0:c1], g)

    # ---- illumination, highlights, endoscope style
    rr = ((xs[None, :] - w / 2) ** 2 + (ys[:, None] - h / 2) ** 2) / ((w / 2) ** 2 + (h / 2) ** 2)
    col *= (shade * style.gain * (1 - style.vignette * rr))[None]
    spec = np.clip(spec, 0, 1)[None]
    col = col * (1 - spec) + spec * np.float32(0.98)
    col *= np.array(style.cast, np.float32)[:, None, None]
    col = np.clip(col, 0, 1) ** np.float32(style.gamma)
    if style.blur > 0:
        sigma = style.blur * preset.scale
        col = ndimage.gaussian_filter(col, sigma=(0, sigma, sigma), mode="nearest")
    col += rng.standard_normal(col.shape, dtype=np.float32) * np.float32(style.noise)
    col *= fov[None]
    img = np.clip(np.rint(col * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    return np.ascontiguousarray(img), mask, polyps


# ------------------------------------------------------------------------------------------ writing
def _jpeg_bytes(arr: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    _write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode("utf-8"))


def synth_polypgen(out_dir: str | Path, preset: str = "quick", seed: int = 0, progress: bool = True,
                   **overrides: Any) -> Path:
    """Write a synthetic PolypGen-format data set into ``out_dir`` (created if needed) and return its path.

    ``overrides`` replace fields of the preset (:class:`PolypGenPreset`: ``scale``, ``images``,
    ``small_area``, ``mask_quality``). See the module docstring for what is generated.
    """
    from tqdm.auto import tqdm

    p = _get_preset(preset, overrides)
    plan = plan_polypgen(preset, seed, **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = sum(len(v) for v in plan.values())
    frames_meta: list[dict[str, Any]] = []
    split_centres: dict[str, dict[str, Any]] = {}
    with tqdm(total=total, desc=f"synth polypgen ({preset})", unit="img", disable=not progress) as bar:
        for ci, centre in enumerate(CENTRES):
            n = ci + 1
            style = CENTRE_STYLES[centre]
            img_dir = out / f"data_C{n}" / f"images_C{n}"
            mask_dir = out / f"data_C{n}" / f"masks_C{n}"
            img_dir.mkdir(parents=True, exist_ok=True)
            mask_dir.mkdir(parents=True, exist_ok=True)
            folds: list[list[str]] = [[] for _ in range(N_FOLDS)]
            for fi, frame in enumerate(plan[centre]):
                rng = np.random.default_rng(np.random.SeedSequence([int(seed), n, fi, 0x1C0]))
                img, mask, polyps = _render(rng, style, p, frame["kind"])
                stem = frame["stem"]
                _write_bytes(img_dir / f"{stem}.jpg", _jpeg_bytes(img, style.jpeg_quality))
                _write_bytes(mask_dir / f"{stem}_mask.jpg",
                             _jpeg_bytes(mask.astype(np.uint8) * np.uint8(255), p.mask_quality))
                if frame["fold"] is not None:
                    folds[frame["fold"]].append(stem)
                frames_meta.append({
                    "centre": centre, "stem": stem, "image": f"data_C{n}/images_C{n}/{stem}.jpg",
                    "mask": f"data_C{n}/masks_C{n}/{stem}_mask.jpg", "kind": frame["kind"], "fold": frame["fold"],
                    "height": int(img.shape[0]), "width": int(img.shape[1]),
                    "lesion_pixels": int(mask.sum()), "polyps": [q.record() for q in polyps],
                })
                bar.update(1)
            split_centres[centre] = ({"test": [f["stem"] for f in plan[centre]]} if centre == TEST_CENTRE
                                     else {"folds": [sorted(f) for f in folds]})
    split = {
        "dataset": "polypgen",
        "description": (f"synthetic PolypGen ({preset} preset, seed {seed}): {N_FOLDS} folds per centre 1-5 "
                        f"(stratified: frames with small polyps dealt over the folds first), centre 6 = test"),
        "n_folds": N_FOLDS,
        "centres": split_centres,
        "sites": {f"site-{i + 1}": c for i, c in enumerate(TRAIN_CENTRES)},
        "test_centre": TEST_CENTRE,
    }
    _write_json(out / "split.json", split)
    counts = {c: {k: sum(1 for f in plan[c] if f["kind"] == k) for k in _KINDS} for c in CENTRES}
    _write_json(out / "synthetic.json", {
        "generator": "fedseg.data.synthetic_polypgen.synth_polypgen", "version": SYNTH_VERSION, "preset": preset,
        "seed": seed, "parameters": dataclasses.asdict(p),
        "centres": {c: dataclasses.asdict(s) | {"frame_size": list(_frame_size(s, p))}
                    for c, s in CENTRE_STYLES.items()},
        "kinds": counts, "frames": frames_meta,
    })
    return out
