"""Tests for fedseg.models.sd_utnet: SD-UTNet (SDNet with a UTNet anatomy encoder, as in FedGS)."""

from __future__ import annotations

import math

import pytest
import torch

from fedseg.errors import ConfigError
from fedseg.losses import SoftDiceLoss
from fedseg.models import available_models, count_parameters, get_model
from fedseg.models.sd_utnet import (
    ModalityEncoder,
    SDUTNet,
    adain,
    kl_divergence,
    multiclass_soft_dice_loss,
    round_ste,
)
from fedseg.models.utnet import UTNet

# Paper width (in_chan=3, base_chan=32, num_classes=1). FedGS's SD_UTNet(in_channels=3) at 512x512, counted on a
# transcription of its code: UTNet(3, 32, num_classes=8) + modality encoder + segmentor + AdaIN decoder.
REF_UTNET_8 = 14_418_986
REF_MODALITY = 4_292_848
REF_SEGMENTOR = 41_986
REF_DECODER = 82_403
REF_TOTAL = REF_UTNET_8 + REF_MODALITY + REF_SEGMENTOR + REF_DECODER  # 18,836,223
DEFAULT_TOTAL = 18_837_375  # + the first modality conv's weights for the 8 anatomy channels


def _small(**kw) -> SDUTNet:
    cfg = dict(in_chan=1, base_chan=4, reduce_size=2, modality_grid=2, attn_drop=0.0, proj_drop=0.0)
    cfg.update(kw)
    return SDUTNet(**cfg)


