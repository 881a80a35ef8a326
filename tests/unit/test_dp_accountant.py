"""DP accountants against closed forms: basic composition, Gaussian and Laplace RDP, the RDP -> (eps, delta)
conversion, and the registry."""

import math

import numpy as np
import pytest
from fedseg.algorithms.adaptive_dp import DPConfig, analytic_gaussian_sigma
from fedseg.algorithms.dp_accountant import (
    ACCOUNTANTS,
    ALPHAS,
    PureAccountant,
    RDPAccountant,
    default_accountant,
    get_accountant,
    laplace_rdp,
    rdp_to_dp,
)
from fedseg.errors import ConfigError
from scipy import integrate

SIGMA_1 = 3.7306316348159707  # analytic Gaussian sigma / sensitivity at epsilon 1, delta 1e-5


def test_pure_composition_is_k_times_the_round_cost():
    acc = PureAccountant(DPConfig(epsilon=0.5, clipping="fixed"))
    assert acc.spent() == (0.0, 0.0)
    for _ in range(7):
        acc.record_round()
    assert acc.rounds == 7 and acc.spent() == (3.5, 0.0)
    assert acc.spent(rounds=100) == (50.0, 0.0)
    adaptive = PureAccountant(DPConfig(epsilon=0.5, quantile_epsilon=0.25))
    assert adaptive.round_cost() == (0.75, 0.0) and adaptive.spent(rounds=8) == (6.0, 0.0)
    gauss = PureAccountant(DPConfig(mechanism="gaussian", epsilon=2.0, delta=1e-6, clipping="fixed"))
    eps, delta = gauss.spent(rounds=10)
    assert eps == 20.0 and delta == pytest.approx(1e-5, rel=1e-12)


def test_rdp_gaussian_composition_at_one_order_by_hand():
    acc = RDPAccountant(DPConfig(mechanism="gaussian", epsilon=1.0, delta=1e-5, clipping="fixed"))
    assert acc.sigma_over_sensitivity == pytest.approx(SIGMA_1, rel=1e-12)
    # 10 rounds at alpha = 8: 10 * 8 / (2 * 3.7306316^2) = 40 / 13.917612
    assert float(acc.rdp([8.0], rounds=10)[0]) == pytest.approx(40 / 13.917612, rel=1e-6)
    # the grid curve is the same function
    i = int(np.argmin(np.abs(ALPHAS - 8.0)))
    assert acc.rdp(rounds=10)[i] == pytest.approx(10 * ALPHAS[i] / (2 * SIGMA_1 ** 2), rel=1e-12)


@pytest.mark.parametrize("rounds", [2, 10, 100, 1000])
def test_rdp_gaussian_conversion_matches_the_closed_form_minimum(rounds):
    """min_a c a + L / (a - 1) with c = k / (2 s^2), L = log(1/delta): a* = 1 + sqrt(L / c), eps = c + 2 sqrt(c L)."""
    delta = 1e-5
    acc = RDPAccountant(DPConfig(mechanism="gaussian", epsilon=1.0, delta=delta, clipping="fixed"))
    c, L = rounds / (2 * SIGMA_1 ** 2), math.log(1 / delta)
    eps, got_delta = acc.spent(rounds=rounds)
    assert got_delta == delta
    assert eps == pytest.approx(c + 2 * math.sqrt(c * L), rel=1e-4)
    _, alpha = rdp_to_dp(ALPHAS, acc.rdp(rounds=rounds), delta)
    assert alpha == pytest.approx(1 + math.sqrt(L / c), rel=0.01)
    assert eps < rounds * 1.0  # RDP beats basic composition k * eps (at a fixed delta, not k delta)
    eps_other, d_other = acc.spent(rounds=rounds, delta=1e-3)
    assert d_other == 1e-3 and eps_other == pytest.approx(c + 2 * math.sqrt(c * math.log(1e3)), rel=1e-4)


def test_one_gaussian_round_reports_the_exact_analytic_guarantee():
    acc = RDPAccountant(DPConfig(mechanism="gaussian", epsilon=1.0, delta=1e-5, clipping="fixed"))
    assert acc.spent(rounds=1) == (1.0, 1e-5)  # the conversion of one round is looser than the calibration itself
    assert rdp_to_dp(ALPHAS, acc.rdp(rounds=1), 1e-5)[0] > 1.0


