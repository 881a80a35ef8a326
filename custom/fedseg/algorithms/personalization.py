"""Partial model sharing for personalized FL: pFL-ResFIM (paper 004) and the FedPer baseline. Pure code (torch and
numpy, no nvflare import); the FLARE adapters are :mod:`fedseg.flare.personalized` and
:mod:`fedseg.flare.style_exchange`. The formulas (Fisher, residual, mask, masked aggregation, personalization) are in
:mod:`fedseg.algorithms.resfim`; this module is the protocol around them. Every choice below is ours (paper 004
publishes only its abstract) and is quoted in ``docs/algorithms/resfim.md``.

Who holds what
--------------
* A site holds its **own model** (``local``: the full state after its last local training) and its **mask**
  (``True`` = domain-sensitive = kept local), and the style bank (every site's low-frequency amplitude style).
* The server holds the **global model**, whose coordinates are the aggregates of the domain-invariant coordinates
  (a coordinate that is sensitive at every site keeps its initial value there and is never used by any site).
* What a site sends each round: its update with every sensitive coordinate set to 0 (the trained local values of
  sensitive parameters never leave the site: asserted in the tests), its step count, and its mask packed to one bit
  per coordinate (:func:`pack_mask`). The server needs the mask to know which coordinates a site's update covers;
  the Fisher values and the residual stay at the site.

One round at a site (:class:`PersonalizedSite`)
-----------------------------------------------
1. ``start = personalize(global, local, mask)``: the aggregated invariant part + the site's own sensitive part
   (before the site has a mask or a local model: ``start = global``).
2. When the schedule says so (:meth:`PersonalizedSite.due`), the mask is (re)computed on ``start`` and ``start`` is
   rebuilt with the new mask.
3. Local training from ``start``; the update ``U`` (FLARE WEIGHT_DIFF, relative to ``start``) is sent as
   :meth:`PersonalizedSite.outgoing` ``(U)``: sensitive coordinates zeroed + the packed mask.
4. ``local = trained state``. The server's masked aggregate (:func:`fedseg.algorithms.resfim.masked_aggregate`,
   weights = local steps) is added to the global model; since ``start`` equals the global model on every invariant
   coordinate, ``global + aggregate`` is the weighted mean of the sites' trained invariant values.

Float buffers (BatchNorm running statistics) have no Fisher. With ``buffers="local"`` (the default) they stay at
the site, as in FedBN (Li et al. 2021): once any parameter upstream of a normalisation layer is a site's own, the
features it normalises differ between sites, and an average of the sites' statistics fits none of them (measured:
ResFIM's personalized Dice at CPU scale went from 0.48 with shared statistics to 0.67 when each site's model was given
its own; docs/experiments/resfim_cpu). ``buffers="shared"`` averages them as in FedAvg. Integer buffers are never
part of an update.

Schedule (ResFIM)
-----------------
``warmup_rounds`` (default 1) rounds of full sharing (FedAvg: every site's mask is all-False) so that the Fisher is
measured on a model that has learned the task rather than on random weights; the mask is first computed at the
start of round ``warmup_rounds`` and then recomputed every ``every`` rounds (default 0: never again, the split stays
fixed once chosen, so a coordinate does not flip between a site's own value and the global one). Recomputing uses
the site's current personalized model; coordinates that become invariant take the global value at once.

FedPer (Arivazhagan et al. 2019)
--------------------------------
The same protocol with a fixed mask: every parameter whose name matches the ``head`` regular expression (default
``^(up4|outc)\\.``: UTNet's last decoder stage and output convolution) is kept local from round 0, everything else is
shared. No Fisher, no style bank.

The mask computation for ResFIM is :func:`resfim_mask`: diagonal empirical Fisher on ``fisher_samples`` real
training samples (seeded choice, no augmentation, model in eval mode) and on their style-transferred copies, one per
other site's style (``lam`` = 1: the window's amplitude replaced, FDA), residual (``residual`` mode, default
"abs"), then the top ``fraction`` (default 0.1, globally ranked, per element) or the residuals above
``threshold``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from fedseg.algorithms.resfim import (
    GRANULARITIES,
    RESIDUAL_MODES,
    diagonal_fisher,
    masked_aggregate,
    personalize,
    residual_fisher,
    sensitive_mask,
)
from fedseg.algorithms.robust import UpdateCollector
from fedseg.algorithms.spectral import StyleBank, _check_beta, _check_lam
from fedseg.errors import ConfigError, DataError, UpdateRejected

__all__ = [
    "METHODS",
    "MaskedCollector",
    "PersonalizationConfig",
    "PersonalizedSite",
    "head_mask",
    "mask_stats",
    "pack_mask",
    "resfim_mask",
    "sample_rows",
    "styled_batches",
    "unpack_mask",
]

METHODS = ("resfim", "fedper")
DEFAULT_FRACTION = 0.1
BUFFER_MODES = ("local", "shared")
DEFAULT_HEAD = r"^(up4|outc)\."


# ---------------------------------------------------------------- configuration

@dataclass
class PersonalizationConfig:
    method: str = "resfim"  # "resfim" | "fedper"
    fraction: float | None = None  # share of parameters kept local (resfim); 0.1 when neither it nor threshold
    threshold: float | None = None  # residual above which a parameter is kept local (resfim)
    granularity: str = "element"  # "element" | "tensor"
    residual: str = "abs"  # "abs" | "relative" (docs/algorithms/resfim.md: abs ranks far more reproducibly)
    warmup_rounds: int = 1  # rounds of full sharing before the first mask (resfim)
    every: int = 0  # recompute the mask every k rounds after the first (0 = never)
    fisher_samples: int = 16  # real training samples of the Fisher estimate (and as many styled copies per style)
    fisher_batch_size: int = 4
    style_samples: int = 64  # training images whose mean low-frequency amplitude is the site's style
    beta: float = 0.05  # low-frequency window half-size as a share of the shorter image side
    lam: float = 1.0  # 1 = replace the window's amplitude (FDA), < 1 = interpolate
    head: str = DEFAULT_HEAD  # fedper: regex of the parameters kept local
    buffers: str = "local"  # float buffers (BatchNorm statistics): "local" (FedBN) | "shared" (averaged)
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"personalization method must be one of {METHODS}, got {self.method!r}")
        if self.method == "resfim":
            if self.fraction is not None and self.threshold is not None:
                raise ConfigError("ResFIM: set only one of fraction (share of parameters kept local, e.g. 0.1) "
                                  "and threshold (residual above which a parameter is kept local)")
            if self.fraction is None and self.threshold is None:
                self.fraction = DEFAULT_FRACTION
            if self.fraction is not None and not (isinstance(self.fraction, (int, float))
                                                  and 0.0 <= float(self.fraction) <= 1.0):
                raise ConfigError(f"ResFIM: fraction must be in [0, 1], got {self.fraction!r}")
            if self.threshold is not None and not (isinstance(self.threshold, (int, float))
                                                   and math.isfinite(float(self.threshold))):
                raise ConfigError(f"ResFIM: threshold must be a finite number, got {self.threshold!r}")
            if self.granularity not in GRANULARITIES:
                raise ConfigError(f"ResFIM: granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
            if self.residual not in RESIDUAL_MODES:
                raise ConfigError(f"ResFIM: residual must be one of {RESIDUAL_MODES}, got {self.residual!r}")
            _check_beta(self.beta)
            _check_lam(self.lam)
        if self.buffers not in BUFFER_MODES:
            raise ConfigError(f"personalization: buffers must be one of {BUFFER_MODES} (BatchNorm statistics kept at "
                              f"the site or averaged), got {self.buffers!r}")
        for name in ("warmup_rounds", "every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"personalization: {name} must be an integer >= 0, got {v!r}")
        for name in ("fisher_samples", "fisher_batch_size", "style_samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"personalization: {name} must be an integer >= 1, got {v!r}")
        try:
            re.compile(self.head)
        except (re.error, TypeError) as e:
            raise ConfigError(f"FedPer: head must be a regular expression of parameter names, got {self.head!r}: "
                              f"{e}") from None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- masks on the wire

def pack_mask(mask: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """name -> uint8 array of ``np.packbits`` of the flat bool mask (1 bit per coordinate, C order)."""
    out = {}
    for name, m in mask.items():
        m = np.asarray(m)
        if m.dtype != np.bool_:
            raise DataError(f"pack_mask: mask {name!r} has dtype {m.dtype}, expected bool")
        out[name] = np.packbits(m.ravel())
    return out


def unpack_mask(packed: Any, shapes: Mapping[str, tuple], site: str) -> dict[str, np.ndarray]:
    """The bool masks of ``shapes`` from a site's packed mask; a missing, extra or malformed entry is an
    :class:`UpdateRejected` naming the site."""
    if not isinstance(packed, Mapping):
        raise UpdateRejected(f"site {site!r}: no personalization mask in the result (got {type(packed).__name__}); "
                             "the site runs an executor without partial sharing")
    missing = sorted(set(shapes) - set(packed))
    unknown = sorted(set(packed) - set(shapes))
    if missing or unknown:
        raise UpdateRejected(f"site {site!r}: the mask's entries differ from the update's (missing {missing[:5]}, "
                             f"unknown {unknown[:5]})")
    out = {}
    for name, shape in shapes.items():
        bits = np.asarray(packed[name])
        size = int(np.prod(shape, dtype=np.int64))
        if bits.dtype != np.uint8 or bits.ndim != 1 or bits.size != (size + 7) // 8:
            raise UpdateRejected(f"site {site!r}: mask {name!r} must be {(size + 7) // 8} packed bytes (uint8) for "
                                 f"shape {tuple(shape)}, got {bits.dtype} of shape {bits.shape}")
        flat = np.unpackbits(bits)
        if flat[size:].any():
            raise UpdateRejected(f"site {site!r}: mask {name!r} has bits set beyond its {size} coordinates")
        out[name] = flat[:size].astype(bool).reshape(shape)
    return out


def mask_stats(mask: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Kept-local coordinates and tensors of a mask: counts and the share of coordinates."""
    total = sum(int(np.asarray(m).size) for m in mask.values())
    local = sum(int(np.asarray(m).sum()) for m in mask.values())
    tensors = sum(1 for m in mask.values() if np.asarray(m).any())
    return {"local_coords": local, "total_coords": total, "local_fraction": local / total if total else 0.0,
            "tensors_with_local": tensors}


