"""Preprocessed-data caches shared by the dataset readers (:mod:`fedseg.data.lits`, :mod:`fedseg.data.polypgen`).

A cache is one folder holding ``images.npy``, ``masks.npy`` (opened with ``mmap_mode="r"``) and
``manifest.json`` (per-sample records plus a *fingerprint* of the inputs: file names, sizes, mtimes and the
preprocessing). The protocol, identical for every dataset:

* :func:`cache_folder` names the folder from a key (data root, sample list, preprocessing, format version), so
  other preprocessing gets its own folder and old folders stay valid;
* :func:`load_or_build` opens the folder under a *shared* ``fcntl`` lock; when it is missing or its
  fingerprint/format does not match, it takes the *exclusive* lock, checks again (another process may have
  built it meanwhile) and calls the builder once;
* builders write into a temporary sibling (:func:`building_folder`) which is renamed into place only when
  complete, so a reader never sees a half-written cache and a crashed build leaves nothing behind.

:class:`RowView` exposes a subset of a cache's rows as an array-like (``shape``, ``dtype``, ``len``,
``view[idx]`` reads only those rows from the memmap, ``np.asarray(view)``), so several datasets (e.g. the
train and validation folds of one PolypGen centre) share one cache without copying it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from fedseg.data.config import file_lock
from fedseg.errors import DataError

__all__ = ["ArraySpec", "RowView", "cache_folder", "files_fingerprint", "write_json_atomic", "open_cache",
           "building_folder", "load_or_build"]

#: expected ``(shape, dtype)`` of each array of a cache folder, by name (``"images"`` -> ``images.npy``)
ArraySpec = Mapping[str, tuple[tuple[int, ...], Any]]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def cache_folder(cache_dir: Path, prefix: str, label: str, key: Mapping[str, Any]) -> Path:
    """``<cache_dir>/<prefix>_<label>_<16 hex digits of sha256(key)>`` (label sanitised for file names)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
    return Path(cache_dir) / f"{prefix}_{safe}_{_digest(dict(key))[:16]}"


def files_fingerprint(entries: Iterable[tuple[Any, Sequence[Path]]], extra: Mapping[str, Any]) -> str:
    """sha256 over ``(id, [(name, size, mtime_ns) of each path])`` per entry plus ``extra`` (preprocessing...)."""
    files = []
    for ident, paths in entries:
        row: list[Any] = [ident]
        for p in paths:
            st = Path(p).stat()
            row += [Path(p).name, st.st_size, st.st_mtime_ns]
        files.append(row)
    return _digest({"extra": dict(extra), "files": files})


def write_json_atomic(path: Path, obj: Any, indent: int | None = None) -> None:
    """Write JSON to a temporary sibling and ``os.replace`` it onto ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        tmp.write_text(json.dumps(obj, indent=indent), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def open_cache(folder: Path, fingerprint: str, format_version: int,
               arrays: Callable[[dict[str, Any]], ArraySpec]) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The arrays (memory-mapped) and manifest of a valid cache folder, else None.

    Valid means: ``manifest.json`` parses, has this ``format_version`` and ``fingerprint``, and every array named
    by ``arrays(manifest)`` exists with exactly the expected shape and dtype. Zero-length arrays are loaded
    normally (they cannot be memory-mapped).
    """
    mf = Path(folder) / "manifest.json"
    if not mf.is_file():
        return None
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if (not isinstance(manifest, dict) or manifest.get("format_version") != format_version
            or manifest.get("fingerprint") != fingerprint):
        return None
    try:
        spec = arrays(manifest)
    except (KeyError, TypeError, ValueError):
        return None
    out: dict[str, np.ndarray] = {}
    for name, (shape, dtype) in spec.items():
        try:
            arr = np.load(Path(folder) / f"{name}.npy", mmap_mode="r" if int(np.prod(shape)) > 0 else None)
        except (OSError, ValueError):
            return None
        if tuple(arr.shape) != tuple(shape) or arr.dtype != np.dtype(dtype):
            return None
        out[name] = arr
    return out, manifest


@contextlib.contextmanager
def building_folder(folder: Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``folder``; on success rename it onto ``folder`` (replacing an old one).

    On an exception the temporary folder is removed and ``folder`` is left untouched.
    """
    folder = Path(folder)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        yield tmp
        old = None
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(folder, old)
        os.rename(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_or_build(folder: Path, open_fn: Callable[[], Any | None], build_fn: Callable[[], Any], what: str) -> Any:
    """``open_fn()`` under a shared lock; if None, build once under the exclusive lock and open again.

    ``open_fn`` returns the opened cache or None (missing / stale); ``build_fn`` writes the folder (e.g. with
    :func:`building_folder`). ``what`` names the cache in the error raised if it still cannot be opened.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = folder.parent / f"{folder.name}.lock"
    with file_lock(lock, shared=True):
        opened = open_fn()
    if opened is not None:
        return opened
    with file_lock(lock):
        opened = open_fn()  # another process may have built it while we waited for the lock
        if opened is None:
            build_fn()
            opened = open_fn()
    if opened is None:  # pragma: no cover - would mean the folder was removed right after building
        raise DataError(f"{what} cache {folder} could not be opened after building; check the disk and retry")
    return opened


class RowView:
    """Read-only array-like over rows ``rows`` of ``base`` (an ndarray or memmap), without copying it.

    ``view[i]`` / ``view[a:b]`` / ``view[index_array]`` read only the selected rows (numpy arrays are returned);
    ``np.asarray(view)`` materialises all rows. ``shape``, ``dtype``, ``ndim`` and ``len`` behave like those of
    the selected sub-array. Pickling keeps ``base`` as it is; datasets replace it by their cache path.
    """

    def __init__(self, base: np.ndarray, rows: np.ndarray | Sequence[int]) -> None:
        self.base = base
        self.rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if self.rows.size and (self.rows.min() < 0 or self.rows.max() >= base.shape[0]):
            raise IndexError(f"rows out of range for an array of {base.shape[0]} rows")

    @property
    def shape(self) -> tuple[int, ...]:
        return (int(self.rows.size),) + tuple(self.base.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    @property
    def ndim(self) -> int:
        return self.base.ndim

    def __len__(self) -> int:
        return int(self.rows.size)

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, tuple):
            first, rest = key[0], key[1:]
        else:
            first, rest = key, ()
        sel = self.rows[first]
        if np.ndim(sel) == 0:
            out = np.asarray(self.base[int(sel)])
        elif sel.size and np.all(np.diff(sel) == 1):  # contiguous: one slice read
            out = np.asarray(self.base[int(sel[0]):int(sel[-1]) + 1])
        else:
            out = np.asarray(self.base[sel]) if sel.size else np.zeros((0,) + self.shape[1:], dtype=self.dtype)
        return out[(slice(None),) * (0 if np.ndim(sel) == 0 else 1) + rest] if rest else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[np.arange(len(self))] if len(self) else np.zeros(self.shape, dtype=self.dtype)
        return out.astype(dtype, copy=False) if dtype is not None else out

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"RowView(shape={self.shape}, dtype={self.dtype})"
