"""Adaptive differential privacy for one site's model update (paper 003, ADP-FL; DESIGN.md section 4).

Pure code: numpy and scipy only, no nvflare import. ``fedseg.flare.dp_filter.AdaptiveDPFilter`` applies it to a
site's WEIGHT_DIFF task result before any encryption; ``fedseg attack idlg --scenario dp`` calls
:func:`idlg_mechanism`; :mod:`fedseg.algorithms.dp_accountant` adds the rounds up.

What is protected
-----------------
The unit is one site's update in one round. Two updates are neighbours under ``adjacency="replace"`` when they are ANY
two updates the site could send (any two local data sets): after clipping to norm C they differ by at most 2C, the
sensitivity. Under ``adjacency="add_remove"`` the neighbour of an update is the zero update (the site sends nothing):
sensitivity C. Every released quantity (the noised update and the noisy quantile bits below) is
(epsilon, delta)-DP with respect to that unit per round; the rounds compose (the accountant). Nothing protects the
individual images more than the whole site's data: record-level DP would need per-example clipping in training.

Round r (one call of :meth:`AdaptiveDPMechanism.privatize`)
-----------------------------------------------------------
1. Clip. ``mechanism="laplace"``: L1 norm (the Laplace mechanism needs an L1 sensitivity); ``"gaussian"``: L2 norm.
   Whole update: one threshold C_r, the update is scaled by min(1, C_r / ||u||). ``per_layer=True``: one threshold
   C_r,k per tensor, each tensor scaled to its own threshold; the combined threshold is sum_k C_r,k (L1) or
   sqrt(sum_k C_r,k^2) (L2), so the clipped update's norm is at most that, and the sensitivity is
   ``2 * combined`` (replace) or ``combined`` (add_remove).
2. Noise, calibrated to that one sensitivity Delta. Laplace: i.i.d. Laplace(b) with b = Delta / epsilon on every
   coordinate (pure epsilon-DP for L1 sensitivity Delta). Gaussian: i.i.d. N(0, sigma^2) with sigma from the analytic
   Gaussian mechanism (Balle & Wang 2018, "Improving the Gaussian mechanism for differential privacy", Theorem 8:
   the mechanism is (epsilon, delta)-DP iff Phi(Delta/(2 sigma) - epsilon sigma/Delta) - e^epsilon Phi(-Delta/(2 sigma)
   - epsilon sigma/Delta) <= delta), found by bisection (:func:`analytic_gaussian_sigma`): valid for every epsilon > 0,
   unlike the classic sqrt(2 ln(1.25/delta)) Delta / epsilon (epsilon < 1 only), and smaller than it.
   Noise is drawn in float64, added to the clipped update in float64 and cast back to each tensor's dtype.
3. Threshold (``clipping="adaptive"``): noisy quantile estimation after Andrew et al. 2021 ("Differentially private
   learning with adaptive clipping"), with one site: the bit b = 1[||u|| <= C_r] (per layer: one bit per tensor) is
   released as b + Laplace(n_bits / quantile_epsilon) (each bit has sensitivity 1, the vector n_bits in L1), so the
   bits are quantile_epsilon-DP, and the threshold moves geometrically towards the target quantile
   gamma = percentile / 100:  C_{r+1} = C_r * exp(-clip_lr * (b_noisy - gamma)).  If more than a gamma fraction of
   updates fall below C, E[b_noisy] > gamma and C shrinks, and vice versa: the fixed point is the gamma-quantile of the
   norms. The noisy bit is the ONLY use of the pre-clip norm, so C_{r+1} is post-processing of DP outputs (and so is
   the clamp of C to [1e-9, 1e9] x its initial value, which keeps the float64 arithmetic finite after a run of large
   noise draws). C_0 = ``clip_init`` is a configured constant (per layer: split by the tensors' public sizes, below),
   never computed from data. ``clipping="fixed"``: C_r = C_0 for every round, no bits, no quantile budget.

Per-layer initial thresholds: ``clip_init`` is split over the tensors so that the combined threshold is ``clip_init``:
C_0,k = clip_init * n_k / N (L1) or clip_init * sqrt(n_k / N) (L2), n_k the tensor's element count, N the total:
the share an update with equal-magnitude entries would have. Only the (public) shapes are used.

Cost of the noisy quantile with one site. Andrew et al. average the bits of many clients; a single site releases one
bit per round, so its noise does not average over clients, only over rounds. Per round log C moves by
-clip_lr * (b + L - gamma) with L ~ Laplace(n_bits / quantile_epsilon): std clip_lr * sqrt(2) * n_bits /
quantile_epsilon (2.8 at the defaults clip_lr 0.2, quantile_epsilon 0.1, whole update). The drift is right, but the
threshold wanders by that much around the target; the mean over rounds tracks the quantile only when
clip_lr * n_bits / quantile_epsilon is small (the tests use quantile_epsilon 5, clip_lr 0.01).

Refusals. An update with NaN/Inf or non-float tensors raises ``UpdateRejected`` naming the tensor and nothing is
released or learnt (the threshold and round count stay); that a site's update was refused is visible to the server
through the failed task, outside the DP guarantee.

Report. :meth:`AdaptiveDPMechanism.privatize` returns a JSON-able report of public quantities only: the configuration,
the threshold(s) used and the next, the sensitivity, the noise scale, the noisy bits (DP outputs) and the round. It
never holds a pre-clip norm or whether the update was clipped: both are functions of the private update.

Randomness. A ``numpy.random.Generator`` (PCG64) seeded by ``seed`` (None: OS entropy). A fixed seed makes the noise
reproducible and is for tests and experiments only: whoever knows the seed can subtract the noise. For the same reason
the generator's state is not part of :meth:`AdaptiveDPMechanism.state_dict`. Known limits of this implementation:
PCG64 is not a cryptographic generator, and floating-point Laplace / Gaussian sampling is exposed to the
least-significant-bit attack of Mironov 2012 ("On significance of the least significant bits for differential
privacy"); a production deployment against a strong adversary would use a snapping or discrete mechanism.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fedseg.errors import ConfigError, UpdateRejected

MECHANISMS = ("laplace", "gaussian")
CLIPPINGS = ("adaptive", "fixed")
ADJACENCIES = ("replace", "add_remove")
#: the norm each mechanism clips in (its sensitivity is measured in that norm)
NORMS = {"laplace": "l1", "gaussian": "l2"}
#: the adaptive threshold is kept within these multiples of its initial value (post-processing: keeps it finite)
THRESHOLD_RANGE = (1e-9, 1e9)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"DPConfig.{name} must be a number, got {value!r} ({type(value).__name__})")
    v = float(value)
    if not math.isfinite(v):
        raise ConfigError(f"DPConfig.{name} must be finite, got {value!r}")
    return v


@dataclass(frozen=True)
class DPConfig:
    """Settings of :class:`AdaptiveDPMechanism` (see the module docstring for what each does)."""

    mechanism: str = "laplace"      # laplace: L1 clipping + Laplace noise (paper 003); gaussian: L2 clipping + Gaussian
    epsilon: float = 1.0            # per-round epsilon of the update's noise (> 0)
    delta: float = 1e-5             # per-round delta of the Gaussian mechanism; target delta of RDP conversions
    clipping: str = "adaptive"      # adaptive: threshold tracks a percentile of update norms (noisy quantile); fixed
    clip_init: float = 1.0          # initial (adaptive) or fixed threshold (> 0, data-independent)
    percentile: float = 50.0        # target percentile of update norms, in (0, 100]
    quantile_epsilon: float = 0.1   # per-round epsilon spent on the noisy quantile estimate (adaptive only, > 0)
    clip_lr: float = 0.2            # geometric step of the threshold update (Andrew et al. 2021)
    per_layer: bool = False         # one threshold per tensor (noise calibrated to the combined sensitivity)
    adjacency: str = "replace"      # replace: any two clipped updates (sensitivity 2C); add_remove: vs. zero (C)

    @property
    def norm(self) -> str:
        """``"l1"`` (Laplace) or ``"l2"`` (Gaussian): the norm updates are clipped in."""
        return NORMS[self.mechanism]

    @property
    def adaptive(self) -> bool:
        return self.clipping == "adaptive"

    def validate(self) -> DPConfig:
        """Return self, or raise ConfigError naming the bad setting and its allowed range."""
        for name, value, allowed in (("mechanism", self.mechanism, MECHANISMS), ("clipping", self.clipping, CLIPPINGS),
                                     ("adjacency", self.adjacency, ADJACENCIES)):
            if value not in allowed:
                raise ConfigError(f"DPConfig.{name} must be one of {', '.join(allowed)}; got {value!r}")
        eps = _number("epsilon", self.epsilon)
        if eps <= 0:
            raise ConfigError(f"DPConfig.epsilon must be > 0 (the per-round privacy budget of the update's noise), "
                              f"got {self.epsilon!r}")
        delta = _number("delta", self.delta)
        if not 0 < delta < 1:
            raise ConfigError(f"DPConfig.delta must be in (0, 1) (the Gaussian mechanism's delta and the target delta "
                              f"of RDP accounting; e.g. 1e-5), got {self.delta!r}")
        pct = _number("percentile", self.percentile)
        if not 0 < pct <= 100:
            raise ConfigError(f"DPConfig.percentile must be in (0, 100] (the percentile of update norms the clipping "
                              f"threshold tracks), got {self.percentile!r}")
        if _number("clip_init", self.clip_init) <= 0:
            raise ConfigError(f"DPConfig.clip_init must be > 0 (a data-independent initial / fixed clipping "
                              f"threshold), got {self.clip_init!r}")
        if not isinstance(self.per_layer, (bool, np.bool_)):
            raise ConfigError(f"DPConfig.per_layer must be true or false, got {self.per_layer!r}")
        q = _number("quantile_epsilon", self.quantile_epsilon)
        lr = _number("clip_lr", self.clip_lr)
        if self.adaptive:
            if q <= 0:
                raise ConfigError(f"DPConfig.quantile_epsilon must be > 0 with clipping 'adaptive' (the budget of the "
                                  f"noisy quantile estimate; or use clipping 'fixed'), got {self.quantile_epsilon!r}")
            if lr <= 0:
                raise ConfigError(f"DPConfig.clip_lr must be > 0 with clipping 'adaptive' (the geometric step of the "
                                  f"threshold, e.g. 0.2), got {self.clip_lr!r}")
        return self

    def round_cost(self) -> tuple[float, float]:
        """(epsilon, delta) one round spends by basic composition: the update's noise plus, when adaptive, the noisy
        quantile bits (pure quantile_epsilon-DP). delta is 0 for Laplace."""
        self.validate()
        eps = float(self.epsilon) + (float(self.quantile_epsilon) if self.adaptive else 0.0)
        return eps, (float(self.delta) if self.mechanism == "gaussian" else 0.0)


# ---------------------------------------------------------------------------------------------------------------------
# the analytic Gaussian mechanism


def gaussian_delta(sigma: float, epsilon: float, sensitivity: float = 1.0) -> float:
    """The smallest delta for which N(0, sigma^2) noise on a query of L2 sensitivity ``sensitivity`` is
    (epsilon, delta)-DP: Phi(D/(2s) - eps s/D) - e^eps Phi(-D/(2s) - eps s/D) (Balle & Wang 2018, Theorem 8)."""
    from scipy.special import log_ndtr, ndtr  # the standard normal CDF (scipy.stats.norm.cdf / logcdf), faster

    a = sensitivity / (2.0 * sigma)
    b = epsilon * sigma / sensitivity
    return float(ndtr(a - b) - math.exp(epsilon + log_ndtr(-a - b)))


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """The smallest sigma with ``gaussian_delta(sigma, epsilon, sensitivity) <= delta``, by bisection.

    ``gaussian_delta`` decreases in sigma, so the condition holds exactly for sigma >= sigma*; the bracket starts at the
    classic sqrt(2 ln(1.25/delta)) * sensitivity / epsilon and doubles / halves until it holds on one side only, then
    bisects (in log sigma) to a relative width of 1e-14. The returned sigma satisfies the condition.
    """
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ConfigError(f"analytic Gaussian mechanism: epsilon must be > 0, got {epsilon!r}")
    if not 0 < delta < 1:
        raise ConfigError(f"analytic Gaussian mechanism: delta must be in (0, 1), got {delta!r}")
    if not (math.isfinite(sensitivity) and sensitivity > 0):
        raise ConfigError(f"analytic Gaussian mechanism: sensitivity must be > 0, got {sensitivity!r}")
    return _unit_sigma(float(epsilon), float(delta)) * sensitivity


@functools.lru_cache(maxsize=256)
def _unit_sigma(epsilon: float, delta: float) -> float:
    """sigma / sensitivity of the analytic Gaussian mechanism (it scales linearly with the sensitivity; cached because
    every round of a run asks for the same (epsilon, delta))."""
    start = math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon  # in units of the sensitivity

    def holds(r: float) -> bool:
        return gaussian_delta(r, epsilon, 1.0) <= delta

    lo = hi = start
    while not holds(hi):
        hi *= 2.0
    while holds(lo):
        if lo < 1e-300:
            raise ConfigError(f"analytic Gaussian mechanism: no positive sigma found for epsilon {epsilon}, "
                              f"delta {delta}")
        lo /= 2.0
    for _ in range(200):
        if hi / lo - 1.0 < 1e-14:
            break
        mid = math.sqrt(lo * hi)
        if holds(mid):
            hi = mid
        else:
            lo = mid
    return hi


# ---------------------------------------------------------------------------------------------------------------------
# clipping


def tensor_norm(array: np.ndarray, norm: str) -> float:
    """L1 or L2 norm of one array, in float64."""
    a = np.asarray(array, dtype=np.float64)
    return float(np.abs(a).sum()) if norm == "l1" else float(np.sqrt(np.square(a).sum()))


def combine_norms(norms, norm: str) -> float:
    """Norm of the concatenation from the parts' norms: sum (L1) or sqrt of the sum of squares (L2)."""
    v = np.asarray(list(norms), dtype=np.float64)
    return float(v.sum()) if norm == "l1" else float(np.sqrt(np.square(v).sum()))