def head_mask(shapes: Mapping[str, tuple], pattern: str = DEFAULT_HEAD) -> dict[str, np.ndarray]:
    """FedPer: ``True`` for every entry whose name matches ``pattern`` (``re.search``), ``False`` elsewhere."""
    rx = re.compile(pattern)
    out = {n: np.full(tuple(s), bool(rx.search(n)), dtype=bool) for n, s in shapes.items()}
    if not any(m.all() and m.size for m in out.values()):
        raise ConfigError(f"FedPer: the head pattern {pattern!r} matches no parameter of this model (e.g. "
                          f"{sorted(shapes)[-3:]}); set personalization_args.head to the model's last layers")
    if all(m.all() for m in out.values()):
        raise ConfigError(f"FedPer: the head pattern {pattern!r} matches every parameter; nothing would be shared")
    return out


# ---------------------------------------------------------------- the server's collector

class MaskedCollector(UpdateCollector):
    """Masked aggregation behind the interface of :class:`fedseg.algorithms.fedgs.WeightedUpdateAccumulator`
    (``add``, ``len``, ``contributors``, ``total_weight``, ``result``), plus each site's mask. ``result`` is
    :func:`fedseg.algorithms.resfim.masked_aggregate` with the sites' steps as weights; ``last_stats`` says how many
    coordinates were aggregated and how many were kept local at some / every site."""

    def __init__(self):
        super().__init__()
        self._masks: dict[str, Mapping[str, np.ndarray]] = {}
        self.last_stats: dict[str, Any] | None = None

    def add(self, update: Mapping[str, np.ndarray], weight: float, contributor: str = "",
            mask: Mapping[str, np.ndarray] | None = None) -> None:
        if mask is None:
            raise UpdateRejected(f"site {contributor!r}: no personalization mask with the update")
        super().add(update, weight, contributor)
        self._masks[contributor] = mask

    def result(self, dtype=np.float32) -> dict[str, np.ndarray]:
        if not self.contributors:
            raise ValueError("no update was added")
        aggregate, aggregated = masked_aggregate(self._updates, self._masks, self._weights)
        total = sum(a.size for a in aggregated.values())
        shared = sum(int(a.sum()) for a in aggregated.values())
        some = sum(int(np.logical_or.reduce([np.asarray(self._masks[s][n]) for s in self.contributors]).sum())
                   for n in aggregated)
        self.last_stats = {
            "aggregated_coords": shared,
            "total_coords": int(total),
            "local_somewhere": int(some),
            "local_everywhere": int(total - shared),
            "per_site_local_fraction": {s: mask_stats(self._masks[s])["local_fraction"] for s in self.contributors},
        }
        return {n: v.astype(dtype, copy=False) for n, v in aggregate.items()}


