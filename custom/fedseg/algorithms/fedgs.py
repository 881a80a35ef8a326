"""FedGS (Federated Gradient Scaling, paper 000): client accumulator and server aggregation math.

Pure code: torch and numpy only, no nvflare import.

Client side (DESIGN.md section 2). For each optimizer step t the real parameter change is
``Delta_t = w_{t-1} - w_t`` (so any optimizer works) and the cumulative update is

    G = sum_t eta_t * Delta_t

``eta_t`` scales only G, never the local step. We compute it without touching every parameter on every step:

    G = sum_t Delta_t + sum_t (eta_t - 1) * Delta_t = (w_0 - w_T) + sum_{t: eta_t != 1} (eta_t - 1) * Delta_t

so a step whose batch holds no small lesion (eta_t == 1, the common case, and every step of FedAvg) costs nothing;
only steps with eta_t != 1 snapshot the parameters before the step and add ``(eta_t - 1) * Delta_t`` after it.
With eta = 1 everywhere, G is exactly the plain parameter change ``w_0 - w_T`` (the FedAvg update).

Server side. ``G_A = sum_k steps_k / steps_total * G_k`` and ``w <- w - G_A``. Float buffers (BatchNorm running
statistics) are averaged with the same weights, as deltas ``b_k - b_global``; integer buffers (``num_batches_tracked``,
relative-position index tables) are never averaged: they are not part of an update at all.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, Mapping, MutableMapping, Sequence, Tuple

import numpy as np
import torch

from fedseg.errors import UpdateRejected

__all__ = [
    "FedGSAccumulator",
    "model_update",
    "split_state",
    "WeightedUpdateAccumulator",
    "aggregate_updates",
    "check_update",
]


def split_state(model: torch.nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Split ``model.state_dict()`` into (trainable float parameters, float buffers, other entries).

    "Other" holds integer/bool buffers and frozen parameters: they are never part of an update.
    """
    state = model.state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    params, float_buffers, other = {}, {}, {}
    for name, value in state.items():
        if name in trainable and value.is_floating_point():
            params[name] = value
        elif value.is_floating_point():
            float_buffers[name] = value
        else:
            other[name] = value
    return params, float_buffers, other


class FedGSAccumulator:
    """Accumulates ``G = sum_t eta_t * (w_{t-1} - w_t)`` over the trainable float parameters of ``model``.

    Usage::

        acc = FedGSAccumulator(model)         # snapshots w_0
        for batch in loader:
            loss.backward()
            with acc.step(eta):               # eta from the batch's difficulty (1.0 for FedAvg)
                optimizer.step()
        G = acc.result()                      # name -> tensor, on the parameters' device
    """

    def __init__(self, model: torch.nn.Module):
        self._names = [n for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()]
        # detached views share storage with the parameters, so they follow every in-place optimizer update
        self._params = [p.detach() for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()]
        with torch.no_grad():
            self._start = [p.clone() for p in self._params]
        self._extra = None  # sum of (eta_t - 1) * Delta_t, allocated on the first step with eta != 1
        self._before = None
        self.steps = 0
        self.eta_sum = 0.0
        self.scaled_steps = 0

    @contextmanager
    def step(self, eta: float) -> Iterator[None]:
        """Wrap one optimizer step; ``eta`` is the FedGS factor of this step's batch (>= 1)."""
        eta = float(eta)
        if not math.isfinite(eta) or eta < 1.0:
            raise ValueError(f"eta must be a finite number >= 1, got {eta}")
        scaled = eta != 1.0
        if scaled:
            with torch.no_grad():
                if self._before is None:
                    self._before = [p.clone() for p in self._params]
                    self._extra = [torch.zeros_like(p) for p in self._params]
                else:
                    torch._foreach_copy_(self._before, self._params)
        yield
        if scaled:
            with torch.no_grad():
                # extra += (eta - 1) * (w_before - w_after), in place: three passes, no allocation.
                # (w_before - w_after is exact in floating point for nearby values, so G keeps full precision.)
                torch._foreach_sub_(self._before, self._params)
                torch._foreach_add_(self._extra, self._before, alpha=eta - 1.0)
            self.scaled_steps += 1
        self.steps += 1
        self.eta_sum += eta

    def result(self) -> Dict[str, torch.Tensor]:
        """G for every trainable float parameter (name -> tensor)."""
        with torch.no_grad():
            total = torch._foreach_sub(self._start, self._params)
            if self._extra is not None:
                torch._foreach_add_(total, self._extra)
        return dict(zip(self._names, total))

    @property
    def mean_eta(self) -> float:
        return self.eta_sum / self.steps if self.steps else 1.0


