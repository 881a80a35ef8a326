"""FLARE client executor: local segmentation training (FedGS / FedAvg AdamW steps or Per-FedAvg meta-steps).

Thin adapter: data loading is :func:`fedseg.sitedata.load_site_data` (site-local configuration, no job edits), the
training loop is :class:`fedseg.training.LocalTrainer`, the CSAHE ring member is
:class:`fedseg.algorithms.ring.RingMember`. Tasks:

- ``train``: receives the global model (WEIGHTS), reports its validation Dice / DiceS / DiceL on the site's
  validation split (streamed to the server as round metrics), trains one round and returns a WEIGHT_DIFF
  (``-G`` / ``w_T - w_0``, float-buffer deltas) with ``NUM_STEPS_CURRENT_ROUND``.
  With ``secure_aggregation="csahe"`` the update stays at the site (kept for this round) and the reply carries
  metadata only (APP_DEFINED DXO: steps, n_samples, layout digest, number of values; validation and training metrics
  in the meta as before).
- ``csahe_start`` / ``csahe_prepare`` / ``csahe_hop`` / ``csahe_finish`` (csahe only; payload: APP_DEFINED DXO from
  :class:`fedseg.flare.ring_controller.CSAHEScatterAndGather`): start builds a NEW ``csahe.Initiator`` (fresh keys
  and mask) with this round's update and the weight the server sent, and returns the public context and
  Enc(w * Delta + R); prepare encrypts Enc(w * Delta) under the round's public context ahead of the hop and keeps
  the ciphertexts here (the reply only echoes the round tag); hop adds the prepared ciphertexts (or, when none were
  prepared for this round tag and weight, encrypts in the hop) to the received running sum; finish decrypts,
  removes R and returns the aggregate as a WEIGHT_DIFF DXO. A refused request (wrong round, ring < 3 sites, a bad
  ciphertext or context, no update) returns EXECUTION_EXCEPTION with a log line naming the cause.
- ``validate``: evaluates the received model on the site's held-out data: the "test" part when the dataset gives
  every site one (``fedseg.sitedata.site_parts``), else "val"; with ``adaptation_steps`` > 0 also the model after the
  final local adaptation (``LocalTrainer.personalize``) under ``"personalized"``. Returns METRICS (with ``"part"``).
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

from fedseg import sitedata
from fedseg.algorithms.ring import TASK_NAMES
from fedseg.errors import ConfigError, FedsegError
from fedseg.models import get_model
from fedseg.sitedata import augmenter, load_site_data
from fedseg.training import LocalTrainer, TrainConfig

METRIC_KEYS = ("dice", "dice_s", "dice_l")
SECURE_AGGREGATIONS = ("none", "csahe")
CSAHE_TASKS = {task: kind for kind, task in TASK_NAMES.items()}  # "csahe_start" -> "start", ...
PERSONALIZED = "personalized"


def held_out_part(dataset: str) -> str:
    """The part a site's final evaluation uses: "test" when the dataset gives every site one, else "val"."""
    return "test" if "test" in sitedata.site_parts(dataset) else "val"


#: per-image / per-case detail that stays at the site (case names are local identifiers)
PRIVATE_METRIC_KEYS = ("per_image_dice", "per_case_dice")


def public_metrics(summary: dict) -> dict:
    """The summary without per-image or per-case entries (what leaves the site): aggregate metrics only."""
    return {k: v for k, v in summary.items() if k not in PRIVATE_METRIC_KEYS}


