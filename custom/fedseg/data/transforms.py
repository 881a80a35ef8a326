"""Batched data augmentation on tensors (FedGS: flips and rotations up to 90 degrees, p = 0.5; PolypGen: colour
jitter, p = 0.3, first).

:func:`augment_batch` transforms a whole batch at once, without a Python loop over samples:

* horizontal flip with probability ``p_flip`` and, independently, vertical flip with ``p_flip`` -- exact
  (``torch.flip`` selected per sample with ``torch.where``);
* rotation by an angle drawn uniformly from ``[-max_degrees, max_degrees]`` with probability ``p_rot``, via
  ``affine_grid`` + ``grid_sample`` on the rotated samples only: bilinear for images, nearest for masks (so
  masks stay binary). Pixels that come from outside the image are filled by reflection (like
  albumentations' default ``BORDER_REFLECT_101`` used by the FedGS reference code), identically for the
  image and its mask.

Randomness comes only from the ``torch.Generator`` passed in, and the same numbers are drawn whatever the
probabilities are, so a run is reproducible. Samples that are not transformed are returned bit-exactly.
Difficulty (delta, small flag) is a property of the stored mask and is *not* recomputed after augmentation.

:func:`augment_polypgen_batch` (PolypGen, ImageNet-normalised RGB) first applies colour jitter to each sample with
probability ``p_jitter`` (0.3), on the *de-normalised* colours ``x * std + mean`` (then clipped to [0, 1] and
re-normalised), as the FedGS reference code (albumentations ``ColorJitter(0.2, 0.2, 0.2, 0.2, p=0.3)``) does on
colours: brightness ``x * b``, contrast ``c * x + (1 - c) * mean_grey``, saturation ``s * x + (1 - s) * grey``
with factors drawn uniformly from ``[max(0, 1 - v), 1 + v]`` and a hue rotation by ``h`` turns, ``h`` uniform in
``[-hue, hue]`` (HSV), in this fixed order, clipping to [0, 1] after each step (torchvision's definitions;
``grey = 0.299 R + 0.587 G + 0.114 B``). Masks are untouched by the jitter. Then :func:`augment_batch`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["augment_batch", "rotate_batch", "augment_polypgen_batch", "colour_jitter"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def augment_batch(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator, p_flip: float = 0.5,
                  p_rot: float = 0.5, max_degrees: float = 90.0, padding_mode: str = "reflection"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly flip and rotate ``images`` [N, C, H, W] and ``masks`` [N, C', H, W] together (see module doc)."""
    if images.ndim != 4 or masks.ndim != 4:
        raise ValueError(f"augment_batch expects [N, C, H, W] tensors, got images {tuple(images.shape)} and "
                         f"masks {tuple(masks.shape)}")
    if images.shape[0] != masks.shape[0] or images.shape[-2:] != masks.shape[-2:]:
        raise ValueError(f"images {tuple(images.shape)} and masks {tuple(masks.shape)} differ in batch or size")
    for name, p in (("p_flip", p_flip), ("p_rot", p_rot)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    n, _, h, w = images.shape
    dev = images.device
    # draw the same random numbers whatever the probabilities (reproducible streams)
    gdev = generator.device
    u = torch.rand(4, n, generator=generator, device=gdev).to(dev)
    flip_h, flip_v, rotate = u[0] < p_flip, u[1] < p_flip, u[2] < p_rot
    angle = (u[3] * 2.0 - 1.0) * math.radians(max_degrees)

    out_img, out_mask = images, masks
    if bool(flip_h.any()):
        sel = flip_h.view(n, 1, 1, 1)
        out_img = torch.where(sel, out_img.flip(-1), out_img)
        out_mask = torch.where(sel, out_mask.flip(-1), out_mask)
    if bool(flip_v.any()):
        sel = flip_v.view(n, 1, 1, 1)
        out_img = torch.where(sel, out_img.flip(-2), out_img)
        out_mask = torch.where(sel, out_mask.flip(-2), out_mask)
    if bool(rotate.any()) and max_degrees != 0:
        idx = torch.nonzero(rotate, as_tuple=False).view(-1)
        rot_img, rot_mask = rotate_batch(out_img[idx], out_mask[idx], torch.rad2deg(angle[idx]), padding_mode)
        out_img = out_img.clone() if out_img is images else out_img
        out_mask = out_mask.clone() if out_mask is masks else out_mask
        out_img[idx] = rot_img
        out_mask[idx] = rot_mask
    return out_img, out_mask


def rotate_batch(images: torch.Tensor, masks: torch.Tensor, degrees: torch.Tensor, padding_mode: str = "reflection"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each sample by ``degrees[i]`` (counter-clockwise on screen, rows pointing down) about the centre.

    Images: bilinear ``grid_sample``; masks: nearest (values are only copied, so binary masks stay binary).
    Both keep their dtype. A multiple of 90 degrees on a square image reproduces ``torch.rot90`` exactly.
    """
    n, _, h, w = images.shape
    a = torch.deg2rad(degrees.to(device=images.device, dtype=torch.float64)).view(-1)
    if a.numel() != n:
        raise ValueError(f"need one angle per sample ({n}), got {a.numel()}")
    cos, sin = torch.cos(a), torch.sin(a)
    # sampling grid: output pixel (x, y) reads input R(-a) (x, y), in affine_grid's normalised coordinates
    theta = torch.zeros(n, 2, 3, device=images.device, dtype=torch.float64)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = -sin * (h / w)
    theta[:, 1, 0] = sin * (w / h)
    theta[:, 1, 1] = cos
    ftype = images.dtype if images.is_floating_point() else torch.float32
    grid = F.affine_grid(theta.to(ftype), [n, 1, h, w], align_corners=False)
    rot_img = F.grid_sample(images.to(ftype), grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)
    rot_mask = F.grid_sample(masks.to(ftype), grid, mode="nearest", padding_mode=padding_mode, align_corners=False)
    return rot_img.to(images.dtype), rot_mask.to(masks.dtype)


# ------------------------------------------------------------------------------------------ colour (PolypGen)
def _grey(rgb: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] -> [N, 1, H, W] luma 0.299 R + 0.587 G + 0.114 B."""
    return (0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3])


def _rgb_to_hsv(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, g, b = rgb.unbind(1)
    maxc, _ = rgb.max(dim=1)
    minc, _ = rgb.min(dim=1)
    chroma = maxc - minc
    flat = chroma == 0
    s = chroma / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    div = torch.where(flat, torch.ones_like(chroma), chroma)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    h = torch.where(is_r, bc - gc, torch.where(is_g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(flat, torch.zeros_like(h), h)
    h = torch.remainder(h / 6.0, 1.0)
    return h, s, maxc


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = i.to(torch.int64).remainder(6)
    p = v * (1 - s)
    q = v * (1 - s * f)
    t = v * (1 - s * (1 - f))
    # sector -> (R, G, B) among (v, q, p, t): 0 (v,t,p) 1 (q,v,p) 2 (p,v,t) 3 (p,q,v) 4 (t,p,v) 5 (v,p,q)
    cand = torch.stack([v, q, p, t])  # [4, N, H, W]
    table = torch.tensor([[0, 3, 2], [1, 0, 2], [2, 0, 3], [2, 1, 0], [3, 2, 0], [0, 2, 1]], device=h.device)
    idx = table[i]  # [N, H, W, 3]
    out = torch.gather(cand, 0, idx.permute(3, 0, 1, 2))  # [3, N, H, W]
    return out.permute(1, 0, 2, 3)


def colour_jitter(rgb: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor,
                  hue: torch.Tensor) -> torch.Tensor:
    """Jitter colours in [0, 1] [N, 3, H, W] with per-sample factors [N] (hue in turns), in that order (module doc)."""
    def col(v: torch.Tensor) -> torch.Tensor:
        return v.to(rgb.dtype).view(-1, 1, 1, 1)

    x = (rgb * col(brightness)).clamp(0, 1)
    mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (col(contrast) * x + (1 - col(contrast)) * mean).clamp(0, 1)
    x = (col(saturation) * x + (1 - col(saturation)) * _grey(x)).clamp(0, 1)
    if bool((hue != 0).any()):
        h, s, v = _rgb_to_hsv(x)
        h = torch.remainder(h + col(hue)[:, 0], 1.0)
        x = _hsv_to_rgb(h, s, v).clamp(0, 1)
    return x


def augment_polypgen_batch(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator,
                           p_jitter: float = 0.3, brightness: float = 0.2, contrast: float = 0.2,
                           saturation: float = 0.2, hue: float = 0.2, p_flip: float = 0.5, p_rot: float = 0.5,
                           max_degrees: float = 90.0, mean: tuple[float, float, float] = IMAGENET_MEAN,
                           std: tuple[float, float, float] = IMAGENET_STD) -> tuple[torch.Tensor, torch.Tensor]:
    """PolypGen augmentation of ImageNet-normalised ``images`` [N, 3, H, W] and ``masks`` [N, C, H, W] (module doc).

    Colour jitter with probability ``p_jitter`` per sample (on de-normalised colours), then :func:`augment_batch`
    (flips, rotations). Same random numbers drawn whatever the probabilities; samples left alone are bit-exact.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"augment_polypgen_batch expects RGB images [N, 3, H, W], got {tuple(images.shape)}")
    if not 0.0 <= p_jitter <= 1.0:
        raise ValueError(f"p_jitter must be in [0, 1], got {p_jitter}")
    for name, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if not 0.0 <= hue <= 0.5:
        raise ValueError(f"hue must be in [0, 0.5] (turns), got {hue}")
    n = images.shape[0]
    dev = images.device
    u = torch.rand(5, n, generator=generator, device=generator.device).to(dev)

    def factor(v: float, r: torch.Tensor) -> torch.Tensor:
        lo = max(0.0, 1.0 - v)
        return lo + (1.0 + v - lo) * r

    out = images
    sel = torch.nonzero(u[0] < p_jitter, as_tuple=False).view(-1)
    if sel.numel():
        ftype = images.dtype if images.is_floating_point() else torch.float32
        m = torch.tensor(mean, device=dev, dtype=ftype).view(1, 3, 1, 1)
        s = torch.tensor(std, device=dev, dtype=ftype).view(1, 3, 1, 1)
        rgb = (images[sel].to(ftype) * s + m).clamp(0, 1)
        rgb = colour_jitter(rgb, factor(brightness, u[1, sel]), factor(contrast, u[2, sel]),
                            factor(saturation, u[3, sel]), (u[4, sel] * 2 - 1) * hue)
        out = images.clone()
        out[sel] = ((rgb - m) / s).to(images.dtype)
    return augment_batch(out, masks, generator, p_flip=p_flip, p_rot=p_rot, max_degrees=max_degrees)
