"""Server widget that keeps the global model with the best validation Dice (the paper's "best checkpoint").

At round r every site evaluates the global model it received (M_r) on its validation split before training and sends
the metrics with its update. When the round's contributions are in (``BEFORE_AGGREGATION``), the image-weighted mean
validation Dice of M_r is known, and M_r, still the global model at that moment, is saved if it is the best so far.
:class:`~fedseg.flare.final_evaluation.FinalEvaluation` adds the final model's validation result and copies the
winner into the results folder. (FLARE's stock IntimeModelSelector pairs a round's metric with the model aggregated
after it, one round off; this keeps metric and model together.)
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import numpy as np

from nvflare.apis.dxo import from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType


def weighted_dice(site_metrics: Dict[str, dict]) -> Optional[float]:
    """Mean Dice over all validation images of all sites (sites weighted by their image count)."""
    pairs = [(m["dice"], m.get("n", 0)) for m in site_metrics.values() if m and m.get("dice") is not None]
    total = sum(n for _, n in pairs)
    return float(sum(d * n for d, n in pairs) / total) if total else None


class BestModelKeeper(FLComponent):
    def __init__(self, file_name: str = "best_global_model.pt"):
        super().__init__()
        self.file_name = file_name
        self.best_round: Optional[int] = None
        self.best_val_dice: Optional[float] = None
        self.by_round: Dict[int, float] = {}
        self.path: Optional[str] = None
        self._round_metrics: Dict[str, dict] = {}
        self._round: Optional[int] = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
            self.path = os.path.join(run_dir, self.file_name)
        elif event_type == AppEventType.AFTER_CONTRIBUTION_ACCEPT:
            if not fl_ctx.get_prop(AppConstants.AGGREGATION_ACCEPTED, False):
                return
            result = fl_ctx.get_prop(AppConstants.TRAINING_RESULT)
            rnd = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
            if result is None:
                return
            if rnd != self._round:
                self._round, self._round_metrics = rnd, {}
            site = result.get_peer_prop(ReservedKey.IDENTITY_NAME, "?")
            try:
                metrics = from_shareable(result).get_meta_prop("val_metrics")
            except Exception:
                metrics = None
            if metrics:
                self._round_metrics[site] = metrics
        elif event_type == AppEventType.BEFORE_AGGREGATION:
            rnd = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
            model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
            if rnd == self._round and model is not None:
                self.offer(int(rnd), self._round_metrics, model[ModelLearnableKey.WEIGHTS], fl_ctx)

    def resume_state(self) -> dict:
        """What a round checkpoint keeps of this keeper (:mod:`fedseg.flare.resume`)."""
        return {"best_round": self.best_round, "best_val_dice": self.best_val_dice,
                "by_round": {str(k): v for k, v in self.by_round.items()}}

    def restore_state(self, state: dict, best_model_file: Optional[str] = None) -> None:
        """Continue from a round checkpoint: the record so far and, when there is one, the best model's file."""
        import shutil

        self.best_round = state.get("best_round")
        self.best_val_dice = state.get("best_val_dice")
        self.by_round = {int(k): float(v) for k, v in (state.get("by_round") or {}).items()}
        if best_model_file and self.path and os.path.isfile(best_model_file):
            shutil.copyfile(best_model_file, self.path)

    def offer(self, model_round: int, site_metrics: Dict[str, dict], weights, fl_ctx: FLContext) -> bool:
        """Record the validation Dice of the model sent in ``model_round``; save it if it is the best so far."""
        dice = weighted_dice(site_metrics)
        if dice is None:
            return False
        self.by_round[model_round] = dice
        if self.best_val_dice is not None and dice <= self.best_val_dice:
            return False
        import torch

        self.best_round, self.best_val_dice = model_round, dice
        if self.path:
            torch.save({k: torch.as_tensor(np.asarray(v)) for k, v in weights.items()}, self.path)
        self.log_info(fl_ctx, f"new best global model: the model of round {model_round}, validation Dice {dice:.4f}")
        return True
