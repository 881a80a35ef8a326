"""Partial model sharing (pFL-ResFIM / FedPer): the site protocol, the masks on the wire, the masked collector and
the FLARE adapters (aggregator, style exchange, executor hooks) with real DXO / Shareable / FLContext objects."""

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants

from fedseg.algorithms.personalization import (
    MaskedCollector,
    PersonalizationConfig,
    PersonalizedSite,
    head_mask,
    mask_stats,
    pack_mask,
    resfim_mask,
    styled_batches,
    unpack_mask,
)
from fedseg.algorithms.resfim import masked_aggregate
from fedseg.algorithms.spectral import StyleBank, low_freq_style, site_style
from fedseg.errors import ConfigError, DataError, UpdateRejected
from fedseg.flare.personalized_aggregator import MASK_META, PersonalizedAggregator
from fedseg.flare.style_exchange import StyleExchange

SHAPES = {"conv.weight": (2, 3), "conv.bias": (2,), "bn.running_mean": (2,)}


def _mask(**true_at):
    out = {n: np.zeros(s, bool) for n, s in SHAPES.items()}
    for name, idx in true_at.items():
        out[name.replace("__", ".")][idx] = True
    return out


# ---------------------------------------------------------------- masks on the wire

def test_pack_unpack_round_trip_is_one_bit_per_coordinate():
    rng = np.random.default_rng(0)
    mask = {"a": rng.random((3, 5)) < 0.3, "b": rng.random(17) < 0.5, "c": np.zeros((), bool)}
    packed = pack_mask(mask)
    assert packed["a"].dtype == np.uint8 and packed["a"].shape == (2,) and packed["b"].shape == (3,)
    back = unpack_mask(packed, {k: v.shape for k, v in mask.items()}, "site-1")
    for k in mask:
        np.testing.assert_array_equal(back[k], mask[k])
        assert back[k].dtype == np.bool_


@pytest.mark.parametrize("packed, match", [
    (None, "no personalization mask"),
    ({"a": np.zeros(2, np.uint8)}, "missing"),
    ({"a": np.zeros(2, np.uint8), "b": np.zeros(1, np.uint8), "x": np.zeros(1, np.uint8)}, "unknown"),
    ({"a": np.zeros(3, np.uint8), "b": np.zeros(1, np.uint8)}, "packed bytes"),
    ({"a": np.zeros(2, np.int64), "b": np.zeros(1, np.uint8)}, "packed bytes"),
    ({"a": np.array([0, 0b00100000], np.uint8), "b": np.zeros(1, np.uint8)}, "beyond its 10 coordinates"),
])
def test_a_malformed_mask_rejects_the_update_and_names_the_site(packed, match):
    with pytest.raises(UpdateRejected, match=match) as e:
        unpack_mask(packed, {"a": (2, 5), "b": (3,)}, "site-7")
    assert "site-7" in str(e.value)


def test_head_mask_keeps_the_matching_tensors_and_refuses_patterns_that_share_nothing_or_everything():
    shapes = {"enc.weight": (3, 2), "up4.conv.weight": (2, 2), "outc.weight": (1, 2), "outc.bias": (1,)}
    m = head_mask(shapes, r"^(up4|outc)\.")
    assert not m["enc.weight"].any() and m["up4.conv.weight"].all() and m["outc.bias"].all()
    assert mask_stats(m) == {"local_coords": 7, "total_coords": 13, "local_fraction": 7 / 13, "tensors_with_local": 3}
    with pytest.raises(ConfigError, match="matches no parameter"):
        head_mask(shapes, r"^decoder\.")
    with pytest.raises(ConfigError, match="matches every parameter"):
        head_mask(shapes, r".")


# ---------------------------------------------------------------- masked collector (server math)

def _update(value, dtype=np.float32):
    return {n: np.full(s, value, dtype) for n, s in SHAPES.items()}


def test_masked_collector_is_the_steps_weighted_mean_over_the_sites_that_share_each_coordinate():
    c = MaskedCollector()
    c.add(_update(1.0), 1, "site-1", _mask(conv__weight=(0, 0)))
    c.add(_update(4.0), 3, "site-2", _mask(conv__weight=(0, 0), conv__bias=1))
    c.add(_update(10.0), 2, "site-3", _mask(conv__bias=1))
    out = c.result()
    # (0,0) shared only by site-3; bias[1] only by site-1; elsewhere (1*1 + 3*4 + 2*10) / 6 = 5.5
    assert out["conv.weight"][0, 0] == 10.0 and out["conv.bias"][1] == 1.0
    assert out["conv.weight"][1, 2] == pytest.approx(5.5) and out["bn.running_mean"][0] == pytest.approx(5.5)
    assert out["conv.weight"].dtype == np.float32 and c.total_weight == 6 and len(c) == 3
    ref, _ = masked_aggregate({"site-1": _update(1.0), "site-2": _update(4.0), "site-3": _update(10.0)},
                              {"site-1": _mask(conv__weight=(0, 0)), "site-2": _mask(conv__weight=(0, 0), conv__bias=1),
                               "site-3": _mask(conv__bias=1)}, {"site-1": 1, "site-2": 3, "site-3": 2})
    for k in out:
        np.testing.assert_allclose(out[k], ref[k])
    assert c.last_stats["aggregated_coords"] == 10 and c.last_stats["local_everywhere"] == 0
    assert c.last_stats["local_somewhere"] == 2