def clip_scale(norm_value: float, threshold: float) -> float:
    """The factor min(1, threshold / norm) that clips a vector of norm ``norm_value`` to ``threshold``."""
    return 1.0 if norm_value <= threshold else threshold / norm_value


def clip_update(update: Mapping[str, np.ndarray], threshold: float | Mapping[str, float],
                norm: str) -> dict[str, np.ndarray]:
    """Clip (float64 copies): a float threshold clips the whole update's L1/L2 norm; a mapping clips each tensor to
    its own threshold. Returns the clipped arrays only (the norms are private)."""
    if isinstance(threshold, Mapping):
        return {k: np.asarray(v, np.float64) * clip_scale(tensor_norm(v, norm), float(threshold[k]))
                for k, v in update.items()}
    total = combine_norms((tensor_norm(v, norm) for v in update.values()), norm)
    s = clip_scale(total, float(threshold))
    return {k: np.asarray(v, np.float64) * s for k, v in update.items()}


def initial_layer_thresholds(shapes: Mapping[str, tuple[int, ...]], clip_init: float, norm: str) -> dict[str, float]:
    """Per-layer C_0,k from the public shapes only: clip_init * n_k / N (L1) or clip_init * sqrt(n_k / N) (L2), so the
    combined threshold equals clip_init."""
    sizes = {k: max(int(np.prod(s, dtype=np.int64)), 1) for k, s in shapes.items()}
    total = float(sum(sizes.values()))
    if norm == "l1":
        return {k: clip_init * n / total for k, n in sizes.items()}
    return {k: clip_init * math.sqrt(n / total) for k, n in sizes.items()}


