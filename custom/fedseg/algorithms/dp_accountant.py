"""Privacy accounting for :class:`fedseg.algorithms.adaptive_dp.AdaptiveDPMechanism` over rounds.

Pure code (numpy only, no nvflare import). One accountant per site and run; each round it is told
``record_round()`` and ``spent()`` gives the cumulative (epsilon, delta) guarantee for that site's sequence of
released updates (the unit: one site's update per round, see :mod:`fedseg.algorithms.adaptive_dp`).

The per-round cost does not depend on the thresholds: the noise is calibrated to the sensitivity of whatever
threshold was used, so every round of one configuration costs the same, and the accountant needs only the
:class:`~fedseg.algorithms.adaptive_dp.DPConfig` and the round count. A round releases two things from the same
update: the noised update and (``clipping="adaptive"``) the noisy quantile bits; both are counted.

Accountants (registry ``ACCOUNTANTS``, names as in Opacus):

* ``"pure"``: basic sequential composition. k rounds of a Laplace configuration cost k * (epsilon +
  quantile_epsilon) with delta 0; for a Gaussian configuration (each round (epsilon, delta)-DP by the analytic
  calibration, plus the pure quantile bits) k * (epsilon + quantile_epsilon) and k * delta.
* ``"rdp"``: Renyi DP (Mironov 2017, "Renyi differential privacy"). Per round, at order alpha > 1:
  Gaussian with sigma / Delta = s:  alpha / (2 s^2)  (Table II);
  Laplace with b / Delta = lambda:  1/(alpha-1) log( alpha/(2 alpha-1) e^{(alpha-1)/lambda}
  + (alpha-1)/(2 alpha-1) e^{-alpha/lambda} )  (Prop. 6, Table II), for the update (lambda = 1/epsilon) and for the
  quantile bits (lambda = 1/quantile_epsilon: each bit's Laplace scale is n_bits / quantile_epsilon for an L1
  sensitivity n_bits). Prop. 6 is one-dimensional; for a vector of i.i.d. Laplace coordinates the Renyi divergence is
  the sum over coordinates of the 1-D curve at each coordinate's shift t_i with sum t_i <= Delta, and the 1-D curve is
  convex in t with value 0 at 0 (checked numerically in the tests), hence superadditive: the sum is at most the 1-D
  curve at t = Delta. RDP composes by adding the curves over rounds; the conversion to (epsilon, delta) is
  eps = min_alpha [ k rdp(alpha) + log(1/delta) / (alpha - 1) ] (Mironov 2017, Prop. 3) on a fine alpha grid
  (``ALPHAS``). The result is the smaller of this and the basic-composition bound when that bound's delta fits the
  target: for pure-Laplace configurations that is often the pure k * epsilon with delta 0 (returned as delta 0, the
  stronger statement); for one Gaussian round it is the exact (epsilon, delta) of the analytic mechanism.

``default_accountant(config)``: "pure" for Laplace, "rdp" for Gaussian. ``get_accountant(name, config)`` also takes
``"auto"`` (the default).
"""

from __future__ import annotations

import math

import numpy as np

from fedseg.algorithms.adaptive_dp import DPConfig, analytic_gaussian_sigma
from fedseg.errors import ConfigError

#: Renyi orders of the RDP accountant: 1 + 1e-4 ... 1 + 1e6, 4001 points log-spaced in alpha - 1
ALPHAS = 1.0 + np.geomspace(1e-4, 1e6, 4001)


def laplace_rdp(alphas, lam: float) -> np.ndarray:
    """RDP of the Laplace mechanism with scale / sensitivity = ``lam`` at orders ``alphas`` > 1 (Mironov 2017,
    Prop. 6), in log-space (finite for any lam > 0 and alpha up to 1e6)."""
    a = np.asarray(alphas, dtype=np.float64)
    if np.any(a <= 1):
        raise ConfigError("Laplace RDP: orders alpha must be > 1")
    lg = np.logaddexp(np.log(a / (2 * a - 1)) + (a - 1) / lam, np.log((a - 1) / (2 * a - 1)) - a / lam)
    return lg / (a - 1)


def gaussian_rdp(alphas, sigma_over_sensitivity: float) -> np.ndarray:
    """RDP of the Gaussian mechanism with sigma / L2 sensitivity = s: alpha / (2 s^2)."""
    a = np.asarray(alphas, dtype=np.float64)
    return a / (2.0 * sigma_over_sensitivity ** 2)


def rdp_to_dp(alphas, rdp, delta: float) -> tuple[float, float]:
    """(epsilon, best alpha) from an RDP curve: min over alpha of rdp(alpha) + log(1/delta) / (alpha - 1)."""
    a = np.asarray(alphas, dtype=np.float64)
    eps = np.asarray(rdp, dtype=np.float64) + math.log(1.0 / delta) / (a - 1)
    i = int(np.argmin(eps))
    return float(eps[i]), float(a[i])


