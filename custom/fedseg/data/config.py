"""Site-local data configuration: where each FLARE site finds its data, without editing the job.

A job only names a dataset (``"lits"``, ``"polypgen"`` or ``"covid"``). Each site decides *where* that data lives,
in this order:

1. ``<workspace_root>/local/fedseg_data.json`` -- FLARE's site-local folder. In a provisioned system
   ``workspace_root`` is the site's startup kit (``<kit>/local/``); under ``nvflare simulator -w WS`` the
   simulator copies ``WS/local`` into every site's workspace, so one file configures all simulated sites.
2. The JSON file named by the environment variable ``FEDSEG_DATA_CONFIG``.
3. Built-in synthetic data (``root=None``), generated once on first use (:func:`ensure_builtin_lits`,
   :func:`ensure_builtin_polypgen`, :func:`ensure_builtin_covid`).

File format (a site's section overrides the top level key by key; relative paths are resolved against the
folder that holds the JSON file; ``~`` is expanded)::

    {
      "lits": {"root": "/data/LiTS", "split": "paper", "centre": null, "cache_dir": null},
      "polypgen": {"root": "/data/PolypGen2021_MultiCenterData_v3", "split": null},
      "sites": {"site-1": {"lits": {"centre": "centre-1"}},
                "site-2": {"lits": {"root": "/mnt/other/LiTS"}, "polypgen": {"centre": "centre-2"}}}
    }

Keys of a dataset section:

* ``root`` (required): LiTS: folder with ``volume-<i>.nii[.gz]`` / ``segmentation-<i>.nii[.gz]``; PolypGen:
  folder with ``data_C<n>/images_C<n>/`` and ``data_C<n>/masks_C<n>/``; COVID: folder with
  ``<hospital>/imagesTr/`` and ``<hospital>/labelsTr/`` (:mod:`fedseg.data.covid`); the special value ``"builtin"``
  selects the built-in synthetic data explicitly.
* ``split``: ``"paper"`` (the packaged FedGS LiTS split), ``"auto"`` (LiTS: one local centre of all cases;
  PolypGen: automatic 5-fold split per centre; COVID: automatic 5-fold split per hospital, data_args ``fold``), a
  path to a split JSON, or ``null`` (``<root>/split.json`` if present, else automatic).
* ``centre``: the split's centre this site holds (default: the split's ``sites`` mapping; COVID: the hospital,
  default site-1..site-5 -> A..E).
* ``cache_dir``: where preprocessed caches go (default ``<root>/.fedseg_cache``, or ``~/.cache/fedseg/cache``
  when the root is read-only).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from fedseg.errors import ConfigError, DataError

__all__ = [
    "CONFIG_ENV",
    "DATA_HOME_ENV",
    "LOCAL_CONFIG_NAME",
    "DATASETS",
    "DataSource",
    "resolve_data_source",
    "builtin_data_root",
    "ensure_builtin_lits",
    "ensure_builtin_polypgen",
    "ensure_builtin_covid",
    "default_cache_dir",
    "file_lock",
]

#: environment variable naming a data-configuration JSON file (step 2 of the resolution order)
CONFIG_ENV = "FEDSEG_DATA_CONFIG"
#: environment variable for the folder that holds built-in synthetic data (default ``~/.cache/fedseg/data``)
DATA_HOME_ENV = "FEDSEG_DATA_HOME"
#: file name inside FLARE's site-local folder ``<workspace>/local/``
LOCAL_CONFIG_NAME = "fedseg_data.json"
#: datasets this module knows how to configure
DATASETS = ("lits", "polypgen", "covid")
#: keys allowed in a dataset section
_SECTION_KEYS = ("root", "split", "centre", "cache_dir")
#: bump when the built-in data generator changes in a way that must regenerate old built-in copies
BUILTIN_LITS_VERSION = 1
BUILTIN_POLYPGEN_VERSION = 1  # bump with fedseg.data.synthetic_polypgen.SYNTH_VERSION
BUILTIN_COVID_VERSION = 1  # bump with fedseg.data.synthetic_covid.SYNTH_VERSION
#: what a data root of each dataset holds (for error messages)
_ROOT_CONTENT = {
    "lits": "volume-<i>.nii[.gz] and segmentation-<i>.nii[.gz]",
    "polypgen": "data_C<n>/images_C<n>/*.jpg and data_C<n>/masks_C<n>/*_mask.jpg",
    "covid": "<hospital>/imagesTr/<case>.nii.gz and <hospital>/labelsTr/<case>.nii.gz",
}
_BUILTIN_MARKER = ".fedseg_builtin.json"


@dataclass(frozen=True)
class DataSource:
    """Where one site's data for one dataset comes from (the result of :func:`resolve_data_source`)."""

    dataset: str
    root: Path | None  # None => built-in synthetic data (generated on first use)
    split: str | None  # "paper", "auto", a path to a split JSON, or None (root/split.json if present, else auto)
    centre: str | None  # explicit centre of the split for this site (else from the split's site mapping)
    cache_dir: Path | None  # where preprocessed caches go (None: <root>/.fedseg_cache or ~/.cache/fedseg/cache)
    origin: str  # human-readable: which file/env/default this came from (for logs and error messages)

    def __post_init__(self) -> None:  # accept str paths from callers
        for name in ("root", "cache_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(os.path.expanduser(str(value))))
        if self.split is not None and not isinstance(self.split, str):
            object.__setattr__(self, "split", str(self.split))

    @property
    def is_builtin(self) -> bool:
        return self.root is None


# ------------------------------------------------------------------------------------------ resolution
def _check_dataset(dataset: str) -> str:
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; known datasets: {', '.join(DATASETS)}")
    return dataset


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read {what} ({e}); check the path and its permissions") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: {what} is not valid JSON ({e}); fix the syntax "
                        f"(line {e.lineno}, column {e.colno})") from e
    if not isinstance(data, dict):
        raise DataError(f"{path}: {what} must be a JSON object, got {type(data).__name__}")
    return data


