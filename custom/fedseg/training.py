"""Local training and evaluation of a segmentation model on one site's data (no nvflare import).

The FLARE executor (:mod:`fedseg.flare.executor`) is a thin adapter around :class:`LocalTrainer`.
A dataset here is anything with the array attributes of :class:`fedseg.data.lits.LiTSSliceDataset`:
``images`` [N, S, S] or [N, C, S, S] (float16/float32, already normalised), ``masks`` [N, S, S] {0, 1}, ``delta`` [N]
(FedGS difficulty, computed once from the stored masks), ``small`` [N] and ``nonempty`` [N] (for DiceS / DiceL).
Optional hooks (CONTRACTS4): ``data.batch(idx) -> (x, y)`` float32 tensors, used instead of
:func:`image_batch` / :func:`mask_batch`; ``data.evaluate(model, device, batch_size) -> dict``, used by
:meth:`LocalTrainer.evaluate` instead of :func:`evaluate_model`. The loss of a batch is always
``model.training_loss(x, y)`` when the model has it, else ``loss_fn(model(x), y)``.

Two local algorithms (``TrainConfig.algorithm``):

``"sgd"`` (default): AdamW steps; the update is the FedGS cumulative ``-G`` (``aggregation="fedgs"``: eta from the
batch difficulty; ``"fedavg"``: eta = 1, i.e. ``w_T - w_0``).

``"perfedavg"`` (Per-FedAvg, Fallah et al. 2020, as PPPML-HMI uses it; :mod:`fedseg.algorithms.perfedavg`): plain
meta-steps ``w <- w - beta * grad F(w)`` with the first-order (``"fo"``) or Hessian-free (``"hf"``) estimate, no
optimizer state and no weight decay. Batches of a round: ``local_epochs`` (tau) epochs; an *epoch* is one fresh
random permutation of the site's n training samples, cut into consecutive groups of ``k * batch_size`` samples
(k = 2 for FO: D, D'; k = 3 for HF: D, D', D''); each group is one meta-step, its k consecutive chunks of
``batch_size`` are D, D' (, D''), so the batches of a step are disjoint and every sample is used at most once per
epoch. The last group of an epoch, with r < k * batch_size samples, is split into k consecutive near-equal chunks
(sizes differ by at most 1) when r >= k, and is left out of that epoch when r < k (at most k - 1 samples; they are
in other places of the next epoch's permutation). So an epoch has ``n // (k*b) + (1 if n % (k*b) >= k else 0)``
meta-steps; ``max_steps_per_round`` caps the meta-steps of a round. (Algorithm 1 of PPPML-HMI writes one meta-step
per "local epoch" t; that literal reading is ``max_steps_per_round = tau`` with enough ``local_epochs``.) Each batch
is augmented (independently) as in the AdamW path. The round's update has the same WEIGHT_DIFF convention: ``w_T - w_0`` for parameters (``-G`` with
eta = 1) and ``b_local - b_global`` for float buffers; ``RoundResult.steps`` is the number of meta-steps. Per-FedAvg
runs in float32 without autocast even when ``amp`` is on (the HF variant needs a double backward, and the meta-step
has no loss scaler). ``aggregation="fedgs"`` is refused with Per-FedAvg: neither paper defines eta weighting of
meta-steps.

Final local adaptation (:meth:`LocalTrainer.personalize`): gamma (``adaptation_steps``, 0 <= gamma < 5) plain SGD
steps of size alpha from the global model on fresh training batches, on a copy of the model.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from fedseg.algorithms.fedgs import FedGSAccumulator, model_update
from fedseg.algorithms.perfedavg import MAX_ADAPTATION_STEPS, local_adaptation, perfedavg_step
from fedseg.difficulty import batch_eta
from fedseg.errors import ConfigError
from fedseg.evaluation import evaluate_dataset, evaluate_model, image_batch, mask_batch, predict_masks  # noqa: F401  (re-exported)
from fedseg.losses import SoftDiceLoss

log = logging.getLogger(__name__)

AGGREGATIONS = ("fedgs", "fedavg")
ALGORITHMS = ("sgd", "perfedavg")
PERFEDAVG_VARIANTS = ("fo", "hf")


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU. ``cpu``, ``cuda``, ``cuda:N`` are honoured (error if unavailable)."""
    spec = (spec or "auto").lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} was requested but CUDA is not available on this host; use 'auto' or 'cpu'")
    return torch.device(spec)


