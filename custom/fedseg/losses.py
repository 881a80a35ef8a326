"""Training losses. UTNet is trained with Dice loss in FedGS (paper 000, section 3.3)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SoftDiceLoss"]


class SoftDiceLoss(nn.Module):
    """Soft (differentiable) Dice loss, computed per image and averaged over the batch.

    For image ``i`` with probabilities ``p`` and target ``t`` (summed over all non-batch dims)::

        loss_i = 1 - (2 * sum(p * t) + smooth) / (sum(p) + sum(t) + smooth)
        loss   = mean_i loss_i

    ``sigmoid=True`` (default) applies a sigmoid to the input logits; with ``sigmoid=False`` the input must
    already be probabilities. An image with empty target and all-zero prediction has loss 0 (for smooth > 0).
Half-precision inputs (autocast) are reduced in float32; the result is float32 (float64 for float64 input).
    """

    def __init__(self, smooth: float = 1.0, sigmoid: bool = True) -> None:
        super().__init__()
        if smooth < 0:
            raise ValueError(f"smooth must be >= 0, got {smooth}")
        self.smooth = float(smooth)
        self.sigmoid = bool(sigmoid)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape != target.shape:
            raise ValueError(f"logits and target shapes differ: {tuple(logits.shape)} vs {tuple(target.shape)} "
                             "(expected [N, 1, H, W] for both)")
        if logits.dim() < 2:
            raise ValueError(f"expected a batch [N, C, ...], got shape {tuple(logits.shape)}")
        # reduce in float32 at least: half-precision sums over a 512x512 image overflow (max 65504)
        x = logits if logits.dtype == torch.float64 else logits.float()
        p = torch.sigmoid(x) if self.sigmoid else x
        p = p.reshape(p.shape[0], -1)
        t = target.reshape(target.shape[0], -1).to(p.dtype)
        inter = (p * t).sum(dim=1)
        denom = p.sum(dim=1) + t.sum(dim=1)
        dice = (2.0 * inter + self.smooth) / (denom + self.smooth)
        return (1.0 - dice).mean()

    def extra_repr(self) -> str:
        return f"smooth={self.smooth}, sigmoid={self.sigmoid}"