def _resolve_path(value: str, base: Path) -> Path:
    p = Path(os.path.expanduser(value))
    return p if p.is_absolute() else (base / p)


def _section(data: Mapping[str, Any], dataset: str, where: str, path: Path) -> dict[str, Any] | None:
    sec = data.get(dataset)
    if sec is None:
        return None
    if not isinstance(sec, dict):
        raise DataError(f"{path}: {where}{dataset!r} must be an object like "
                        f'{{"root": "/data/LiTS", "split": "paper"}}, got {type(sec).__name__}')
    unknown = sorted(set(sec) - set(_SECTION_KEYS))
    if unknown:
        raise DataError(f"{path}: unknown key(s) {unknown} in {where}{dataset!r}; allowed keys: "
                        f"{', '.join(_SECTION_KEYS)}")
    return dict(sec)


def _source_from_file(dataset: str, site_name: str, path: Path, how: str) -> DataSource:
    data = _read_json(path, "data configuration")
    unknown_top = sorted(set(data) - set(DATASETS) - {"sites", "description", "comment"})
    if unknown_top:
        raise DataError(f"{path}: unknown top-level key(s) {unknown_top}; allowed: "
                        f"{', '.join(DATASETS)}, sites (per-site overrides), description")
    merged: dict[str, Any] = {}
    top = _section(data, dataset, "", path)
    if top:
        merged.update(top)
    sites = data.get("sites", {})
    if not isinstance(sites, dict):
        raise DataError(f"{path}: \"sites\" must be an object mapping site names to overrides, "
                        f'e.g. {{"site-1": {{"{dataset}": {{"root": "/data"}}}}}}')
    site_sec_raw = sites.get(site_name)
    if site_sec_raw is not None:
        if not isinstance(site_sec_raw, dict):
            raise DataError(f"{path}: sites[{site_name!r}] must be an object like "
                            f'{{"{dataset}": {{"root": "/data"}}}}')
        site_sec = _section(site_sec_raw, dataset, f"sites[{site_name!r}].", path)
        if site_sec:
            merged.update(site_sec)
    origin = f"{path} ({how}; site {site_name})"
    fix = (f'add "{dataset}": {{"root": "/path/to/{dataset}"}} (top level, or under "sites": '
           f'{{"{site_name}": ...}}) to {path}, use "root": "builtin" for the built-in synthetic data, '
           f"or remove the file")
    if top is None and (site_sec_raw is None or not isinstance(site_sec_raw, dict) or dataset not in site_sec_raw):
        raise DataError(f"{path}: no {dataset!r} data is configured for site {site_name!r}; {fix}")
    root_val = merged.get("root")
    if root_val is None or (isinstance(root_val, str) and not root_val.strip()):
        raise DataError(f"{path}: the {dataset!r} data root for site {site_name!r} is missing or empty; {fix}")
    if not isinstance(root_val, str):
        raise DataError(f"{path}: the {dataset!r} root for site {site_name!r} must be a string path, "
                        f"got {root_val!r}")
    base = path.parent
    root: Path | None
    if root_val.strip() == "builtin":
        root = None
    else:
        root = _resolve_path(root_val.strip(), base)
        if not root.is_dir():
            state = "is not a folder" if root.exists() else "does not exist"
            raise DataError(f"{path}: the {dataset!r} data root {root} for site {site_name!r} {state}; "
                            f"point \"root\" at the folder that holds {_ROOT_CONTENT[dataset]} "
                            f"(relative paths are relative to {base})")
    split_val = merged.get("split")
    split: str | None
    if split_val is None:
        split = None
    elif not isinstance(split_val, str) or not split_val.strip():
        raise DataError(f"{path}: \"split\" for site {site_name!r} must be \"paper\", \"auto\", a path to a "
                        f"split JSON, or null; got {split_val!r}")
    elif split_val.strip() in ("paper", "auto"):
        split = split_val.strip()
    else:
        split = str(_resolve_path(split_val.strip(), base))
    centre_val = merged.get("centre")
    if centre_val is not None and (not isinstance(centre_val, str) or not centre_val.strip()):
        raise DataError(f"{path}: \"centre\" for site {site_name!r} must be a centre name such as "
                        f"\"centre-1\" or null; got {centre_val!r}")
    cache_val = merged.get("cache_dir")
    if cache_val is not None and (not isinstance(cache_val, str) or not cache_val.strip()):
        raise DataError(f"{path}: \"cache_dir\" for site {site_name!r} must be a folder path or null; "
                        f"got {cache_val!r}")
    cache_dir = _resolve_path(cache_val.strip(), base) if cache_val else None
    return DataSource(dataset=dataset, root=root, split=split,
                      centre=centre_val.strip() if centre_val else None,
                      cache_dir=cache_dir, origin=origin)


