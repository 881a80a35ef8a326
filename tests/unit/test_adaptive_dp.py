"""Adaptive DP mechanism: noise scale and clipping against theory, the noisy-quantile threshold, the analytic Gaussian
calibration, what the report may hold, state, and refusals of bad settings and updates."""

import json
import math

import numpy as np
import pytest
from fedseg.algorithms.adaptive_dp import (
    AdaptiveDPMechanism,
    DPConfig,
    analytic_gaussian_sigma,
    clip_update,
    gaussian_delta,
    idlg_mechanism,
    initial_layer_thresholds,
)
from fedseg.errors import ConfigError, UpdateRejected
from scipy.optimize import brentq
from scipy.stats import norm

N = 200_000  # noise samples: the standard error of a scale estimate is ~ 1 / sqrt(N) = 0.22%


def _noise(cfg, seed=0, dtype=np.float64):
    """The noise alone: privatize a zero update (norm 0, never clipped)."""
    mech = AdaptiveDPMechanism(cfg, seed=seed)
    out, report = mech.privatize({"w": np.zeros(N, dtype)})
    return out["w"].astype(np.float64), report


# ------------------------------------------------------------------------------------------------------ noise scale
@pytest.mark.parametrize("adjacency, clip, eps, b", [("replace", 1.0, 2.0, 1.0), ("add_remove", 0.3, 0.1, 3.0)])
def test_laplace_noise_has_scale_sensitivity_over_epsilon(adjacency, clip, eps, b):
    noise, report = _noise(DPConfig(epsilon=eps, clipping="fixed", clip_init=clip, adjacency=adjacency))
    assert report["sensitivity"] == pytest.approx((2 if adjacency == "replace" else 1) * clip, rel=1e-12)
    assert report["noise_scale"] == pytest.approx(b, rel=1e-12)
    # Laplace(b): E|X| = b, Var X = 2 b^2; mean abs deviation has std b / sqrt(N)
    assert np.mean(np.abs(noise)) == pytest.approx(b, rel=0.01)
    assert np.var(noise) == pytest.approx(2 * b * b, rel=0.03)
    assert abs(np.mean(noise)) < 5 * b * math.sqrt(2 / N)


def test_gaussian_noise_has_the_analytic_sigma():
    noise, report = _noise(DPConfig(mechanism="gaussian", epsilon=1.0, delta=1e-5, clipping="fixed", clip_init=0.5))
    sigma = 2 * 0.5 * 3.7306316348  # analytic Gaussian sigma / sensitivity at (1, 1e-5), see below
    assert report["noise_scale"] == pytest.approx(sigma, rel=1e-9)
    assert np.std(noise) == pytest.approx(sigma, rel=0.01)  # std of the std estimate: 0.16%
    # Gaussian, not Laplace: E|X| = sigma sqrt(2/pi)
    assert np.mean(np.abs(noise)) == pytest.approx(sigma * math.sqrt(2 / math.pi), rel=0.01)


def test_noise_is_float64_then_cast_back_and_seeded():
    update = {"a": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.float16)}
    cfg = DPConfig(epsilon=3.0)
    out1, _ = AdaptiveDPMechanism(cfg, seed=7).privatize(update)
    out2, _ = AdaptiveDPMechanism(cfg, seed=7).privatize(update)
    out3, _ = AdaptiveDPMechanism(cfg, seed=8).privatize(update)
    assert {k: (v.shape, v.dtype) for k, v in out1.items()} == {k: (v.shape, v.dtype) for k, v in update.items()}
    for k in update:
        np.testing.assert_array_equal(out1[k], out2[k])
        assert not np.array_equal(out1[k], out3[k])
    # same draws in float64 (quantile bit first, then the tensors in order), then cast
    rng = np.random.default_rng(7)
    rng.laplace(0.0, 1 / 0.1, size=1)
    clipped = clip_update(update, 1.0, "l1")
    for k, v in update.items():
        expected = (clipped[k] + rng.laplace(0.0, 2.0 / 3.0, size=v.shape)).astype(v.dtype)
        np.testing.assert_array_equal(out1[k], expected)