@dataclass
class TrainConfig:
    """Local training settings of one round (the paper: AdamW lr 1e-4, batch 4, 5 local epochs)."""

    lr: float = 1e-4
    weight_decay: float = 0.01
    batch_size: int = 4
    local_epochs: int = 5
    max_steps_per_round: int | None = None  # cap for smoke tests; None = full epochs
    aggregation: str = "fedgs"  # "fedgs": eta from batch difficulty; "fedavg": eta = 1
    augment: bool = True
    reset_optimizer: bool = True  # fresh AdamW state every round (DESIGN.md section 2)
    eval_batch_size: int = 16
    device: str = "auto"
    amp: bool = True  # mixed precision on CUDA only (AdamW path; Per-FedAvg always runs in float32)
    seed: int = 0
    algorithm: str = "sgd"  # "sgd" (AdamW steps, FedGS/FedAvg) | "perfedavg"
    perfedavg_variant: str = "fo"  # "fo" (first-order) | "hf" (Hessian-free, exact Hessian-vector product)
    alpha: float = 1e-3  # Per-FedAvg inner step size (also the step size of the final adaptation)
    beta: float = 1e-4  # Per-FedAvg outer (meta) step size: the paper's local learning rate
    adaptation_steps: int = 0  # gamma (0 <= gamma < 5): final local adaptation steps at every site

    def __post_init__(self):
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        for name in ("batch_size", "local_epochs", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"algorithm must be one of {ALGORITHMS} ('sgd': AdamW steps for FedGS/FedAvg; "
                              f"'perfedavg': Per-FedAvg meta-steps), got {self.algorithm!r}")
        if self.perfedavg_variant not in PERFEDAVG_VARIANTS:
            raise ConfigError(f"perfedavg_variant must be 'fo' (first-order) or 'hf' (Hessian-free), "
                              f"got {self.perfedavg_variant!r}")
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ConfigError(f"{name} (Per-FedAvg step size) must be a finite number > 0, got {value!r}; "
                                  f"e.g. {name}={getattr(TrainConfig, name)}")
        gamma = self.adaptation_steps
        if isinstance(gamma, bool) or not isinstance(gamma, int) or not 0 <= gamma <= MAX_ADAPTATION_STEPS:
            raise ConfigError(f"adaptation_steps (gamma, the final local adaptation steps) must be an integer with "
                              f"0 <= gamma < {MAX_ADAPTATION_STEPS + 1} (PPPML-HMI), got {gamma!r}")
        if self.algorithm == "perfedavg" and self.aggregation == "fedgs":
            raise ConfigError("algorithm='perfedavg' cannot be combined with aggregation='fedgs': FedGS weights "
                              "AdamW steps by their batch difficulty (eta), and eta weighting of Per-FedAvg "
                              "meta-steps is defined by neither the FedGS nor the PPPML-HMI paper; "
                              "set aggregation='fedavg' for Per-FedAvg")


@dataclass
class RoundResult:
    update: dict[str, np.ndarray]  # WEIGHT_DIFF convention: -G for parameters, b_local - b_global for float buffers
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)


def _as_tensor(value, like: torch.Tensor) -> torch.Tensor:
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    return t.to(device=like.device, dtype=like.dtype)