def test_a_sites_local_coordinates_never_enter_the_aggregate_whatever_their_value():
    base = MaskedCollector()
    base.add(_update(1.0), 1, "a", _mask())
    base.add(_update(2.0), 1, "b", _mask(conv__weight=(1, 1)))
    poisoned = MaskedCollector()
    poisoned.add(_update(1.0), 1, "a", _mask())
    upd = _update(2.0)
    upd["conv.weight"][1, 1] = 1e30  # a value a site keeps local: must not move the aggregate at all
    poisoned.add(upd, 1, "b", _mask(conv__weight=(1, 1)))
    r0, r1 = base.result(), poisoned.result()
    for k in r0:
        np.testing.assert_array_equal(r0[k], r1[k])
    assert r1["conv.weight"][1, 1] == 1.0


def test_masked_collector_refuses_a_missing_mask_a_second_update_and_bad_weights():
    c = MaskedCollector()
    with pytest.raises(UpdateRejected, match="no personalization mask"):
        c.add(_update(1.0), 1, "a")
    c.add(_update(1.0), 1, "a", _mask())
    with pytest.raises(UpdateRejected, match="second update"):
        c.add(_update(1.0), 1, "a", _mask())
    with pytest.raises(UpdateRejected, match="weight must be > 0"):
        c.add(_update(1.0), 0, "b", _mask())


# ---------------------------------------------------------------- the site's protocol

def test_schedule_warm_up_then_fixed_or_recomputed_masks():
    site = PersonalizedSite(PersonalizationConfig(warmup_rounds=2, every=0))
    assert [site.due(r) for r in range(3)] == [False, False, True]
    site.set_mask(_mask(), 2)
    assert not any(site.due(r) for r in range(3, 10))
    every = PersonalizedSite(PersonalizationConfig(warmup_rounds=1, every=3))
    assert every.due(1)
    every.set_mask(_mask(), 1)
    assert [every.due(r) for r in range(2, 6)] == [False, False, True, True]
    fedper = PersonalizedSite(PersonalizationConfig(method="fedper"))
    assert fedper.due(0)
    fedper.set_mask(_mask(), 0)
    assert not fedper.due(1)


def test_two_rounds_of_the_protocol_give_the_hand_computed_models():
    """Two sites, one scalar parameter each coordinate; site A keeps w[0] local, site B keeps w[1] local."""
    cfg = PersonalizationConfig(warmup_rounds=0)
    a, b = PersonalizedSite(cfg), PersonalizedSite(cfg)
    glob = {"w": np.array([0.0, 0.0, 0.0], np.float32)}
    a.set_mask({"w": np.array([True, False, False])}, 0)
    b.set_mask({"w": np.array([False, True, False])}, 0)
    # round 0: no local model yet, both start from the global one; "training" adds +1 (A) and +3 (B)
    sa, sb = a.start_state(glob), b.start_state(glob)
    np.testing.assert_array_equal(sa["w"], glob["w"])
    ua, pa = a.outgoing({"w": np.array([1.0, 1.0, 1.0], np.float32)})
    ub, pb = b.outgoing({"w": np.array([3.0, 3.0, 3.0], np.float32)})
    np.testing.assert_array_equal(ua["w"], [0, 1, 1])  # A's local coordinate leaves as 0
    np.testing.assert_array_equal(ub["w"], [3, 0, 3])
    a.finish_round({"w": sa["w"] + 1})
    b.finish_round({"w": sb["w"] + 3})
    shapes = {"w": (3,)}
    agg = MaskedCollector()
    agg.add(ua, 1, "A", unpack_mask(pa, shapes, "A"))
    agg.add(ub, 1, "B", unpack_mask(pb, shapes, "B"))
    glob = {"w": glob["w"] + agg.result()["w"]}
    # w[0]: only B shares -> 3; w[1]: only A shares -> 1; w[2]: both -> 2
    np.testing.assert_allclose(glob["w"], [3.0, 1.0, 2.0])
    # round 1: each site's model = global where shared, own trained value where local
    np.testing.assert_allclose(a.start_state(glob)["w"], [1.0, 1.0, 2.0])
    np.testing.assert_allclose(b.start_state(glob)["w"], [3.0, 3.0, 2.0])


