"""One entry point for a site's data, whatever the dataset: resolves the site-local data configuration and loads
the requested part. New datasets (PolypGen, COVID CT) register a loader here."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from fedseg.errors import ConfigError

DATASETS = ("lits",)


def _lits_prep(data_args: Dict[str, Any]):
    from fedseg.data.lits import LiTSPreprocessing

    try:
        return LiTSPreprocessing(**data_args)
    except TypeError as e:
        raise ConfigError(f"bad LiTS data_args {data_args}: {e}") from e


def load_site_data(dataset: str, site_name: str, part: str, data_args: Optional[Dict[str, Any]] = None,
                   workspace_root: Optional[str | Path] = None, progress: bool = False) -> Tuple[Any, Any]:
    """Returns (dataset object, DataSource) of ``part`` ("train" / "val") of ``site_name``'s data."""
    data_args = dict(data_args or {})
    if dataset == "lits":
        from fedseg.data.config import resolve_data_source
        from fedseg.data.lits import load_lits_site

        source = resolve_data_source("lits", site_name, workspace_root)
        return load_lits_site(source, site_name, part, _lits_prep(data_args), progress=progress), source
    raise ConfigError(f"unknown dataset {dataset!r}; known: {DATASETS}")


def load_test_data(dataset: str, data_args: Optional[Dict[str, Any]] = None, site_name: str = "server",
                   workspace_root: Optional[str | Path] = None, progress: bool = False) -> Tuple[Any, Any]:
    """Returns (test-centre dataset, DataSource) as configured for ``site_name`` (the server by default)."""
    data_args = dict(data_args or {})
    if dataset == "lits":
        from fedseg.data.config import resolve_data_source
        from fedseg.data.lits import load_lits_test_centre

        source = resolve_data_source("lits", site_name, workspace_root)
        return load_lits_test_centre(source, _lits_prep(data_args), progress=progress), source
    raise ConfigError(f"unknown dataset {dataset!r}; known: {DATASETS}")