def load_state(model: torch.nn.Module, state: Mapping[str, Any]) -> None:
    """Load a name->array mapping into ``model`` (every entry of the model must be present).

    An entry may also come as a flat vector with the right number of values (FLARE's HE decryption returns CKKS
    vectors flat); it is reshaped. Any other shape difference is an error naming the entry.

    Normalisation variances (``*.running_var``) are clamped at 0: a variance cannot be negative, but an aggregate of
    DP-noised (or CKKS-rounded) updates can push a small one below 0, and BatchNorm would then return NaN. The clamp is
    post-processing of what was released, so it costs no privacy."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise ConfigError(
            f"the global model lacks {len(missing)} entries of the local model (e.g. {missing[:3]}): "
            "server and site use different model configurations"
        )
    with torch.no_grad():
        for name, tensor in own.items():
            value = _as_tensor(state[name], tensor)
            if value.shape != tensor.shape and value.dim() == 1 and value.numel() == tensor.numel():
                value = value.reshape(tensor.shape)
            if value.shape != tensor.shape:
                raise ConfigError(f"global model entry {name!r} has shape {tuple(value.shape)}, "
                                  f"local {tuple(tensor.shape)}")
            if name.endswith("running_var") and value.is_floating_point():
                value = value.clamp_min(0.0)
            tensor.copy_(value)


class LocalTrainer:
    """Trains ``model`` on one site's training data and evaluates it; one object per site for the whole run."""

    def __init__(
        self,
        model: torch.nn.Module,
        train_data,
        cfg: TrainConfig,
        loss_fn: Callable | None = None,
        augment_fn: Callable | None = None,
    ):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.model = model.to(self.device)
        self.train_data = train_data
        self.loss_fn = loss_fn or SoftDiceLoss()
        if augment_fn is None and cfg.augment:
            from fedseg.data.transforms import augment_batch

            augment_fn = augment_batch
        self.augment_fn = augment_fn if cfg.augment else None
        self._rng = np.random.default_rng(cfg.seed)
        self._gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        # the final adaptation has its own streams, so personalize() never shifts train_round's batches
        self._adapt_rng = np.random.default_rng([cfg.seed, 1])
        self._adapt_gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 7_919_000_001)
        self._optimizer = None
        self._amp = bool(cfg.amp and self.device.type == "cuda")
        self._scaler = torch.amp.GradScaler("cuda") if self._amp else None

    # ------------------------------------------------------------------ batches
    def _batch(self, data, idx: np.ndarray):
        idx = np.sort(idx)  # sorted reads are faster on memory-mapped arrays
        if hasattr(data, "batch"):  # dataset hook (e.g. 2.5D COVID slices): float32 tensors
            x, y = data.batch(idx)
            return x, y, idx
        return image_batch(data, idx), mask_batch(data, idx), idx

    def _prepared(self, data, idx: np.ndarray, generator: torch.Generator):
        """(x, y) of rows ``idx``, augmented as in training (when on), on the device."""
        x, y, _ = self._batch(data, idx)
        if self.augment_fn is not None:
            x, y = self.augment_fn(x, y, generator=generator)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _batch_loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss of a batch: ``model.training_loss(x, y)`` if the model has one (SD-UTNet), else the loss_fn."""
        if hasattr(model, "training_loss"):
            return model.training_loss(x, y)
        return self.loss_fn(model(x), y)

    def _make_optimizer(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    # ------------------------------------------------------------------ training
    def train_round(self, global_state: Mapping[str, Any],
                    should_stop: Callable[[], bool] | None = None) -> RoundResult:
        """One round of local training from ``global_state``; ``should_stop()`` is polled every step (abort)."""
        if self.cfg.algorithm == "perfedavg":
            return self._train_round_perfedavg(global_state, should_stop)
        cfg = self.cfg
        global_state = self._start_round(global_state)
        if self._optimizer is None or cfg.reset_optimizer:
            self._optimizer = self._make_optimizer()
        opt = self._optimizer
        acc = FedGSAccumulator(self.model)
        n = len(self.train_data.delta)
        if n == 0:
            raise ConfigError("this site has no training samples")
        deltas = np.asarray(self.train_data.delta, dtype=np.float64)
        losses, t0 = [], time.perf_counter()

        def batches(order):
            return (order[start: start + cfg.batch_size] for start in range(0, n, cfg.batch_size))

        def step(idx):
            eta = batch_eta(deltas[idx]) if cfg.aggregation == "fedgs" else 1.0
            x, y, _ = self._batch(self.train_data, idx)
            if self.augment_fn is not None:
                x, y = self.augment_fn(x, y, generator=self._gen)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device_type=self.device.type, enabled=self._amp):
                loss = self._batch_loss(self.model, x, y)
            if self._scaler is not None:
                self._scaler.scale(loss).backward()
                with acc.step(eta):
                    self._scaler.step(opt)
                self._scaler.update()
            else:
                loss.backward()
                with acc.step(eta):
                    opt.step()
            losses.append(float(loss.detach()))

        self._run_epochs(n, batches, step, acc, should_stop)
        return self._round_result(acc, global_state, t0, n, {
            "train_loss": float(np.mean(losses)),
            "eta_mean": acc.mean_eta,
            "scaled_step_fraction": acc.scaled_steps / max(acc.steps, 1),
        })

    def _start_round(self, global_state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Load the global model, switch to train mode; returns a detached copy of the loaded state."""
        load_state(self.model, global_state)
        self.model.train()
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def _run_epochs(self, n: int, units: Callable[[np.ndarray], Any], step: Callable[[Any], None],
                    acc: FedGSAccumulator, should_stop: Callable[[], bool] | None) -> None:
        """``local_epochs`` passes over a fresh permutation of the ``n`` samples: ``units(order)`` cuts it into
        optimisation steps, ``step(unit)`` takes one; stops at ``max_steps_per_round`` or on abort."""
        cap = self.cfg.max_steps_per_round
        for _epoch in range(self.cfg.local_epochs):
            order = self._rng.permutation(n)
            for unit in units(order):
                step(unit)
                if should_stop is not None and should_stop():
                    raise InterruptedError("local training was aborted")
                if cap and acc.steps >= cap:
                    return

    def _round_result(self, acc: FedGSAccumulator, global_state: Mapping[str, torch.Tensor], t0: float, n: int,
                      metrics: dict[str, float]) -> RoundResult:
        update = model_update(self.model, acc.result(), global_state)
        metrics = {**metrics, "train_seconds": time.perf_counter() - t0, "n_samples": n}
        return RoundResult(update=update, steps=acc.steps, metrics=metrics)

    # ------------------------------------------------------------------ Per-FedAvg
    def _loss_module(self, model: torch.nn.Module) -> _BatchLoss:
        return _BatchLoss(model, self._batch_loss)

    def loss_view(self, model: torch.nn.Module | None = None) -> tuple[torch.nn.Module, Callable]:
        """``(module, loss_fn)`` for code that takes a model and a loss (ResFIM's Fisher): ``loss_fn(module(x), y)`` is
        this trainer's batch loss of ``model`` (default: the trainer's) on ``(x, y)``, ``training_loss`` included.
        The module's parameters are ``model``'s, named ``"net." + name``."""
        return self._loss_module(self.model if model is None else model), _pending_loss

    @staticmethod
    def meta_step_groups(order: np.ndarray, batch_size: int, k: int) -> list:
        """The meta-steps of one epoch: lists of k disjoint consecutive index chunks of ``order`` (module doc)."""
        group = k * batch_size
        steps = [[order[s + j * batch_size: s + (j + 1) * batch_size] for j in range(k)]
                 for s in range(0, len(order) - group + 1, group)]
        rest = order[len(steps) * group:]
        if len(rest) >= k:
            steps.append(np.array_split(rest, k))
        return steps

    def _train_round_perfedavg(self, global_state: Mapping[str, Any],
                               should_stop: Callable[[], bool] | None = None) -> RoundResult:
        cfg = self.cfg
        k = 3 if cfg.perfedavg_variant == "hf" else 2
        n = len(self.train_data.delta)
        if n < k:
            raise ConfigError(f"Per-FedAvg ({cfg.perfedavg_variant}) needs {k} disjoint batches per meta-step, but "
                              f"this site has {n} training sample(s); use a site with at least {k} samples")
        global_state = self._start_round(global_state)
        net = self._loss_module(self.model)
        acc = FedGSAccumulator(self.model)  # eta = 1 on every step: result() is w_0 - w_T
        losses, meta_losses, t0 = [], [], time.perf_counter()

        def step(chunks):
            batches = [self._prepared(self.train_data, idx, self._gen) for idx in chunks]
            with acc.step(1.0):
                out = perfedavg_step(net, _pending_loss, batches[0], batches[1], cfg.alpha, cfg.beta,
                                     variant=cfg.perfedavg_variant, batch_d2=batches[2] if k == 3 else None)
            losses.append(out["loss"])
            meta_losses.append(out["meta_loss"])

        self._run_epochs(n, lambda order: self.meta_step_groups(order, cfg.batch_size, k), step, acc, should_stop)
        return self._round_result(acc, global_state, t0, n, {
            "train_loss": float(np.mean(losses)),  # f(w; D) before each meta-step
            "meta_loss": float(np.mean(meta_losses)),  # f(w_tmp; D')
            "eta_mean": 1.0,  # the update is -G with eta = 1 (no FedGS scaling)
            "scaled_step_fraction": 0.0,
        })

    # ------------------------------------------------------------------ final local adaptation
    def _adaptation_batches(self, steps: int) -> list:
        """``steps`` fresh training batches of ``batch_size`` (consecutive chunks of permutations; own RNG)."""
        n = len(self.train_data.delta)
        if n == 0:
            raise ConfigError("this site has no training samples to adapt the model on")
        b = min(self.cfg.batch_size, n)
        out, order = [], np.zeros(0, dtype=np.int64)
        while len(out) < steps:
            if len(order) < b:
                order = self._adapt_rng.permutation(n)
            idx, order = order[:b], order[b:]
            out.append(self._prepared(self.train_data, idx, self._adapt_gen))
        return out

    def personalize(self, global_state: Mapping[str, Any], steps: int | None = None) -> dict[str, np.ndarray]:
        """Final local adaptation: gamma plain SGD steps ``w <- w - alpha * grad f(w; B_t)`` from ``global_state``.

        gamma is ``steps`` when given, else ``cfg.adaptation_steps`` (0 <= gamma < 5). Each step uses a fresh
        training batch of ``batch_size`` (augmented as in training; drawn from the trainer's own adaptation random
        stream, not the training one), on a copy of the model in train mode, in float32. The trainer's model and
        what ``train_round`` starts from are unchanged. Returns the personalized ``state_dict`` (every key) as
        numpy arrays (float entries float, integer buffers keep their integer dtype).
        """
        gamma = self.cfg.adaptation_steps if steps is None else steps
        if isinstance(gamma, bool) or not isinstance(gamma, int) or not 0 <= gamma <= MAX_ADAPTATION_STEPS:
            raise ConfigError(f"personalize: gamma (adaptation steps) must be an integer with "
                              f"0 <= gamma < {MAX_ADAPTATION_STEPS + 1} (PPPML-HMI), got {gamma!r}")
        model = copy.deepcopy(self.model)
        load_state(model, global_state)
        model.train()
        batches = self._adaptation_batches(gamma)
        local_adaptation(self._loss_module(model), _pending_loss, batches, self.cfg.alpha, gamma)
        return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, data, state: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Dice / DiceS / DiceL of ``state`` (or the current model) on ``data`` (``data.evaluate`` when present)."""
        if state is not None:
            load_state(self.model, state)
        self.model.eval()
        return evaluate_dataset(self.model, data, self.device, self.cfg.eval_batch_size)


class _BatchLoss(torch.nn.Module):
    """Adapter for :mod:`fedseg.algorithms.perfedavg`, whose batch loss is ``loss_fn(model(x), y)``: ``forward``
    defers the computation (returns ``x`` wrapped) and :func:`_pending_loss` then evaluates the trainer's batch-loss
    rule ``loss(net, x, y)``, so ``net.training_loss`` is honoured. Its parameters are exactly ``net``'s, in the same
    order, so the meta-step updates ``net`` in place."""

    def __init__(self, net: torch.nn.Module, loss: Callable):
        super().__init__()
        self.net = net
        self._loss = loss

    def forward(self, x):
        return _Pending(self, x)


class _Pending:
    __slots__ = ("owner", "x")

    def __init__(self, owner: _BatchLoss, x: torch.Tensor):
        self.owner, self.x = owner, x


def _pending_loss(pending: _Pending, y: torch.Tensor) -> torch.Tensor:
    return pending.owner._loss(pending.owner.net, pending.x, y)


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    return asdict(cfg)
