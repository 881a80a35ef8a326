"""Segmentation metrics as in FedGS (paper 000, section 3.4).

* Per image: foreground Dice ``2 |P & T| / (|P| + |T|)`` of the *thresholded* prediction ``P`` against the
  truth ``T``; an empty truth with an empty prediction scores 1, exactly one of them empty scores 0.
* ``Dice``  = mean over all test images,
  ``DiceS`` = mean over images with a non-empty truth that is small,
  ``DiceL`` = mean over images with a non-empty truth that is not small.
  A mean over an empty group is ``None`` (not NaN).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["dice_per_image", "summarize_dice", "DiceAccumulator"]


def _as_binary(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dtype == torch.bool:
        return x
    if x.is_complex():
        raise ValueError(f"{name} has unsupported dtype {x.dtype}")
    if not bool(((x == 0) | (x == 1)).all()):
        raise ValueError(f"{name} must be binary (bool or 0/1 values); threshold probabilities/logits first, "
                         "e.g. torch.sigmoid(logits) > 0.5")
    return x != 0


def dice_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Foreground Dice of each image in a batch.

    ``pred`` and ``target`` have the same shape ``[N, ...]`` and hold bool or 0/1 values (threshold predictions
    first; anything else raises ValueError). Returns a float64 tensor ``[N]`` on the inputs' device:
    both empty -> 1.0, exactly one empty -> 0.0.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.dim() < 1:
        raise ValueError("pred/target need a leading batch dimension [N, ...]")
    p = _as_binary(pred, "pred").reshape(pred.shape[0], -1)
    t = _as_binary(target, "target").reshape(target.shape[0], -1)
    inter = (p & t).sum(dim=1, dtype=torch.int64)
    total = p.sum(dim=1, dtype=torch.int64) + t.sum(dim=1, dtype=torch.int64)
    dice = torch.ones(pred.shape[0], dtype=torch.float64, device=pred.device)
    has = total > 0
    dice[has] = 2.0 * inter[has].to(torch.float64) / total[has].to(torch.float64)
    return dice


def _to_numpy(x: Any, dtype: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype).reshape(-1)


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def summarize_dice(dice: Any, small: Any, nonempty: Any) -> dict[str, Any]:
    """Aggregate per-image Dice into ``{"dice", "dice_s", "dice_l", "n", "n_small", "n_large"}``.

    ``small`` and ``nonempty`` are per-image booleans (truth mask small / truth mask non-empty).
    ``dice_s`` averages over ``nonempty & small``, ``dice_l`` over ``nonempty & ~small``; empty groups give None.
    """
    d = _to_numpy(dice, np.float64)
    s = _to_numpy(small, bool)
    ne = _to_numpy(nonempty, bool)
    if not (d.shape == s.shape == ne.shape):
        raise ValueError(f"dice, small and nonempty must have the same length, got {d.size}, {s.size}, {ne.size}")
    if not np.all(np.isfinite(d)):
        raise ValueError("dice values must be finite (got NaN or inf)")
    small_sel = ne & s
    large_sel = ne & ~s
    return {
        "dice": _mean_or_none(d),
        "dice_s": _mean_or_none(d[small_sel]),
        "dice_l": _mean_or_none(d[large_sel]),
        "n": int(d.size),
        "n_small": int(small_sel.sum()),
        "n_large": int(large_sel.sum()),
    }


class DiceAccumulator:
    """Collects per-image Dice with the images' small / non-empty flags over many batches.

    >>> acc = DiceAccumulator()
    >>> acc.update(dice_per_image(pred, target), small_flags, target.flatten(1).any(1))  # doctest: +SKIP
    >>> acc.compute()["dice_s"]                                                          # doctest: +SKIP
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._dice: list[np.ndarray] = []
        self._small: list[np.ndarray] = []
        self._nonempty: list[np.ndarray] = []

    def update(self, dice_values: Any, small: Any, nonempty: Any) -> None:
        d = _to_numpy(dice_values, np.float64)
        s = _to_numpy(small, bool)
        ne = _to_numpy(nonempty, bool)
        if not (d.shape == s.shape == ne.shape):
            raise ValueError(f"dice_values, small and nonempty must have the same length, "
                             f"got {d.size}, {s.size}, {ne.size}")
        self._dice.append(d)
        self._small.append(s)
        self._nonempty.append(ne)

    def __len__(self) -> int:
        return int(sum(a.size for a in self._dice))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All collected ``(dice, small, nonempty)`` as 1-D arrays."""
        if not self._dice:
            return np.zeros(0, np.float64), np.zeros(0, bool), np.zeros(0, bool)
        return np.concatenate(self._dice), np.concatenate(self._small), np.concatenate(self._nonempty)

    def compute(self) -> dict[str, Any]:
        return summarize_dice(*self.arrays())