# ------------------------------------------------------------------------------------------------------- clipping
@pytest.mark.parametrize("norm_name", ["l1", "l2"])
def test_clipping_puts_the_norm_exactly_on_the_threshold_and_leaves_small_updates(norm_name):
    rng = np.random.default_rng(1)
    update = {"a": rng.normal(size=(4, 5)), "b": rng.normal(size=7)}
    l1 = sum(np.abs(v).sum() for v in update.values())
    l2 = math.sqrt(sum(np.square(v).sum() for v in update.values()))
    total = l1 if norm_name == "l1" else l2
    clipped = clip_update(update, total / 3, norm_name)
    c1 = sum(np.abs(v).sum() for v in clipped.values())
    c2 = math.sqrt(sum(np.square(v).sum() for v in clipped.values()))
    assert (c1 if norm_name == "l1" else c2) == pytest.approx(total / 3, rel=1e-12)
    np.testing.assert_allclose(clipped["a"] / update["a"], 1 / 3, rtol=1e-12)  # a scaling: direction kept
    untouched = clip_update(update, total * 1.001, norm_name)
    for k in update:
        np.testing.assert_array_equal(untouched[k], update[k])


@pytest.mark.parametrize("mechanism", ["laplace", "gaussian"])
def test_privatize_clips_in_the_mechanism_norm(mechanism):
    update = {"a": np.array([3.0, -4.0]), "b": np.array([0.0])}  # L1 7, L2 5
    # negligible noise: Laplace b = 4e-12; Gaussian sigma ~ 4 / sqrt(2 eps) = 2.8e-6 (analytic, large epsilon)
    cfg = DPConfig(mechanism=mechanism, epsilon=1e12, clipping="fixed", clip_init=2.0)
    out, report = AdaptiveDPMechanism(cfg, seed=0).privatize(update)
    expected = update["a"] * (2 / 7 if mechanism == "laplace" else 2 / 5)
    atol = 1e-9 if mechanism == "laplace" else 3e-5
    np.testing.assert_allclose(out["a"], expected, atol=atol)
    assert report["norm"] == ("l1" if mechanism == "laplace" else "l2")
    below, _ = AdaptiveDPMechanism(DPConfig(mechanism=mechanism, epsilon=1e12, clipping="fixed", clip_init=10.0),
                                   seed=0).privatize(update)
    np.testing.assert_allclose(below["a"], update["a"], atol=atol)


@pytest.mark.parametrize("mechanism", ["laplace", "gaussian"])
def test_per_layer_clipping_and_combined_sensitivity(mechanism):
    update = {"big": np.full((10, 10), 1.0), "small": np.full(25, 1e-4), "bias": np.zeros(1)}
    cfg = DPConfig(mechanism=mechanism, epsilon=1e12, clipping="fixed", clip_init=1.0, per_layer=True)
    mech = AdaptiveDPMechanism(cfg, seed=0)
    assert mech.thresholds == {}  # unknown until the first update names the tensors
    out, report = mech.privatize(update)
    c = report["clip"]
    if mechanism == "laplace":  # split by element count, combined L1 threshold = clip_init
        assert c == pytest.approx({"big": 100 / 126, "small": 25 / 126, "bias": 1 / 126}, rel=1e-12)
        assert np.abs(out["big"]).sum() == pytest.approx(c["big"], rel=1e-9)
        combined = sum(c.values())
    else:
        assert c == pytest.approx({"big": math.sqrt(100 / 126), "small": math.sqrt(25 / 126),
                                   "bias": math.sqrt(1 / 126)}, rel=1e-12)
        assert np.linalg.norm(out["big"]) == pytest.approx(c["big"], rel=1e-4)  # sigma 1.4e-6 at eps 1e12
        combined = math.sqrt(sum(v * v for v in c.values()))
    assert combined == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_allclose(out["small"], update["small"], atol=1e-5)  # below its own threshold: untouched
    assert report["sensitivity"] == pytest.approx(2 * combined, rel=1e-12)
    if mechanism == "laplace":
        assert report["noise_scale"] == pytest.approx(2 * combined / 1e12, rel=1e-12)
    with pytest.raises(UpdateRejected, match=r"missing \['bias'\]"):
        mech.privatize({"big": update["big"], "small": update["small"]})


