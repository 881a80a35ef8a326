"""Pooled (centralized) training data: the concatenation of several sites' parts without copying them.

:class:`PooledData` presents parts ``p_0, ..., p_{m-1}`` (any dataset objects of the training convention, see
:mod:`fedseg.training`) as one dataset of ``sum(len(p_j))`` samples: global index ``g`` is sample
``g - offset_j`` of the part ``j`` with ``offset_j <= g < offset_{j+1}`` (``offset_j`` = the sizes of the parts
before ``j``). The per-sample arrays ``delta`` / ``small`` / ``nonempty`` are concatenated (small 1-D arrays); the
images and masks stay in the parts (memory-mapped caches, lazy 2.5D samples): :meth:`PooledData.batch` reads a batch
from the parts -- through a part's own ``batch(idx)`` hook when it has one, else
:func:`fedseg.evaluation.image_batch` / :func:`fedseg.evaluation.mask_batch` -- and returns the rows in the order of
the requested indices. :class:`fedseg.training.LocalTrainer` uses that hook, so the centralized baseline trains with
the same batch code as a site.

Pure code (numpy + torch), no nvflare import.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedseg.errors import DataError

__all__ = ["PooledData"]


def _part_len(part: Any) -> int:
    return len(np.asarray(part.delta))


class PooledData:
    """Concatenation of dataset parts (see the module docstring).

    ``parts``: the datasets, in order; ``names``: one label per part (e.g. the site), used in error messages and
    :attr:`part_of`. Attributes: ``parts``, ``names``, ``offsets`` (int64 [m + 1], ``offsets[j]`` = first global
    index of part j), ``delta`` (float32), ``small`` / ``nonempty`` (bool), ``part_index`` (int64 [N]: the part of
    each global index).
    """

    def __init__(self, parts: Sequence[Any], names: Sequence[str] | None = None):
        self.parts = list(parts)
        if not self.parts:
            raise DataError("PooledData needs at least one part (no site data was given to pool)")
        self.names = [str(n) for n in names] if names is not None else [f"part-{j}" for j in range(len(self.parts))]
        if len(self.names) != len(self.parts):
            raise DataError(f"PooledData: {len(self.parts)} parts but {len(self.names)} names")
        sizes = []
        for name, part in zip(self.names, self.parts):
            for attr in ("delta", "small", "nonempty"):
                if not hasattr(part, attr):
                    raise DataError(f"PooledData: the data of {name} has no {attr!r} array (not a training dataset)")
            n = _part_len(part)
            if len(np.asarray(part.small)) != n or len(np.asarray(part.nonempty)) != n:
                raise DataError(f"PooledData: the data of {name} has delta/small/nonempty of different lengths")
            sizes.append(n)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.delta = np.concatenate([np.asarray(p.delta, np.float32) for p in self.parts])
        self.small = np.concatenate([np.asarray(p.small, bool) for p in self.parts])
        self.nonempty = np.concatenate([np.asarray(p.nonempty, bool) for p in self.parts])
        self.part_index = np.repeat(np.arange(len(self.parts), dtype=np.int64), sizes)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def sizes(self) -> list[int]:
        return [int(b - a) for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    def locate(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(part j, local index) of every global index in ``idx`` (negative or out-of-range indices: DataError)."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise DataError(f"PooledData: index out of range 0..{len(self) - 1}: {idx[(idx < 0) | (idx >= len(self))][:5]}")
        part = self.part_index[idx]
        return part, idx - self.offsets[part]

    def part_of(self, g: int) -> tuple[str, int]:
        """(name of the part, local index) of global index ``g``."""
        j, local = self.locate(np.array([g]))
        return self.names[int(j[0])], int(local[0])

    @staticmethod
    def _read(part: Any, local: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if hasattr(part, "batch"):
            x, y = part.batch(local)
            return x, y
        from fedseg.evaluation import image_batch, mask_batch

        return image_batch(part, local), mask_batch(part, local)

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (x, y) of global indices ``idx``, rows in the order of ``idx``; each part is read once, with its
        local indices in ascending order (sorted reads suit memory-mapped arrays)."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        part, local = self.locate(idx)
        pieces = []  # (positions in idx, x rows, y rows)
        for j in np.unique(part):
            pos = np.flatnonzero(part == j)
            order = np.argsort(local[pos], kind="stable")
            pos = pos[order]
            x, y = self._read(self.parts[int(j)], local[pos])
            if x.shape[0] != pos.size or y.shape[0] != pos.size:
                raise DataError(f"PooledData: the data of {self.names[int(j)]} returned {x.shape[0]} rows for "
                                f"{pos.size} indices")
            pieces.append((pos, x, y))
        if not pieces:
            raise DataError("PooledData.batch: empty index list")
        shapes = {(tuple(x.shape[1:]), tuple(y.shape[1:])) for _, x, y in pieces}
        if len(shapes) > 1:
            detail = ", ".join(f"{self.names[int(part[p[0]])]}: x {tuple(x.shape[1:])} y {tuple(y.shape[1:])}"
                               for p, x, y in pieces)
            raise DataError(f"PooledData: the pooled parts have samples of different shapes ({detail}); pool data "
                            "preprocessed with the same data_args (image size, channels)")
        x0, y0 = pieces[0][1], pieces[0][2]
        x_out = torch.empty((idx.size,) + tuple(x0.shape[1:]), dtype=torch.float32)
        y_out = torch.empty((idx.size,) + tuple(y0.shape[1:]), dtype=torch.float32)
        for pos, x, y in pieces:
            t = torch.from_numpy(pos)
            x_out[t] = x.to(torch.float32)
            y_out[t] = y.to(torch.float32)
        return x_out, y_out
