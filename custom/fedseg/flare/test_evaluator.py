"""Server component that evaluates a global model on the held-out test centre, where the server may see it.

``test_data``:
- ``"auto"`` (default): use the test centre of the server's own data configuration (``local/fedseg_data.json`` or
  ``FEDSEG_DATA_CONFIG``); with no configuration, use the built-in synthetic test centre only in the simulator.
  On a real server without test data this evaluates nothing and says how to evaluate the model at the site that
  holds the test centre (``fedseg evaluate``).
- ``"off"``: never evaluate at the server.
The untrained model is evaluated when FLARE loads it (``INITIAL_MODEL_LOADED``), so the results can show what training
gained; ``every_n_rounds`` > 0 also evaluates after every n-th round (a test-centre curve).
"""

from __future__ import annotations

import time
from typing import Any

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType


def _is_simulation(fl_ctx: FLContext) -> bool:
    """True under ``nvflare simulator``: the server engine is the simulator's (clients carry SIMULATE_MODE)."""
    if fl_ctx.get_prop(FLContextKey.SIMULATE_MODE, False):
        return True
    try:
        from nvflare.private.fed.simulator.simulator_server import SimulatorServerEngine
    except ImportError:  # pragma: no cover - layout of a future NVFlare
        return False
    return isinstance(fl_ctx.get_engine(), SimulatorServerEngine)


class TestCentreEvaluator(FLComponent):
    __test__ = False  # not a pytest class

    def __init__(self, dataset: str = "lits", data_args: dict | None = None, model: str = "utnet",
                 model_args: dict | None = None, in_channels: int = 1, num_classes: int = 1,
                 test_data: str = "auto", every_n_rounds: int = 0, device: str = "auto", eval_batch_size: int = 16):
        super().__init__()
        if test_data not in ("auto", "off"):
            raise ValueError(f"test_data must be 'auto' or 'off', got {test_data!r}")
        self.dataset, self.data_args = dataset, dict(data_args or {})
        self.model_name, self.model_args = model, dict(model_args or {})
        self.in_channels, self.num_classes = in_channels, num_classes
        self.test_data, self.every_n_rounds = test_data, int(every_n_rounds)
        self.device_spec, self.eval_batch_size = device, eval_batch_size
        self._data = None
        self._model = None
        self._device = None
        self.unavailable_reason: str | None = None
        self.initial: dict[str, Any] | None = None
        self.by_round: dict[int, dict[str, Any]] = {}

    # ------------------------------------------------------------------ data
    def _ensure_data(self, fl_ctx: FLContext) -> bool:
        if self._data is not None:
            return True
        if self.unavailable_reason is not None:
            return False
        if self.test_data == "off":
            self.unavailable_reason = "server-side test evaluation is off (test_data='off')"
            return False
        from fedseg.data.config import resolve_data_source
        from fedseg.models import get_model
        from fedseg.sitedata import load_test_data
        from fedseg.training import resolve_device

        ws_root = fl_ctx.get_engine().get_workspace().get_root_dir()
        source = resolve_data_source(self.dataset, "server", ws_root)
        simulate = _is_simulation(fl_ctx)
        if source.root is None and not simulate:
            self.unavailable_reason = (
                "this server has no test data configured (local/fedseg_data.json); evaluate the final global model "
                "where the test centre lives: fedseg evaluate --model <results>/global_model.pt --data-config ..."
            )
            self.log_info(fl_ctx, self.unavailable_reason)
            return False
        t0 = time.perf_counter()
        try:
            self._data, _ = load_test_data(self.dataset, self.data_args, "server", ws_root)
        except Exception as e:  # the run goes on; the results say why there is no test row
            self.unavailable_reason = f"could not load the test centre: {e}"
            self.log_error(fl_ctx, self.unavailable_reason)
            return False
        self._device = resolve_device(self.device_spec)
        self._model = get_model(self.model_name, in_channels=self.in_channels, num_classes=self.num_classes,
                                **self.model_args).to(self._device)
        self.log_info(fl_ctx, f"test centre: {len(self._data.delta)} images ({int(self._data.small.sum())} small) "
                      f"from {source.root or 'built-in synthetic data'}, loaded in {time.perf_counter() - t0:.1f} s")
        return True

    def evaluate(self, weights: dict[str, Any], fl_ctx: FLContext, overlays_png: str | None = None
                 ) -> dict[str, Any] | None:
        """Dice / DiceS / DiceL of ``weights`` on the test centre (None when the server has no test data);
        with ``overlays_png`` also a figure of predictions on small and large lesions."""
        if not self._ensure_data(fl_ctx):
            return None
        from fedseg.evaluation import evaluate_dataset, write_prediction_overlays
        from fedseg.training import load_state

        load_state(self._model, weights)
        summary = evaluate_dataset(self._model, self._data, self._device, self.eval_batch_size)
        per_image = summary.pop("per_image_dice", None)
        summary.pop("per_case_dice", None)
        if overlays_png and per_image is not None and not hasattr(self._data, "evaluate"):  # 2-D slice overlays
            write_prediction_overlays(self._model, self._data, self._device, per_image, overlays_png)
        return summary

    # ------------------------------------------------------------------ events
    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == AppEventType.INITIAL_MODEL_LOADED:
            model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
            if model and self.initial is None:
                self.initial = self.evaluate(model[ModelLearnableKey.WEIGHTS], fl_ctx)
                if self.initial:
                    self.log_info(fl_ctx, f"untrained model on the test centre: Dice {self.initial['dice']:.4f}")
        elif event_type == AppEventType.ROUND_DONE and self.every_n_rounds > 0:
            rnd = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
            model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
            if model is not None and rnd is not None and (rnd + 1) % self.every_n_rounds == 0:
                m = self.evaluate(model[ModelLearnableKey.WEIGHTS], fl_ctx)
                if m:
                    self.by_round[int(rnd) + 1] = m
        elif event_type == EventType.END_RUN:
            self._data = None
