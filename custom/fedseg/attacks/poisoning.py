"""Model-poisoning attacks of the security toolbox (paper 002, section 3), for simulations only. Pure numpy.

What a malicious site sends instead of its honest update ``Delta`` (a name -> array WEIGHT_DIFF):

- ``scale`` -- model replacement (Bagdasaryan et al. 2020, paper 002 section 3.1): the attacker wants the global model
  to become its own, ``w_i``. With n_S sites averaged with weights n_i / n_S, it sends ``gamma * (w_i - w)`` with
  ``gamma = n_S / n_i`` so that its share of the mean is the whole step: ``boost_update(Delta, gamma)``. Under FedGS's
  steps weighting ``gamma = (total steps) / (own steps)``; with equal weights it is the number of sites.
- ``noise`` -- a site sending random noise (a broken or hostile site): Gaussian noise with the L2 norm of the honest
  update times ``scale`` (``noise_update``), so the noise is not trivially screened by its size unless ``scale`` is large.

Integer entries (``num_batches_tracked`` and index tables) are never part of an update and are passed through.
The mask-flipping (label) attack is a data attack: ``flip_mask`` gives the flipped training mask.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedseg.errors import ConfigError

ATTACKS = ("scale", "noise")


def _floats(update: Mapping[str, np.ndarray]):
    return {k: np.asarray(v) for k, v in update.items() if np.issubdtype(np.asarray(v).dtype, np.floating)}


def boost_update(update: Mapping[str, np.ndarray], gamma: float) -> dict[str, np.ndarray]:
    """``gamma * Delta`` for every float entry (model replacement with ``gamma = n_S / n_i``); others unchanged."""
    if not np.isfinite(gamma) or gamma <= 0:
        raise ConfigError(f"model replacement: the boost gamma must be > 0, got {gamma}")
    out = dict(update)
    for k, v in _floats(update).items():
        out[k] = (v.astype(np.float64) * gamma).astype(v.dtype)
    return out


def noise_update(update: Mapping[str, np.ndarray], rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    """Gaussian noise in place of the float entries, with ``scale`` x the honest update's whole L2 norm."""
    if not np.isfinite(scale) or scale <= 0:
        raise ConfigError(f"noise attack: scale must be > 0, got {scale}")
    floats = _floats(update)
    d = sum(v.size for v in floats.values())
    norm = float(np.sqrt(sum(np.square(v.astype(np.float64)).sum() for v in floats.values())))
    sigma = scale * norm / np.sqrt(d) if d else 0.0  # E||noise||_2 ~ sigma sqrt(d) = scale * norm
    out = dict(update)
    for k, v in floats.items():
        out[k] = rng.normal(0.0, sigma, v.shape).astype(v.dtype)
    return out


def flip_mask(mask: np.ndarray) -> np.ndarray:
    """The label-flipping attack on a binary segmentation mask: lesion <-> background."""
    m = np.asarray(mask)
    if not np.isin(m, (0, 1)).all():
        raise ConfigError("flip_mask needs a binary (0/1) mask")
    return (1 - m).astype(m.dtype)
