"""Local training and evaluation of a segmentation model on one site's data (no nvflare import).

The FLARE executor (:mod:`fedseg.flare.executor`) is a thin adapter around :class:`LocalTrainer`.
A dataset here is anything with the array attributes of :class:`fedseg.data.lits.LiTSSliceDataset`:
``images`` [N, S, S] (float16/float32, already normalised), ``masks`` [N, S, S] {0, 1}, ``delta`` [N] (FedGS
difficulty, computed once from the stored masks), ``small`` [N] and ``nonempty`` [N] (for DiceS / DiceL).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np
import torch

from fedseg.algorithms.fedgs import FedGSAccumulator, model_update
from fedseg.difficulty import batch_eta
from fedseg.errors import ConfigError
from fedseg.evaluation import evaluate_model, image_batch, mask_batch, predict_masks  # noqa: F401  (re-exported)
from fedseg.losses import SoftDiceLoss

log = logging.getLogger(__name__)

AGGREGATIONS = ("fedgs", "fedavg")


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
    max_steps_per_round: Optional[int] = None  # cap for smoke tests; None = full epochs
    aggregation: str = "fedgs"  # "fedgs": eta from batch difficulty; "fedavg": eta = 1
    augment: bool = True
    reset_optimizer: bool = True  # fresh AdamW state every round (DESIGN.md section 2)
    eval_batch_size: int = 16
    device: str = "auto"
    amp: bool = True  # mixed precision on CUDA only
    seed: int = 0

    def __post_init__(self):
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        for name in ("batch_size", "local_epochs", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be > 0, got {self.lr}")


@dataclass
class RoundResult:
    update: Dict[str, np.ndarray]  # WEIGHT_DIFF convention: -G for parameters, b_local - b_global for float buffers
    steps: int
    metrics: Dict[str, float] = field(default_factory=dict)


def _as_tensor(value, like: torch.Tensor) -> torch.Tensor:
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    return t.to(device=like.device, dtype=like.dtype)


def load_state(model: torch.nn.Module, state: Mapping[str, Any]) -> None:
    """Load a name->array mapping into ``model`` (every entry of the model must be present)."""
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
            if value.shape != tensor.shape:
                raise ConfigError(f"global model entry {name!r} has shape {tuple(value.shape)}, local {tuple(tensor.shape)}")
            tensor.copy_(value)


class LocalTrainer:
    """Trains ``model`` on one site's training data and evaluates it; one object per site for the whole run."""

    def __init__(
        self,
        model: torch.nn.Module,
        train_data,
        cfg: TrainConfig,
        loss_fn: Optional[Callable] = None,
        augment_fn: Optional[Callable] = None,
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
        self._optimizer = None
        self._amp = bool(cfg.amp and self.device.type == "cuda")
        self._scaler = torch.amp.GradScaler("cuda") if self._amp else None

    # ------------------------------------------------------------------ batches
    def _batch(self, data, idx: np.ndarray):
        idx = np.sort(idx)  # sorted reads are faster on memory-mapped arrays
        return image_batch(data, idx), mask_batch(data, idx), idx

    def _make_optimizer(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    # ------------------------------------------------------------------ training
    def train_round(self, global_state: Mapping[str, Any], should_stop: Optional[Callable[[], bool]] = None) -> RoundResult:
        """One round of local training from ``global_state``; ``should_stop()`` is polled every step (abort)."""
        cfg = self.cfg
        load_state(self.model, global_state)
        global_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if self._optimizer is None or cfg.reset_optimizer:
            self._optimizer = self._make_optimizer()
        opt = self._optimizer
        self.model.train()
        acc = FedGSAccumulator(self.model)
        n = len(self.train_data.delta)
        if n == 0:
            raise ConfigError("this site has no training samples")
        deltas = np.asarray(self.train_data.delta, dtype=np.float64)
        losses, t0 = [], time.perf_counter()
        done = False
        for _epoch in range(cfg.local_epochs):
            order = self._rng.permutation(n)
            for start in range(0, n, cfg.batch_size):
                idx = order[start : start + cfg.batch_size]
                eta = batch_eta(deltas[idx]) if cfg.aggregation == "fedgs" else 1.0
                x, y, _ = self._batch(self.train_data, idx)
                if self.augment_fn is not None:
                    x, y = self.augment_fn(x, y, generator=self._gen)
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                opt.zero_grad(set_to_none=True)
                with torch.autocast(device_type=self.device.type, enabled=self._amp):
                    if hasattr(self.model, "training_loss"):  # models with their own composite loss (SD-UTNet)
                        loss = self.model.training_loss(x, y)
                    else:
                        loss = self.loss_fn(self.model(x), y)
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
                if should_stop is not None and should_stop():
                    raise InterruptedError("local training was aborted")
                if cfg.max_steps_per_round and acc.steps >= cfg.max_steps_per_round:
                    done = True
                    break
            if done:
                break
        update = model_update(self.model, acc.result(), global_state)
        metrics = {
            "train_loss": float(np.mean(losses)),
            "eta_mean": acc.mean_eta,
            "scaled_step_fraction": acc.scaled_steps / max(acc.steps, 1),
            "train_seconds": time.perf_counter() - t0,
        }
        return RoundResult(update=update, steps=acc.steps, metrics=metrics)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, data, state: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """Dice / DiceS / DiceL of ``state`` (or the current model) on ``data``."""
        if state is not None:
            load_state(self.model, state)
        return evaluate_model(self.model, data, self.device, self.cfg.eval_batch_size)


def config_dict(cfg: TrainConfig) -> Dict[str, Any]:
    return asdict(cfg)