# ---------------------------------------------------------------- ResFIM's mask at a site

STYLE_SALT, FISHER_SALT = 1, 2  # FISHER_SALT + round: a fresh Fisher sample at every recomputation


def sample_rows(n: int, k: int, seed: int, salt: int) -> np.ndarray:
    """The sorted rows (``min(k, n)`` of ``n``, without replacement) a site uses for its style (``salt`` =
    ``STYLE_SALT``) or a Fisher estimate (``FISHER_SALT + round``); seeded, so a run and ``fedseg resfim restyle``
    pick the same images."""
    if n <= 0:
        raise ConfigError("personalization: the site has no training samples")
    rng = np.random.default_rng([int(seed), int(salt)])
    return np.sort(rng.choice(n, size=min(int(k), n), replace=False))


def styled_batches(batches: Iterable, bank: StyleBank, site: str, lam: float = 1.0) -> list:
    """Every batch ``(x, y)`` (x: float tensor [B, C, H, W]; the bank's styles are ``(C, h, w)``) restyled to each
    other site's style in ``bank`` (one copy per other site, the local phase kept, masks unchanged)."""
    others = bank.others(site)
    if not others:
        raise ConfigError(f"ResFIM at {site!r}: the style bank holds no other site's style ({bank.sites}); the "
                          "residual Fisher needs at least one other site")
    out = []
    for x, y in batches:
        xs = x.detach().cpu().numpy()
        for other in others:
            styled = np.stack([bank.transfer(img, other, lam=lam) for img in xs])
            out.append((torch.from_numpy(styled).to(dtype=x.dtype, device=x.device), y))
    return out


