"""FLARE aggregator of partial model sharing (pFL-ResFIM, FedPer): the masked, steps-weighted mean.

Every contribution is checked as in :class:`fedseg.flare.aggregator.FedGSAggregator` (return code, round, duplicates,
WEIGHT_DIFF, steps > 0, keys, shapes, NaN/Inf; rejected by name, the round goes on). In addition the result's meta
must carry the site's mask (``personalization_mask``: one packed bit per coordinate of every update entry, ``True`` =
kept local at that site; :func:`fedseg.algorithms.personalization.unpack_mask`); a missing or malformed mask rejects
the update. The aggregate is :func:`fedseg.algorithms.resfim.masked_aggregate` with the sites' steps as weights: per
coordinate, the weighted mean over the sites for which it is shared, 0 (global value kept) where every site keeps it
local. One log line a round says how many coordinates were aggregated and each site's kept-local share.
"""

from __future__ import annotations

import numpy as np
from nvflare.apis.dxo import DXO, from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from fedseg.algorithms.personalization import MaskedCollector, unpack_mask
from fedseg.flare.aggregator import FedGSAggregator

MASK_META = "personalization_mask"


class PersonalizedAggregator(FedGSAggregator):
    def __init__(self, min_accepted: int = 1):
        super().__init__(min_accepted=min_accepted)
        self.last_stats = None

    def _new_accumulator(self):
        return MaskedCollector()

    def _add(self, dxo: DXO, steps: float, site: str) -> None:
        shapes = {name: np.asarray(value).shape for name, value in dxo.data.items()}
        mask = unpack_mask(dxo.get_meta_prop(MASK_META), shapes, site)
        self._acc.add(dxo.data, steps, contributor=site, mask=mask)

    def _after_result(self, fl_ctx: FLContext, current_round) -> None:
        st = self._acc.last_stats
        self.last_stats = st
        shares = ", ".join(f"{s} {100 * f:.1f}%" for s, f in sorted(st["per_site_local_fraction"].items()))
        self.log_info(fl_ctx, f"round {current_round}: masked aggregation of {st['aggregated_coords']} of "
                      f"{st['total_coords']} coordinates ({st['local_everywhere']} kept local at every site, "
                      f"{st['local_somewhere']} at some site); kept local per site: {shares}")

    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        out = super().aggregate(fl_ctx)
        if self.last_stats is not None:
            dxo = from_shareable(out)
            dxo.set_meta_prop("personalization", {k: v for k, v in self.last_stats.items()})
            self.last_stats = None
            return dxo.to_shareable()
        return out
