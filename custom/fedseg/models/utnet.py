"""UTNet: a hybrid transformer architecture for medical image segmentation (Gao, Zhou, Metaxas, MICCAI 2021).

What this follows
-----------------
The module is a re-implementation of the authors' reference code (github.com/yhygao/UTNet, ``model/utnet.py``,
``model/conv_trans_utils.py``, ``model/unet_utils.py``) exactly as FedGS uses it (the copy in
github.com/Trustworthy-AI-UU-NKI/Federated-Learning-Disentanglement, ``src/models/utnet.py``, built there as
``UTNet(in_chan=in_channels, num_classes=2)`` with every other argument at its default, i.e. ``base_chan=32``,
``reduce_size=8``, ``block_list='234'``, ``num_blocks=[1, 2, 4]``, ``num_heads=[2, 4, 8]``, ``projection='interp'``,
``rel_pos=True``, ``maxpool=True``, no dropout, Xavier-normal initialisation of every convolution).

Layer structure, parameter shapes, state_dict keys and the channel layout of the heads (``(dim_head heads)``,
heads varying fastest) are the reference's, so a reference checkpoint loads with ``load_state_dict(strict=True)``
(if it was trained without ``aux_loss``) and gives the same output for inputs whose deep feature maps are multiples
of ``reduce_size`` (checked against the reference code during development).

- ``BasicBlock``: pre-activation residual block BN-ReLU-conv3x3-BN-ReLU-conv3x3 (+ BN-ReLU-conv1x1 shortcut when the
  width changes).
- ``BasicTransBlock``: BN -> efficient multi-head self-attention (queries at full resolution; keys/values produced by
  a depthwise-separable convolution and bilinearly resized to ``reduce_size x reduce_size``; 2-D relative position
  bias) -> residual -> BN -> ReLU -> 1x1 conv "MLP" -> residual.
- ``BasicTransDecoderBlock``: cross-attention (queries from the high-resolution skip feature, keys/values from the
  low-resolution decoder feature), residual through an upsampled 1x1 projection, then BN-ReLU-1x1 conv + residual.
- ``DownBlockTrans`` (reference ``down_block_trans``): max-pool, a ``BasicBlock`` that changes the width, then
  ``num_block`` transformer blocks. ``UpBlockTrans`` (``up_block_trans``): cross-attention decoder block, concat
  with the skip, ``BasicBlock``. Levels not in ``block_list`` use the plain ``down_block`` / ``up_block`` (two
  ``BasicBlock`` each, bilinear up-sampling with a 1x1 channel projection).
- ``block_list`` names the levels that carry transformer blocks ('0' = input level ... '4' = bottleneck);
  ``num_blocks`` and ``num_heads`` are indexed from the right as in the reference (level L uses entry ``L - 5``),
  so ``block_list='234', num_blocks=(1, 2, 4), num_heads=(2, 4, 8)`` puts 1/2/4 transformer blocks with 2/4/8 heads
  at the three deepest levels (128/256/512 channels for ``base_chan=32``) and cross-attention in the two deepest
  up-blocks (heads 4 and 8), as in DESIGN.md.

Parameter count at paper width (``in_chan=3, base_chan=32``, defaults above): 14,418,755 for ``num_classes=1``
(14,418,788 with FedGS's two-class head; 14,418,107 for one input channel as FedGS uses on LiTS), i.e. DESIGN.md's
"about 14.4 M". Other reference settings are further away: ``block_list='1234'`` with ``num_blocks=(1, 1, 2, 4)``,
``num_heads=(2, 2, 4, 8)`` gives 14,325,063, and the UTNet authors' own training script (``'1234'``, one block and
4 heads per level) 10,019,049. The implementation was checked during development against a transcription of the
reference code: identical state_dict keys (same order), parameter counts, and outputs (max abs difference ~1e-7
in eval mode, ~1e-5 in train mode with batch statistics) for ``'234'``, ``'1234'`` and ``'01234'`` at 128x128 and
256x128 inputs.

Deviations from the reference (all documented here)
---------------------------------------------------
1. Relative position bias for any feature size. The reference ``RelativePositionBias.forward(H, W)`` expands the
   ``reduce_size x reduce_size`` query grid with ``repeat_interleave(H // r)``, which is only correct when ``H`` and
   ``W`` are multiples of ``r = reduce_size`` (and fails for feature maps smaller than ``r``, e.g. the 4x4 bottleneck
   of a 64x64 image). We keep the reference's learnable table ``relative_position_bias_table`` of shape
   ``[(2r-1)^2, heads]`` and its integer index ``relative_position_index`` ``[r*r, r*r]`` (a persistent
   ``torch.long`` buffer, so it is in the state_dict exactly as in the reference), and map every query position
   ``(y, x)`` of the actual ``H x W`` map to the key-grid cell ``(floor(y*r/H), floor(x*r/W))`` at forward time
   (nearest-neighbour assignment). For ``H, W`` multiples of ``r`` this is bit-for-bit the reference's
   ``repeat_interleave``; otherwise it is its natural generalisation. No image size is fixed at construction time.
   The row selection ``floor(y*r/H)`` is recomputed per forward (a few hundred integers) and is not a buffer.
2. Keys/values are resized whenever ``(H, W) != (r, r)``; the reference tests only ``H != r`` and so breaks on
   non-square maps with ``H == r``.
3. The reference's index formula multiplies the row offset by ``2*h - 1`` where Swin uses ``2*w - 1``; we use the
   latter. Both are identical for the square ``r x r`` key grid the model always uses.
4. Deep-supervision heads (``aux_loss``) are dropped: the model returns one logit map ``[N, num_classes, H, W]``.
   FedGS never enables them.
5. The attention product uses ``torch.nn.functional.scaled_dot_product_attention`` with the bias (times the scale)
   as an additive mask: ``softmax((q k^T + B) * s) == softmax(q k^T * s + B * s)``, the reference's formula.
6. Dropout defaults follow the fedseg contract (``attn_drop = proj_drop = 0.1``, the values of the UTNet authors'
   training script); FedGS used 0.0 (the class default) - pass ``attn_drop=0.0, proj_drop=0.0`` to match it.
7. ``weight_init='xavier'`` (default) reproduces FedGS's ``initialize_weights``: Xavier-normal weights and zero bias
   for every ``Conv2d``/``Linear``, BatchNorm weight 1 and bias 0. ``weight_init=None`` keeps PyTorch's default
   initialisation (the UTNet repository's behaviour). The relative position tables are ``N(0, 0.02^2)`` either way.
8. Plain up-blocks resize to the skip feature's size instead of ``scale_factor=2`` (identical for sizes divisible
   by 16, which the forward pass requires).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedseg.errors import ConfigError

__all__ = [
    "UTNet",
    "BasicBlock",
    "BottleneckBlock",
    "BasicTransBlock",
    "BasicTransDecoderBlock",
    "LinearAttention",
    "LinearAttentionDecoder",
    "RelativePositionBias",
    "DownBlock",
    "UpBlock",
    "DownBlockTrans",
    "UpBlockTrans",
    "relative_position_index_2d",
]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)


class DepthwiseSeparableConv(nn.Module):
    """3x3 depthwise convolution followed by a 1x1 pointwise convolution (reference ``depthwise_separable_conv``)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, kernel_size: int = 3, padding: int = 1,
                 bias: bool = False) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(in_ch, in_ch, kernel_size=kernel_size, padding=padding, groups=in_ch, bias=bias,
                                   stride=stride)
        self.pointwise = nn.Conv2d(in_ch, out_ch, kernel_size=1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))


