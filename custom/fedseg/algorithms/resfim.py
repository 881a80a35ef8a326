"""Residual Fisher information (pFL-ResFIM, paper 004; DESIGN.md section 5): masks, masked aggregation, personalization.

Pure code: torch and numpy only, no nvflare import.

Paper 004 publishes only its abstract: ResFIM "quantif[ies] the sensitivity of model parameters to domain
discrepancies", is estimated with spectrally style-transferred data (``fedseg.algorithms.spectral``), splits the
parameters into domain-sensitive and domain-invariant ones, and "a personalized model for each client is then
constructed by aggregating only the domain-invariant parameters on the server". Everything else below is *our*
choice, written down so the documentation can quote it.

1. Diagonal empirical Fisher (:func:`diagonal_fisher`)
------------------------------------------------------
For every trainable floating-point parameter ``theta_j`` (``requires_grad=True``; frozen parameters and buffers are
left out) and batches ``B_1 .. B_N`` of pairs ``(x, y)``::

    per batch (default):   F_j = (1/N) sum_n ( d L(B_n) / d theta_j )^2,   L(B) = loss_fn(model(x), y)  (a scalar)
    per sample:            F_j = (1/M) sum_m ( d L({s_m}) / d theta_j )^2  over all M samples s_m of all batches

"Empirical": the labels are the data's labels, not labels sampled from the model. Default is *per batch* (one
backward pass per batch, the usual EWC-style estimate; each batch counts once whatever its size); ``per_sample=True``
splits every batch along dim 0 into single samples (``x[i:i+1], y[i:i+1]``), the textbook empirical Fisher, at one
backward pass per sample. With batches of one sample both are identical. A parameter the loss does not reach gets 0.

Model mode: by default (``eval_mode=True``) the model is switched to ``eval()`` for the estimate and every module's
``training`` flag is restored afterwards, so BatchNorm uses (and does not update) its running statistics and dropout
is off: the Fisher is measured for the deployed, deterministic network and the model's state is not changed at all
(gradients are taken with ``torch.autograd.grad``; ``.grad`` fields are not touched). ``eval_mode=False`` uses the
caller's mode as is. A NaN/Inf loss or gradient is a :class:`~fedseg.errors.DataError` naming the batch.

2. Residual (:func:`residual_fisher`)
-------------------------------------
``F_real`` is the Fisher on the site's real data, ``F_styled`` the Fisher on style-transferred copies of the *same*
data (other sites' styles; e.g. one copy per other site, all in one ``diagonal_fisher`` call so ``F_styled`` is their
mean). The residual is the parameter's domain sensitivity: how much the loss curvature along that parameter changes
when only the image style (low-frequency amplitude) changes::

    mode="abs"       R_j = |F_real_j - F_styled_j|
    mode="relative"  R_j = |F_real_j - F_styled_j| / (F_real_j + F_styled_j + eps)      in [0, 1), eps = 1e-12

"abs" favours parameters with large Fisher (large gradients); "relative" is scale-free, comparable across layers
(0 when the parameter's Fisher is the same under both styles, close to 1 when one of them vanishes). Inputs are
name -> tensor/array mappings with identical names and shapes; negative or NaN/Inf Fisher values are a
:class:`~fedseg.errors.DataError`. Results are float64 numpy arrays.

3. Sensitive mask (:func:`sensitive_mask`)
------------------------------------------
``True`` = domain-sensitive = stays local; ``False`` = domain-invariant = aggregated. Exactly one of:

* ``fraction`` in ``[0, 1]``: the top ``k = floor(fraction * N)`` units (1e-9 slack against decimal rounding) by
  residual, ranked *globally across tensors* (so layers compete; no per-layer quota). ``floor`` means at most the
  requested share stays local.
* ``threshold`` (finite): a unit is sensitive iff its residual is ``> threshold`` (strict).

Units (``granularity``): ``"element"`` -- every scalar parameter, ``N`` = total parameter count; ``"tensor"`` -- a
whole tensor, scored by the *mean* residual of its elements, ``N`` = number of tensors (``fraction`` is a share of
tensors, not of parameters), the mask is all-True or all-False per tensor.
Ties are broken deterministically, independent of the mapping's order: units are ordered by name (sorted), then by
flat C-order index within the tensor, and among equal residuals the earlier unit wins (a stable sort of ``-R``).
Passing both or neither of ``fraction`` and ``threshold`` is a :class:`~fedseg.errors.ConfigError`.

4. Masked aggregation (:func:`masked_aggregate`)
------------------------------------------------
Each site ``k`` sends its update (or weights) ``U_k`` and its bool mask ``M_k`` (1 bit per parameter; the Fisher
values never leave the site). With weights ``w_k > 0`` (e.g. sample or step counts; ``None`` = equal weights), per
coordinate ``j``::

    S_j = {k : not M_k[j]}                                       (sites for which j is domain-invariant)
    agg_j = sum_{k in S_j} w_k U_k[j] / sum_{k in S_j} w_k       if S_j is not empty
    agg_j = fill_value (0.0),  aggregated_j = False               if S_j is empty (sensitive at every site)

so a site's sensitive coordinates never enter the aggregate (not even with weight 0: they are excluded before the
sum). Computed in float64, returned in the updates' dtype (float32 updates -> float32). Returns
``(aggregate, aggregated)``, both name -> array. ``fill_value = 0`` is the natural choice for FLARE WEIGHT_DIFF
updates (the global model keeps its value there). All sites must send the same names and shapes, finite values
(:class:`~fedseg.errors.UpdateRejected`, the site named, as in fedgs.py); masks must be bool arrays of the updates'
shapes for every site and name (:class:`~fedseg.errors.DataError`); weights must be finite and > 0 for exactly the
updates' sites (:class:`~fedseg.errors.ConfigError`). Sites are processed in sorted order.

5. Personalization (:func:`personalize`)
----------------------------------------
Site model = aggregated invariant part + its own sensitive part::

    w_site[j] = local[j]    if mask[j] (sensitive) or not aggregated[j]
    w_site[j] = global[j]   otherwise

The sensitive entries are copied bit-for-bit from ``local`` (the output has the local entry's dtype; the global value
is cast to it). ``aggregated`` (optional, from :func:`masked_aggregate`) marks coordinates that have no aggregate;
there the site keeps its local value too. ``mask`` and ``global_weights`` must hold the same names, all present in
``local_weights`` with the same shapes; local entries without a mask (e.g. integer buffers such as
``num_batches_tracked``) are not federated and are returned unchanged. Torch tensors are accepted (moved to CPU
numpy); the result is name -> numpy array.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch

from fedseg.errors import ConfigError, DataError, UpdateRejected

__all__ = [
    "GRANULARITIES",
    "RESIDUAL_MODES",
    "diagonal_fisher",
    "masked_aggregate",
    "personalize",
    "residual_fisher",
    "sensitive_mask",
]

RESIDUAL_MODES = ("abs", "relative")
GRANULARITIES = ("element", "tensor")
DEFAULT_EPS = 1e-12

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _np(value, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype == object:
        raise DataError(f"ResFIM: entry {name!r} is not a numeric array")
    return arr


# ---------------------------------------------------------------- 1. diagonal Fisher

def _unpack(batch, index: int):
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise DataError(f"ResFIM Fisher: batch {index} must be a pair (x, y), got {type(batch).__name__}")
    return batch[0], batch[1]


def diagonal_fisher(
    model: torch.nn.Module,
    batches: Iterable,
    loss_fn: LossFn,
    per_sample: bool = False,
    eval_mode: bool = True,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher: the mean squared gradient of the loss (per batch, or per sample) per parameter.

    Returns name -> detached tensor shaped like the parameter (on its device, its dtype), for every trainable
    floating-point parameter, in ``named_parameters()`` order.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()]
    if not named:
        raise ConfigError("ResFIM Fisher: the model has no trainable floating-point parameters; unfreeze some")
    names = [n for n, _ in named]
    params = [p for _, p in named]
    flags = [(m, m.training) for m in model.modules()]
    if eval_mode:
        model.eval()
    total = [torch.zeros_like(p) for p in params]
    count = 0
    try:
        for b, batch in enumerate(batches):
            x, y = _unpack(batch, b)
            if per_sample:
                n = len(x)
                if len(y) != n:
                    raise DataError(f"ResFIM Fisher: batch {b} has {n} inputs but {len(y)} targets")
                pieces = [(x[i:i + 1], y[i:i + 1], f"batch {b} sample {i}") for i in range(n)]
            else:
                pieces = [(x, y, f"batch {b}")]
            for xi, yi, where in pieces:
                loss = loss_fn(model(xi), yi)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise ConfigError(f"ResFIM Fisher: loss_fn must return a scalar tensor, got "
                                      f"{type(loss).__name__} of shape {tuple(getattr(loss, 'shape', ()))} on "
                                      f"{where}; reduce it with mean()")
                if not torch.isfinite(loss.detach()).all():
                    raise DataError(f"ResFIM Fisher: the loss is NaN/Inf on {where}; check that data and model")
                grads = torch.autograd.grad(loss.reshape(()), params, allow_unused=True)
                with torch.no_grad():
                    for i, (t, g) in enumerate(zip(total, grads)):
                        if g is None:
                            continue
                        if not torch.isfinite(g).all():
                            raise DataError(f"ResFIM Fisher: the gradient of {names[i]!r} is NaN/Inf on {where}")
                        t.add_(g * g)
                count += 1
    finally:
        for m, flag in flags:
            m.training = flag
    if count == 0:
        raise DataError("ResFIM Fisher: no batch (or no sample) was given; the Fisher needs at least one")
    return {n: (t / count).detach() for n, t in zip(names, total)}


# ---------------------------------------------------------------- 2. residual

def _check_fisher(fisher: Mapping, what: str) -> dict[str, np.ndarray]:
    if not isinstance(fisher, Mapping) or not fisher:
        raise DataError(f"ResFIM: {what} must be a non-empty name -> array mapping")
    out = {}
    for name, value in fisher.items():
        arr = _np(value, name)
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise DataError(f"ResFIM: {what} entry {name!r} has dtype {arr.dtype}, expected a real number type")
        arr = arr.astype(np.float64)
        if not np.isfinite(arr).all():
            raise DataError(f"ResFIM: {what} entry {name!r} holds {int(arr.size - np.isfinite(arr).sum())} NaN/Inf "
                            "values; recompute the Fisher (check the loss and the data)")
        if (arr < 0).any():
            raise DataError(f"ResFIM: {what} entry {name!r} holds negative values; a diagonal Fisher is >= 0")
        out[name] = arr
    return out


def residual_fisher(fisher_real: Mapping, fisher_styled: Mapping, mode: str = "abs",
                    eps: float = DEFAULT_EPS) -> dict[str, np.ndarray]:
    """Domain sensitivity per parameter: ``|F_real - F_styled|`` ("abs") or that over ``F_real + F_styled + eps``."""
    if not isinstance(mode, str) or mode.lower() not in RESIDUAL_MODES:
        raise ConfigError(f"ResFIM: unknown residual mode {mode!r}; use 'abs' or 'relative'")
    mode = mode.lower()
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ConfigError(f"ResFIM: eps must be a finite number > 0, got {eps!r}; the default is {DEFAULT_EPS}")
    real = _check_fisher(fisher_real, "fisher_real")
    styled = _check_fisher(fisher_styled, "fisher_styled")
    if set(real) != set(styled):
        raise DataError(f"ResFIM: the two Fisher estimates hold different parameters (only real: "
                        f"{sorted(set(real) - set(styled))[:5]}, only styled: {sorted(set(styled) - set(real))[:5]}); "
                        "compute both on the same model")
    out = {}
    for name, r in real.items():
        s = styled[name]
        if r.shape != s.shape:
            raise DataError(f"ResFIM: parameter {name!r} has shape {r.shape} in fisher_real, {s.shape} in "
                            "fisher_styled; compute both on the same model")
        diff = np.abs(r - s)
        out[name] = diff if mode == "abs" else diff / (r + s + float(eps))
    return out


# ---------------------------------------------------------------- 3. mask

def sensitive_mask(residual: Mapping, fraction=None, threshold=None,
                   granularity: str = "element") -> dict[str, np.ndarray]:
    """name -> bool array, ``True`` = domain-sensitive (stays local). Exactly one of ``fraction`` / ``threshold``."""
    if (fraction is None) == (threshold is None):
        raise ConfigError("ResFIM mask: give exactly one of fraction (share of parameters kept local, e.g. 0.1) "
                          "and threshold (residual above which a parameter stays local)")
    if not isinstance(granularity, str) or granularity.lower() not in GRANULARITIES:
        raise ConfigError(f"ResFIM mask: unknown granularity {granularity!r}; use 'element' or 'tensor'")
    granularity = granularity.lower()
    if not isinstance(residual, Mapping) or not residual:
        raise DataError("ResFIM mask: the residual must be a non-empty name -> array mapping")
    res = {}
    for name in sorted(residual):
        arr = _np(residual[name], name)
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise DataError(f"ResFIM mask: residual {name!r} has dtype {arr.dtype}, expected real numbers")
        arr = arr.astype(np.float64)
        if not np.isfinite(arr).all():
            raise DataError(f"ResFIM mask: residual {name!r} holds NaN/Inf values; recompute the Fisher")
        res[name] = arr
    names = list(res)
    if granularity == "element":
        scores = np.concatenate([res[n].ravel() for n in names]) if names else np.zeros(0)
    else:
        scores = np.array([res[n].mean() if res[n].size else -np.inf for n in names], dtype=np.float64)

    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.integer, np.floating)) \
                or not math.isfinite(float(threshold)):
            raise ConfigError(f"ResFIM mask: threshold must be a finite number, got {threshold!r}")
        chosen = scores > float(threshold)
    else:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.integer, np.floating)) \
                or not math.isfinite(float(fraction)) or not 0.0 <= float(fraction) <= 1.0:
            raise ConfigError(f"ResFIM mask: fraction must be a number in [0, 1], got {fraction!r}; "
                              "set e.g. fraction=0.1")
        k = min(scores.size, math.floor(float(fraction) * scores.size + 1e-9))
        order = np.argsort(-scores, kind="stable")  # stable: among ties the earlier (name, flat index) wins
        chosen = np.zeros(scores.size, dtype=bool)
        chosen[order[:k]] = True

    out, start = {}, 0
    for i, n in enumerate(names):
        shape = res[n].shape
        if granularity == "element":
            size = res[n].size
            out[n] = chosen[start:start + size].reshape(shape).copy()
            start += size
        else:
            out[n] = np.full(shape, bool(chosen[i]), dtype=bool)
    return out


# ---------------------------------------------------------------- 4. masked aggregation

def masked_aggregate(
    updates: Mapping[str, Mapping[str, np.ndarray]],
    masks: Mapping[str, Mapping[str, np.ndarray]],
    weights: Mapping[str, float] | None = None,
    fill_value: float = 0.0,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per coordinate, the weighted mean over the sites for which it is *not* sensitive.

    Returns ``(aggregate, aggregated)``: name -> array (updates' dtype) and name -> bool array (False where every
    site marked the coordinate sensitive; the aggregate holds ``fill_value`` there).
    """
    if not isinstance(updates, Mapping) or not updates:
        raise UpdateRejected("ResFIM aggregation: no update was given (expected site -> {name: array})")
    sites = sorted(updates, key=str)
    if not isinstance(masks, Mapping) or set(masks) != set(updates):
        got = sorted(masks, key=str) if isinstance(masks, Mapping) else type(masks).__name__
        raise DataError(f"ResFIM aggregation: masks are needed for exactly the updates' sites {sites}, got {got}")
    if weights is None:
        w = {s: 1.0 for s in sites}
    else:
        if not isinstance(weights, Mapping) or set(weights) != set(updates):
            got = sorted(weights, key=str) if isinstance(weights, Mapping) else type(weights).__name__
            raise ConfigError(f"ResFIM aggregation: weights are needed for exactly the sites {sites}, got {got}")
        w = {}
        for s in sites:
            v = weights[s]
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(float(v)) or float(v) <= 0:
                raise ConfigError(f"ResFIM aggregation: site {s!r}'s weight must be a finite number > 0, got {v!r}")
            w[s] = float(v)
    if isinstance(fill_value, bool) or not isinstance(fill_value, (int, float)) or not math.isfinite(fill_value):
        raise ConfigError(f"ResFIM aggregation: fill_value must be a finite number, got {fill_value!r}")

    first = sites[0]
    ref = updates[first]
    if not isinstance(ref, Mapping) or not ref:
        raise UpdateRejected(f"site {first!r}: the update is empty or not a name -> array mapping")
    ref_shapes = {n: _np(v, n).shape for n, v in ref.items()}
    num = {n: np.zeros(shape, dtype=np.float64) for n, shape in ref_shapes.items()}
    den = {n: np.zeros(shape, dtype=np.float64) for n, shape in ref_shapes.items()}
    dtypes: dict[str, list] = {n: [] for n in ref_shapes}
    for s in sites:
        upd, mask = updates[s], masks[s]
        if not isinstance(upd, Mapping) or set(upd) != set(ref_shapes):
            extra = sorted(set(upd) - set(ref_shapes)) if isinstance(upd, Mapping) else []
            missing = sorted(set(ref_shapes) - set(upd)) if isinstance(upd, Mapping) else []
            raise UpdateRejected(f"site {s!r}: the update's names differ from site {first!r}'s (missing "
                                 f"{missing[:5]}, unknown {extra[:5]}); the sites run different models")
        if not isinstance(mask, Mapping) or set(mask) != set(ref_shapes):
            raise DataError(f"ResFIM aggregation: site {s!r}'s mask must hold exactly the update's names")
        for n, shape in ref_shapes.items():
            u = _np(upd[n], n)
            if u.shape != shape:
                raise UpdateRejected(f"site {s!r}: entry {n!r} has shape {u.shape}, site {first!r}'s has {shape}")
            if not np.issubdtype(u.dtype, np.floating):
                raise UpdateRejected(f"site {s!r}: entry {n!r} has dtype {u.dtype}, expected a float type "
                                     "(integer buffers are not aggregated)")
            if not np.isfinite(u).all():
                raise UpdateRejected(f"site {s!r}: entry {n!r} holds {int(u.size - np.isfinite(u).sum())} "
                                     "NaN/Inf values")
            m = _np(mask[n], n)
            if m.dtype != np.bool_:
                raise DataError(f"ResFIM aggregation: site {s!r}'s mask {n!r} has dtype {m.dtype}, expected bool "
                                "(True = sensitive, kept local)")
            if m.shape != shape:
                raise DataError(f"ResFIM aggregation: site {s!r}'s mask {n!r} has shape {m.shape}, the update "
                                f"entry has {shape}")
            keep = ~m
            # excluded before the sum: a sensitive value never touches the aggregate (not even as 0 * value)
            num[n][keep] += w[s] * u.astype(np.float64)[keep]
            den[n][keep] += w[s]
            dtypes[n].append(u.dtype)
    aggregate, aggregated = {}, {}
    for n, shape in ref_shapes.items():
        ok = den[n] > 0
        value = np.full(shape, float(fill_value), dtype=np.float64)
        value[ok] = num[n][ok] / den[n][ok]
        aggregate[n] = value.astype(np.result_type(*dtypes[n]))
        aggregated[n] = ok
    return aggregate, aggregated


