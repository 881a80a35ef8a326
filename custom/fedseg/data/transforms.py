"""Batched data augmentation on tensors (FedGS / LiTS: flips and rotations up to 90 degrees, p = 0.5).

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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["augment_batch", "rotate_batch"]


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
