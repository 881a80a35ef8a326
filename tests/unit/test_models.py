"""Tests for fedseg.models: UTNet (Gao et al. 2021, as used by FedGS), the MONAI U-Net and the registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedseg.errors import ConfigError
from fedseg.models import available_models, count_parameters, get_model
from fedseg.models.utnet import (
    DownBlock,
    DownBlockTrans,
    LinearAttention,
    RelativePositionBias,
    UpBlock,
    UpBlockTrans,
    UTNet,
    relative_position_index_2d,
)

# Counted for the reference layout (yhygao/UTNet, FedGS defaults) with in_chan=3, base_chan=32, num_classes=1.
PAPER_PARAMS = 14_418_755


def _small(**kw) -> UTNet:
    cfg = dict(in_chan=1, base_chan=8, num_classes=1)
    cfg.update(kw)
    return UTNet(**cfg)


# ------------------------------------------------------------------------------------------------ architecture


def test_paper_width_parameter_count():
    model = UTNet(in_chan=3, base_chan=32)
    n = count_parameters(model)
    assert n == PAPER_PARAMS
    assert abs(n - 14.4e6) / 14.4e6 <= 0.03
    # FedGS builds it with two output classes: the 1x1 head gains 32 weights + 1 bias.
    assert count_parameters(UTNet(in_chan=3, base_chan=32, num_classes=2)) == PAPER_PARAMS + 33


def test_default_layout_matches_design():
    model = _small()
    # encoder: transformer stages at levels 2, 3, 4 with 1, 2, 4 blocks and 2, 4, 8 heads
    assert isinstance(model.down1, DownBlock)
    for stage, blocks, heads, ch in ((model.down2, 1, 2, 32), (model.down3, 2, 4, 64), (model.down4, 4, 8, 128)):
        assert isinstance(stage, DownBlockTrans)
        attn = [m for m in stage.modules() if isinstance(m, LinearAttention)]
        assert len(attn) == blocks
        assert all(a.heads == heads and a.dim_head * heads == ch and a.reduce_size == 8 for a in attn)
    # decoder: cross-attention only in the two deepest up-blocks (heads 8 and 4)
    assert isinstance(model.up1, UpBlockTrans) and model.up1.attn_decoder.attn.heads == 8
    assert isinstance(model.up2, UpBlockTrans) and model.up2.attn_decoder.attn.heads == 4
    assert isinstance(model.up3, UpBlock) and isinstance(model.up4, UpBlock)


@pytest.mark.parametrize(
    ("shape", "num_classes", "kw"),
    [
        ((2, 1, 64, 96), 1, {}),
        ((2, 3, 96, 64), 3, dict(in_chan=3, base_chan=4)),
        ((1, 1, 32, 48), 2, dict(reduce_size=4, block_list="1234", num_blocks=(1, 1, 1, 1), num_heads=(2, 2, 2, 2))),
        ((2, 1, 48, 80), 1, dict(projection="maxpool", maxpool=False, bottleneck=True)),
    ],
)
def test_forward_backward_shapes_non_square(shape, num_classes, kw):
    torch.manual_seed(0)
    model = _small(num_classes=num_classes, **kw)
    x = torch.randn(*shape)
    y = model(x)
    assert y.shape == (shape[0], num_classes, shape[2], shape[3])
    y.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    model.eval()
    with torch.no_grad():
        assert model(x).shape == y.shape


def test_input_not_divisible_by_16_is_config_error():
    with pytest.raises(ConfigError, match="divisible by 16"):
        _small()(torch.randn(1, 1, 64, 72))


def test_gradient_reaches_every_relative_position_table():
    torch.manual_seed(1)
    model = _small(attn_drop=0.0, proj_drop=0.0)
    model(torch.randn(2, 1, 64, 64)).mean().backward()
    tables = [(n, p) for n, p in model.named_parameters() if n.endswith("relative_position_bias_table")]
    assert len(tables) == 1 + 2 + 4 + 2  # encoder blocks + two decoder cross-attentions
    for name, p in tables:
        assert p.shape == ((2 * 8 - 1) ** 2, p.shape[1])
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ------------------------------------------------------------------------------------------ integer buffers


def test_relative_index_buffers_are_long_and_persistent():
    model = _small()
    sd = model.state_dict()
    idx = {k: v for k, v in sd.items() if k.endswith("relative_position_index")}
    assert len(idx) == 9
    for k, v in idx.items():
        assert v.dtype == torch.long, k
        assert v.shape == (64, 64), k
        assert int(v.min()) == 0 and int(v.max()) == 15 * 15 - 1
    int_keys = {k for k, v in sd.items() if not v.is_floating_point()}
    assert set(idx) <= int_keys
    assert any(k.endswith("num_batches_tracked") for k in int_keys)
    # every non-float entry of the state_dict is an int64 buffer, never a parameter
    param_names = {n for n, _ in model.named_parameters()}
    assert int_keys.isdisjoint(param_names)
    assert all(sd[k].dtype == torch.long for k in int_keys)


def test_relative_position_index_hand_values():
    # 2x2 grid, cells (0,0),(0,1),(1,0),(1,1); entry = (dy + 1) * 3 + (dx + 1), (dy, dx) = cell_i - cell_j
    expected = torch.tensor([[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]])
    got = relative_position_index_2d(2, 2)
    assert got.dtype == torch.long
    assert torch.equal(got, expected)
    # non-square grid 1x3: entry = dx + 2 (row part is (0 + 0) * 5)
    assert torch.equal(relative_position_index_2d(1, 3), torch.tensor([[2, 1, 0], [3, 2, 1], [4, 3, 2]]))


def test_state_dict_roundtrip_keeps_integer_buffers():
    a, b = _small(), _small()
    b.load_state_dict(a.state_dict(), strict=True)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and va.dtype == vb.dtype and torch.equal(va, vb)


# ------------------------------------------------------------------------------- relative position bias


def test_bias_matches_reference_expansion_for_multiples():
    torch.manual_seed(2)
    rpb = RelativePositionBias(num_heads=3, h=2, w=2)
    H, W = 4, 6
    got = rpb(H, W)
    assert got.shape == (1, 3, H * W, 4)
    # reference: table[index].view(h, w, hw, heads), repeat_interleave H//h on rows, W//w on columns
    ref = rpb.relative_position_bias_table[rpb.relative_position_index.view(-1)].view(2, 2, 4, 3)
    ref = ref.repeat_interleave(H // 2, dim=0).repeat_interleave(W // 2, dim=1)
    ref = ref.reshape(H * W, 4, 3).permute(2, 0, 1).unsqueeze(0)
    assert torch.equal(got, ref)


def test_bias_for_sizes_not_multiple_of_grid():
    rpb = RelativePositionBias(num_heads=1, h=4, w=4)
    # H=2: rows floor(y*4/2) = 0, 2; W=6: cols floor(x*4/6) = 0, 0, 1, 2, 2, 3
    cells = rpb.query_cells(2, 6)
    assert cells.tolist() == [0, 0, 1, 2, 2, 3, 8, 8, 9, 10, 10, 11]
    bias = rpb(2, 6)
    table, index = rpb.relative_position_bias_table[:, 0], rpb.relative_position_index
    # query (1, 4) -> cell (2, 2) = 10; key cell (0, 3) = 3: offset (2, -1) -> (2+3)*7 + (-1+3) = 37
    assert int(index[10, 3]) == 37
    assert bias[0, 0, 1 * 6 + 4, 3] == table[37]


def test_attention_equals_reference_formula():
    """softmax((q k^T + B) * scale) v with keys/values bilinearly resized, heads laid out as (dim_head heads)."""
    torch.manual_seed(3)
    attn = LinearAttention(8, heads=2, dim_head=4, reduce_size=4).eval()
    x = torch.randn(2, 8, 8, 12)
    with torch.no_grad():
        got = attn(x)
        q, k, v = attn.to_qkv(x).chunk(3, dim=1)
        k, v = (F.interpolate(t, size=(4, 4), mode="bilinear", align_corners=True) for t in (k, v))

        def split(t):  # b (d h) y x -> b h (y x) d
            b, _, hh, ww = t.shape
            return t.reshape(b, 4, 2, hh * ww).permute(0, 2, 3, 1)

        logits = torch.einsum("bhid,bhjd->bhij", split(q), split(k)) + attn.relative_position_encoding(8, 12)
        w = torch.softmax(logits * 4 ** -0.5, dim=-1)
        out = torch.einsum("bhij,bhjd->bhid", w, split(v)).permute(0, 3, 1, 2).reshape(2, 8, 8, 12)
        expected = attn.to_out(out)
    assert torch.allclose(got, expected, atol=1e-5)


# ------------------------------------------------------------------------------------------- determinism


def test_deterministic_under_fixed_seed():
    def run():
        torch.manual_seed(123)
        model = _small()  # dropout 0.1 active in train mode
        x = torch.randn(2, 1, 64, 64)
        y = model(x)
        y.mean().backward()
        return model, y

    m1, y1 = run()
    m2, y2 = run()
    assert torch.equal(y1, y2)
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    g1 = m1.down4.blocks[2].attn.relative_position_encoding.relative_position_bias_table.grad
    g2 = m2.down4.blocks[2].attn.relative_position_encoding.relative_position_bias_table.grad
    assert torch.equal(g1, g2)


def test_xavier_init_like_fedgs():
    model = _small()
    assert torch.all(model.outc.bias == 0)
    bn = model.inc[0].bn1
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    w = model.down4.blocks[1].conv1.weight  # 3x3 conv 64 -> 128: xavier std = sqrt(2 / (64*9 + 128*9))
    assert abs(w.std().item() - math.sqrt(2 / (64 * 9 + 128 * 9))) < 0.1 * math.sqrt(2 / (64 * 9 + 128 * 9))


# ------------------------------------------------------------------------------------------ configuration


def test_bad_configuration_is_config_error():
    with pytest.raises(ConfigError, match="block_list"):
        _small(block_list="235")
    with pytest.raises(ConfigError, match="num_blocks"):
        _small(block_list="1234")  # num_blocks has 3 entries, level 1 needs a 4th from the right
    with pytest.raises(ConfigError, match="num_heads"):
        _small(block_list="1234", num_blocks=(1, 1, 2, 4))  # same for num_heads
    with pytest.raises(ConfigError, match="projection"):
        _small(projection="conv")
    with pytest.raises(ConfigError, match="num_blocks"):
        _small(num_blocks=(0, 2, 4))
    with pytest.raises(ConfigError, match="weight_init"):
        _small(weight_init="orthogonal")


# ---------------------------------------------------------------------------------------------- registry


def test_registry_builds_utnet():
    model = get_model("UTNet", in_channels=2, num_classes=3, base_chan=4, reduce_size=4)
    assert isinstance(model, UTNet)
    assert model.config["in_chan"] == 2 and model.config["base_chan"] == 4
    assert model(torch.randn(1, 2, 32, 64)).shape == (1, 3, 32, 64)


def test_registry_unknown_name_lists_known_models():
    assert available_models() == ["sd_utnet", "unet", "unet25d", "utnet"]
    with pytest.raises(ConfigError) as err:
        get_model("transunet")
    msg = str(err.value)
    assert "transunet" in msg and "unet" in msg and "utnet" in msg


def test_registry_rejects_bad_kwargs():
    with pytest.raises(ConfigError, match="basechan"):
        get_model("utnet", basechan=8)
    with pytest.raises(ConfigError, match="in_channels"):
        get_model("utnet", in_chan=3)
    with pytest.raises(ConfigError, match="featurez"):
        get_model("unet", featurez=(1, 2))
    with pytest.raises(ConfigError, match="features"):
        get_model("unet", features=(8, 8, 16))
    with pytest.raises(ConfigError):
        get_model("unet", in_channels=0)


def test_monai_unet_forward_backward():
    torch.manual_seed(0)
    model = get_model("unet", in_channels=2, num_classes=3, features=(4, 4, 8, 8, 16, 4))
    x = torch.randn(2, 2, 64, 96)
    y = model(x)
    assert y.shape == (2, 3, 64, 96)
    y.mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    # BatchNorm by default: integer num_batches_tracked buffers like UTNet
    assert any(k.endswith("num_batches_tracked") and v.dtype == torch.long for k, v in model.state_dict().items())
    default = get_model("unet")
    assert count_parameters(default) == 495_905


def test_count_parameters_trainable_only():
    model = _small()
    total = count_parameters(model)
    assert total == sum(p.numel() for p in model.parameters())
    model.outc.weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == total - model.outc.weight.numel()
    assert count_parameters(model) == total