def _toy_batch(n=4, c=1, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.zeros(n, 1, h, w)
    for i in range(n):  # one bright square lesion per image
        r, s = 4 + 3 * i, 6 + 2 * i
        y[i, :, r:r + s, r:r + s] = 1.0
    x = 0.3 * torch.randn(n, c, h, w, generator=g) + 0.8 * y - 0.2
    return x, y


# ------------------------------------------------------------------------------------------------ architecture


def test_paper_width_parameter_count_matches_reference():
    assert REF_TOTAL == 18_836_223
    assert REF_UTNET_8 == 14_418_755 - 33 + (32 * 8 + 8)  # UTNet paper count with an 8-channel head instead of 1
    fedgs = SDUTNet(in_chan=3, base_chan=32, anatomy_activation="tanh", modality_input="image", weight_init=None)
    assert count_parameters(fedgs) == REF_TOTAL
    assert count_parameters(fedgs.a_encoder) == REF_UTNET_8
    assert count_parameters(fedgs.m_encoder) == REF_MODALITY
    assert count_parameters(fedgs.segmentor) == REF_SEGMENTOR
    assert count_parameters(fedgs.decoder) == REF_DECODER
    # reference fc: 128 channels on the 32x32 map of a 512x512 image -> 32 (target_size**2 // 2 inputs)
    assert fedgs.m_encoder.fc.in_features == 512**2 // 2 and fedgs.m_encoder.fc.out_features == 32
    default = SDUTNet(in_chan=3, base_chan=32, weight_init=None)
    assert count_parameters(default) == DEFAULT_TOTAL == REF_TOTAL + 16 * 8 * 3 * 3
    assert default.m_encoder.block1[0].in_channels == 3 + 8


def test_reference_layout_of_parts():
    m = _small(in_chan=3, base_chan=32 // 4)
    # widths scale with base_chan: segmentor 2*base, modality (base/2, base, 2 base, 4 base)
    assert m.segmentor.conv1[0].out_channels == 16
    assert [m.m_encoder.get_submodule(f"block{i}")[0].out_channels for i in range(1, 5)] == [4, 8, 16, 32]
    assert all(m.m_encoder.get_submodule(f"block{i}")[0].stride == (2, 2) for i in range(1, 5))
    assert m.segmentor.pred.out_channels == 2  # background + foreground, as in the reference
    # decoder: 3 AdaIN layers of width anatomy_channels, so the MLP predicts 3 * 2 * 8 parameters from z (8)
    dec = m.decoder.decoder
    assert dec.mlp.fc1.in_features == 8 and dec.mlp.fc3.out_features == 48
    assert dec.dec.conv4.out_channels == 3
    assert isinstance(m.a_encoder.utnet, UTNet) and m.a_encoder.utnet.outc.out_channels == 8
    keys = list(m.state_dict())
    assert keys[0].startswith("m_encoder.block1.") and any(k.startswith("decoder.decoder.dec.conv1") for k in keys)


@pytest.mark.parametrize(
    ("shape", "kw"),
    [
        ((2, 1, 32, 48), {}),
        ((3, 3, 48, 32), dict(in_chan=3, anatomy_activation="tanh", modality_input="image")),
        ((2, 1, 32, 32), dict(anatomy_channels=4, z_length=3, modality_chan=(4, 8), modality_hidden=6,
                              segmentor_chan=5, decoder_chan=6, decoder_mlp_dim=7)),
    ],
)
def test_forward_decompose_shapes_and_backward(shape, kw):
    torch.manual_seed(0)
    model = _small(**kw)
    n, c, h, w = shape
    a_ch, z_len = kw.get("anatomy_channels", 8), kw.get("z_length", 8)
    x = torch.randn(*shape)
    y = (torch.rand(n, 1, h, w) > 0.7).float()
    assert model(x).shape == (n, 1, h, w)
    out = model.decompose(x)
    assert out.seg_logits.shape == (n, 1, h, w)
    assert out.anatomy.shape == (n, a_ch, h, w)
    assert out.recon.shape == (n, c, h, w)
    for t in (out.z, out.mu, out.logvar, out.z_recon):
        assert t.shape == (n, z_len)
    loss = model.training_loss(x, y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


def test_anatomy_is_binary_one_hot_or_tanh():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 32, 32)
    a = _small().decompose(x).anatomy
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert (a.sum(1) <= 1).all()  # rounded softmax: at most one active factor per pixel
    t = _small(anatomy_activation="tanh").decompose(x).anatomy
    assert t.abs().max() < 1 and len(t.unique()) > 2


def test_round_ste_forward_round_backward_identity():
    p = torch.tensor([0.2, 0.5, 0.51, 0.9], requires_grad=True)
    r = round_ste(p)
    assert r.tolist() == [0.0, 0.0, 1.0, 1.0]  # round half to even, like numpy.round in SDNet's Rounding layer
    (r * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert p.grad.tolist() == [1.0, 2.0, 3.0, 4.0]


# ----------------------------------------------------------------------------------------------- loss terms


def test_kl_divergence_hand_value():
    mu = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    # row 1: -0.5 * [(1 + 0 - 1 - 1) + (1 + ln2 - 0 - 2)] = 1 - ln2 / 2 ; row 2: 0 ; mean over the batch
    assert kl_divergence(mu, logvar).item() == pytest.approx((1 - math.log(2.0) / 2) / 2, abs=1e-7)


def test_adain_hand_value():
    x = torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]]]])  # [1, 2, 1, 2]: channel 0 mean 2, biased var 1
    out = adain(x, scale=torch.tensor([[2.0, 3.0]]), shift=torch.tensor([[5.0, -1.0]]))
    s = 1 / math.sqrt(1 + 1e-5)
    assert torch.allclose(out[0, 0, 0], torch.tensor([5 - 2 * s, 5 + 2 * s]))
    assert torch.allclose(out[0, 1, 0], torch.tensor([-1.0, -1.0]))  # constant map -> shift


def test_decoder_adain_parameter_order_like_reference():
    """MLP output p: layer i uses shift p[:, 2Di:2Di+D] and scale p[:, 2Di+D:2D(i+1)] (reference assignment)."""
    torch.manual_seed(0)
    dec = _small(anatomy_channels=3).decoder.decoder
    a, z = torch.randn(2, 3, 8, 8), torch.randn(2, 8)
    p = dec.mlp(z)
    assert p.shape == (2, 18)

    def inorm(t):
        mean = t.mean(dim=(2, 3), keepdim=True)
        var = t.var(dim=(2, 3), unbiased=False, keepdim=True)
        return (t - mean) / torch.sqrt(var + 1e-5)

    out = a
    for i, conv in enumerate((dec.dec.conv1, dec.dec.conv2, dec.dec.conv3)):
        shift, scale = p[:, 6 * i:6 * i + 3], p[:, 6 * i + 3:6 * i + 6]
        out = inorm(conv(out)) * scale[:, :, None, None] + shift[:, :, None, None]
    expected = torch.tanh(dec.dec.conv4(out))
    assert torch.allclose(dec(a, z), expected, atol=1e-5)
    # the MLP ends in ReLU (reference): AdaIN scales and shifts are non-negative
    assert (p >= 0).all()