def test_outgoing_never_carries_a_sensitive_value_and_buffers_follow_the_setting():
    site = PersonalizedSite(PersonalizationConfig(warmup_rounds=0))
    site.set_mask({"conv.weight": _mask(conv__weight=(0, 1))["conv.weight"], "conv.bias": np.array([True, True])}, 0)
    upd = {n: np.full(s, 7.25, np.float32) for n, s in SHAPES.items()}
    sent, packed = site.outgoing(upd)
    assert sent["conv.weight"][0, 1] == 0 and (sent["conv.bias"] == 0).all()
    full = unpack_mask(packed, SHAPES, "s")
    assert full["conv.bias"].all() and full["bn.running_mean"].all()  # BatchNorm statistics stay local (FedBN)
    assert (sent["bn.running_mean"] == 0).all()
    assert upd["conv.bias"][0] == 7.25  # the caller's update is not modified
    assert not any(np.isin(sent[k][full[k]], [7.25]).any() for k in sent)
    shared = PersonalizedSite(PersonalizationConfig(warmup_rounds=0, buffers="shared"))
    shared.set_mask({"conv.weight": np.zeros((2, 3), bool), "conv.bias": np.zeros(2, bool)}, 0)
    sent, packed = shared.outgoing(upd)
    assert (sent["bn.running_mean"] == 7.25).all() and not unpack_mask(packed, SHAPES, "s")["bn.running_mean"].any()
    # before any mask (warm-up) everything is shared, statistics included
    warm = PersonalizedSite(PersonalizationConfig(warmup_rounds=3))
    assert not unpack_mask(warm.outgoing(upd)[1], SHAPES, "s")["bn.running_mean"].any()


def test_the_site_model_keeps_its_own_normalisation_statistics():
    glob = {"conv.weight": np.zeros((2, 3), np.float32), "conv.bias": np.zeros(2, np.float32),
            "bn.running_mean": np.zeros(2, np.float32), "bn.num_batches_tracked": np.array(9)}
    own = {"conv.weight": np.ones((2, 3), np.float32), "conv.bias": np.ones(2, np.float32),
           "bn.running_mean": np.full(2, 5.0, np.float32), "bn.num_batches_tracked": np.array(4)}
    for buffers, expected in (("local", 5.0), ("shared", 0.0)):
        site = PersonalizedSite(PersonalizationConfig(warmup_rounds=0, buffers=buffers))
        site.set_mask({"conv.weight": np.zeros((2, 3), bool), "conv.bias": np.array([True, False])}, 0)
        site.finish_round(own)
        start = site.start_state(glob)
        assert (start["bn.running_mean"] == expected).all() and start["bn.running_mean"].dtype == np.float32
        np.testing.assert_array_equal(start["conv.bias"], [1.0, 0.0])
        assert (start["conv.weight"] == 0).all() and start["bn.num_batches_tracked"] == 9


def test_start_state_is_global_before_a_mask_and_names_a_model_mismatch():
    site = PersonalizedSite(PersonalizationConfig(warmup_rounds=0))
    glob = {"w": torch.ones(2), "n": torch.tensor(3)}
    assert set(site.start_state(glob)) == {"w", "n"}
    site.set_mask({"w": np.array([True, False]), "v": np.array([True])}, 0)
    site.finish_round({"w": np.array([5.0, 5.0]), "v": np.array([1.0])})
    with pytest.raises(DataError, match="lacks masked entries"):
        site.start_state(glob)


@pytest.mark.parametrize("kwargs, match", [({"method": "fedbn"}, "must be one of"),
                                           ({"fraction": 0.1, "threshold": 0.5}, "only one of"),
                                           ({"fraction": 1.5}, "fraction must be in"),
                                           ({"residual": "ratio"}, "residual must be"),
                                           ({"beta": 0.9}, "beta must be"),
                                           ({"warmup_rounds": -1}, "warmup_rounds"),
                                           ({"fisher_samples": 0}, "fisher_samples"),
                                           ({"head": "("}, "regular expression"),
                                           ({"buffers": "fedbn"}, "buffers must be one of")])
def test_bad_personalization_settings_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PersonalizationConfig(**kwargs)
    assert PersonalizationConfig(threshold=0.5).fraction is None
    assert PersonalizationConfig().fraction == 0.1


# ---------------------------------------------------------------- ResFIM's mask from styled data

def _bank(rng, size=16):
    bank = StyleBank(0.125, image_size=(size, size))
    for site, gain in (("site-1", 1.0), ("site-2", 3.0), ("site-3", 0.2)):
        bank.add_images(site, [gain * rng.random((2, size, size)) for _ in range(3)])
    return bank


