"""The 2.5D U-Net of PPPML-HMI (paper 001, section II-C; after Zhou et al.'s machine-agnostic COVID segmentation).

One 2-D U-Net per view -- xy (axial), yz (sagittal), xz (coronal) -- each taking the 5 adjacent slices of its view
as channels and returning the logit map of the central slice. Each U-Net has four encoding layers, a bottleneck
and four decoding layers (the paper's Fig. 2A): an encoding layer is two 3x3 convolutions (BatchNorm, ReLU) whose
output is kept for the skip connection and then max-pooled 2x2; the bottleneck is the same double convolution at
1/16 resolution; a decoding layer upsamples 2x (transposed convolution), concatenates the skip and applies a double
convolution; a 1x1 convolution gives the logit. Channel widths are ``base_chan * (1, 2, 4, 8)`` in the encoder and
``16 * base_chan`` in the bottleneck. The paper does not give widths; ``base_chan = 64`` (the classic U-Net) is used
as the paper width (:data:`PAPER_BASE_CHAN`), ``8`` is the quick CPU width (:data:`QUICK_BASE_CHAN`, the default).

Inputs of any size work: they are zero-padded to a multiple of 16 and the output is cropped back.

:class:`UNet25D` holds the three nets (separate parameters). ``forward(x [B, 3, 5, S, S]) -> [B, 3, S, S]`` runs
view ``v``'s net on ``x[:, v]``; ``forward_view(x [B, 5, S, S], view)`` runs one view; ``training_loss(x, y)`` is
the mean over views of :class:`fedseg.losses.SoftDiceLoss` of each view's logits against ``y[:, v]``. The loss is
separable -- view v's term depends only on view v's parameters -- so one optimiser step on it equals three
independent trainings (the paper: "the training along each plane was performed independently"), apart from the
shared 1/3 factor. 3-D inference and the fusion ``p_xy + p_yz + p_xz >= 2`` are in :mod:`fedseg.volume_inference`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedseg.errors import ConfigError

__all__ = ["PAPER_BASE_CHAN", "QUICK_BASE_CHAN", "VIEW_NAMES", "UNet2D", "UNet25D"]

QUICK_BASE_CHAN = 8
PAPER_BASE_CHAN = 64
VIEW_NAMES = ("xy", "yz", "xz")
_DEPTH = 4  # encoding layers (and decoding layers)


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNet2D(nn.Module):
    """2-D U-Net: 4 encoding layers, bottleneck, 4 decoding layers; logits ``[N, num_classes, H, W]``."""

    def __init__(self, in_chan: int = 5, num_classes: int = 1, base_chan: int = QUICK_BASE_CHAN) -> None:
        super().__init__()
        chans = [base_chan * 2 ** i for i in range(_DEPTH + 1)]
        self.enc = nn.ModuleList()
        cin = in_chan
        for c in chans[:-1]:
            self.enc.append(_double_conv(cin, c))
            cin = c
        self.bottleneck = _double_conv(chans[-2], chans[-1])
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in range(_DEPTH - 1, -1, -1):
            self.up.append(nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2))
            self.dec.append(_double_conv(2 * chans[i], chans[i]))
        self.head = nn.Conv2d(chans[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = 2 ** _DEPTH
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        skips = []
        for enc in self.enc:
            x = enc(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
            x = dec(torch.cat([up(x), skip], dim=1))
        out = self.head(x)
        return out[..., :h, :w] if (ph or pw) else out


class UNet25D(nn.Module):
    """Three independent 2-D U-Nets (views xy, yz, xz) on 5-slice slabs; see the module docstring."""

    def __init__(self, in_chan: int = 5, num_classes: int = 1, base_chan: int = QUICK_BASE_CHAN,
                 smooth: float = 1.0) -> None:
        super().__init__()
        if num_classes != 1:
            raise ConfigError(f"unet25d predicts one infection map per view (num_classes = 1), got {num_classes}")
        if isinstance(base_chan, bool) or not isinstance(base_chan, int) or base_chan < 1:
            raise ConfigError(f"unet25d base_chan must be a positive integer (quick {QUICK_BASE_CHAN}, paper "
                              f"{PAPER_BASE_CHAN}), got {base_chan!r}")
        from fedseg.losses import SoftDiceLoss

        self.in_chan = int(in_chan)
        self.views = nn.ModuleList(UNet2D(in_chan, 1, base_chan) for _ in VIEW_NAMES)
        self.loss_fn = SoftDiceLoss(smooth=smooth)

    @staticmethod
    def view_index(view: int | str) -> int:
        if isinstance(view, str):
            if view not in VIEW_NAMES:
                raise ValueError(f"unknown view {view!r}; views are {VIEW_NAMES}")
            return VIEW_NAMES.index(view)
        v = int(view)
        if not 0 <= v < len(VIEW_NAMES):
            raise ValueError(f"view index must be 0..{len(VIEW_NAMES) - 1}, got {view}")
        return v

    def forward_view(self, x: torch.Tensor, view: int | str) -> torch.Tensor:
        """Logits ``[B, 1, S, S]`` of one view's net on slabs ``x [B, 5, S, S]``."""
        if x.ndim != 4 or x.shape[1] != self.in_chan:
            raise ValueError(f"forward_view expects [B, {self.in_chan}, S, S] slabs, got {tuple(x.shape)}")
        return self.views[self.view_index(view)](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, 3, S, S]`` (channel v = view v's central-slice logits) of ``x [B, 3, 5, S, S]``."""
        if x.ndim != 5 or x.shape[1] != len(VIEW_NAMES) or x.shape[2] != self.in_chan:
            raise ValueError(f"UNet25D expects [B, 3, {self.in_chan}, S, S] (3 views of {self.in_chan} slices), "
                             f"got {tuple(x.shape)}")
        return torch.cat([net(x[:, v]) for v, net in enumerate(self.views)], dim=1)

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean over the three views of the soft Dice loss of view v's logits against ``y[:, v]``."""
        if y.ndim != 4 or y.shape[1] != len(VIEW_NAMES):
            raise ValueError(f"UNet25D.training_loss expects masks [B, 3, S, S], got {tuple(y.shape)}")
        logits = self.forward(x)
        losses = [self.loss_fn(logits[:, v:v + 1], y[:, v:v + 1]) for v in range(len(VIEW_NAMES))]
        return torch.stack(losses).mean()