def test_training_loss_terms_by_hand():
    torch.manual_seed(0)
    model = _small().eval()  # eval: z = mu, so decompose() and training_loss() see the same numbers
    x, y = _toy_batch(n=2)
    with torch.no_grad():
        out = model.decompose(x)
        loss = model.training_loss(x, y)
    p = torch.sigmoid(out.seg_logits).reshape(2, -1)
    t = y.reshape(2, -1)
    dice = (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()  # per image, smooth 1, averaged
    kl = (-0.5 * (1 + out.logvar - out.mu**2 - out.logvar.exp()).sum(1)).mean()
    z_recon = (out.z_recon - out.z).abs().mean()
    recon = (out.recon - x).abs().mean()
    assert torch.equal(out.z, out.mu)
    parts = model.last_loss_parts
    assert set(parts) == {"dice", "kl", "z_recon", "recon", "total"}
    assert all(isinstance(v, float) for v in parts.values())
    assert parts["dice"] == pytest.approx(dice.item(), rel=1e-5)
    assert parts["kl"] == pytest.approx(kl.item(), rel=1e-5)
    assert parts["z_recon"] == pytest.approx(z_recon.item(), rel=1e-5)
    assert parts["recon"] == pytest.approx(recon.item(), rel=1e-5)
    total = 10 * dice + 0.01 * kl + 1 * z_recon + 1 * recon
    assert loss.item() == pytest.approx(total.item(), rel=1e-5)
    assert parts["total"] == pytest.approx(loss.item(), rel=1e-6)
    assert parts["recon"] > 0 and parts["kl"] > 0 and 0 < parts["dice"] < 1


def test_loss_weights_are_configurable():
    torch.manual_seed(0)
    x, y = _toy_batch(n=2)
    model = _small(dice_weight=0.0, kl_weight=1.0, z_recon_weight=0.0, recon_weight=2.0).eval()
    with torch.no_grad():
        loss = model.training_loss(x, y)
    parts = model.last_loss_parts
    assert loss.item() == pytest.approx(parts["kl"] + 2 * parts["recon"], rel=1e-5)


def test_multiclass_dice_hand_value_and_two_class_equals_binary():
    # 1 image, 2 pixels, K=3; logits chosen so the softmax is exactly [[1,0],[0,1],[0,0]] per pixel (large margins)
    big = 50.0
    logits = torch.tensor([[[[big, 0.0]], [[0.0, big]], [[0.0, 0.0]]]])
    target = torch.tensor([[[[1.0, 1.0]]]])  # both pixels class 1
    # class 1: p = [0, 1], t = [1, 1] -> 1 - (2*1 + 1) / (1 + 2 + 1) = 0.25 ; class 2: p = 0, t = 0 -> 1 - 1/1 = 0
    assert multiclass_soft_dice_loss(logits, target).item() == pytest.approx(0.125, abs=1e-6)
    # K = 2 softmax Dice on channel 1 == binary sigmoid Dice of the logit difference
    torch.manual_seed(1)
    two = torch.randn(3, 2, 8, 8)
    y = (torch.rand(3, 1, 8, 8) > 0.5).float()
    binary = SoftDiceLoss()(two[:, 1:2] - two[:, 0:1], y)
    assert multiclass_soft_dice_loss(two, y).item() == pytest.approx(binary.item(), rel=1e-6)


def test_two_class_model_shares_weights_with_binary_model():
    torch.manual_seed(0)
    m1, m2 = _small(num_classes=1).eval(), _small(num_classes=2).eval()
    m2.load_state_dict(m1.state_dict(), strict=True)  # same prediction conv (background + foreground)
    x, y = _toy_batch(n=2)
    with torch.no_grad():
        l1, l2 = m1(x), m2(x)
        assert l2.shape == (2, 2, 32, 32)
        assert torch.allclose(torch.sigmoid(l1[:, 0]), torch.softmax(l2, 1)[:, 1], atol=1e-6)
        assert m1.training_loss(x, y).item() == pytest.approx(m2.training_loss(x, y).item(), rel=1e-5)
    m3 = _small(num_classes=3)
    assert m3(x).shape == (2, 3, 32, 32)
    assert torch.isfinite(m3.training_loss(x, torch.randint(0, 3, (2, 1, 32, 32)).float()))


def test_training_loss_rejects_bad_target():
    model = _small()
    x = torch.randn(2, 1, 32, 32)
    with pytest.raises(ValueError, match="y"):
        model.training_loss(x, torch.zeros(2, 32, 32))
    with pytest.raises(ValueError, match="y"):
        model.training_loss(x, torch.zeros(2, 1, 16, 32))


# ------------------------------------------------------------------------------------------------ training


def test_training_loss_decreases_on_toy_batch():
    torch.manual_seed(0)
    model = _small().train()
    x, y = _toy_batch()

    def measure():  # training-mode loss with the same sampling noise before and after training
        torch.manual_seed(123)
        with torch.no_grad():
            return model.training_loss(x, y).item(), dict(model.last_loss_parts)

    before, parts_before = measure()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(8):
        opt.zero_grad()
        model.training_loss(x, y).backward()
        opt.step()
    after, parts_after = measure()
    assert after < 0.9 * before, (parts_before, parts_after)
    assert parts_after["dice"] < parts_before["dice"] - 0.05, (parts_before, parts_after)


def test_each_loss_term_reaches_the_right_modules():
    torch.manual_seed(0)
    model = _small().train()
    x, y = _toy_batch(n=2)
    terms = model.loss_terms(model.decompose(x), x, y)
    parts = {name: [p for n, p in model.named_parameters() if n.startswith(name)]
             for name in ("a_encoder", "m_encoder", "segmentor", "decoder")}

    def reached(term):
        grads = torch.autograd.grad(terms[term], [p for ps in parts.values() for p in ps], retain_graph=True,
                                    allow_unused=True)
        out, i = {}, 0
        for name, ps in parts.items():
            g = grads[i:i + len(ps)]
            i += len(ps)
            out[name] = any(gi is not None and gi.abs().sum() > 0 for gi in g)
        return out

    # segmentation depends on the anatomy only: Dice never reaches the modality encoder or the decoder
    assert reached("dice") == {"a_encoder": True, "m_encoder": False, "segmentor": True, "decoder": False}
    # the reconstruction trains the decoder, the modality encoder and (through the straight-through rounding) the
    # anatomy encoder
    assert reached("recon") == {"a_encoder": True, "m_encoder": True, "segmentor": False, "decoder": True}
    assert reached("kl") == {"a_encoder": True, "m_encoder": True, "segmentor": False, "decoder": False}
    assert reached("z_recon") == {"a_encoder": True, "m_encoder": True, "segmentor": False, "decoder": True}
    # ... and the total reaches every parameter, the UTNet relative-position tables included
    terms["total"].backward()
    tables = [p for n, p in model.named_parameters() if n.endswith("relative_position_bias_table")]
    assert len(tables) == 9 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in tables)


