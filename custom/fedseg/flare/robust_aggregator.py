"""FLARE aggregator with a robust rule (paper 002): FedGSAggregator's checks, then median / trimmed mean / Krum /
Multi-Krum / norm screening from :mod:`fedseg.algorithms.robust` instead of the plain step-weighted mean.

Every contribution is checked exactly as in :class:`fedseg.flare.aggregator.FedGSAggregator` (return code, round,
duplicates, WEIGHT_DIFF, steps > 0, keys, shapes, NaN/Inf: rejected by name, the round goes on). At the end of the
round the rule combines the accepted updates; one log line says which sites it kept and which it rejected and why
(e.g. ``norm 412.3 > 3 x median 12.1``), and the aggregate's meta lists them (``robust_kept``, ``robust_rejected``).
A round with fewer accepted sites than the rule needs (Krum: ``n >= 2f + 3``) keeps the global model and says so.
"""

from __future__ import annotations

from typing import Any

from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from fedseg.algorithms.robust import RobustCollector, make_rule
from fedseg.errors import ConfigError
from fedseg.flare.aggregator import FedGSAggregator


class RobustAggregator(FedGSAggregator):
    def __init__(self, rule: str = "median", rule_args: dict[str, Any] | None = None, weighted: bool = True,
                 min_accepted: int = 1):
        self.rule_name = rule
        self.rule_args = dict(rule_args or {})
        self.weighted = bool(weighted)
        self._rule = make_rule(rule, **self.rule_args)  # bad names / parameters fail when the job is loaded
        super().__init__(min_accepted=max(int(min_accepted), self._rule.min_sites()))
        self._last = None

    def _new_accumulator(self):
        return RobustCollector(self._rule, weighted=self.weighted)

    def _after_result(self, fl_ctx: FLContext, current_round) -> None:
        res = self._acc.last
        self._last = res
        rejected = "; ".join(f"{s}: {r}" for s, r in res.rejected.items()) or "none"
        scores = ", ".join(f"{s} {v:.4g}" for s, v in sorted(res.scores.items())) if res.scores else "n/a"
        details = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in res.details.items())
        self.log_info(fl_ctx, f"round {current_round}: {res.rule} kept {list(res.kept)}, rejected {rejected}")
        # a second line with every site's score and the thresholds used, so a verdict can be checked afterwards
        self.log_info(fl_ctx, f"round {current_round}: {res.rule} scores: {scores}; {details or 'no details'}")

    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        try:
            out = super().aggregate(fl_ctx)
        except ConfigError as e:  # fewer sites than the rule needs this round
            self.log_error(fl_ctx, f"{self.rule_name}: {e}; the global model is kept unchanged this round")
            self.reset(fl_ctx)
            self._round = None
            from nvflare.apis.dxo import DXO, DataKind, MetaKey

            return DXO(data_kind=DataKind.WEIGHT_DIFF, data={}, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 0}).to_shareable()
        if self._last is not None:
            dxo = from_shareable(out)
            dxo.set_meta_prop("robust_kept", list(self._last.kept))
            dxo.set_meta_prop("robust_rejected", dict(self._last.rejected))
            self._last = None
            return dxo.to_shareable()
        return out