# ----------------------------------------------------------------------------------------------------------------
# Convolution blocks


def _preact_shortcut(inplanes: int, planes: int, stride: int) -> nn.Module:
    """Identity, or BN-ReLU-conv1x1 when the block changes width or resolution (reference shortcut)."""
    if stride == 1 and inplanes == planes:
        return nn.Sequential()
    return nn.Sequential(
        nn.BatchNorm2d(inplanes),
        nn.ReLU(inplace=True),
        nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
    )


class BasicBlock(nn.Module):
    """Pre-activation residual block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus a BN-ReLU-conv1x1 shortcut if needed."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        # Registration order (and so state_dict order) follows the reference.
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _preact_shortcut(inplanes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        return out + self.shortcut(x)


class BottleneckBlock(nn.Module):
    """Pre-activation bottleneck block 1x1 -> 3x3 -> 1x1 at a quarter of the width (reference ``BottleneckBlock``)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        if planes < 4:
            raise ConfigError(f"UTNet bottleneck blocks need at least 4 channels, got {planes}; "
                              "raise base_chan or set bottleneck=False")
        self.conv1 = conv1x1(inplanes, planes // 4)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes // 4, planes // 4, stride=stride)
        self.bn2 = nn.BatchNorm2d(planes // 4)
        self.conv3 = conv1x1(planes // 4, planes)
        self.bn3 = nn.BatchNorm2d(planes // 4)
        self.shortcut = _preact_shortcut(inplanes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + self.shortcut(x)


def _conv_block(bottleneck: bool) -> type[nn.Module]:
    return BottleneckBlock if bottleneck else BasicBlock


# ----------------------------------------------------------------------------------------------------------------
# Attention


def relative_position_index_2d(h: int, w: int) -> Tensor:
    """Index into a ``[(2h-1)*(2w-1), heads]`` bias table for every pair of cells of an ``h x w`` grid.

    Entry ``[i, j]`` (cells in row-major order) is ``(dy + h - 1) * (2w - 1) + (dx + w - 1)`` with
    ``(dy, dx) = cell_i - cell_j``. Returns a ``[h*w, h*w]`` ``torch.long`` tensor.
    """
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)  # 2, hw
    rel = coords[:, :, None] - coords[:, None, :]  # 2, hw, hw
    return ((rel[0] + h - 1) * (2 * w - 1) + (rel[1] + w - 1)).to(torch.long)


class RelativePositionBias(nn.Module):
    """Learnable 2-D relative position bias between queries on any ``H x W`` map and an ``h x w`` key grid.

    ``relative_position_bias_table`` ``[(2h-1)*(2w-1), heads]`` is learnt; ``relative_position_index``
    ``[h*w, h*w]`` is a persistent ``torch.long`` buffer (reference layout). A query at ``(y, x)`` of an ``H x W``
    map is assigned to key-grid cell ``(floor(y*h/H), floor(x*w/W))``; for ``H, W`` multiples of ``h, w`` this equals
    the reference's ``repeat_interleave`` expansion.
    """

    relative_position_index: Tensor

    def __init__(self, num_heads: int, h: int, w: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.h = h
        self.w = w
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * h - 1) * (2 * w - 1), num_heads) * 0.02)
        self.register_buffer("relative_position_index", relative_position_index_2d(h, w), persistent=True)

    def query_cells(self, H: int, W: int) -> Tensor:
        """``[H*W]`` long: the key-grid cell (row-major) that each query position of an ``H x W`` map sits in."""
        device = self.relative_position_index.device
        rows = torch.div(torch.arange(H, device=device) * self.h, H, rounding_mode="floor")
        cols = torch.div(torch.arange(W, device=device) * self.w, W, rounding_mode="floor")
        return (rows[:, None] * self.w + cols[None, :]).reshape(-1)

    def forward(self, H: int, W: int) -> Tensor:
        """Bias ``[1, heads, H*W, h*w]`` for queries on an ``H x W`` map attending to the ``h x w`` key grid."""
        index = self.relative_position_index.index_select(0, self.query_cells(H, W))  # HW, hw
        bias = self.relative_position_bias_table.index_select(0, index.reshape(-1))  # HW*hw, heads
        return bias.view(H * W, self.h * self.w, self.num_heads).permute(2, 0, 1).unsqueeze(0)


def _split_heads(t: Tensor, heads: int, dim_head: int) -> Tensor:
    """``[B, dim_head*heads, H, W]`` (channel = d*heads + h, the reference's ``(dim_head heads)``) ->
    ``[B, heads, H*W, dim_head]``."""
    B, _, H, W = t.shape
    return t.reshape(B, dim_head, heads, H * W).permute(0, 2, 3, 1)


def _merge_heads(t: Tensor, H: int, W: int) -> Tensor:
    """Inverse of :func:`_split_heads`: ``[B, heads, H*W, dim_head]`` -> ``[B, dim_head*heads, H, W]``."""
    B, heads, _, dim_head = t.shape
    return t.permute(0, 3, 1, 2).reshape(B, dim_head * heads, H, W)


class _ReducedAttention(nn.Module):
    """Shared part of the encoder self-attention and decoder cross-attention: keys/values on a reduced grid."""

    def __init__(self, heads: int, dim_head: int, attn_drop: float, proj_drop: float, reduce_size: int,
                 projection: str, rel_pos: bool) -> None:
        super().__init__()
        if projection not in ("interp", "maxpool"):
            raise ConfigError(f"UTNet projection must be 'interp' or 'maxpool', got {projection!r}")
        if dim_head < 1:
            raise ConfigError(f"UTNet attention with {heads} heads has no channels per head; "
                              "raise base_chan or lower num_heads")
        if reduce_size < 1:
            raise ConfigError(f"UTNet reduce_size must be >= 1, got {reduce_size}")
        self.inner_dim = dim_head * heads
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head ** (-0.5)
        self.reduce_size = reduce_size
        self.projection = projection
        self.rel_pos = rel_pos
        self.attn_drop_p = float(attn_drop)
        self.proj_drop_p = float(proj_drop)

    def _build_tail(self) -> None:
        """Register dropout and the position bias after the projections (the reference's state_dict order)."""
        self.proj_drop = nn.Dropout(self.proj_drop_p)
        if self.rel_pos:
            self.relative_position_encoding = RelativePositionBias(self.heads, self.reduce_size, self.reduce_size)

    def _reduce(self, t: Tensor) -> Tensor:
        r = self.reduce_size
        if tuple(t.shape[-2:]) == (r, r):
            return t
        if self.projection == "interp":
            return F.interpolate(t, size=(r, r), mode="bilinear", align_corners=True)
        return F.adaptive_max_pool2d(t, output_size=(r, r))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q ``[B, inner, H, W]`` (full resolution), k/v ``[B, inner, h', w']`` -> ``[B, inner, H, W]``."""
        H, W = q.shape[-2:]
        k, v = self._reduce(k), self._reduce(v)
        q = _split_heads(q, self.heads, self.dim_head)
        k = _split_heads(k, self.heads, self.dim_head)
        v = _split_heads(v, self.heads, self.dim_head)
        mask = self.relative_position_encoding(H, W) * self.scale if self.rel_pos else None
        if mask is not None:
            mask = mask.to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_drop_p if self.training else 0.0, scale=self.scale
        )
        return _merge_heads(out, H, W)


class LinearAttention(_ReducedAttention):
    """Efficient self-attention of UTNet (reference name kept): keys/values reduced to ``reduce_size^2`` tokens."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 64, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 reduce_size: int = 16, projection: str = "interp", rel_pos: bool = True) -> None:
        super().__init__(heads, dim_head, attn_drop, proj_drop, reduce_size, projection, rel_pos)
        self.to_qkv = DepthwiseSeparableConv(dim, self.inner_dim * 3)
        self.to_out = DepthwiseSeparableConv(self.inner_dim, dim)
        self._build_tail()

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.to_qkv(x).chunk(3, dim=1)
        return self.proj_drop(self.to_out(self._attend(q, k, v)))


class LinearAttentionDecoder(_ReducedAttention):
    """Cross-attention of the UTNet decoder: queries from the high-res skip, keys/values from the low-res feature."""

    def __init__(self, in_dim: int, out_dim: int, heads: int = 4, dim_head: int = 64, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, reduce_size: int = 16, projection: str = "interp",
                 rel_pos: bool = True) -> None:
        super().__init__(heads, dim_head, attn_drop, proj_drop, reduce_size, projection, rel_pos)
        self.to_kv = DepthwiseSeparableConv(in_dim, self.inner_dim * 2)
        self.to_q = DepthwiseSeparableConv(out_dim, self.inner_dim)
        self.to_out = DepthwiseSeparableConv(self.inner_dim, out_dim)
        self._build_tail()

    def forward(self, q: Tensor, x: Tensor) -> Tensor:
        """``q``: high-resolution feature ``[B, out_dim, H, W]``; ``x``: low-resolution feature ``[B, in_dim, h, w]``."""
        k, v = self.to_kv(x).chunk(2, dim=1)
        return self.proj_drop(self.to_out(self._attend(self.to_q(q), k, v)))


class BasicTransBlock(nn.Module):
    """BN -> efficient self-attention -> residual -> BN -> ReLU -> 1x1 conv -> residual."""

    def __init__(self, in_ch: int, heads: int, dim_head: int | None = None, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, reduce_size: int = 16, projection: str = "interp",
                 rel_pos: bool = True) -> None:
        super().__init__()
        # As in the reference, the head width is always in_ch // heads (the dim_head argument is ignored there).
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.attn = LinearAttention(in_ch, heads=heads, dim_head=in_ch // heads, attn_drop=attn_drop,
                                    proj_drop=proj_drop, reduce_size=reduce_size, projection=projection,
                                    rel_pos=rel_pos)
        self.bn2 = nn.BatchNorm2d(in_ch)
        self.relu = nn.ReLU(inplace=True)
        self.mlp = nn.Conv2d(in_ch, in_ch, kernel_size=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.attn(self.bn1(x)) + x
        return self.mlp(self.relu(self.bn2(out))) + out


class BasicTransDecoderBlock(nn.Module):
    """Cross-attention block of the decoder; output has the high-resolution feature's size and ``out_ch`` channels."""

    def __init__(self, in_ch: int, out_ch: int, heads: int, dim_head: int | None = None, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, reduce_size: int = 16, projection: str = "interp",
                 rel_pos: bool = True) -> None:
        super().__init__()
        self.bn_l = nn.BatchNorm2d(in_ch)
        self.bn_h = nn.BatchNorm2d(out_ch)
        self.conv_ch = nn.Conv2d(in_ch, out_ch, kernel_size=1)
        self.attn = LinearAttentionDecoder(in_ch, out_ch, heads=heads, dim_head=out_ch // heads, attn_drop=attn_drop,
                                           proj_drop=proj_drop, reduce_size=reduce_size, projection=projection,
                                           rel_pos=rel_pos)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.mlp = nn.Conv2d(out_ch, out_ch, kernel_size=1, bias=False)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        """``x1``: low-resolution decoder feature; ``x2``: high-resolution skip feature."""
        residue = F.interpolate(self.conv_ch(x1), size=x2.shape[-2:], mode="bilinear", align_corners=True)
        out = self.attn(self.bn_h(x2), self.bn_l(x1)) + residue
        return self.mlp(self.relu(self.bn2(out))) + out


# ----------------------------------------------------------------------------------------------------------------
# Encoder / decoder stages


class DownBlock(nn.Module):
    """Plain encoder stage (reference ``down_block``): max-pool then ``num_block`` residual blocks."""

    def __init__(self, in_ch: int, out_ch: int, scale: int | tuple[int, int] = 2, num_block: int = 2,
                 bottleneck: bool = False, pool: bool = True) -> None:
        super().__init__()
        block = _conv_block(bottleneck)
        layers: list[nn.Module] = []
        if pool:
            layers += [nn.MaxPool2d(scale), block(in_ch, out_ch)]
        else:
            layers.append(block(in_ch, out_ch, stride=2))
        layers += [block(out_ch, out_ch) for _ in range(num_block - 1)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class UpBlock(nn.Module):
    """Plain decoder stage (reference ``up_block``): bilinear x2, 1x1 channel projection, concat skip, residual blocks."""

    def __init__(self, in_ch: int, out_ch: int, num_block: int = 2, scale: tuple[int, int] = (2, 2),
                 bottleneck: bool = False) -> None:
        super().__init__()
        self.scale = scale
        self.conv_ch = nn.Conv2d(in_ch, out_ch, kernel_size=1)
        block = _conv_block(bottleneck)
        self.conv = nn.Sequential(block(2 * out_ch, out_ch), *[block(out_ch, out_ch) for _ in range(num_block - 1)])

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        """``x1``: low-resolution decoder feature; ``x2``: skip feature."""
        x1 = F.interpolate(x1, size=x2.shape[-2:], mode="bilinear", align_corners=True)
        return self.conv(torch.cat([x2, self.conv_ch(x1)], dim=1))


class DownBlockTrans(nn.Module):
    """Transformer encoder stage (reference ``down_block_trans``): max-pool, residual block, ``num_block`` attn blocks."""

    def __init__(self, in_ch: int, out_ch: int, num_block: int, bottleneck: bool = False, maxpool: bool = True,
                 heads: int = 4, dim_head: int | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 reduce_size: int = 16, projection: str = "interp", rel_pos: bool = True) -> None:
        super().__init__()
        if num_block < 1:
            raise ConfigError(f"UTNet transformer stage needs num_blocks >= 1, got {num_block}; "
                              "remove the level from block_list instead")
        block = _conv_block(bottleneck)
        layers: list[nn.Module] = []
        if maxpool:
            layers += [nn.MaxPool2d(2), block(in_ch, out_ch, stride=1)]
        else:
            layers.append(block(in_ch, out_ch, stride=2))
        layers += [BasicTransBlock(out_ch, heads, attn_drop=attn_drop, proj_drop=proj_drop, reduce_size=reduce_size,
                                   projection=projection, rel_pos=rel_pos) for _ in range(num_block)]
        self.blocks = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


class UpBlockTrans(nn.Module):
    """Transformer decoder stage (reference ``up_block_trans``): cross-attention, concat skip, residual block."""

    def __init__(self, in_ch: int, out_ch: int, num_block: int = 0, bottleneck: bool = False, heads: int = 4,
                 dim_head: int | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0, reduce_size: int = 16,
                 projection: str = "interp", rel_pos: bool = True) -> None:
        super().__init__()
        self.attn_decoder = BasicTransDecoderBlock(in_ch, out_ch, heads=heads, attn_drop=attn_drop,
                                                   proj_drop=proj_drop, reduce_size=reduce_size,
                                                   projection=projection, rel_pos=rel_pos)
        layers: list[nn.Module] = [
            BasicTransBlock(out_ch, heads, attn_drop=attn_drop, proj_drop=proj_drop, reduce_size=reduce_size,
                            projection=projection, rel_pos=rel_pos)
            for _ in range(num_block)
        ]
        layers.append(_conv_block(bottleneck)(2 * out_ch, out_ch, stride=1))
        self.blocks = nn.Sequential(*layers)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        """``x1``: low-resolution decoder feature; ``x2``: skip feature."""
        out = self.attn_decoder(x1, x2)
        return self.blocks(torch.cat([out, x2], dim=1))


# ----------------------------------------------------------------------------------------------------------------
# The network


def _pick(values: Sequence[int], level: int, name: str) -> int:
    """Right-aligned lookup as in the reference (level L in 0..4 uses ``values[L - 5]``)."""
    idx = level - 5
    if -idx > len(values):
        raise ConfigError(
            f"UTNet {name}={tuple(values)} has no entry for level {level}: block_list levels are indexed from the "
            f"right (level L uses {name}[L-5]), so give at least {5 - level} values"
        )
    return int(values[idx])


class UTNet(nn.Module):
    """UTNet (Gao et al. 2021) as used by FedGS; returns logits ``[N, num_classes, H, W]``.

    Args:
        in_chan: input channels.
        base_chan: width of the first level; levels have 1, 2, 4, 8, 16 times this.
        num_classes: output channels (logits, no activation).
        reduce_size: keys/values are resized to ``reduce_size x reduce_size`` tokens; also the relative-position grid.
        block_list: string of level digits ('0'..'4') that carry transformer blocks.
        num_blocks: transformer blocks per encoder level, right-aligned (last entry = bottleneck level 4).
        num_heads: attention heads per level, right-aligned like ``num_blocks``. As in the reference, the
            cross-attention of the up-block that brings level L+1 up to level L (present when L is in
            ``block_list``) uses the heads of level L+1: up1 (4 -> 3) ``num_heads[-1]``, up2 (3 -> 2)
            ``num_heads[-2]``, up3 ``num_heads[-3]``, up4 ``num_heads[-4]``.
        attn_drop, proj_drop: dropout on the attention map / after the output projection.
        projection: 'interp' (bilinear, reference default) or 'maxpool' (adaptive max pooling) key/value reduction.
        rel_pos: add the learnable 2-D relative position bias.
        maxpool: down-sample with max-pooling (True) or strided convolution (False).
        bottleneck: use bottleneck residual blocks in the transformer stages.
        weight_init: 'xavier' (FedGS), 'kaiming', or None (PyTorch defaults).

    Input height and width must be divisible by 16.
    """

    def __init__(
        self,
        in_chan: int = 1,
        base_chan: int = 32,
        num_classes: int = 1,
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
        for name, val in (("in_chan", in_chan), ("base_chan", base_chan), ("num_classes", num_classes)):
            if int(val) < 1:
                raise ConfigError(f"UTNet {name} must be >= 1, got {val}")
        block_list = str(block_list)
        bad = sorted(set(block_list) - set("01234"))
        if bad:
            raise ConfigError(f"UTNet block_list={block_list!r} has invalid level(s) {bad}; use digits 0-4, e.g. '234'")
        self.config = dict(
            in_chan=in_chan, base_chan=base_chan, num_classes=num_classes, reduce_size=reduce_size,
            block_list=block_list, num_blocks=tuple(num_blocks), num_heads=tuple(num_heads), attn_drop=attn_drop,
            proj_drop=proj_drop, projection=projection, rel_pos=rel_pos, maxpool=maxpool, bottleneck=bottleneck,
            weight_init=weight_init,
        )
        c = base_chan
        attn = dict(attn_drop=attn_drop, proj_drop=proj_drop, reduce_size=reduce_size, projection=projection,
                    rel_pos=rel_pos)

        # Level 0 (input resolution).
        inc: list[nn.Module] = [BasicBlock(in_chan, c)]
        if "0" in block_list:
            inc.append(BasicTransBlock(c, heads=_pick(num_heads, 0, "num_heads"), **attn))
            self.up4: nn.Module = UpBlockTrans(2 * c, c, num_block=0, bottleneck=bottleneck,
                                               heads=_pick(num_heads, 1, "num_heads"), **attn)
        else:
            inc.append(BasicBlock(c, c))
            self.up4 = UpBlock(2 * c, c, scale=(2, 2), num_block=2)
        self.inc = nn.Sequential(*inc)

        # Levels 1..4; up-block ``up{5-L}`` joins levels L and L-1 and is a transformer block if L-1 is listed
        # (the reference builds up3 with level 1, up2 with level 2, up1 with level 3).
        def down(level: int) -> nn.Module:
            cin, cout = c * 2 ** (level - 1), c * 2**level
            if str(level) in block_list:
                return DownBlockTrans(cin, cout, num_block=_pick(num_blocks, level, "num_blocks"),
                                      bottleneck=bottleneck, maxpool=maxpool,
                                      heads=_pick(num_heads, level, "num_heads"), **attn)
            return DownBlock(cin, cout, (2, 2), num_block=2)

        def up(level: int) -> nn.Module:
            # decoder block that brings level ``level + 1`` up to ``level`` (level in 1..3)
            cin, cout = c * 2 ** (level + 1), c * 2**level
            if str(level) in block_list:
                return UpBlockTrans(cin, cout, num_block=0, bottleneck=bottleneck,
                                    heads=_pick(num_heads, level + 1, "num_heads"), **attn)
            return UpBlock(cin, cout, scale=(2, 2), num_block=2)

        self.down1 = down(1)
        self.up3 = up(1)
        self.down2 = down(2)
        self.up2 = up(2)
        self.down3 = down(3)
        self.up1 = up(3)
        self.down4 = down(4)
        self.outc = nn.Conv2d(c, num_classes, kernel_size=1, bias=True)

        if weight_init is not None:
            initialize_weights(self, weight_init)

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        if H % 16 or W % 16:
            raise ConfigError(
                f"UTNet input height and width must be divisible by 16 (four 2x down-samplings), got {H}x{W}; "
                "resize or pad the images (e.g. the data 'image size' setting) to a multiple of 16"
            )
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        out = self.up1(x5, x4)
        out = self.up2(out, x3)
        out = self.up3(out, x2)
        out = self.up4(out, x1)
        return self.outc(out)


def initialize_weights(model: nn.Module, init: str = "xavier") -> None:
    """FedGS's ``initialize_weights``: conv/linear weights by ``init``, zero biases; BatchNorm weight 1, bias 0."""
    funcs = {
        "xavier": nn.init.xavier_normal_,
        "kaiming": nn.init.kaiming_normal_,
        "normal": nn.init.normal_,
        "gaussian": nn.init.normal_,
    }
    if init not in funcs:
        raise ConfigError(f"unknown weight_init {init!r}; use one of {sorted(funcs)} or None")
    func = funcs[init]
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            func(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