class Accountant:
    """Cumulative privacy of one site's released updates, from its DPConfig and the number of rounds."""

    name = "base"

    def __init__(self, config: DPConfig):
        if not isinstance(config, DPConfig):
            raise ConfigError(f"{type(self).__name__} needs a DPConfig, got {type(config).__name__}")
        self.config = config.validate()
        self.rounds = 0

    def record_round(self) -> None:
        """Count one released update (call once per privatize())."""
        self.rounds += 1

    def round_cost(self) -> tuple[float, float]:
        """(epsilon, delta) of one round by itself: update noise + quantile bits (DPConfig.round_cost)."""
        return self.config.round_cost()

    def _rounds(self, rounds: int | None) -> int:
        k = self.rounds if rounds is None else rounds
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ConfigError(f"{self.name} accountant: rounds must be an integer >= 0, got {rounds!r}")
        return int(k)

    def _basic(self, k: int) -> tuple[float, float]:
        eps, delta = self.round_cost()
        return k * eps, min(1.0, k * delta)

    def spent(self, rounds: int | None = None, delta: float | None = None) -> tuple[float, float]:
        """Cumulative (epsilon, delta) after ``rounds`` (default: the recorded) rounds."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"accountant": self.name, "rounds": self.rounds}

    def load_state_dict(self, state) -> None:
        if state.get("accountant") != self.name:
            raise ConfigError(f"accountant state is from {state.get('accountant')!r}, not {self.name!r}")
        self.rounds = self._rounds(int(state["rounds"]))


class PureAccountant(Accountant):
    """Basic composition: k * (epsilon + quantile_epsilon), k * delta (delta 0 for Laplace)."""

    name = "pure"

    def spent(self, rounds: int | None = None, delta: float | None = None) -> tuple[float, float]:
        """``delta`` is not a free parameter of basic composition and is ignored."""
        return self._basic(self._rounds(rounds))


class RDPAccountant(Accountant):
    """Renyi-DP composition of the update noise (Gaussian or Laplace) and the noisy quantile bits (Laplace)."""

    name = "rdp"

    def __init__(self, config: DPConfig):
        super().__init__(config)
        cfg = self.config
        if cfg.mechanism == "gaussian":
            # sigma scales with the sensitivity: sigma / Delta is the same every round
            self.sigma_over_sensitivity = analytic_gaussian_sigma(cfg.epsilon, cfg.delta, 1.0)
            curve = gaussian_rdp(ALPHAS, self.sigma_over_sensitivity)
        else:
            self.sigma_over_sensitivity = None
            curve = laplace_rdp(ALPHAS, 1.0 / cfg.epsilon)
        if cfg.adaptive:
            curve = curve + laplace_rdp(ALPHAS, 1.0 / cfg.quantile_epsilon)
        self._curve = curve

    def rdp(self, alphas=None, rounds: int | None = None) -> np.ndarray:
        """Composed RDP of ``rounds`` rounds at ``alphas`` (default: the grid ALPHAS)."""
        k = self._rounds(rounds)
        if alphas is None:
            return k * self._curve
        cfg = self.config
        if cfg.mechanism == "gaussian":
            one = gaussian_rdp(alphas, self.sigma_over_sensitivity)
        else:
            one = laplace_rdp(alphas, 1.0 / cfg.epsilon)
        if cfg.adaptive:
            one = one + laplace_rdp(alphas, 1.0 / cfg.quantile_epsilon)
        return k * one

    def spent(self, rounds: int | None = None, delta: float | None = None) -> tuple[float, float]:
        """(epsilon, delta) at target ``delta`` (default config.delta): the RDP conversion, or the basic-composition
        bound when it is smaller and its delta is <= the target (then its own delta, e.g. 0 for Laplace)."""
        k = self._rounds(rounds)
        target = self.config.delta if delta is None else float(delta)
        if not 0 < target < 1:
            raise ConfigError(f"rdp accountant: the target delta must be in (0, 1), got {delta!r}")
        if k == 0:
            return 0.0, 0.0
        eps_rdp, _ = rdp_to_dp(ALPHAS, k * self._curve, target)
        eps_basic, delta_basic = self._basic(k)
        if delta_basic <= target and eps_basic <= eps_rdp:
            return eps_basic, delta_basic
        return eps_rdp, target


ACCOUNTANTS: dict[str, type[Accountant]] = {"pure": PureAccountant, "rdp": RDPAccountant}


def default_accountant(config: DPConfig) -> str:
    """"pure" for Laplace (pure epsilon composes exactly), "rdp" for Gaussian (much tighter than k * epsilon)."""
    return "rdp" if config.mechanism == "gaussian" else "pure"


def get_accountant(name: str, config: DPConfig) -> Accountant:
    """An accountant by registry name, or ``"auto"``: :func:`default_accountant`."""
    key = default_accountant(config) if name in (None, "auto") else name
    if key not in ACCOUNTANTS:
        raise ConfigError(f"unknown DP accountant {name!r}; use one of auto, {', '.join(ACCOUNTANTS)}")
    return ACCOUNTANTS[key](config)
