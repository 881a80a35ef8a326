"""Per-FedAvg (Fallah, Mokhtari, Ozdaglar 2020; paper 001, PPPML-HMI): local meta-steps and final adaptation.

Pure code: torch only, no nvflare import.

One local meta-step (DESIGN.md section 3) with three independent batches D, D', D'' and ``f(w; B)`` the mean loss of
the model with parameters ``w`` on batch ``B``:

    w_tmp = w - alpha * grad f(w; D)
    FO:  w <- w - beta * grad f(w_tmp; D')
    HF:  w <- w - beta * (I - alpha * H(w; D'')) grad f(w_tmp; D')

``H(w; D'') v`` is an exact Hessian-vector product computed by autograd (double backward) *at w*, not at ``w_tmp``
and not by finite differences. The HF update therefore differs from the FO update by exactly
``beta * alpha * H(w; D'') grad f(w_tmp; D')``.

After the last round each site personalizes the meta-model with ``gamma < 5`` plain SGD steps of step size alpha
(:func:`local_adaptation`).

Parameters and buffers. Only trainable floating-point parameters (``requires_grad=True``) take part; frozen
parameters are never touched. A parameter the loss does not depend on gets a zero gradient (and a zero HVP entry).
The model is used in whatever mode the caller set: in train mode every forward pass (on D, D' and, for HF, D'')
updates BatchNorm running statistics exactly as ordinary training would; the meta-step never saves or restores
buffers. Call ``model.eval()`` first if buffers must stay fixed.

A batch is a pair ``(x, y)``; the loss is ``loss_fn(model(x), y)`` and must be a scalar.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch

from fedseg.errors import ConfigError, DataError

__all__ = [
    "MAX_ADAPTATION_STEPS",
    "VARIANTS",
    "hessian_vector_product",
    "local_adaptation",
    "perfedavg_step",
]

VARIANTS = ("fo", "hf")
MAX_ADAPTATION_STEPS = 4  # gamma < 5 (PPPML-HMI)

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_step_size(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"Per-FedAvg: {name} must be a positive number, got {value!r}; set e.g. {name}=0.01")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ConfigError(f"Per-FedAvg: {name} must be a finite number > 0, got {value!r}; set e.g. {name}=0.01")
    return value


def _check_variant(variant) -> str:
    if not isinstance(variant, str) or variant.lower() not in VARIANTS:
        raise ConfigError(
            f"Per-FedAvg: unknown variant {variant!r}; use 'fo' (first-order) or 'hf' (Hessian-free, exact HVP)"
        )
    return variant.lower()


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad and p.is_floating_point()]
    if not params:
        raise ConfigError("Per-FedAvg: the model has no trainable floating-point parameters; unfreeze some")
    return params


def _unpack(batch, name: str) -> Batch:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise DataError(f"Per-FedAvg: {name} must be a pair (x, y), got {type(batch).__name__}")
    return batch[0], batch[1]


def _loss(model: torch.nn.Module, loss_fn: LossFn, batch, name: str) -> torch.Tensor:
    x, y = _unpack(batch, name)
    loss = loss_fn(model(x), y)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ConfigError(f"Per-FedAvg: loss_fn must return a scalar tensor, got {type(loss).__name__} "
                          f"of shape {tuple(getattr(loss, 'shape', ()))} on {name}; reduce it with mean()")
    return loss.reshape(())


def _grad(loss: torch.Tensor, params: Sequence[torch.Tensor], create_graph: bool = False) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def hessian_vector_product(
    model: torch.nn.Module, loss_fn: LossFn, batch, vector: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """``H(w; batch) v`` at the model's current parameters ``w``, by double backward (exact, no finite differences).

    ``vector`` is a list of tensors shaped like the trainable parameters (in ``model.parameters()`` order).
    Returns a list of detached tensors of the same shapes. The model's parameters are not changed.
    """
    params = _trainable(model)
    vector = list(vector)
    if len(vector) != len(params):
        raise ConfigError(f"hessian_vector_product: vector has {len(vector)} tensors, the model has "
                          f"{len(params)} trainable parameters; pass one tensor per parameter")
    for i, (p, v) in enumerate(zip(params, vector)):
        if tuple(v.shape) != tuple(p.shape):
            raise ConfigError(f"hessian_vector_product: vector[{i}] has shape {tuple(v.shape)}, "
                              f"parameter {i} has shape {tuple(p.shape)}")
    vector = [v.detach().to(device=p.device, dtype=p.dtype) for p, v in zip(params, vector)]
    loss = _loss(model, loss_fn, batch, "batch")
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    # parameters the loss does not touch have zero gradient, hence zero Hessian rows
    pairs = [(g, v, i) for i, (g, v) in enumerate(zip(grads, vector)) if g is not None and g.requires_grad]
    out = [torch.zeros_like(p) for p in params]
    if pairs:
        hv = torch.autograd.grad(
            [g for g, _, _ in pairs], params, grad_outputs=[v for _, v, _ in pairs], allow_unused=True
        )
        out = [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(params, hv)]
    return out


def perfedavg_step(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batch_d,
    batch_d1,
    alpha: float,
    beta: float,
    variant: str = "fo",
    batch_d2=None,
) -> dict[str, float]:
    """One Per-FedAvg local meta-step; updates the model's trainable parameters in place.

    ``batch_d`` is D (inner step at w), ``batch_d1`` is D' (outer gradient at w_tmp), ``batch_d2`` is D''
    (Hessian-vector product at w; required for ``variant="hf"``, ignored for ``"fo"``).

    Returns ``{"loss": f(w; D), "meta_loss": f(w_tmp; D'), "variant": variant}`` as Python floats/str,
    with w the parameters before the step.
    """
    alpha = _check_step_size("alpha", alpha)
    beta = _check_step_size("beta", beta)
    variant = _check_variant(variant)
    if variant == "hf" and batch_d2 is None:
        raise ConfigError("Per-FedAvg HF needs a third independent batch D'' for the Hessian-vector product; "
                          "pass batch_d2=(x, y)")
    params = _trainable(model)

    with torch.no_grad():
        w = [p.detach().clone() for p in params]

    # inner step: w_tmp = w - alpha * grad f(w; D)
    loss_d = _loss(model, loss_fn, batch_d, "batch_d (D)")
    g_inner = _grad(loss_d, params)
    with torch.no_grad():
        for p, g in zip(params, g_inner):
            p.sub_(g, alpha=alpha)

    # outer gradient at w_tmp on D'; always restore w afterwards, even if the loss fails
    try:
        loss_d1 = _loss(model, loss_fn, batch_d1, "batch_d1 (D')")
        g_outer = _grad(loss_d1, params)
    finally:
        with torch.no_grad():
            for p, w0 in zip(params, w):
                p.copy_(w0)

    if variant == "hf":
        # (I - alpha * H(w; D'')) g_outer, with the HVP at w (parameters restored above)
        hv = hessian_vector_product(model, loss_fn, batch_d2, g_outer)
        direction = [g - alpha * h for g, h in zip(g_outer, hv)]
    else:
        direction = g_outer

    with torch.no_grad():
        for p, d in zip(params, direction):
            p.sub_(d, alpha=beta)

    return {"loss": float(loss_d.detach()), "meta_loss": float(loss_d1.detach()), "variant": variant}


def local_adaptation(
    model: torch.nn.Module, loss_fn: LossFn, batches: Iterable, alpha: float, steps: int
) -> torch.nn.Module:
    """Final personalization: ``steps`` (gamma, 0 <= gamma < 5) plain SGD steps ``w <- w - alpha * grad f(w; B_t)``.

    ``batches`` is an iterable of (x, y) pairs; step t uses the next batch, restarting the iterable (e.g. a
    DataLoader) when it runs out. Updates and returns ``model`` (same object).
    """
    alpha = _check_step_size("alpha", alpha)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= MAX_ADAPTATION_STEPS:
        raise ConfigError(f"Per-FedAvg local adaptation: gamma (steps) must be an integer with 0 <= gamma < 5 "
                          f"(PPPML-HMI), got {steps!r}; set e.g. steps=3")
    if steps == 0:
        return model
    params = _trainable(model)
    iterator = iter(batches)
    for t in range(steps):
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(batches)
            try:
                batch = next(iterator)
            except StopIteration:
                raise DataError(f"Per-FedAvg local adaptation: the batches ran out after {t} of {steps} steps "
                                f"and cannot be restarted; pass a list or a DataLoader with at least one batch")
        loss = _loss(model, loss_fn, batch, f"adaptation batch {t}")
        grads = _grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(g, alpha=alpha)
    return model
