"""FLARE aggregator for FedGS (and the FedAvg baseline, which is FedGS with eta = 1).

Thin adapter over :mod:`fedseg.algorithms.fedgs`: each site sends a WEIGHT_DIFF (``-G`` for parameters,
``b_local - b_global`` for float buffers) with its step count; the result is the step-weighted mean, which FLARE's
``FullModelShareableGenerator`` adds to the global model (``w <- w - G_A``). A contribution that is not finite,
has the wrong keys or shapes, comes from another round or twice from one site is rejected with a log line naming the
site; the round goes on with the rest while at least ``min_accepted`` sites remain, else the global model is kept.
"""

from __future__ import annotations

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.aggregator import Aggregator
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants

from fedseg.algorithms.fedgs import WeightedUpdateAccumulator, check_update
from fedseg.errors import UpdateRejected


class FedGSAggregator(Aggregator):
    def __init__(self, min_accepted: int = 1):
        super().__init__()
        if int(min_accepted) < 1:
            raise ValueError(f"min_accepted must be >= 1, got {min_accepted}")
        self.min_accepted = int(min_accepted)
        self._acc = self._new_accumulator()
        self._round = None
        self.rejected = {}  # site -> reason, for the current round

    def _new_accumulator(self):
        """The step-weighted mean (FedGS equation 1); :class:`fedseg.flare.robust_aggregator.RobustAggregator`
        replaces it by a robust rule with the same interface."""
        return WeightedUpdateAccumulator()

    def reset(self, fl_ctx: FLContext):
        self._acc = self._new_accumulator()
        self.rejected = {}

    def _reference(self, fl_ctx: FLContext):
        global_model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        weights = global_model[ModelLearnableKey.WEIGHTS] if global_model else None
        if not weights:
            raise RuntimeError("FedGSAggregator: no global model in the FL context")
        shapes, integer_keys = {}, []
        for name, value in weights.items():
            arr = np.asarray(value)
            if np.issubdtype(arr.dtype, np.floating):
                shapes[name] = arr.shape
            else:
                integer_keys.append(name)
        return shapes, integer_keys

    def _reject(self, fl_ctx, site, reason) -> bool:
        self.rejected[site] = reason
        self.log_error(fl_ctx, f"rejected the update of {reason}")
        return False

    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        site = shareable.get_peer_prop(key=ReservedKey.IDENTITY_NAME, default="?")
        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        if self._round != current_round:
            self.reset(fl_ctx)
            self._round = current_round
        rc = shareable.get_return_code()
        if rc and rc != ReturnCode.OK:
            return self._reject(fl_ctx, site, f"site {site!r}: the site returned {rc}")
        contribution_round = shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND)
        if contribution_round is not None and contribution_round != current_round:
            return self._reject(
                fl_ctx, site, f"site {site!r}: it is for round {contribution_round}, the server is in round {current_round}"
            )
        if site in self._acc.contributors:
            return self._reject(fl_ctx, site, f"site {site!r}: a second update in round {current_round}")
        try:
            dxo = from_shareable(shareable)
        except Exception as e:  # malformed payload
            return self._reject(fl_ctx, site, f"site {site!r}: the result holds no DXO ({e})")
        if dxo.data_kind != DataKind.WEIGHT_DIFF:
            return self._reject(fl_ctx, site, f"site {site!r}: data kind {dxo.data_kind}, expected WEIGHT_DIFF")
        steps = dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND)
        try:
            steps = float(steps)
        except (TypeError, ValueError):
            steps = float("nan")
        if not steps > 0:
            return self._reject(fl_ctx, site, f"site {site!r}: NUM_STEPS_CURRENT_ROUND must be > 0, got {steps}")
        shapes, integer_keys = self._reference(fl_ctx)
        try:
            check_update(dxo.data, shapes, site, integer_keys=integer_keys)
            self._add(dxo, steps, site)
        except UpdateRejected as e:
            return self._reject(fl_ctx, site, str(e))
        self.log_info(fl_ctx, f"accepted the update of site {site!r} ({int(steps)} steps) for round {current_round}")
        return True

    def _add(self, dxo: DXO, steps: float, site: str) -> None:
        """Add a checked update to the round's accumulator (the personalized aggregator also passes the site's mask)."""
        self._acc.add(dxo.data, steps, contributor=site)

    def _after_result(self, fl_ctx: FLContext, current_round) -> None:
        """Hook after the round's aggregate was computed (the robust aggregator logs what its rule did)."""

    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        n = len(self._acc) if self._round == current_round else 0
        if n < self.min_accepted:
            self.log_error(
                fl_ctx,
                f"round {current_round}: only {n} valid update(s), fewer than min_accepted={self.min_accepted} "
                f"(rejected: {self.rejected or 'none'}); the global model is kept unchanged this round",
            )
            dxo = DXO(data_kind=DataKind.WEIGHT_DIFF, data={}, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 0})
        else:
            data = self._acc.result()
            self._after_result(fl_ctx, current_round)
            dxo = DXO(
                data_kind=DataKind.WEIGHT_DIFF,
                data=data,
                meta={MetaKey.NUM_STEPS_CURRENT_ROUND: self._acc.total_weight, "contributors": list(self._acc.contributors)},
            )
            used = list(getattr(self._acc, "aggregated_sites", self._acc.contributors))
            self.log_info(
                fl_ctx, f"round {current_round}: aggregated {len(used)} site(s) {used}, "
                f"{int(self._acc.total_weight)} steps in total"
            )
        self.reset(fl_ctx)
        self._round = None
        return dxo.to_shareable()