def model_update(
    model: torch.nn.Module, cumulative: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor]
) -> Dict[str, np.ndarray]:
    """The update a client sends, in FLARE's WEIGHT_DIFF convention (``new = old + diff``).

    Parameters: ``-G`` (so the server's ``w + mean(diff)`` is ``w - G_A``). Float buffers: ``b_local - b_global``
    (plain averaging). Integer buffers: absent, never averaged.
    """
    _, float_buffers, _ = split_state(model)
    out: Dict[str, np.ndarray] = {}
    for name, g in cumulative.items():
        out[name] = (-g).detach().cpu().numpy().astype(np.float32, copy=False)
    for name, b in float_buffers.items():
        ref = torch.as_tensor(global_state[name]).to(b.device, b.dtype)
        out[name] = (b - ref).detach().cpu().numpy().astype(np.float32, copy=False)
    return out


def check_update(
    update: Mapping[str, np.ndarray],
    reference: Mapping[str, Tuple[int, ...]],
    site: str,
    integer_keys: Iterable[str] = (),
) -> None:
    """Raise :class:`UpdateRejected` when a site's update cannot be aggregated.

    ``reference`` maps every float entry of the global model to its shape. An update must hold exactly those
    keys (integer entries are never part of an update), with those shapes, and only finite values.
    """
    integer_keys = set(integer_keys)
    if not isinstance(update, Mapping) or not update:
        raise UpdateRejected(f"site {site!r}: the update is empty or not a name->array mapping")
    bad_int = sorted(set(update) & integer_keys)
    if bad_int:
        raise UpdateRejected(
            f"site {site!r}: the update holds integer entries {bad_int[:5]}, which are never averaged; "
            "the site runs an incompatible fedseg version"
        )
    missing = sorted(set(reference) - set(update))
    unknown = sorted(set(update) - set(reference))
    if missing or unknown:
        raise UpdateRejected(
            f"site {site!r}: the update does not match the global model (missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unknown {unknown[:5]}{'...' if len(unknown) > 5 else ''}); "
            "the site probably runs a different model configuration"
        )
    for name, shape in reference.items():
        arr = np.asarray(update[name])
        if tuple(arr.shape) != tuple(shape):
            raise UpdateRejected(
                f"site {site!r}: entry {name!r} has shape {tuple(arr.shape)}, the global model has {tuple(shape)}"
            )
        if not np.issubdtype(arr.dtype, np.floating):
            raise UpdateRejected(f"site {site!r}: entry {name!r} has dtype {arr.dtype}, expected a float type")
        if not np.isfinite(arr).all():
            n_bad = int(arr.size - np.isfinite(arr).sum())
            raise UpdateRejected(f"site {site!r}: entry {name!r} holds {n_bad} NaN/Inf values")


class WeightedUpdateAccumulator:
    """In-time weighted mean of updates: ``sum_k w_k * U_k / sum_k w_k`` without keeping every update in memory."""

    def __init__(self):
        self._sum: MutableMapping[str, np.ndarray] = {}
        self._total = 0.0
        self.contributors: list = []

    def add(self, update: Mapping[str, np.ndarray], weight: float, contributor: str = "") -> None:
        weight = float(weight)
        if not math.isfinite(weight) or weight <= 0:
            raise UpdateRejected(f"site {contributor!r}: aggregation weight must be > 0, got {weight}")
        if self._sum and set(update) != set(self._sum):
            raise UpdateRejected(f"site {contributor!r}: update keys differ from the other sites' updates")
        for name, value in update.items():
            value = np.asarray(value, dtype=np.float64)
            if name in self._sum:
                self._sum[name] += weight * value
            else:
                self._sum[name] = weight * value
        self._total += weight
        self.contributors.append(contributor)

    def __len__(self) -> int:
        return len(self.contributors)

    @property
    def total_weight(self) -> float:
        return self._total

    def result(self, dtype=np.float32) -> Dict[str, np.ndarray]:
        if not self.contributors:
            raise ValueError("no update was added")
        return {k: (v / self._total).astype(dtype) for k, v in self._sum.items()}


def aggregate_updates(updates: Sequence[Mapping[str, np.ndarray]], steps: Sequence[float]) -> Dict[str, np.ndarray]:
    """FedGS server aggregation: ``G_A = sum_k steps_k / steps_total * G_k`` (equation 1 of the paper)."""
    if len(updates) != len(steps):
        raise ValueError("one step count per update is needed")
    acc = WeightedUpdateAccumulator()
    for i, (u, s) in enumerate(zip(updates, steps)):
        acc.add(u, s, contributor=str(i))
    return acc.result()