def resfim_mask(model: torch.nn.Module, loss_fn: Callable, real: list, styled: list, cfg: PersonalizationConfig
                ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The sensitive mask of ``model``'s trainable parameters: Fisher on ``real`` and ``styled`` batches, residual,
    mask. Returns ``(mask, info)`` with the residual's summary (what the site logs; it never leaves the site)."""
    f_real = diagonal_fisher(model, real, loss_fn)
    f_styled = diagonal_fisher(model, styled, loss_fn)
    residual = residual_fisher(f_real, f_styled, mode=cfg.residual)
    mask = sensitive_mask(residual, fraction=None if cfg.threshold is not None else cfg.fraction,
                          threshold=cfg.threshold, granularity=cfg.granularity)
    flat = np.concatenate([r.ravel() for r in residual.values()])
    info = {**mask_stats(mask), "residual_median": float(np.median(flat)), "residual_max": float(flat.max())}
    return mask, info


# ---------------------------------------------------------------- the site's state

def _numpy_state(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)).copy()
            for k, v in state.items()}


class PersonalizedSite:
    """One site's side of partial sharing: its own model, its mask and the schedule (module docstring)."""

    def __init__(self, cfg: PersonalizationConfig):
        self.cfg = cfg
        self.local: dict[str, np.ndarray] | None = None
        self.mask: dict[str, np.ndarray] | None = None
        self.mask_round: int | None = None
        self.mask_info: dict[str, Any] = {}

    def due(self, current_round: int) -> bool:
        """Whether the mask is (re)computed at the start of ``current_round``."""
        if self.cfg.method == "fedper":
            return self.mask is None
        if current_round < self.cfg.warmup_rounds:
            return False
        if self.mask is None:
            return True
        return self.cfg.every > 0 and (current_round - self.mask_round) >= self.cfg.every

    def set_mask(self, mask: Mapping[str, np.ndarray], current_round: int, info: Mapping[str, Any] | None = None):
        self.mask = {k: np.asarray(v, dtype=bool).copy() for k, v in mask.items()}
        self.mask_round = int(current_round)
        self.mask_info = dict(info or mask_stats(self.mask))

    def start_state(self, global_state: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The site model of this round: global where invariant, the site's own values where sensitive."""
        glob = _numpy_state(global_state)
        if self.mask is None or self.local is None:
            return glob
        missing = sorted(set(self.mask) - set(glob))
        if missing:
            raise DataError(f"personalization: the global model lacks masked entries {missing[:5]}; server and site "
                            "run different models")
        sub_global = {k: glob[k] for k in self.mask}
        merged = personalize(sub_global, {k: self.local.get(k, glob[k]) for k in self.mask}, self.mask)
        out = {}
        for k, v in glob.items():
            if k in merged:
                out[k] = merged[k]
            elif self._local_buffer(k, v) and k in self.local:
                out[k] = self.local[k].astype(v.dtype, copy=True)
            else:
                out[k] = v
        return out

    def _local_buffer(self, name: str, value) -> bool:
        """A float entry without a parameter mask (a normalisation statistic) that this site keeps."""
        return (self.cfg.buffers == "local" and self.mask is not None and name not in self.mask
                and np.issubdtype(np.asarray(value).dtype, np.floating))

    def full_mask(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The mask over every entry of ``update``; entries without a parameter mask (float buffers) are all True
        with ``buffers="local"`` once the site has a mask, else all False (shared)."""
        out = {}
        for name, value in update.items():
            shape = np.asarray(value).shape
            m = self.mask.get(name) if self.mask is not None else None
            if m is not None and m.shape != shape:
                raise DataError(f"personalization: mask {name!r} has shape {m.shape}, the update entry {shape}")
            if m is not None:
                out[name] = m.copy()
            else:
                out[name] = np.full(shape, self._local_buffer(name, value), dtype=bool)
        return out

    def outgoing(self, update: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """What leaves the site: the update with every sensitive coordinate set to 0, and the packed mask."""
        mask = self.full_mask(update)
        out = {}
        for name, value in update.items():
            arr = np.array(value, copy=True)
            arr[mask[name]] = 0
            out[name] = arr
        return out, pack_mask(mask)

    def finish_round(self, trained_state: Mapping[str, Any]) -> None:
        self.local = _numpy_state(trained_state)

    def checkpoint(self) -> dict[str, Any]:
        """What a site saves next to its personalized model (no weights): method, settings, mask round and stats."""
        return {"method": self.cfg.method, "settings": self.cfg.as_dict(), "mask_round": self.mask_round,
                "mask": mask_stats(self.mask) if self.mask is not None else None, "mask_info": self.mask_info}