class SegmentationTrainer(Executor):
    start_model_label = "global model"  # what _round_start returns, for the log

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
        algorithm: str = "sgd",
        perfedavg_variant: str = "fo",
        alpha: float = 1e-3,
        beta: float = 1e-4,
        adaptation_steps: int = 0,
        secure_aggregation: str = "none",
        csahe_sigma: float = 1e4,
        simulated_attack: dict | None = None,
        train_task_name: str = AppConstants.TASK_TRAIN,
        validate_task_name: str = AppConstants.TASK_VALIDATION,
        analytic_sender_id: str = "analytic_sender",
    ):
        super().__init__()
        if secure_aggregation not in SECURE_AGGREGATIONS:
            raise ConfigError(f"SegmentationTrainer: secure_aggregation must be one of {SECURE_AGGREGATIONS}, got "
                              f"{secure_aggregation!r} (set it in the job's client config)")
        self.secure_aggregation = secure_aggregation
        self.csahe_sigma = csahe_sigma
        self.simulated_attack = _check_data_attack(simulated_attack)
        self.attacking = False
        if secure_aggregation == "csahe":
            from fedseg.algorithms.csahe import _check_sigma

            _check_sigma(csahe_sigma)  # a bad sigma stops the job at start, not in round 1
        self.dataset = dataset
        self.data_args = dict(data_args or {})
        self.model_name = model
        self.model_args = dict(model_args or {})
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.cfg = TrainConfig(
            lr=lr, weight_decay=weight_decay, batch_size=batch_size, local_epochs=local_epochs,
            max_steps_per_round=max_steps_per_round, aggregation=aggregation, augment=augment,
            reset_optimizer=reset_optimizer, device=device, seed=seed, **_perfedavg_fields(
                algorithm=algorithm, perfedavg_variant=perfedavg_variant, alpha=alpha, beta=beta,
                adaptation_steps=adaptation_steps),
        )
        self.num_threads = num_threads
        self.train_task_name = train_task_name
        self.validate_task_name = validate_task_name
        self.analytic_sender_id = analytic_sender_id
        self.trainer = None
        self.val_data = None
        self.held_out = None  # (part, data) of the final evaluation, loaded on first use
        self.data_origin = None
        self.writer = None
        self.site = None
        self.workspace_root = None
        self.ring = None
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
        workspace_root = self.workspace_root = engine.get_workspace().get_root_dir()
        t0 = time.perf_counter()
        train, source = load_site_data(self.dataset, self.site, "train", self.data_args, workspace_root)
        self.val_data, _ = load_site_data(self.dataset, self.site, "val", self.data_args, workspace_root)
        self.data_origin = "builtin" if source.root is None else "site-config"
        attack = self.simulated_attack
        if attack and self.site in attack["sites"]:  # a SIMULATED data-poisoning site (security experiments only)
            from fedseg.attacks.poisoning import MaskFlippedData

            train = MaskFlippedData(train)
            self.attacking = True
            self.log_warning(fl_ctx, f"SIMULATED ATTACK at {self.site}: {attack['attack']}, every training mask is "
                             "flipped (lesion <-> background); never deploy this setting")
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
        self.n_samples = len(train.delta)
        if self.secure_aggregation == "csahe":
            from fedseg.algorithms.ring import RingMember

            self.ring = RingMember(self.site, sigma=self.csahe_sigma)
        self.log_info(fl_ctx, f"site {self.site}: training on {self.trainer.device}, aggregation={self.cfg.aggregation}, "
                      f"algorithm={self.cfg.algorithm}, secure aggregation={self.secure_aggregation}")
        self.writer = engine.get_component(self.analytic_sender_id) if self.analytic_sender_id else None

    # ------------------------------------------------------------------ tasks
    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if self.trainer is None:
            self.log_error(fl_ctx, f"task {task_name} refused: {self.setup_error or 'the trainer was not set up'}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        if task_name in CSAHE_TASKS:
            return self._ring_task(CSAHE_TASKS[task_name], shareable, fl_ctx)
        try:
            dxo = from_shareable(shareable)
        except Exception as e:  # noqa: BLE001  (any malformed task data: refuse the task with a log line)
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

    def _round_start(self, global_state, current_round: int, fl_ctx: FLContext):
        """The state this round evaluates and trains from: the global model (a personalized executor merges in the
        site's own parameters)."""
        return global_state

    def _finish_round(self, result, out: DXO, current_round: int, fl_ctx: FLContext) -> None:
        """Hook before the result leaves the site (a personalized executor masks it and keeps its own model)."""

    def _train(self, dxo: DXO, current_round: int, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        try:
            start = self._round_start(dxo.data, current_round, fl_ctx)
        except FedsegError as e:
            self.log_error(fl_ctx, f"round {current_round}: site {self.site} cannot start the round: {e}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        val = public_metrics(self.trainer.evaluate(self.val_data, start))
        self.log_info(fl_ctx, f"round {current_round}: {self.start_model_label} on {self.site} validation: "
                      + ", ".join(f"{k}={val[k]:.4f}" if val[k] is not None else f"{k}=n/a" for k in METRIC_KEYS))
        self._stream({f"val_{k}": val[k] for k in METRIC_KEYS if val[k] is not None}, current_round, "")
        try:
            result = self.trainer.train_round(start, should_stop=lambda: abort_signal.triggered)
        except InterruptedError:
            return make_reply(ReturnCode.TASK_ABORTED)
        if self.attacking:
            self.log_warning(fl_ctx, f"SIMULATED ATTACK at {self.site}: {self.simulated_attack['attack']} "
                             f"(round {current_round}, trained on flipped masks)")
        m = result.metrics
        eta = f", mean eta {m['eta_mean']:.3f}" if "eta_mean" in m else ""
        self.log_info(fl_ctx, f"round {current_round}: {result.steps} local steps, loss {m.get('train_loss', float('nan')):.4f}"
                      f"{eta}, {m.get('train_seconds', float('nan')):.1f} s")
        self._stream(result.metrics, current_round, "")
        if self.ring is not None:
            return self._keep_update(result, val, current_round, fl_ctx)
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
        if self.attacking:
            out.set_meta_prop("simulated_attack", {"site": self.site, "attack": self.simulated_attack["attack"]})
        self._finish_round(result, out, current_round, fl_ctx)
        return out.to_shareable()

    def _keep_update(self, result, val: dict, current_round: int, fl_ctx: FLContext) -> Shareable:
        """CSAHE: the update stays here for this round's ring; the server gets metadata only."""
        from fedseg.algorithms.csahe import PackSpec

        try:
            digest = self.ring.set_update(current_round, result.update)
        except FedsegError as e:
            self.log_error(fl_ctx, f"round {current_round}: site {self.site} does not join the CSAHE ring: {e}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        spec = PackSpec.from_update(result.update)
        self.log_info(fl_ctx, f"round {current_round}: update of {spec.size} values kept at {self.site} for the "
                      f"CSAHE ring ({spec.n_ciphertexts} ciphertexts); sending metadata only")
        out = DXO(
            data_kind=DataKind.APP_DEFINED,
            data={"steps": int(result.steps), "n_samples": int(self.n_samples), "layout_digest": digest,
                  "n_values": int(spec.size), "round": int(current_round)},
            meta={
                MetaKey.NUM_STEPS_CURRENT_ROUND: result.steps,
                MetaKey.INITIAL_METRICS: val.get("dice"),
                "val_metrics": val,
                "train_metrics": result.metrics,
                "secure_aggregation": "csahe",
            },
        )
        return out.to_shareable()

    def _ring_task(self, kind: str, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        """One CSAHE ring step (start / hop / finish) for the server's ring controller."""
        if self.ring is None:
            self.log_error(fl_ctx, f"CSAHE {kind} refused: site {self.site} runs with secure_aggregation="
                           f"{self.secure_aggregation!r}; the job's client config must say 'csahe'")
            return make_reply(ReturnCode.TASK_UNKNOWN)
        try:
            dxo = from_shareable(shareable)
            payload = dict(dxo.data)
        except Exception as e:  # noqa: BLE001  (malformed task data: refuse with a log line)
            self.log_error(fl_ctx, f"CSAHE {kind} at {self.site}: unreadable task data: {e}")
            return make_reply(ReturnCode.BAD_TASK_DATA)
        try:
            reply = self.ring.handle(kind, payload)
        except FedsegError as e:
            self.log_error(fl_ctx, f"CSAHE {kind} refused at site {self.site}: {e}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        meta = {"csahe_kind": kind, "csahe_round": payload.get("round"), "csahe_attempt": payload.get("attempt")}
        note = f": {self.ring.last_hop_note}" if kind == "hop" and self.ring.last_hop_note else ""
        self.log_info(fl_ctx, f"CSAHE {kind} done at {self.site} (round {payload.get('round')}, "
                      f"attempt {payload.get('attempt')}){note}")
        if kind == "finish":
            return DXO(data_kind=DataKind.WEIGHT_DIFF, data=reply["aggregate"], meta=meta).to_shareable()
        return DXO(data_kind=DataKind.APP_DEFINED, data=reply, meta=meta).to_shareable()

    def _personalized_model(self, global_state, fl_ctx: FLContext):
        """The site's personalized model for the final evaluation, or None: here the final local adaptation
        (Per-FedAvg's gamma steps) when ``adaptation_steps`` > 0."""
        if int(getattr(self.cfg, "adaptation_steps", 0) or 0) > 0:
            return self.trainer.personalize(global_state)
        return None

    def _held_out(self, fl_ctx: FLContext):
        if self.held_out is None:
            part = held_out_part(self.dataset)
            if part == "val":
                self.held_out = ("val", self.val_data)
            else:
                data, _ = load_site_data(self.dataset, self.site, part, self.data_args, self.workspace_root)
                self.held_out = (part, data)
                self.log_info(fl_ctx, f"site {self.site}: final evaluation on its own {part} part "
                              f"({len(data.delta)} samples)")
        return self.held_out

    def _validate(self, dxo: DXO, fl_ctx: FLContext) -> Shareable:
        try:
            part, data = self._held_out(fl_ctx)
        except FedsegError as e:
            self.log_error(fl_ctx, f"final evaluation at site {self.site} cannot load its held-out data: {e}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        val = public_metrics(self.trainer.evaluate(data, dxo.data))
        val["part"] = part
        val["data_origin"] = self.data_origin
        personalized = self._personalized_model(dxo.data, fl_ctx)
        if personalized is not None:
            val[PERSONALIZED] = public_metrics(self.trainer.evaluate(data, personalized))
        self.log_info(fl_ctx, f"final evaluation on {self.site} ({part}): {val}")
        return DXO(data_kind=DataKind.METRICS, data=val).to_shareable()


def _check_data_attack(attack: dict | None) -> dict | None:
    """``{"attack": "mask_flip", "sites": [...]}`` or None; anything else stops the job at load with the reason."""
    if not attack:
        return None
    from fedseg.attacks.poisoning import DATA_ATTACKS

    if not isinstance(attack, dict) or attack.get("attack") not in DATA_ATTACKS or not attack.get("sites"):
        raise ConfigError(f"SegmentationTrainer: simulated_attack must be {{'attack': one of {DATA_ATTACKS}, "
                          f"'sites': [site names]}}, got {attack!r} (update attacks such as 'scale' are a "
                          "task-result filter, fedseg.flare.attack_filter)")
    return {"attack": attack["attack"], "sites": [str(s) for s in attack["sites"]]}


def _perfedavg_fields(**values) -> dict:
    """The Per-FedAvg / adaptation settings for TrainConfig; a clear error if this fedseg's TrainConfig lacks one
    that is set to a non-default value."""
    fields = getattr(TrainConfig, "__dataclass_fields__", {})
    out = {}
    for name, value in values.items():
        if name in fields:
            out[name] = value
        elif value != {"algorithm": "sgd", "perfedavg_variant": "fo", "alpha": 1e-3, "beta": 1e-4,
                       "adaptation_steps": 0}[name]:
            raise ConfigError(f"SegmentationTrainer: {name}={value!r} needs fedseg.training.TrainConfig.{name} "
                              "(Per-FedAvg support), which this fedseg version lacks; update fedseg at this site")
    return out