# ---------------------------------------------------------------- 5. personalization

def personalize(global_weights: Mapping, local_weights: Mapping, mask: Mapping,
                aggregated: Mapping | None = None) -> dict[str, np.ndarray]:
    """Site model: ``local`` where sensitive (or not aggregated), ``global`` elsewhere; sensitive entries bit-exact."""
    for what, m in (("global_weights", global_weights), ("local_weights", local_weights), ("mask", mask)):
        if not isinstance(m, Mapping):
            raise DataError(f"ResFIM personalize: {what} must be a name -> array mapping")
    if set(mask) != set(global_weights):
        raise DataError(f"ResFIM personalize: mask and global_weights must hold the same names (only in mask: "
                        f"{sorted(set(mask) - set(global_weights))[:5]}, only global: "
                        f"{sorted(set(global_weights) - set(mask))[:5]})")
    missing = sorted(set(mask) - set(local_weights))
    if missing:
        raise DataError(f"ResFIM personalize: local_weights lacks {missing[:5]}")
    if aggregated is not None and (not isinstance(aggregated, Mapping) or set(aggregated) != set(mask)):
        raise DataError("ResFIM personalize: aggregated must hold the same names as mask")
    out = {}
    for name, value in local_weights.items():
        local = _np(value, name)
        if name not in mask:
            out[name] = local.copy()
            continue
        glob = _np(global_weights[name], name)
        m = _np(mask[name], name)
        if m.dtype != np.bool_:
            raise DataError(f"ResFIM personalize: mask {name!r} has dtype {m.dtype}, expected bool")
        if not (local.shape == glob.shape == m.shape):
            raise DataError(f"ResFIM personalize: {name!r} has shapes local {local.shape}, global {glob.shape}, "
                            f"mask {m.shape}; they must agree")
        take_global = ~m
        if aggregated is not None:
            a = _np(aggregated[name], name)
            if a.dtype != np.bool_ or a.shape != m.shape:
                raise DataError(f"ResFIM personalize: aggregated {name!r} must be a bool array of shape {m.shape}")
            take_global &= a
        result = local.copy()
        result[take_global] = glob[take_global].astype(local.dtype)
        out[name] = result
    return out