def test_styled_batches_carry_the_other_sites_styles_and_the_local_phase():
    rng = np.random.default_rng(0)
    bank = _bank(rng)
    x = torch.from_numpy(rng.random((2, 2, 16, 16)).astype(np.float32))
    y = torch.zeros(2, 1, 16, 16)
    out = styled_batches([(x, y)], bank, "site-1")
    assert len(out) == 2  # one copy per other site
    for (xs, ys), other in zip(out, ["site-2", "site-3"]):
        assert ys is y and xs.shape == x.shape and xs.dtype == x.dtype
        np.testing.assert_allclose(low_freq_style(xs[0].numpy().astype(np.float64), 0.125), bank.style(other),
                                   rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.angle(np.fft.fft2(xs[1].numpy())[..., 5, 5]),
                                   np.angle(np.fft.fft2(x[1].numpy())[..., 5, 5]), atol=1e-4)
    with pytest.raises(ConfigError, match="no other site"):
        styled_batches([(x, y)], StyleBank.from_dict({**{k: v for k, v in bank.to_dict().items()
                                                         if not k.endswith(("2", "3"))}}), "site-1")


def test_resfim_mask_keeps_the_requested_share_and_marks_the_style_sensitive_first_layer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(3, 1, 1))
    rng = np.random.default_rng(1)
    bank = _bank(rng)
    real = [(torch.from_numpy(rng.random((2, 2, 16, 16)).astype(np.float32)),
             (torch.from_numpy(rng.random((2, 1, 16, 16))) > 0.5).float()) for _ in range(2)]
    styled = styled_batches(real, bank, "site-1")
    loss = lambda out, y: torch.nn.functional.binary_cross_entropy_with_logits(out, y)  # noqa: E731
    mask, info = resfim_mask(model, loss, real, styled, PersonalizationConfig(fraction=0.25, residual="abs"))
    n = sum(p.numel() for p in model.parameters())
    assert info["local_coords"] == int(0.25 * n) and info["total_coords"] == n
    assert set(mask) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    thr, _ = resfim_mask(model, loss, real, styled, PersonalizationConfig(threshold=1e9))
    assert not any(m.any() for m in thr.values())


# ---------------------------------------------------------------- FLARE: the aggregator

def _ctx(round_=0, weights=None):
    ctx = FLContext()
    ctx.set_prop(AppConstants.CURRENT_ROUND, round_, private=True, sticky=False)
    w = weights or {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
    ctx.set_prop(AppConstants.GLOBAL_MODEL, {ModelLearnableKey.WEIGHTS: w}, private=True, sticky=False)
    return ctx


def _result(site, update, mask, steps=1):
    dxo = DXO(DataKind.WEIGHT_DIFF, update, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: steps})
    if mask is not None:
        dxo.set_meta_prop(MASK_META, pack_mask(mask))
    s = dxo.to_shareable()
    s.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    s.set_return_code(ReturnCode.OK)
    return s


def test_personalized_aggregator_masks_each_site_and_rejects_a_site_without_a_mask():
    agg = PersonalizedAggregator()
    ctx = _ctx()
    assert agg.accept(_result("site-1", _update(2.0), _mask(conv__bias=0), steps=1), ctx)
    assert agg.accept(_result("site-2", _update(5.0), _mask(), steps=2), ctx)
    assert not agg.accept(_result("site-3", _update(9.0), None), ctx)
    assert "no personalization mask" in agg.rejected["site-3"]
    bad = _mask()
    bad["conv.weight"] = np.zeros((3, 3), bool)  # 9 bits = 2 bytes: does not fit the 6 coordinates of the entry
    assert not agg.accept(_result("site-4", _update(9.0), bad), ctx)
    out = from_shareable(agg.aggregate(ctx))
    assert out.data["conv.bias"][0] == 5.0 and out.data["conv.bias"][1] == pytest.approx(4.0)
    assert out.get_meta_prop("contributors") == ["site-1", "site-2"]
    assert out.get_meta_prop("personalization")["local_somewhere"] == 1


# ---------------------------------------------------------------- FLARE: the style bank

def test_style_exchange_builds_the_bank_and_leaves_out_a_bad_style_by_name():
    rng = np.random.default_rng(3)
    good = {s: {"style": site_style([rng.random((3, 16, 16))], 0.125), "beta": 0.125, "image_size": (16, 16)}
            for s in ("site-1", "site-2", "site-3")}
    bank = StyleExchange(min_sites=2).build_bank(good)
    assert bank.sites == ["site-1", "site-2", "site-3"] and bank.nbytes == 3 * 3 * 5 * 5 * 8
    bad = dict(good)
    bad["site-2"] = {**good["site-2"], "style": rng.random((3, 16, 16))}  # a whole image is not a style
    bad["site-3"] = {**good["site-3"], "beta": 0.25}
    assert StyleExchange(min_sites=2).build_bank(bad).sites == ["site-1"]
    with pytest.raises(ValueError, match="min_sites must be >= 2"):
        StyleExchange(min_sites=1)
