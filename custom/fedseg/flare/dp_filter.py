"""Client task-result filter: differential privacy of a site's model update (paper 003, DESIGN.md section 4).

:class:`AdaptiveDPFilter` sits in the site's ``task_result_filters`` of the ``train`` task, before any encryption
filter (noise must be added to the plaintext; an encryptor after it only ever sees the noised update). Every round it

1. checks the privacy budget: the accountant's total *after* this round against ``budget_epsilon``;
   ``budget_action="warn"`` logs a warning and releases (``over_budget`` true in the meta), ``"stop"`` releases
   nothing: the reply is ``make_reply("PRIVACY_BUDGET_EXHAUSTED")`` (the server's workflow treats a non-OK reply as
   a failed contribution and leaves it out);
2. clips and noises the WEIGHT_DIFF update with one :class:`fedseg.algorithms.adaptive_dp.AdaptiveDPMechanism` per
   run (its adaptive threshold and noisy-quantile state carry over from round to round); an update holding NaN/Inf
   is refused (nothing is released, the log names the site and the tensor), and so is a train result that is not a
   WEIGHT_DIFF (it would otherwise leave the site without noise);
3. records the round in one :mod:`fedseg.algorithms.dp_accountant` accountant per run and adds the DXO meta
   ``"dp"``: the mechanism's report (public quantities only) plus ``epsilon_total``, ``delta_total``, ``round``,
   ``epsilon_round`` / ``delta_round`` (the accountant's cost of one round, noisy quantile included),
   ``accountant``, ``budget_epsilon`` and ``over_budget``; the server's
   :class:`fedseg.flare.privacy_recorder.PrivacyRecorder` reads it (the meta stays plaintext under HE);
4. streams ``dp_epsilon_total``, ``dp_clip`` and ``dp_noise_scale`` through the analytic sender (TensorBoard and
   the results folder's metrics history) and logs one line with this round's and the total epsilon and the
   threshold.

The round: FLARE clears the task data before the result filters run, so the filter takes the round from the
result's or the server's ``current_round`` when one carries it and otherwise counts the train results it has
filtered in this run (0-based; equal to ScatterAndGather's round when the site trains in every round, as in the
fedseg jobs). The accountant counts releases, whatever their round numbers.

Only the update tensors are protected. What the executor adds to the same result in the clear (the number of local
steps, the validation and training metrics in the meta) and the metrics it streams are not noised; see
docs/privacy/dp.md.
"""

from __future__ import annotations

import math
import threading

from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.app_common.app_constant import AppConstants

from fedseg.errors import ConfigError, UpdateRejected
from fedseg.results import combined_value

BUDGET_ACTIONS = ("warn", "stop")
#: return code of a round in which the site refuses to release because its privacy budget is spent
BUDGET_EXHAUSTED = "PRIVACY_BUDGET_EXHAUSTED"
#: return code of a round whose update the filter refuses to release (NaN/Inf, or not a WEIGHT_DIFF)
UPDATE_REFUSED = ReturnCode.EXECUTION_EXCEPTION
META_KEY = "dp"
# float rounding of composed epsilons must not turn "exactly at the budget" into "over it"
_BUDGET_TOLERANCE = 1e-9


class _Refuse(Exception):
    """Raised inside process_dxo to replace the whole result by a non-OK reply (nothing is released)."""

    def __init__(self, return_code: str):
        super().__init__(return_code)
        self.return_code = return_code