def test_laplace_rdp_closed_forms():
    eps = 0.7
    curve = laplace_rdp(ALPHAS, 1 / eps)
    assert curve[-1] == pytest.approx(eps, rel=1e-4)  # alpha -> infinity: the pure epsilon
    assert np.all(np.diff(curve) >= -1e-12) and np.all(curve <= eps + 1e-12)  # increasing in alpha, below eps
    # alpha -> 1: KL divergence of Laplace(0, b) and Laplace(1, b): 1/lam + exp(-1/lam) - 1
    assert laplace_rdp([1 + 1e-7], 1 / eps)[0] == pytest.approx(eps + math.exp(-eps) - 1, rel=1e-5)
    # one order by numerical integration of the Renyi divergence: log(int p^a q^(1-a)) / (a - 1)
    a, b = 3.0, 1 / eps

    def integrand(x):
        return (0.5 / b * math.exp(-abs(x) / b)) ** a * (0.5 / b * math.exp(-abs(x - 1) / b)) ** (1 - a)

    value = integrate.quad(integrand, -60, 60, points=[0, 1], limit=200)[0]
    assert laplace_rdp([a], b)[0] == pytest.approx(math.log(value) / (a - 1), rel=1e-7)


def test_laplace_rdp_is_superadditive_in_the_shift():
    """The accountant bounds a vector of Laplace coordinates (L1 sensitivity D) by the 1-D curve at shift D: that needs
    f(t1) + f(t2) <= f(t1 + t2), f(t) = RDP of Laplace(b) shifted by t = laplace_rdp(alpha, b / t)."""
    alphas = np.array([1.01, 1.5, 2.0, 5.0, 30.0, 1e3])
    shifts = np.linspace(0.01, 4.0, 40)
    f = {t: laplace_rdp(alphas, 1.0 / t) for t in shifts}
    for t1 in shifts:
        for t2 in shifts[::7]:
            if t1 + t2 <= 4.0:
                assert np.all(f[t1] + f[t2] <= laplace_rdp(alphas, 1.0 / (t1 + t2)) + 1e-12)


def test_rdp_laplace_reports_the_smaller_of_pure_and_rdp():
    cfg = DPConfig(epsilon=1.0, clipping="fixed", delta=1e-5)
    acc = RDPAccountant(cfg)
    assert acc.spent(rounds=1) == (1.0, 0.0)  # pure is tighter: delta 0
    eps, delta = acc.spent(rounds=1000)
    expected = rdp_to_dp(ALPHAS, 1000 * laplace_rdp(ALPHAS, 1.0), 1e-5)[0]
    assert delta == 1e-5 and eps == pytest.approx(expected, rel=1e-12) and eps < 1000 * 0.5


def test_noisy_quantile_bits_are_counted():
    fixed = RDPAccountant(DPConfig(epsilon=1.0, clipping="fixed"))
    adaptive = RDPAccountant(DPConfig(epsilon=1.0, clipping="adaptive", quantile_epsilon=0.3))
    np.testing.assert_allclose(adaptive.rdp(rounds=5) - fixed.rdp(rounds=5), 5 * laplace_rdp(ALPHAS, 1 / 0.3),
                               rtol=1e-12)
    assert adaptive.spent(rounds=1) == (1.3, 0.0)
    gauss = RDPAccountant(DPConfig(mechanism="gaussian", epsilon=1.0, quantile_epsilon=0.3))
    assert float(gauss.rdp([4.0], rounds=1)[0]) == pytest.approx(4 / (2 * SIGMA_1 ** 2)
                                                                + laplace_rdp([4.0], 1 / 0.3)[0], rel=1e-12)


def test_registry_defaults_and_bad_input():
    assert set(ACCOUNTANTS) == {"pure", "rdp"}
    lap, gauss = DPConfig(), DPConfig(mechanism="gaussian")
    assert default_accountant(lap) == "pure" and default_accountant(gauss) == "rdp"
    assert isinstance(get_accountant("auto", lap), PureAccountant)
    assert isinstance(get_accountant("auto", gauss), RDPAccountant)
    assert isinstance(get_accountant("rdp", lap), RDPAccountant)
    with pytest.raises(ConfigError, match="unknown DP accountant 'moments'; use one of auto, pure, rdp"):
        get_accountant("moments", lap)
    with pytest.raises(ConfigError, match="epsilon must be > 0"):
        get_accountant("pure", DPConfig(epsilon=0.0))
    with pytest.raises(ConfigError, match="rounds must be an integer >= 0"):
        get_accountant("pure", lap).spent(rounds=-1)
    with pytest.raises(ConfigError, match=r"target delta must be in \(0, 1\)"):
        get_accountant("rdp", lap).spent(rounds=3, delta=0.0)
    acc = get_accountant("rdp", gauss)
    acc.record_round()
    other = get_accountant("rdp", gauss)
    other.load_state_dict(acc.state_dict())
    assert other.rounds == 1
    with pytest.raises(ConfigError, match="not 'pure'"):
        get_accountant("pure", gauss).load_state_dict(acc.state_dict())


def test_sigma_scales_out_of_the_cost():
    """The cost is independent of the thresholds: sigma / sensitivity is the same for every clip."""
    assert analytic_gaussian_sigma(1.0, 1e-5, 0.01) / 0.01 == pytest.approx(SIGMA_1, rel=1e-12)