def resolve_data_source(dataset: str, site_name: str, workspace_root: str | Path | None = None,
                        env: Mapping[str, str] = os.environ) -> DataSource:
    """Where ``site_name`` finds ``dataset``: local file > ``$FEDSEG_DATA_CONFIG`` > built-in synthetic data.

    Raises DataError (naming the config file, the site and the fix) for an unreadable/invalid file, a missing
    or empty root, or a root folder that does not exist.
    """
    _check_dataset(dataset)
    if workspace_root is not None:
        local = Path(workspace_root) / "local" / LOCAL_CONFIG_NAME
        if local.is_file():
            return _source_from_file(dataset, site_name, local, "site-local config")
    env_val = env.get(CONFIG_ENV)
    if env_val:
        path = Path(os.path.expanduser(env_val))
        if not path.is_file():
            raise DataError(f"{CONFIG_ENV}={env_val} (site {site_name}): file does not exist; point "
                            f"{CONFIG_ENV} at a data-configuration JSON file or unset it to use the built-in "
                            f"synthetic data")
        return _source_from_file(dataset, site_name, path.resolve(), f"${CONFIG_ENV}")
    where = (f"no {Path(workspace_root) / 'local' / LOCAL_CONFIG_NAME}" if workspace_root is not None
             else "no workspace given")
    return DataSource(dataset=dataset, root=None, split=None, centre=None, cache_dir=None,
                      origin=f"built-in synthetic {dataset} data ({where}, ${CONFIG_ENV} not set)")


# ------------------------------------------------------------------------------------------ caches
def _writable_dir(path: Path) -> bool:
    """True if ``path`` exists as a writable folder or can be created."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def default_cache_dir(source: DataSource, root: Path) -> Path:
    """The cache folder for ``source`` whose data lives in ``root`` (explicit, else root/.fedseg_cache)."""
    if source.cache_dir is not None:
        if not _writable_dir(source.cache_dir):
            raise DataError(f"cache folder {source.cache_dir} (from {source.origin}) cannot be created or "
                            f"written; set \"cache_dir\" to a writable folder")
        return source.cache_dir
    in_root = root / ".fedseg_cache"
    if _writable_dir(in_root):
        return in_root
    fallback = Path.home() / ".cache" / "fedseg" / "cache"
    if not _writable_dir(fallback):
        raise DataError(f"neither {in_root} nor {fallback} is writable for the preprocessed-data cache "
                        f"(data from {source.origin}); set \"cache_dir\" in the data configuration")
    return fallback


@contextlib.contextmanager
def file_lock(path: Path, shared: bool = False) -> Iterator[None]:
    """Hold an ``fcntl.flock`` on ``path`` (created if needed): exclusive, or shared for readers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------------ built-in data