class AdaptiveDPFilter(DXOFilter):
    def __init__(
        self,
        mechanism: str = "laplace",
        epsilon: float = 1.0,
        delta: float = 1e-5,
        clipping: str = "adaptive",
        clip_init: float = 1.0,
        percentile: float = 50.0,
        quantile_epsilon: float = 0.1,
        clip_lr: float = 0.2,
        per_layer: bool = False,
        adjacency: str = "replace",
        accountant: str = "auto",
        budget_epsilon: float | None = None,
        budget_action: str = "warn",
        seed: int | None = None,
        analytic_sender_id: str = "analytic_sender",
    ):
        """Every setting is checked here, so a bad job stops when the site starts it, not in round 1.

        ``accountant``: ``"auto"`` (``"pure"`` for laplace, ``"rdp"`` for gaussian) or a name of
        ``fedseg.algorithms.dp_accountant.ACCOUNTANTS``. ``budget_epsilon``: total epsilon this site may spend in the
        run (None: no budget). ``seed``: for tests only; noise from a known seed can be subtracted again.
        ``analytic_sender_id``: the client component whose ``add_scalar`` streams the privacy scalars ("" or a
        missing component: nothing is streamed).
        """
        # all kinds reach process_dxo, which refuses anything but WEIGHT_DIFF instead of passing it through unnoised
        super().__init__(supported_data_kinds=None, data_kinds_to_filter=None)
        from fedseg.algorithms.adaptive_dp import AdaptiveDPMechanism, DPConfig
        from fedseg.algorithms.dp_accountant import ACCOUNTANTS, default_accountant, get_accountant

        where = "AdaptiveDPFilter (the job's task_result_filters)"
        try:
            self.config = DPConfig(
                mechanism=mechanism, epsilon=epsilon, delta=delta, clipping=clipping, clip_init=clip_init,
                percentile=percentile, quantile_epsilon=quantile_epsilon, clip_lr=clip_lr, per_layer=per_layer,
                adjacency=adjacency,
            ).validate()
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from e
        except (TypeError, ValueError) as e:  # a value of the wrong type that DPConfig's checks trip over
            raise ConfigError(f"{where}: bad DP setting: {e}") from e
        if accountant == "auto":
            accountant = default_accountant(self.config)
        if accountant not in ACCOUNTANTS:
            raise ConfigError(f"{where}: accountant must be 'auto' or one of {sorted(ACCOUNTANTS)}, got {accountant!r}")
        if budget_epsilon is not None:
            if isinstance(budget_epsilon, bool) or not isinstance(budget_epsilon, (int, float)) \
                    or not math.isfinite(budget_epsilon) or budget_epsilon <= 0:
                raise ConfigError(f"{where}: budget_epsilon must be a positive number or null (no budget), got "
                                  f"{budget_epsilon!r}")
            budget_epsilon = float(budget_epsilon)
        if budget_action not in BUDGET_ACTIONS:
            raise ConfigError(f"{where}: budget_action must be one of {BUDGET_ACTIONS}, got {budget_action!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigError(f"{where}: seed must be an integer or null (fresh randomness), got {seed!r}")
        if not isinstance(analytic_sender_id, str):
            raise ConfigError(f"{where}: analytic_sender_id must be a component id (a string) or \"\", got "
                              f"{analytic_sender_id!r}")
        try:
            self.accountant = get_accountant(accountant, self.config)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from e
        self.accountant_name = accountant
        self.mechanism = AdaptiveDPMechanism(self.config, seed=seed)
        self.budget_epsilon = budget_epsilon
        self.budget_action = budget_action
        self.seed = seed
        if seed is not None:
            self.logger.warning(f"AdaptiveDPFilter: seed={seed}: the noise is reproducible, and anyone who knows the "
                                "seed can subtract it; use a seed for tests only (null in real jobs)")
        self.analytic_sender_id = analytic_sender_id
        self.results_seen = 0  # train results filtered in this run (the fallback round number)
        self._lock = threading.Lock()  # one mechanism and accountant: rounds are filtered one at a time

    # ------------------------------------------------------------------ FLARE entry point
    def process(self, shareable: Shareable, fl_ctx: FLContext):
        try:
            return super().process(shareable, fl_ctx)
        except _Refuse as r:  # nothing of this round's update leaves the site
            return make_reply(r.return_code)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        site = fl_ctx.get_identity_name() or "?"
        with self._lock:
            rnd = self._round(shareable, fl_ctx)
            self.results_seen += 1
            if dxo.data_kind != DataKind.WEIGHT_DIFF:
                self.log_error(fl_ctx, f"DP filter at site {site}, round {rnd}: the train result is "
                               f"{dxo.data_kind}, not WEIGHT_DIFF; refusing to release it without noise (the DP "
                               "filter only protects model updates)")
                raise _Refuse(UPDATE_REFUSED)
            eps_after, delta_after = self.accountant.spent(rounds=self.accountant.rounds + 1)
            over = self.budget_epsilon is not None and eps_after > self.budget_epsilon * (1 + _BUDGET_TOLERANCE)
            if over and self.budget_action == "stop":
                spent, _ = self.accountant.spent()
                self.log_error(fl_ctx, f"DP filter at site {site}, round {rnd}: privacy budget exhausted: "
                               f"{self.accountant.rounds} round(s) spent epsilon {spent:.6g}; this round would "
                               f"make it {eps_after:.6g} > budget_epsilon {self.budget_epsilon:g}; releasing "
                               f"nothing ({BUDGET_EXHAUSTED}), budget_action='stop'")
                raise _Refuse(BUDGET_EXHAUSTED)
            try:
                noised, report = self.mechanism.privatize(dxo.data)
            except UpdateRejected as e:
                self.log_error(fl_ctx, f"DP filter at site {site}, round {rnd}: update refused, nothing released "
                               f"this round: {e}")
                raise _Refuse(UPDATE_REFUSED) from e
            self.accountant.record_round()
            eps_total, delta_total = self.accountant.spent()
            eps_round, delta_round = self.accountant.round_cost()
        if over:
            self.log_warning(fl_ctx, f"DP filter at site {site}, round {rnd}: over the privacy budget: total "
                             f"epsilon {eps_total:.6g} > budget_epsilon {self.budget_epsilon:g}; released anyway "
                             "(budget_action='warn')")
        meta = dict(report)
        meta.update({"epsilon_round": float(eps_round), "delta_round": float(delta_round),
                     "epsilon_total": float(eps_total), "delta_total": float(delta_total), "round": int(rnd),
                     "accountant": self.accountant_name, "budget_epsilon": self.budget_epsilon,
                     "over_budget": bool(over)})
        mech = self.config.mechanism
        clip = combined_value(report.get("clip"), mech)
        next_clip = combined_value(report.get("next_clip"), mech)
        noise = combined_value(report.get("noise_scale"), mech)
        delta_txt = f", delta {delta_round:.3g} / {delta_total:.3g}" if mech == "gaussian" else ""
        self.log_info(fl_ctx, f"DP round {rnd} at {site}: epsilon {eps_round:.6g} this round, {eps_total:.6g} in "
                      f"total over {self.accountant.rounds} round(s) ({self.accountant_name} accountant){delta_txt}; "
                      f"{self.config.clipping} {'per-layer ' if self.config.per_layer else ''}clip threshold "
                      f"{_num(clip)} (next {_num(next_clip)}), {mech} noise scale {_num(noise)}")
        self._stream(fl_ctx, rnd, {"dp_epsilon_total": eps_total, "dp_clip": clip, "dp_noise_scale": noise})
        out = DXO(data_kind=dxo.data_kind, data=noised, meta=dict(dxo.meta))
        out.set_meta_prop(META_KEY, meta)
        return out

    # ------------------------------------------------------------------ helpers
    def _round(self, shareable: Shareable, fl_ctx: FLContext) -> int:
        """This result's round: from the result header, the FL context or the server's context, else the count."""
        peer = fl_ctx.get_peer_context()
        for value in (shareable.get_header(AppConstants.CURRENT_ROUND),
                      fl_ctx.get_prop(AppConstants.CURRENT_ROUND),
                      peer.get_prop(AppConstants.CURRENT_ROUND) if peer is not None else None):
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return self.results_seen

    def _stream(self, fl_ctx: FLContext, rnd: int, values: dict[str, float | None]) -> None:
        engine = fl_ctx.get_engine()
        if not self.analytic_sender_id or engine is None:
            return
        writer = engine.get_component(self.analytic_sender_id)
        if writer is None:
            return
        for tag, value in values.items():
            if value is not None and math.isfinite(value):
                writer.add_scalar(tag, float(value), global_step=int(rnd))


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.6g}"