def test_initial_layer_thresholds_use_shapes_only():
    shapes = {"w": (3, 4), "b": (4,)}
    assert initial_layer_thresholds(shapes, 2.0, "l1") == pytest.approx({"w": 1.5, "b": 0.5})
    assert initial_layer_thresholds(shapes, 2.0, "l2") == pytest.approx({"w": 2 * math.sqrt(0.75),
                                                                       "b": 2 * math.sqrt(0.25)})


# ----------------------------------------------------------------------------------------------- noisy quantile
@pytest.mark.parametrize("percentile", [10.0, 50.0, 90.0])
def test_noisy_quantile_threshold_converges_to_the_target_percentile(percentile):
    """Norms ~ lognormal(0, 1); start a factor e^2 above the median. Over 30 seeds (checked when written) the final
    threshold's CDF value missed the target by std 0.011 / 0.026 / 0.012 (10th / 50th / 90th), at most 0.064; the mean
    log threshold of the last 4000 rounds by std 0.006 / 0.010 / 0.006, at most 0.029."""
    rng = np.random.default_rng(int(percentile))
    cfg = DPConfig(epsilon=1e6, clipping="adaptive", clip_init=math.exp(2.0), percentile=percentile,
                   quantile_epsilon=5.0, clip_lr=0.01)
    mech = AdaptiveDPMechanism(cfg, seed=int(percentile))
    log_c = []
    for norm_value in rng.lognormal(0.0, 1.0, size=8000):
        mech.privatize({"w": np.array([norm_value])})  # 1 element: L1 norm = |value|
        log_c.append(math.log(mech.thresholds))
    fresh = rng.lognormal(0.0, 1.0, size=100_000)
    assert float(np.mean(fresh <= mech.thresholds)) == pytest.approx(percentile / 100, abs=0.07)
    assert norm.cdf(np.mean(log_c[-4000:])) == pytest.approx(percentile / 100, abs=0.035)


def test_threshold_depends_on_the_update_only_through_the_noisy_bit():
    """Post-processing: two updates on the same side of C give identical reports and next thresholds."""
    cfg = DPConfig(epsilon=1.0, clip_init=1.0)
    reports = []
    for value in (0.2, 0.7):  # both below C = 1
        mech = AdaptiveDPMechanism(cfg, seed=3)
        _, r = mech.privatize({"w": np.array([value, 0.0])})
        reports.append(r)
    assert reports[0] == reports[1]
    above = AdaptiveDPMechanism(cfg, seed=3)
    _, r = above.privatize({"w": np.array([5.0, 0.0])})
    assert r["noisy_quantile_bits"] == pytest.approx(reports[0]["noisy_quantile_bits"] - 1.0)
    # C' = C exp(-lr (b_noisy - gamma))
    assert r["next_clip"] == pytest.approx(math.exp(-0.2 * (r["noisy_quantile_bits"] - 0.5)))
    json.dumps(r)
    assert set(r) == {"mechanism", "norm", "clipping", "per_layer", "adjacency", "epsilon", "delta",
                      "quantile_epsilon", "round_epsilon", "round_delta", "percentile", "clip", "clip_combined",
                      "sensitivity", "noise_scale", "noise", "noisy_quantile_bits", "next_clip", "round"}


