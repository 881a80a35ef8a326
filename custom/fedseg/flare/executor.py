"""FLARE client executor: local segmentation training with the FedGS cumulative update.

Thin adapter: data loading is :func:`fedseg.sitedata.load_site_data` (site-local configuration, no job edits), the
training loop is :class:`fedseg.training.LocalTrainer`. Tasks:

- ``train``: receives the global model (WEIGHTS), reports its validation Dice / DiceS / DiceL on the site's
  validation split (streamed to the server as round metrics), trains ``local_epochs`` and returns a WEIGHT_DIFF
  (``-G``, float-buffer deltas) with ``NUM_STEPS_CURRENT_ROUND``.
- ``validate``: evaluates the received model on the site's validation split and returns METRICS.
"""

from __future__ import annotations

import time
import zlib

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from fedseg.errors import FedsegError
from fedseg.models import get_model
from fedseg.sitedata import augmenter, load_site_data
from fedseg.training import LocalTrainer, TrainConfig

METRIC_KEYS = ("dice", "dice_s", "dice_l")


def public_metrics(summary: dict) -> dict:
    """The summary without per-image arrays (what leaves the site)."""
    return {k: v for k, v in summary.items() if k != "per_image_dice"}


class SegmentationTrainer(Executor):
    def __init__(
        self,
        dataset: str = "lits",
        data_args: dict | None = None,
        model: str = "utnet",
        model_args: dict | None = None,
        in_channels: int = 1,
        num_classes: int = 1,
        aggregation: str = "fedgs",
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        batch_size: int = 4,
        local_epochs: int = 5,
        max_steps_per_round: int | None = None,
        augment: bool = True,
        reset_optimizer: bool = True,
        device: str = "auto",
        seed: int = 0,
        num_threads: int | None = None,
        train_task_name: str = AppConstants.TASK_TRAIN,
        validate_task_name: str = AppConstants.TASK_VALIDATION,
        analytic_sender_id: str = "analytic_sender",
    ):
        super().__init__()
        self.dataset = dataset
        self.data_args = dict(data_args or {})
        self.model_name = model
        self.model_args = dict(model_args or {})
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.cfg = TrainConfig(
            lr=lr, weight_decay=weight_decay, batch_size=batch_size, local_epochs=local_epochs,
            max_steps_per_round=max_steps_per_round, aggregation=aggregation, augment=augment,
            reset_optimizer=reset_optimizer, device=device, seed=seed,
        )
        self.num_threads = num_threads
        self.train_task_name = train_task_name
        self.validate_task_name = validate_task_name
        self.analytic_sender_id = analytic_sender_id
        self.trainer = None
        self.val_data = None
        self.data_origin = None
        self.writer = None
        self.site = None
        self.setup_error = None

    # ------------------------------------------------------------------ setup
    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            try:
                self._setup(fl_ctx)
            except FedsegError as e:  # bad data or configuration: say what and where, then refuse tasks
                self.setup_error = str(e)
                self.log_error(fl_ctx, f"site {fl_ctx.get_identity_name()} cannot train: {e}")

    def _setup(self, fl_ctx: FLContext):
        import torch

        if self.num_threads:
            torch.set_num_threads(int(self.num_threads))
        self.site = fl_ctx.get_identity_name()
        engine = fl_ctx.get_engine()
        workspace_root = engine.get_workspace().get_root_dir()
        t0 = time.perf_counter()
        train, source = load_site_data(self.dataset, self.site, "train", self.data_args, workspace_root)
        self.val_data, _ = load_site_data(self.dataset, self.site, "val", self.data_args, workspace_root)
        self.data_origin = "builtin" if source.root is None else "site-config"
        n_small = int(train.small.sum())
        self.log_info(
            fl_ctx,
            f"site {self.site}: {self.dataset} data from {source.origin} ({source.root or 'built-in synthetic data'}); "
            f"{len(train.delta)} training samples ({n_small} small), {len(self.val_data.delta)} validation samples; "
            f"loaded in {time.perf_counter() - t0:.1f} s",
        )
        # every site gets its own (reproducible) augmentation / shuffling stream
        self.cfg.seed = int(self.cfg.seed) + zlib.crc32(self.site.encode()) % 100_000
        model = get_model(self.model_name, in_channels=self.in_channels, num_classes=self.num_classes, **self.model_args)
        self.trainer = LocalTrainer(model, train, self.cfg, augment_fn=augmenter(self.dataset) if self.cfg.augment else None)
        self.log_info(fl_ctx, f"site {self.site}: training on {self.trainer.device}, aggregation={self.cfg.aggregation}")
        self.writer = engine.get_component(self.analytic_sender_id) if self.analytic_sender_id else None

    # ------------------------------------------------------------------ tasks
    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if self.trainer is None:
            self.log_error(fl_ctx, f"task {task_name} refused: {self.setup_error or 'the trainer was not set up'}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        try:
            dxo = from_shareable(shareable)
        except Exception as e:
            self.log_error(fl_ctx, f"task {task_name}: no model in the task data: {e}")
            return make_reply(ReturnCode.BAD_TASK_DATA)
        if dxo.data_kind != DataKind.WEIGHTS:
            self.log_error(fl_ctx, f"task {task_name}: expected WEIGHTS, got {dxo.data_kind}")
            return make_reply(ReturnCode.BAD_TASK_DATA)
        current_round = shareable.get_header(AppConstants.CURRENT_ROUND, 0)
        if task_name == self.train_task_name:
            return self._train(dxo, current_round, fl_ctx, abort_signal)
        if task_name == self.validate_task_name:
            return self._validate(dxo, fl_ctx)
        return make_reply(ReturnCode.TASK_UNKNOWN)

    def _stream(self, values: dict, step: int, prefix: str):
        if self.writer is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and v is not None:
                self.writer.add_scalar(f"{prefix}{k}", float(v), global_step=int(step))

    def _train(self, dxo: DXO, current_round: int, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        val = public_metrics(self.trainer.evaluate(self.val_data, dxo.data))
        self.log_info(fl_ctx, f"round {current_round}: global model on {self.site} validation: "
                      + ", ".join(f"{k}={val[k]:.4f}" if val[k] is not None else f"{k}=n/a" for k in METRIC_KEYS))
        self._stream({f"val_{k}": val[k] for k in METRIC_KEYS if val[k] is not None}, current_round, "")
        try:
            result = self.trainer.train_round(dxo.data, should_stop=lambda: abort_signal.triggered)
        except InterruptedError:
            return make_reply(ReturnCode.TASK_ABORTED)
        self.log_info(fl_ctx, f"round {current_round}: {result.steps} local steps, loss {result.metrics['train_loss']:.4f}, "
                      f"mean eta {result.metrics['eta_mean']:.3f}, {result.metrics['train_seconds']:.1f} s")
        self._stream(result.metrics, current_round, "")
        out = DXO(
            data_kind=DataKind.WEIGHT_DIFF,
            data=result.update,
            meta={
                MetaKey.NUM_STEPS_CURRENT_ROUND: result.steps,
                MetaKey.INITIAL_METRICS: val.get("dice"),
                "val_metrics": val,
                "train_metrics": result.metrics,
            },
        )
        return out.to_shareable()

    def _validate(self, dxo: DXO, fl_ctx: FLContext) -> Shareable:
        val = public_metrics(self.trainer.evaluate(self.val_data, dxo.data))
        val["data_origin"] = self.data_origin
        self.log_info(fl_ctx, f"final validation on {self.site}: {val}")
        return DXO(data_kind=DataKind.METRICS, data=val).to_shareable()
