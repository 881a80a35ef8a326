"""Model-poisoning attacks of the security toolbox (paper 002, section 3), for simulations only. Pure numpy.

What a malicious site sends instead of its honest update ``Delta`` (a name -> array WEIGHT_DIFF):

- ``scale`` -- model replacement (Bagdasaryan et al. 2020, paper 002 section 3.1): the attacker wants the global model
  to become its own, ``w_i``. With n_S sites averaged with weights n_i / n_S, it sends ``gamma * (w_i - w)`` with
  ``gamma = n_S / n_i`` so that its share of the mean is the whole step: ``boost_update(Delta, gamma)``. Under FedGS's
  steps weighting ``gamma = (total steps) / (own steps)``; with equal weights it is the number of sites.
- ``noise`` -- a site sending random noise (a broken or hostile site): Gaussian noise with the L2 norm of the honest
  update times ``scale`` (``noise_update``), so the noise is not trivially screened by its size unless ``scale`` is large.

- ``mask_flip`` -- the label-flipping attack of segmentation (paper 002, section 3.2: data poisoning): the attacker
  trains honestly, but on its training images with every mask flipped (lesion <-> background), and sends the
  resulting update. It is a data attack: :class:`MaskFlippedData` wraps the site's training data and the site's
  trainer runs unchanged (``fedseg.flare.executor.SegmentationTrainer``'s ``simulated_attack``).

Integer entries (``num_batches_tracked`` and index tables) are never part of an update and are passed through.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedseg.errors import ConfigError

UPDATE_ATTACKS = ("scale", "noise")  # change the update after training (a task-result filter)
DATA_ATTACKS = ("mask_flip",)  # change the training data (the site's trainer)
ATTACKS = UPDATE_ATTACKS + DATA_ATTACKS


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


class _FlippedRows:
    """Read-only view of a mask array whose rows come out flipped (``1 - m``); nothing is copied up front."""

    def __init__(self, masks):
        self._masks = masks
        self.shape = getattr(masks, "shape", None)
        self.dtype = getattr(masks, "dtype", None)

    def __len__(self) -> int:
        return len(self._masks)

    def __getitem__(self, idx):
        return flip_mask(np.asarray(self._masks[idx]))


class MaskFlippedData:
    """A site's training data with every mask flipped: the mask-flipping attacker's view of its own data.

    Wraps any dataset the trainer accepts (``images`` / ``masks`` arrays, or a ``batch(idx) -> (x, y)`` hook, whose
    targets are flipped as ``1 - y``); every other attribute is the wrapped dataset's. The FedGS difficulty is that of
    the flipped masks: a flipped mask covers all but the lesion, so no slice is "small" and ``delta = 0`` (eta = 1
    for every batch), exactly what the difficulty rule gives for such masks. Non-binary masks fail at the first read
    with :func:`flip_mask`'s error.
    """

    def __init__(self, data):
        self._data = data
        self.masks = _FlippedRows(data.masks) if hasattr(data, "masks") else None
        self.delta = np.zeros(len(data.delta), dtype=np.asarray(data.delta).dtype)
        self.small = np.zeros(len(data.delta), dtype=bool)

    def __len__(self) -> int:
        return len(self.delta)

    def __getattr__(self, name):
        if name == "batch":
            inner = getattr(self._data, "batch")  # AttributeError when the data has no hook: hasattr() is False

            def batch(idx):
                x, y = inner(idx)
                return x, 1 - y

            return batch
        return getattr(self._data, name)