def test_per_layer_adaptive_bits_use_the_vector_sensitivity():
    cfg = DPConfig(epsilon=1e9, clip_init=1.0, per_layer=True, quantile_epsilon=2.0)
    mech = AdaptiveDPMechanism(cfg, seed=11)
    update = {"a": np.zeros(3), "b": np.full(1, 9.0)}
    _, r = mech.privatize(update)
    rng = np.random.default_rng(11)
    expected_bits = np.array([1.0, 0.0]) + rng.laplace(0.0, 2 / 2.0, size=2)  # n_bits / quantile_epsilon = 1
    assert list(r["noisy_quantile_bits"].values()) == pytest.approx(expected_bits)
    for (k, c), b in zip(r["clip"].items(), expected_bits):
        assert r["next_clip"][k] == pytest.approx(c * math.exp(-0.2 * (b - 0.5)))


# ---------------------------------------------------------------------------------------------- analytic Gaussian
def _balle_wang_algorithm1(eps, delta):
    """Balle & Wang 2018, Algorithm 1 (independent of the bisection on sigma): sigma / sensitivity."""
    def b_plus(v):
        return norm.cdf(math.sqrt(eps * v)) - math.exp(eps) * norm.cdf(-math.sqrt(eps * (v + 2)))

    def b_minus(u):
        return norm.cdf(-math.sqrt(eps * u)) - math.exp(eps) * norm.cdf(-math.sqrt(eps * (u + 2)))

    delta0 = norm.cdf(0) - math.exp(eps) * norm.cdf(-math.sqrt(2 * eps))
    if delta >= delta0:
        v = brentq(lambda v: b_plus(v) - delta, 0, 1e6, xtol=1e-15, rtol=1e-15)
        alpha = math.sqrt(1 + v / 2) - math.sqrt(v / 2)
    else:
        u = brentq(lambda u: b_minus(u) - delta, 0, 1e6, xtol=1e-15, rtol=1e-15)
        alpha = math.sqrt(1 + u / 2) + math.sqrt(u / 2)
    return alpha / math.sqrt(2 * eps)


@pytest.mark.parametrize("eps, delta", [(0.1, 1e-5), (0.5, 1e-6), (1.0, 1e-5), (4.0, 1e-5), (20.0, 1e-8),
                                        (0.05, 0.3)])
def test_analytic_gaussian_sigma_is_the_balle_wang_calibration(eps, delta):
    sigma = analytic_gaussian_sigma(eps, delta, sensitivity=1.0)
    assert gaussian_delta(sigma, eps) <= delta
    assert gaussian_delta(sigma, eps) == pytest.approx(delta, abs=1e-9 * delta)  # tight: the smallest sigma
    assert gaussian_delta(sigma * (1 - 1e-9), eps) > delta
    assert sigma == pytest.approx(_balle_wang_algorithm1(eps, delta), rel=1e-6)
    assert analytic_gaussian_sigma(eps, delta, 2.5) == pytest.approx(2.5 * sigma, rel=1e-12)
    if eps < 1:  # the classic calibration holds only there, and is never smaller
        assert sigma <= math.sqrt(2 * math.log(1.25 / delta)) / eps


def test_analytic_gaussian_known_value():
    assert analytic_gaussian_sigma(1.0, 1e-5) == pytest.approx(3.7306316348, rel=1e-9)


# ---------------------------------------------------------------------------------------------------- state, iDLG
def test_state_dict_round_trip_and_mismatch():
    cfg = DPConfig(epsilon=2.0, per_layer=True)
    a = AdaptiveDPMechanism(cfg, seed=0)
    for _ in range(5):
        a.privatize({"w": np.ones((2, 2)), "b": np.ones(2)})
    state = json.loads(json.dumps(a.state_dict()))
    assert "rng" not in json.dumps(state).lower()  # the generator state is never saved
    b = AdaptiveDPMechanism(cfg, seed=1)
    b.load_state_dict(state)
    assert b.thresholds == a.thresholds and b.rounds == 5
    _, r = b.privatize({"w": np.ones((2, 2)), "b": np.ones(2)})
    assert r["round"] == 6 and r["clip"] == a.thresholds
    with pytest.raises(ConfigError, match="other settings \\(epsilon\\)"):
        AdaptiveDPMechanism(DPConfig(epsilon=3.0, per_layer=True)).load_state_dict(state)