# ---------------------------------------------------------------------------------------------------------------------
# the mechanism


class AdaptiveDPMechanism:
    """Clipping + noise for one site's successive updates, with the noisy-quantile threshold kept across rounds."""

    def __init__(self, config: DPConfig, seed: int | None = None):
        if not isinstance(config, DPConfig):
            raise ConfigError(f"AdaptiveDPMechanism needs a DPConfig, got {type(config).__name__}")
        self.config = config.validate()
        self.rng = np.random.default_rng(seed)
        self.rounds = 0
        self._threshold = float(config.clip_init)      # whole update
        self._layer_thresholds: dict[str, float] = {}  # per layer (set from the first update's shapes)
        self._layer_init: dict[str, float] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}

    # public state --------------------------------------------------------------------------------------------------
    @property
    def thresholds(self) -> dict[str, float] | float:
        """The threshold(s) the next round clips to: a float (whole update) or {tensor: threshold} (per layer; empty
        until the first update names the tensors). Public: a function of clip_init and the DP noisy bits only."""
        return dict(self._layer_thresholds) if self.config.per_layer else self._threshold

    def combined_threshold(self) -> float:
        """The bound on the clipped update's norm: C, or sum / sqrt(sum of squares) of the per-layer thresholds."""
        if self.config.per_layer:
            return combine_norms(self._layer_thresholds.values(), self.config.norm)
        return self._threshold

    def sensitivity(self) -> float:
        """Sensitivity of the clipped update (in the mechanism's norm): 2C (replace) or C (add_remove)."""
        factor = 2.0 if self.config.adjacency == "replace" else 1.0
        return factor * self.combined_threshold()

    def noise_scale(self) -> float:
        """Laplace b = sensitivity / epsilon, or the analytic Gaussian sigma for (epsilon, delta)."""
        cfg = self.config
        delta_s = self.sensitivity()
        if cfg.mechanism == "laplace":
            scale = delta_s / cfg.epsilon
        else:
            scale = analytic_gaussian_sigma(cfg.epsilon, cfg.delta, delta_s)
        if not math.isfinite(scale):
            raise ConfigError(f"DP noise scale overflows (sensitivity {delta_s:g}, epsilon {cfg.epsilon:g}); "
                              "raise DPConfig.epsilon or lower clip_init")
        return float(scale)

    # one round -----------------------------------------------------------------------------------------------------
    def _check(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not isinstance(update, Mapping) or not update:
            raise UpdateRejected("DP mechanism: the update must be a non-empty mapping tensor name -> float array")
        arrays = {}
        for k, v in update.items():
            a = np.asarray(v)
            if not np.issubdtype(a.dtype, np.floating):
                raise UpdateRejected(f"DP mechanism: tensor {k!r} has dtype {a.dtype}; only float updates can be "
                                     "noised (send weight differences as float arrays)")
            if not np.all(np.isfinite(a)):
                bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
                raise UpdateRejected(f"DP mechanism: tensor {k!r} contains {bad} NaN/Inf value(s); the update is not "
                                     "released (fix the local training: diverged loss or learning rate too high)")
            arrays[k] = a
        if self.config.per_layer:
            shapes = {k: tuple(a.shape) for k, a in arrays.items()}
            if not self._shapes:
                self._shapes = shapes
                self._layer_init = initial_layer_thresholds(shapes, self.config.clip_init, self.config.norm)
                self._layer_thresholds = dict(self._layer_init)
            elif shapes != self._shapes:
                missing, extra = sorted(set(self._shapes) - set(shapes)), sorted(set(shapes) - set(self._shapes))
                changed = sorted(k for k in set(shapes) & set(self._shapes) if shapes[k] != self._shapes[k])
                raise UpdateRejected(f"DP mechanism (per-layer thresholds): the update's tensors differ from the first "
                                     f"round's: missing {missing}, extra {extra}, other shape {changed}")
        return arrays

    def privatize(self, update: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Clip and noise one update; update the threshold (adaptive). Returns (noised update with the same keys,
        shapes and dtypes, report of public quantities). NaN/Inf or non-float tensors raise UpdateRejected."""
        cfg = self.config
        arrays = self._check(update)
        norm = cfg.norm
        if cfg.per_layer:
            used: dict[str, float] | float = dict(self._layer_thresholds)
            norms = np.array([tensor_norm(arrays[k], norm) for k in arrays])
            limits = np.array([self._layer_thresholds[k] for k in arrays])
        else:
            used = self._threshold
            norms = np.array([combine_norms((tensor_norm(a, norm) for a in arrays.values()), norm)])
            limits = np.array([self._threshold])
        sensitivity = self.sensitivity()
        scale = self.noise_scale()

        noisy_bits = None
        if cfg.adaptive:  # the only use of the pre-clip norms: one noisy bit each
            n_bits = len(norms)
            bits = (norms <= limits).astype(np.float64)
            noisy_bits = bits + self.rng.laplace(0.0, n_bits / cfg.quantile_epsilon, size=n_bits)
        clipped = clip_update(arrays, used, norm)
        out = {}
        for k, a in arrays.items():
            if cfg.mechanism == "laplace":
                noise = self.rng.laplace(0.0, scale, size=a.shape)
            else:
                noise = self.rng.normal(0.0, scale, size=a.shape)
            with np.errstate(over="ignore"):  # an overflow is refused just below
                out[k] = (clipped[k] + noise).astype(a.dtype, copy=False)
            if not np.all(np.isfinite(out[k])):
                raise UpdateRejected(f"DP mechanism: the noised tensor {k!r} overflows {a.dtype} (noise scale "
                                     f"{scale:.3g}); send the update in float32/float64 or raise the epsilon")
        if noisy_bits is not None:
            self._update_thresholds(noisy_bits, list(arrays))
        self.rounds += 1
        eps_round, delta_round = cfg.round_cost()
        report = {
            "mechanism": cfg.mechanism,
            "norm": norm,
            "clipping": cfg.clipping,
            "per_layer": bool(cfg.per_layer),
            "adjacency": cfg.adjacency,
            "epsilon": float(cfg.epsilon),
            "delta": float(cfg.delta) if cfg.mechanism == "gaussian" else 0.0,
            "quantile_epsilon": float(cfg.quantile_epsilon) if cfg.adaptive else 0.0,
            "round_epsilon": eps_round,
            "round_delta": delta_round,
            "percentile": float(cfg.percentile) if cfg.adaptive else None,
            "clip": used,
            "clip_combined": combine_norms(used.values(), norm) if isinstance(used, dict) else used,
            "sensitivity": sensitivity,
            "noise_scale": scale,
            "noise": "laplace b" if cfg.mechanism == "laplace" else "gaussian sigma (analytic, Balle & Wang 2018)",
            "noisy_quantile_bits": (None if noisy_bits is None else
                                    {k: float(b) for k, b in zip(arrays, noisy_bits)} if cfg.per_layer
                                    else float(noisy_bits[0])),
            "next_clip": self.thresholds,
            "round": self.rounds,
        }
        return out, report

    def _update_thresholds(self, noisy_bits: np.ndarray, names: list[str]) -> None:
        """C <- C * exp(-clip_lr * (b_noisy - gamma)), clamped to THRESHOLD_RANGE x the initial value."""
        cfg = self.config
        gamma = cfg.percentile / 100.0
        lo, hi = THRESHOLD_RANGE
        factors = np.exp(np.clip(-cfg.clip_lr * (noisy_bits - gamma), -700.0, 700.0))
        if cfg.per_layer:
            for k, f in zip(names, factors):
                c0 = self._layer_init[k]
                self._layer_thresholds[k] = float(np.clip(self._layer_thresholds[k] * f, lo * c0, hi * c0))
        else:
            c0 = cfg.clip_init
            self._threshold = float(np.clip(self._threshold * factors[0], lo * c0, hi * c0))

    # state ---------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Config, round count and thresholds (JSON-able). The generator's state is left out on purpose: whoever
        reads it could regenerate and subtract the next rounds' noise."""
        return {"config": asdict(self.config), "rounds": self.rounds, "threshold": self._threshold,
                "layer_thresholds": dict(self._layer_thresholds), "layer_init": dict(self._layer_init),
                "shapes": {k: list(s) for k, s in self._shapes.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict` of a mechanism with the same configuration (ConfigError otherwise: the
        accountant's per-round cost would no longer describe the rounds already spent)."""
        try:
            saved = DPConfig(**state["config"])
            rounds = int(state["rounds"])
            threshold = float(state["threshold"])
            layers = {str(k): float(v) for k, v in state["layer_thresholds"].items()}
            layer_init = {str(k): float(v) for k, v in state["layer_init"].items()}
            shapes = {str(k): tuple(int(d) for d in s) for k, s in state["shapes"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"DP mechanism state is malformed ({e}); expected AdaptiveDPMechanism.state_dict()"
                              ) from e
        if saved != self.config:
            diff = sorted(k for k, v in asdict(saved).items() if getattr(self.config, k) != v)
            raise ConfigError(f"DP mechanism state was saved with other settings ({', '.join(diff)}); resume with "
                              "the same DPConfig or start a new run")
        values = [threshold, *layers.values(), *layer_init.values()]
        if rounds < 0 or not all(math.isfinite(v) and v > 0 for v in values) or set(layers) != set(layer_init):
            raise ConfigError("DP mechanism state holds a negative round count or non-positive thresholds")
        self.rounds, self._threshold = rounds, threshold
        self._layer_thresholds, self._layer_init, self._shapes = layers, layer_init, shapes


# ---------------------------------------------------------------------------------------------------------------------
# iDLG hook


class IDLGMechanism:
    """``update -> noised update`` for ``fedseg attack idlg --scenario dp``; ``last_report`` holds the mechanism's
    report of the last call."""

    def __init__(self, mechanism: AdaptiveDPMechanism):
        self.mechanism = mechanism
        self.last_report: dict[str, Any] | None = None

    def __call__(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out, self.last_report = self.mechanism.privatize(update)
        return out


def idlg_mechanism(epsilon: float, seed: int, mechanism: str = "laplace", clip: float = 1.0, delta: float = 1e-5,
                   per_layer: bool = False) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
    """The DP view of a single-step attack: one round of :class:`AdaptiveDPMechanism` with a FIXED threshold ``clip``
    (L1 for Laplace, L2 for Gaussian), replace adjacency. With one round the adaptive threshold would be clip_init
    anyway, so fixed clipping releases the same update without spending a quantile budget. The threshold is a
    constant, not the attacked update's norm: choosing it from the update would itself leak."""
    cfg = DPConfig(mechanism=mechanism, epsilon=float(epsilon), delta=float(delta), clipping="fixed",
                   clip_init=float(clip), per_layer=bool(per_layer)).validate()
    return IDLGMechanism(AdaptiveDPMechanism(cfg, seed=seed))