def test_batch_of_one_trains_and_keeps_running_stats():
    torch.manual_seed(0)
    model = _small().train()
    x, y = _toy_batch(n=1)
    before = model.m_encoder.norm.running_mean.clone()
    loss = model.training_loss(x, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.equal(model.m_encoder.norm.running_mean, before)
    model.training_loss(*_toy_batch(n=2))
    assert not torch.equal(model.m_encoder.norm.running_mean, before)


# ------------------------------------------------------------------------------------------- determinism


def test_eval_mode_is_deterministic_and_segmentation_ignores_z():
    torch.manual_seed(0)
    model = _small(attn_drop=0.1, proj_drop=0.1)
    x, y = _toy_batch(n=2)
    model.train()
    model.training_loss(x, y)  # move the BatchNorm running statistics away from their initial values
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
        d1, d2 = model.decompose(x), model.decompose(x)
        l1, l2 = model.training_loss(x, y), model.training_loss(x, y)
    assert torch.equal(a, b)
    for t1, t2 in zip(d1, d2, strict=True):
        assert torch.equal(t1, t2)
    assert torch.equal(d1.z, d1.mu) and torch.equal(d1.seg_logits, a)
    assert l1.item() == l2.item()
    # changing the modality encoder and the decoder changes the reconstruction but not the segmentation
    with torch.no_grad():
        for p in list(model.m_encoder.parameters()) + list(model.decoder.parameters()):
            p.add_(0.5)
        d3 = model.decompose(x)
    assert torch.equal(model(x), a)
    assert not torch.allclose(d3.recon, d1.recon)


def test_training_mode_samples_z():
    torch.manual_seed(0)
    model = _small().train()
    x, _ = _toy_batch(n=2)
    out = model.decompose(x)
    assert not torch.allclose(out.z, out.mu)
    torch.manual_seed(5)
    z1 = model.decompose(x).z
    torch.manual_seed(5)
    z2 = model.decompose(x).z
    assert torch.equal(z1, z2)


# ----------------------------------------------------------------------------------- buffers and sizes


def test_integer_buffers_present_and_roundtrip():
    a, b = _small(), _small()
    sd = a.state_dict()
    idx = {k: v for k, v in sd.items() if k.endswith("relative_position_index")}
    assert len(idx) == 9 and all(k.startswith("a_encoder.utnet.") for k in idx)
    assert all(v.dtype == torch.long and v.shape == (4, 4) for v in idx.values())  # reduce_size 2 -> 4 cells
    int_keys = {k for k, v in sd.items() if not v.is_floating_point()}
    assert set(idx) <= int_keys and any(k.endswith("num_batches_tracked") for k in int_keys)
    assert all(sd[k].dtype == torch.long for k in int_keys)
    assert int_keys.isdisjoint(n for n, _ in a.named_parameters())
    b.load_state_dict(sd, strict=True)
    for (ka, va), (kb, vb) in zip(sd.items(), b.state_dict().items(), strict=True):
        assert ka == kb and va.dtype == vb.dtype and torch.equal(va, vb)


def test_modality_grid_pools_any_size_and_is_identity_at_16x_grid():
    torch.manual_seed(0)
    enc = ModalityEncoder(in_chan=2, z_length=3, channels=(4, 4, 4, 4), hidden=5, grid=2).eval()
    assert enc.fc.in_features == 4 * 2 * 2
    x = torch.randn(2, 2, 32, 32)  # 32 / 16 = 2: the flatten sees the raw 2x2 map, no pooling
    feat = x
    for i in range(1, 5):
        feat = enc.get_submodule(f"block{i}")(feat)
    expected = enc.mu(enc.activ(enc.norm(enc.fc(feat.flatten(1)))))
    assert torch.allclose(enc(x)[1], expected, atol=1e-6)
    for size in ((64, 96), (16, 16)):  # larger maps are average-pooled, smaller ones replicated, to 2x2
        z, mu, logvar = enc(torch.randn(2, 2, *size))
        assert z.shape == mu.shape == logvar.shape == (2, 3)
    model = _small()
    for size in ((32, 32), (48, 64)):
        assert model.training_loss(torch.randn(2, 1, *size), torch.zeros(2, 1, *size)).isfinite()


def test_input_not_divisible_by_16_is_config_error():
    with pytest.raises(ConfigError, match="divisible by 16"):
        _small()(torch.randn(1, 1, 32, 40))


def test_bad_configuration_is_config_error():
    with pytest.raises(ConfigError, match="anatomy_activation"):
        _small(anatomy_activation="sigmoid")
    with pytest.raises(ConfigError, match="modality_input"):
        _small(modality_input="anatomy")
    with pytest.raises(ConfigError, match="anatomy_channels"):
        _small(anatomy_channels=1)
    _small(anatomy_channels=1, anatomy_activation="tanh")  # fine without the softmax
    with pytest.raises(ConfigError, match="base_chan"):
        _small(base_chan=0)
    with pytest.raises(ConfigError, match="modality_chan"):
        _small(modality_chan=())
    with pytest.raises(ConfigError, match="kl_weight"):
        _small(kl_weight=-1.0)
    with pytest.raises(ConfigError, match="block_list"):
        _small(block_list="235")


# ---------------------------------------------------------------------------------------------- registry


def test_registry_builds_sd_utnet():
    assert "sd_utnet" in available_models()
    model = get_model("SD_UTNet", in_channels=3, num_classes=1, base_chan=4, reduce_size=2, modality_grid=2,
                      modality_chan=[2, 4, 8, 16])
    assert isinstance(model, SDUTNet)
    assert model.config["in_chan"] == 3 and model.config["modality_chan"] == (2, 4, 8, 16)
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 1, 32, 32)
    assert hasattr(model, "training_loss")
    with pytest.raises(ConfigError, match="modality_gird"):
        get_model("sd_utnet", modality_gird=2)
    with pytest.raises(ConfigError, match="in_channels"):
        get_model("sd_utnet", in_chan=3)