def builtin_data_root(dataset: str) -> Path:
    """``$FEDSEG_DATA_HOME/<dataset>_builtin``, or ``~/.cache/fedseg/data/<dataset>_builtin``."""
    _check_dataset(dataset)
    home = os.environ.get(DATA_HOME_ENV)
    base = Path(os.path.expanduser(home)) if home else Path.home() / ".cache" / "fedseg" / "data"
    return base / f"{dataset}_builtin"


def _builtin_marker_ok(root: Path, expected: dict[str, Any]) -> bool:
    marker = root / _BUILTIN_MARKER
    if not marker.is_file():
        return False
    try:
        found = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return all(found.get(k) == v for k, v in expected.items())


def _ensure_builtin(dataset: str, generator: str, version: int, progress: bool, preset: str, seed: int) -> Path:
    """Run the generator ``"module:function"`` as ``function(out_dir, preset=, seed=, progress=)`` once into
    :func:`builtin_data_root` (lock-safe); the module (scipy, nibabel, ...) is imported only when generating."""
    root = builtin_data_root(dataset)
    expected = {"generator_version": version, "preset": preset, "seed": int(seed)}
    if _builtin_marker_ok(root, expected):
        return root
    parent = root.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {parent} for the built-in synthetic data ({e}); set "
                        f"{DATA_HOME_ENV} to a writable folder") from e
    with file_lock(parent / f".{root.name}.lock"):
        if _builtin_marker_ok(root, expected):  # another process finished while we waited
            return root
        from fedseg.data.cache import building_folder  # cache imports this module

        module, _, function = generator.partition(":")
        generate = getattr(importlib.import_module(module), function)
        with building_folder(root) as tmp:  # temporary sibling, renamed onto root once complete
            generate(tmp, preset=preset, seed=seed, progress=progress)
            marker = dict(expected, generation_id=uuid.uuid4().hex, pid=os.getpid())
            (tmp / _BUILTIN_MARKER).write_text(json.dumps(marker, indent=1), encoding="utf-8")
    return root


def ensure_builtin_lits(progress: bool = False, *, preset: str = "quick", seed: int = 0) -> Path:
    """Return the built-in synthetic LiTS root, generating ``synth_lits(preset, seed)`` there once.

    Safe when several processes call it at once (e.g. 5 simulated sites): an exclusive ``fcntl`` lock
    serialises them, the data is generated into a temporary sibling folder and renamed into place, and a
    marker file (written inside before the rename) records the generator version, preset and seed. A copy
    from another generator version/preset/seed is replaced. ``preset``/``seed`` exist for tests.
    """
    return _ensure_builtin("lits", "fedseg.data.synthetic:synth_lits", BUILTIN_LITS_VERSION, progress, preset, seed)


def ensure_builtin_polypgen(progress: bool = False, *, preset: str = "quick", seed: int = 0) -> Path:
    """Return the built-in synthetic PolypGen root, generating ``synth_polypgen(preset, seed)`` there once.

    Same protocol as :func:`ensure_builtin_lits` (lock, temporary folder + rename, marker with the generator
    version, preset and seed).
    """
    return _ensure_builtin("polypgen", "fedseg.data.synthetic_polypgen:synth_polypgen", BUILTIN_POLYPGEN_VERSION,
                           progress, preset, seed)


def ensure_builtin_covid(progress: bool = False, *, preset: str = "quick", seed: int = 0) -> Path:
    """Return the built-in synthetic COVID root, generating ``synth_covid(preset, seed)`` there once.

    Same protocol as :func:`ensure_builtin_lits` (lock, temporary folder + rename, marker with the generator
    version, preset and seed).
    """
    return _ensure_builtin("covid", "fedseg.data.synthetic_covid:synth_covid", BUILTIN_COVID_VERSION,
                           progress, preset, seed)
