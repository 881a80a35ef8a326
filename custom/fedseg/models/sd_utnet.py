"""SD-UTNet: SDNet (Chartsias et al., MedIA 2019) with a UTNet anatomy encoder, as used by FedGS (paper 000, 3.1).

Sources followed
----------------
- FedGS reference code, github.com/Trustworthy-AI-UU-NKI/Federated-Learning-Disentanglement:
  ``src/models/sd_utnet.py`` (``SD_UTNet``, built there as ``SD_UTNet(in_channels=...)`` with the defaults
  ``width = height = 512, ndf = 32, z_length = 8, anatomy_out_channels = 8, num_classes = 1``),
  ``src/models/sdnet.py`` (``Segmentor``, ``Decoder``, ``ModalityEncoder`` of its SDNet class),
  ``src/models/layers/adain.py`` (``Ada_Decoder``: an MLP maps z to AdaIN parameters), ``layers/blocks.py``,
  ``src/models/losses.py`` (``SDNetLoss``, ``KL_divergence``) and ``src/models/__init__.py`` (Xavier-normal
  initialisation of the whole model).
- The original SDNet: github.com/agis85/anatomy_modality_decomposition (Keras; ``models/sdnet.py``: softmax anatomy
  followed by a ``Rounding`` layer whose gradient is the identity, modality encoder on ``[anatomy, image]``, z
  regressor that decodes ``(s, z)`` and re-encodes the result with the same ``s``; weights ``w_sup_M = 10``,
  ``w_kl = 0.01``, ``w_rec_Z = 1``, ``w_rec_X = 1``) and its PyTorch port github.com/spthermo/SDNet, from which the
  FedGS blocks are copied.
- The anatomy encoder is :class:`fedseg.models.utnet.UTNet` (reused, not copied), with ``anatomy_channels`` outputs.

Architecture (defaults; every width is a constructor argument)
--------------------------------------------------------------
- Anatomy encoder ``a_encoder.utnet``: ``UTNet(in_chan, base_chan, num_classes=anatomy_channels=8)`` and then
  ``anatomy_activation``: ``"round"`` (default) = channel softmax, then rounding with a straight-through estimator
  (forward ``round(p)``, backward identity), i.e. SDNet's binary anatomy factors; ``"tanh"`` = FedGS's code.
- Modality encoder ``m_encoder`` (VAE, z = 8): four ``Conv3x3(stride 2) -> BatchNorm -> LeakyReLU(0.2)`` blocks with
  ``modality_chan`` = (16, 32, 64, 128) channels, flatten of a ``modality_grid x modality_grid`` map, ``Linear -> 32``,
  ``BatchNorm1d``, ``LeakyReLU(0.03)``, and linear heads ``mu``, ``logvar``; ``z = mu + eps * exp(logvar / 2)`` in
  training mode, ``z = mu`` in eval mode. Input: ``modality_input="image+anatomy"`` (default, SDNet: the anatomy and
  the image concatenated on channels) or ``"image"`` (FedGS's ``SD_UTNet``).
- Decoder ``decoder.decoder`` (FedGS's ``Ada_Decoder``): an MLP ``z -> 256 -> 256 -> 6*D`` (ReLU after every layer,
  the last included) gives per-image AdaIN scales and shifts; the image is re-synthesised from the anatomy by
  ``conv3x3(A->D) -> AdaIN -> conv3x3(D->D) -> AdaIN -> conv3x3(D->D) -> AdaIN -> conv3x3(D->in_chan) -> tanh``
  with ``D = decoder_chan = anatomy_channels``. AdaIN = instance normalisation (biased variance, eps 1e-5) followed
  by the z-predicted per-channel scale and shift; layer ``i`` takes shifts ``p[:, 2Di : 2Di+D]`` and scales
  ``p[:, 2Di+D : 2D(i+1)]`` of the MLP output ``p`` (the reference's assignment order). As in the reference there is
  no other non-linearity between the convolutions.
- Segmentor: ``conv3x3 -> BN -> ReLU`` twice (``segmentor_chan`` = 64 channels) and a 1x1 prediction conv with
  ``num_classes + 1`` channels for ``num_classes = 1`` (background and foreground, the reference layout). It sees the
  anatomy only, so segmentation never depends on z.
- ``z_recon``: the modality encoder re-encodes the reconstruction (with the same anatomy when it takes the anatomy).

API
---
- ``forward(x)`` -> segmentation logits ``[N, num_classes, H, W]`` (anatomy encoder + segmentor only; deterministic in
  eval mode). For ``num_classes = 1`` the logit is ``l_fg - l_bg`` of the two-channel prediction, so
  ``sigmoid(logit)`` is exactly the reference's ``softmax(...)[:, 1]``. For ``num_classes = K >= 2`` the K channels
  are softmax logits with channel 0 = background (the FedGS ``UTNet(num_classes=2)`` convention).
- ``decompose(x)`` -> :class:`SDOutput` (segmentation logits, anatomy, reconstruction, z, mu, logvar, z_recon).
- ``training_loss(x, y)`` -> scalar ``10*Dice + 0.01*KL + 1*L1(z_recon, z) + 1*L1(reconstruction, x)`` (DESIGN.md,
  = the reference's ``SDNetLoss`` weights); the float parts are stored in ``self.last_loss_parts``
  (keys ``dice, kl, z_recon, recon, total``). ``y``: ``[N, 1, H, W]`` 0/1 (class indices for ``num_classes >= 2``).
  - Dice: soft Dice per image, averaged over the batch, on ``sigmoid(logits)`` (:class:`fedseg.losses.SoftDiceLoss`,
    smooth 1). For ``num_classes >= 2``: softmax, Dice per image and foreground class, averaged (equal to the binary
    loss for K = 2).
  - KL: ``-0.5 * sum_j(1 + logvar_j - mu_j^2 - exp(logvar_j))``, summed over z, averaged over the batch (reference).
  - z_recon: mean absolute difference between the re-encoded sample and the sample z (reference: both sampled).
  - recon: mean absolute difference between the reconstruction and the input image (reference ``nn.L1Loss``).

Parameter count at paper width (``in_chan=3, base_chan=32``, everything else default): 18,837,375 for
``num_classes=1``. FedGS's ``SD_UTNet(in_channels=3)`` (512x512) has 18,836,223 = UTNet 14,418,986 + modality encoder
4,292,848 (4,194,336 of them in ``fc``) + segmentor 41,986 + decoder 82,403, counted on a transcription of its code;
``SDUTNet(anatomy_activation="tanh", modality_input="image")`` has exactly that count, the same state_dict keys (in
the same order, less the unused AdaIN buffers of deviation 8) and, with the reference's weights loaded, the same
segmentation probabilities, reconstruction, z, z_recon, KL and both L1 terms in training mode (max abs
difference <= 2e-6, checked during development at 64x64 with ``modality_grid=4``). The default's extra 1,152
parameters are the first modality convolution's weights for the 8 anatomy input channels (16 x 8 x 3 x 3). With one
input channel (LiTS): 18,836,293 (reference 18,835,141).

Deviations from the FedGS code (documented choices)
---------------------------------------------------
1. Anatomy binarisation. FedGS's ``SD_UTNet`` squashes the UTNet output with ``tanh``; SDNet (and the fedseg
   contract) uses softmax + rounding with a straight-through gradient. Default ``anatomy_activation="round"``
   (contract); ``"tanh"`` reproduces FedGS's code.
2. Modality encoder input. FedGS's ``SD_UTNet`` encodes the image only (its SDNet class and the original SDNet encode
   ``[anatomy, image]``). Default ``modality_input="image+anatomy"`` (contract, SDNet); ``"image"`` reproduces FedGS.
   When the anatomy is an input, the reconstruction is re-encoded with the same anatomy, as in the original SDNet's
   z regressor (FedGS's SDNet class instead runs the anatomy encoder a second time on the reconstruction, which
   would double the UTNet cost of a step).
3. Any image size. The reference's ``fc`` has ``target_size**2 / 2`` inputs (128 channels on the 32x32 map of a
   512x512 image), fixing the size at construction. Here the last feature map is adaptively average-pooled to
   ``modality_grid x modality_grid`` (default 32) before the flatten: for ``H = W = 16 * modality_grid`` the pooling is
   the identity and the layer is the reference's, so the default equals the reference at the paper's 512x512; for
   small images set ``modality_grid = image_size // 16`` (otherwise the map is replicated up to the grid and the
   ``fc`` keeps its 4.2 M weights).
4. Segmentation output. The reference returns ``softmax`` probabilities over ``num_classes + 1`` channels; fedseg
   models return logits. The weights are identical (2-channel prediction conv); forward returns ``l_fg - l_bg``.
5. Dice. The reference computes one Dice over the whole batch (smooth 0.1); DESIGN.md / the contract use the soft
   Dice per image averaged over the batch (smooth 1, configurable ``dice_smooth``).
6. Batches of one. ``BatchNorm1d`` cannot use batch statistics of a single vector; in training mode a batch of one
   (the last, partial batch of an epoch) is normalised with the running statistics instead of raising an error.
7. Widths scale with ``base_chan`` unless given: ``segmentor_chan = 2 * base_chan`` and
   ``modality_chan = (base_chan/2, base_chan, 2*base_chan, 4*base_chan)``, which are the reference's 64 and
   (16, 32, 64, 128) at the paper width ``base_chan = 32`` and keep small test / CPU-demo models cheap: at 128x128
   with ``base_chan = 8`` a training step (batch 4, forward + backward, 2 CPU threads) costs about 1.3x UTNet's
   Dice-only step with the scaled widths and about 2x with the fixed reference widths, whose full-resolution
   64-channel segmentor alone costs about as much as the whole UTNet.
8. The reference's ``AdaptiveInstanceNorm2d`` registers ``running_mean`` / ``running_var`` buffers that its forward
   never uses (it normalises with statistics of the current instance); they are not created here, so a FedGS
   checkpoint loads after dropping the six ``decoder.decoder.dec.adain*.running_*`` keys (all other state_dict keys
   and shapes are the reference's with ``anatomy_activation="tanh", modality_input="image", modality_grid=32``).
9. UTNet dropout follows the fedseg UTNet default (0.1); FedGS used 0.0 (pass ``attn_drop=0.0, proj_drop=0.0``).
10. The decoder ends in ``tanh`` as in the reference, so reconstructions lie in [-1, 1] although the normalised
    images do not; the L1 term therefore cannot reach zero (unchanged from the reference).
11. Eval mode uses ``z = mu`` (no sampling), so every output of an eval-mode pass is deterministic; the reference
    samples z in eval mode too (it only affects the reconstruction and z, never the segmentation).

Note on ``"round"``: a pixel's rounded anatomy is 1 in a channel only once that channel's softmax probability exceeds
0.5, so at initialisation (near-uniform probabilities over 8 channels) the anatomy is all zeros and the segmentor
and decoder see a constant input until the straight-through gradients push probabilities past 0.5. This is SDNet's
behaviour; it makes the first steps slower than with ``"tanh"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedseg.errors import ConfigError
from fedseg.losses import SoftDiceLoss
from fedseg.models.utnet import UTNet, initialize_weights

__all__ = [
    "AdaINDecoder",
    "AnatomyEncoder",
    "Decoder",
    "ModalityEncoder",
    "SDOutput",
    "SDUTNet",
    "Segmentor",
    "adain",
    "kl_divergence",
    "multiclass_soft_dice_loss",
    "round_ste",
]

ANATOMY_ACTIVATIONS = ("round", "tanh")
MODALITY_INPUTS = ("image+anatomy", "image")
LOSS_KEYS = ("dice", "kl", "z_recon", "recon", "total")


# ----------------------------------------------------------------------------------------------------------------
# Functional pieces


def round_ste(p: Tensor) -> Tensor:
    """``round(p)`` in the forward pass, identity gradient in the backward pass (SDNet's ``Rounding`` layer)."""
    return p + (torch.round(p) - p).detach()


def adain(x: Tensor, scale: Tensor, shift: Tensor, eps: float = 1e-5) -> Tensor:
    """Adaptive instance normalisation: normalise each ``(image, channel)`` map of ``x`` ``[B, C, H, W]`` with its own
    mean and biased variance, then apply per-image ``scale`` and ``shift`` ``[B, C]``."""
    out = F.instance_norm(x, eps=eps)
    return out * scale[:, :, None, None] + shift[:, :, None, None]


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over the latent dimensions and averaged over the batch."""
    mu, logvar = mu.float(), logvar.float()
    return (-0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1)).mean()


def multiclass_soft_dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """Soft Dice loss for ``K >= 2`` softmax logits ``[N, K, H, W]`` (channel 0 = background) and class indices
    ``target`` ``[N, 1, H, W]``: ``1 - Dice`` per image and foreground class, averaged over both."""
    n, k = logits.shape[:2]
    if target.shape != (n, 1, *logits.shape[2:]):
        raise ValueError(f"target must be [N, 1, H, W] class indices matching the logits {tuple(logits.shape)}, "
                         f"got {tuple(target.shape)}")
    x = logits if logits.dtype == torch.float64 else logits.float()
    p = torch.softmax(x, dim=1)[:, 1:].reshape(n, k - 1, -1)
    t = F.one_hot(target.long().reshape(n, -1), num_classes=k)[..., 1:].permute(0, 2, 1).to(p.dtype)
    inter = (p * t).sum(-1)
    dice = (2.0 * inter + smooth) / (p.sum(-1) + t.sum(-1) + smooth)
    return (1.0 - dice).mean()


class SDOutput(NamedTuple):
    """Everything one SD-UTNet pass produces."""

    seg_logits: Tensor  # [N, num_classes, H, W]
    anatomy: Tensor  # [N, anatomy_channels, H, W]
    recon: Tensor  # [N, in_chan, H, W]
    z: Tensor  # [N, z_length] (sample in training mode, mu in eval mode)
    mu: Tensor
    logvar: Tensor
    z_recon: Tensor  # [N, z_length]: the reconstruction re-encoded


# ----------------------------------------------------------------------------------------------------------------
# Modules


class _BatchNorm1dAnyBatch(nn.BatchNorm1d):
    """``BatchNorm1d`` that normalises a training batch of one with its running statistics (no update, no error)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.training and x.shape[0] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class AnatomyEncoder(nn.Module):
    """UTNet producing ``anatomy_channels`` maps, then binarised softmax (``"round"``) or ``tanh``."""

    def __init__(self, in_chan: int, base_chan: int, anatomy_channels: int, activation: str = "round",
                 **utnet_kwargs) -> None:
        super().__init__()
        if activation not in ANATOMY_ACTIVATIONS:
            raise ConfigError(f"SD-UTNet anatomy_activation must be one of {ANATOMY_ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.utnet = UTNet(in_chan=in_chan, base_chan=base_chan, num_classes=anatomy_channels, weight_init=None,
                           **utnet_kwargs)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.utnet(x)
        if self.activation == "tanh":
            return torch.tanh(logits)
        return round_ste(torch.softmax(logits, dim=1))


class ModalityEncoder(nn.Module):
    """VAE encoder of the modality factor z: stride-2 conv blocks, flatten of a fixed grid, fc, mu and logvar."""

    def __init__(self, in_chan: int, z_length: int, channels: Sequence[int] = (16, 32, 64, 128), hidden: int = 32,
                 grid: int = 32) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        self.num_blocks = len(channels)
        self.grid = int(grid)
        cin = in_chan
        for i, cout in enumerate(channels, start=1):  # block1..blockN as in the reference
            self.add_module(f"block{i}", nn.Sequential(
                nn.Conv2d(cin, cout, 3, 2, 1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2)))
            cin = cout
        self.fc = nn.Linear(cin * self.grid * self.grid, hidden)
        self.norm = _BatchNorm1dAnyBatch(hidden)
        self.activ = nn.LeakyReLU(0.03)
        self.mu = nn.Linear(hidden, z_length)
        self.logvar = nn.Linear(hidden, z_length)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x`` ``[N, C, H, W]`` -> ``(z, mu, logvar)``; z is sampled in training mode and equals mu in eval mode."""
        out = x
        for i in range(1, self.num_blocks + 1):
            out = getattr(self, f"block{i}")(out)
        if tuple(out.shape[-2:]) != (self.grid, self.grid):
            out = F.adaptive_avg_pool2d(out, self.grid)
        out = self.activ(self.norm(self.fc(out.flatten(1))))
        mu, logvar = self.mu(out), self.logvar(out)
        if not self.training:
            return mu, mu, logvar
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar), mu, logvar


class Segmentor(nn.Module):
    """Two ``conv3x3-BN-ReLU`` layers and a 1x1 prediction conv on the anatomy factors; returns logits."""

    def __init__(self, anatomy_channels: int, num_classes: int, width: int = 64) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Sequential(nn.Conv2d(anatomy_channels, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(width, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU())
        # the reference predicts background + classes; for one class the logit is their difference
        self.pred = nn.Conv2d(width, max(2, num_classes), 1, 1, 0)

    def forward(self, a: Tensor) -> Tensor:
        out = self.pred(self.conv2(self.conv1(a)))
        if self.num_classes == 1:
            return out[:, 1:2] - out[:, 0:1]
        return out


class _AdaINConvs(nn.Module):
    """The convolutional part of the AdaIN decoder (reference ``layers/adain.py`` ``Decoder``)."""

    def __init__(self, in_chan: int, width: int, out_chan: int) -> None:
        super().__init__()
        self.width = width
        self.conv1 = nn.Conv2d(in_chan, width, 3, 1, 1, bias=True)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=True)
        self.conv3 = nn.Conv2d(width, width, 3, 1, 1, bias=True)
        self.conv4 = nn.Conv2d(width, out_chan, 3, 1, 1, bias=True)

    def forward(self, a: Tensor, params: Tensor) -> Tensor:
        d = self.width
        out = a
        for i, conv in enumerate((self.conv1, self.conv2, self.conv3)):
            p = params[:, 2 * d * i: 2 * d * (i + 1)]
            out = adain(conv(out), scale=p[:, d:], shift=p[:, :d])
        return torch.tanh(self.conv4(out))


class _StyleMLP(nn.Module):
    """z -> AdaIN parameters: three linear layers, each followed by ReLU (reference ``MLP``)."""

    def __init__(self, z_length: int, out_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.fc1 = nn.Linear(z_length, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, out_dim)

    def forward(self, z: Tensor) -> Tensor:
        return F.relu(self.fc3(F.relu(self.fc2(F.relu(self.fc1(z.flatten(1)))))))


class AdaINDecoder(nn.Module):
    """Re-synthesises the image from the anatomy, modulated by z through AdaIN (reference ``Ada_Decoder``)."""

    NUM_ADAIN = 3

    def __init__(self, anatomy_channels: int, z_length: int, out_chan: int, width: int | None = None,
                 mlp_hidden: int = 256) -> None:
        super().__init__()
        width = anatomy_channels if width is None else int(width)
        self.dec = _AdaINConvs(anatomy_channels, width, out_chan)
        self.mlp = _StyleMLP(z_length, 2 * width * self.NUM_ADAIN, mlp_hidden)

    def forward(self, a: Tensor, z: Tensor) -> Tensor:
        return self.dec(a, self.mlp(z))


class Decoder(nn.Module):
    """Holds the :class:`AdaINDecoder` as ``.decoder`` so state_dict keys match the reference's."""

    def __init__(self, anatomy_channels: int, z_length: int, out_chan: int, width: int | None = None,
                 mlp_hidden: int = 256) -> None:
        super().__init__()
        self.decoder = AdaINDecoder(anatomy_channels, z_length, out_chan, width, mlp_hidden)

    def forward(self, a: Tensor, z: Tensor) -> Tensor:
        return self.decoder(a, z)


# ----------------------------------------------------------------------------------------------------------------
# The network


class SDUTNet(nn.Module):
    """SDNet with a UTNet anatomy encoder (FedGS's SD-UTNet); ``forward`` returns segmentation logits.

    Args:
        in_chan: image channels (also the reconstruction's).
        num_classes: 1 (binary, sigmoid logits) or K >= 2 (softmax logits, channel 0 = background).
        base_chan: UTNet width (paper: 32).
        anatomy_channels: number of anatomy factors (UTNet outputs; SDNet: 8).
        z_length: modality factor size (SDNet: 8).
        anatomy_activation: ``"round"`` (softmax + straight-through rounding, SDNet) or ``"tanh"`` (FedGS code).
        modality_input: ``"image+anatomy"`` (SDNet) or ``"image"`` (FedGS code).
        modality_chan: modality-encoder block widths (default ``base_chan * (1/2, 1, 2, 4)``, the reference's
            (16, 32, 64, 128) at ``base_chan = 32``); each block halves the resolution.
        modality_hidden: width of the modality encoder's fully connected layer (32).
        modality_grid: the last modality feature map is pooled to ``grid x grid`` before ``fc`` (32 = the reference at
            512x512 images; use ``image_size // 16`` for smaller images).
        segmentor_chan: segmentor width (default ``2 * base_chan``, the reference's 64 at paper width).
        decoder_chan: width of the AdaIN decoder convolutions (default ``anatomy_channels``, the reference).
        decoder_mlp_dim: hidden width of the z -> AdaIN-parameter MLP (256).
        dice_weight, kl_weight, z_recon_weight, recon_weight: loss weights (10, 0.01, 1, 1).
        dice_smooth: smoothing constant of the soft Dice loss (1.0, as :class:`fedseg.losses.SoftDiceLoss`).
        reduce_size, block_list, num_blocks, num_heads, attn_drop, proj_drop, projection, rel_pos, maxpool,
            bottleneck: passed to :class:`fedseg.models.utnet.UTNet`.
        weight_init: ``'xavier'`` (FedGS: Xavier-normal weights and zero biases for every conv / linear layer of
            the whole model, BatchNorm weight 1 / bias 0), ``'kaiming'``, ``'normal'`` or None (PyTorch defaults).

    Input height and width must be divisible by 16 (UTNet).
    """

    def __init__(
        self,
        in_chan: int = 3,
        num_classes: int = 1,
        base_chan: int = 32,
        anatomy_channels: int = 8,
        z_length: int = 8,
        anatomy_activation: str = "round",
        modality_input: str = "image+anatomy",
        modality_chan: Sequence[int] | None = None,
        modality_hidden: int = 32,
        modality_grid: int = 32,
        segmentor_chan: int | None = None,
        decoder_chan: int | None = None,
        decoder_mlp_dim: int = 256,
        dice_weight: float = 10.0,
        kl_weight: float = 0.01,
        z_recon_weight: float = 1.0,
        recon_weight: float = 1.0,
        dice_smooth: float = 1.0,
        reduce_size: int = 8,
        block_list: str = "234",
        num_blocks: Sequence[int] = (1, 2, 4),
        num_heads: Sequence[int] = (2, 4, 8),
        attn_drop: float = 0.1,
        proj_drop: float = 0.1,
        projection: str = "interp",
        rel_pos: bool = True,
        maxpool: bool = True,
        bottleneck: bool = False,
        weight_init: str | None = "xavier",
    ) -> None:
        super().__init__()
        if modality_chan is None:
            modality_chan = (max(1, base_chan // 2), base_chan, 2 * base_chan, 4 * base_chan)
        if segmentor_chan is None:
            segmentor_chan = 2 * base_chan
        modality_chan = tuple(int(c) for c in modality_chan)
        sizes = dict(in_chan=in_chan, num_classes=num_classes, base_chan=base_chan, anatomy_channels=anatomy_channels,
                     z_length=z_length, modality_hidden=modality_hidden, modality_grid=modality_grid,
                     segmentor_chan=segmentor_chan, decoder_mlp_dim=decoder_mlp_dim)
        if decoder_chan is not None:
            sizes["decoder_chan"] = decoder_chan
        for name, val in sizes.items():
            if isinstance(val, bool) or int(val) != val or int(val) < 1:
                raise ConfigError(f"SD-UTNet {name} must be a positive integer, got {val!r}")
        if not modality_chan or min(modality_chan) < 1:
            raise ConfigError(f"SD-UTNet modality_chan must be a non-empty list of positive widths, "
                              f"got {modality_chan}")
        if anatomy_activation == "round" and anatomy_channels < 2:
            raise ConfigError("SD-UTNet anatomy_activation='round' needs anatomy_channels >= 2 (a softmax over one "
                              "channel is constant); raise anatomy_channels or use 'tanh'")
        if modality_input not in MODALITY_INPUTS:
            raise ConfigError(f"SD-UTNet modality_input must be one of {MODALITY_INPUTS}, got {modality_input!r}")
        weights = dict(dice_weight=dice_weight, kl_weight=kl_weight, z_recon_weight=z_recon_weight,
                       recon_weight=recon_weight, dice_smooth=dice_smooth)
        for name, val in weights.items():
            if float(val) < 0:
                raise ConfigError(f"SD-UTNet {name} must be >= 0, got {val}")

        self.config = dict(
            in_chan=in_chan, num_classes=num_classes, base_chan=base_chan, anatomy_channels=anatomy_channels,
            z_length=z_length, anatomy_activation=anatomy_activation, modality_input=modality_input,
            modality_chan=modality_chan, modality_hidden=modality_hidden, modality_grid=modality_grid,
            segmentor_chan=segmentor_chan, decoder_chan=decoder_chan, decoder_mlp_dim=decoder_mlp_dim, **weights,
            reduce_size=reduce_size, block_list=block_list, num_blocks=tuple(num_blocks), num_heads=tuple(num_heads),
            attn_drop=attn_drop, proj_drop=proj_drop, projection=projection, rel_pos=rel_pos, maxpool=maxpool,
            bottleneck=bottleneck, weight_init=weight_init,
        )
        self.num_classes = int(num_classes)
        self.modality_input = modality_input
        self.dice_weight, self.kl_weight = float(dice_weight), float(kl_weight)
        self.z_recon_weight, self.recon_weight = float(z_recon_weight), float(recon_weight)
        self.last_loss_parts: dict[str, float] = {}

        # Registration order = the reference's state_dict order: m_encoder, a_encoder, segmentor, decoder.
        m_in = in_chan + (anatomy_channels if modality_input == "image+anatomy" else 0)
        self.m_encoder = ModalityEncoder(m_in, z_length, modality_chan, modality_hidden, modality_grid)
        self.a_encoder = AnatomyEncoder(
            in_chan, base_chan, anatomy_channels, anatomy_activation, reduce_size=reduce_size, block_list=block_list,
            num_blocks=num_blocks, num_heads=num_heads, attn_drop=attn_drop, proj_drop=proj_drop,
            projection=projection, rel_pos=rel_pos, maxpool=maxpool, bottleneck=bottleneck)
        self.segmentor = Segmentor(anatomy_channels, num_classes, segmentor_chan)
        self.decoder = Decoder(anatomy_channels, z_length, in_chan, decoder_chan, decoder_mlp_dim)
        self._dice = SoftDiceLoss(smooth=dice_smooth) if self.num_classes == 1 else None
        self._dice_smooth = float(dice_smooth)

        if weight_init is not None:
            initialize_weights(self, weight_init)

    # ------------------------------------------------------------------------------------------------ passes
    def forward(self, x: Tensor) -> Tensor:
        """Segmentation logits ``[N, num_classes, H, W]`` from the anatomy only (no z, no sampling)."""
        return self.segmentor(self.a_encoder(x))

    def encode_modality(self, x: Tensor, anatomy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(z, mu, logvar)`` of image ``x`` (with its ``anatomy`` if the modality encoder takes it)."""
        inp = torch.cat([anatomy, x], dim=1) if self.modality_input == "image+anatomy" else x
        return self.m_encoder(inp)

    def decompose(self, x: Tensor) -> SDOutput:
        """Full SDNet pass: anatomy, segmentation, modality, reconstruction and the re-encoded reconstruction."""
        a = self.a_encoder(x)
        seg = self.segmentor(a)
        z, mu, logvar = self.encode_modality(x, a)
        recon = self.decoder(a, z)
        z_recon = self.encode_modality(recon, a)[0]
        return SDOutput(seg, a, recon, z, mu, logvar, z_recon)

    # ------------------------------------------------------------------------------------------------ loss
    def segmentation_loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """Soft Dice loss per image, averaged (sigmoid for one class, softmax over K >= 2 classes)."""
        if self._dice is not None:
            return self._dice(logits, y)
        return multiclass_soft_dice_loss(logits, y, self._dice_smooth)

    def loss_terms(self, out: SDOutput, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """The four loss terms and their weighted sum ``total`` (tensors) for one :meth:`decompose` output."""
        terms = {
            "dice": self.segmentation_loss(out.seg_logits, y),
            "kl": kl_divergence(out.mu, out.logvar),
            "z_recon": F.l1_loss(out.z_recon.float(), out.z.float()),
            "recon": F.l1_loss(out.recon.float(), x.float()),
        }
        terms["total"] = (self.dice_weight * terms["dice"] + self.kl_weight * terms["kl"]
                          + self.z_recon_weight * terms["z_recon"] + self.recon_weight * terms["recon"])
        return terms

    def training_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """``10*Dice + 0.01*KL + 1*L1(z_recon, z) + 1*L1(reconstruction, x)``; parts go to ``last_loss_parts``."""
        if y.dim() != 4 or y.shape[0] != x.shape[0] or y.shape[1] != 1 or y.shape[2:] != x.shape[2:]:
            raise ValueError(f"SD-UTNet training_loss expects y [N, 1, H, W] matching x {tuple(x.shape)}, "
                             f"got {tuple(y.shape)}")
        terms = self.loss_terms(self.decompose(x), x, y)
        values = torch.stack([terms[k].detach().float() for k in LOSS_KEYS]).tolist()  # one device sync
        self.last_loss_parts = dict(zip(LOSS_KEYS, values, strict=True))
        return terms["total"]