def test_idlg_mechanism_is_one_fixed_clip_round():
    mech = idlg_mechanism(epsilon=4.0, seed=2, clip=0.5)
    update = {"w": np.full((3, 3), 0.1, np.float32)}
    out = mech(update)
    assert out["w"].dtype == np.float32 and out["w"].shape == (3, 3)
    r = mech.last_report
    assert r["clipping"] == "fixed" and r["quantile_epsilon"] == 0.0 and r["round_epsilon"] == 4.0
    assert r["noise_scale"] == pytest.approx(2 * 0.5 / 4.0)
    g = idlg_mechanism(epsilon=4.0, seed=2, mechanism="gaussian", clip=0.5)
    g(update)
    assert g.last_report["noise_scale"] == pytest.approx(analytic_gaussian_sigma(4.0, 1e-5, 1.0))


# ----------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, setting", [
    ({"epsilon": 0.0}, "epsilon must be > 0"), ({"epsilon": -1.0}, "epsilon must be > 0"),
    ({"epsilon": float("nan")}, "epsilon must be finite"),
    ({"percentile": 0.0}, r"percentile must be in \(0, 100\]"), ({"percentile": 101.0}, r"percentile must be in"),
    ({"delta": 0.0}, r"delta must be in \(0, 1\)"), ({"delta": 1.0}, r"delta must be in \(0, 1\)"),
    ({"mechanism": "exponential"}, "mechanism must be one of laplace, gaussian"),
    ({"clipping": "auto"}, "clipping must be one of adaptive, fixed"),
    ({"adjacency": "swap"}, "adjacency must be one of replace, add_remove"),
    ({"clip_init": 0.0}, "clip_init must be > 0"), ({"quantile_epsilon": 0.0}, "quantile_epsilon must be > 0"),
    ({"clip_lr": 0.0}, "clip_lr must be > 0"), ({"epsilon": "1"}, "epsilon must be a number"),
    ({"per_layer": "yes"}, "per_layer must be true or false"),
])
def test_bad_settings_are_refused_by_name(kwargs, setting):
    with pytest.raises(ConfigError, match=setting):
        DPConfig(**kwargs).validate()
    with pytest.raises(ConfigError, match=setting):
        AdaptiveDPMechanism(DPConfig(**kwargs))


def test_quantile_budget_is_only_required_when_adaptive():
    assert DPConfig(clipping="fixed", quantile_epsilon=0.0).validate().round_cost() == (1.0, 0.0)
    assert DPConfig(mechanism="gaussian", epsilon=0.5, quantile_epsilon=0.25).round_cost() == (0.75, 1e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_update_is_rejected_naming_the_tensor(bad):
    mech = AdaptiveDPMechanism(DPConfig(), seed=0)
    update = {"conv.weight": np.ones(4, np.float32), "head.bias": np.array([0.0, bad])}
    with pytest.raises(UpdateRejected, match=r"'head.bias' contains 1 NaN/Inf"):
        mech.privatize(update)
    assert mech.rounds == 0 and mech.thresholds == 1.0  # nothing released, nothing learnt
    with pytest.raises(UpdateRejected, match="'n' has dtype int64"):
        mech.privatize({"n": np.arange(3)})
    with pytest.raises(UpdateRejected, match="non-empty mapping"):
        mech.privatize({})


def test_noise_that_overflows_the_dtype_is_not_released():
    mech = AdaptiveDPMechanism(DPConfig(epsilon=1e-6, clipping="fixed"), seed=0)  # b = 2e6 > float16's 65504
    with pytest.raises(UpdateRejected, match="'h' overflows float16"):
        mech.privatize({"h": np.zeros(4, np.float16)})
