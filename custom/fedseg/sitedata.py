"""One entry point for a site's data, whatever the dataset: resolves the site-local data configuration and loads
the requested part. Each dataset registers its preprocessing class, loaders and augmentation here (FLamby style:
every dataset module has the same shape)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from fedseg.errors import ConfigError


@dataclass(frozen=True)
class DatasetEntry:
    preprocessing: str  # "module:attribute"
    load_site: str
    load_test: str
    augment: str
    in_channels: int
    site_parts: tuple[str, ...] = ("train", "val")  # the parts load_site_data accepts for a site


DATASETS: Dict[str, DatasetEntry] = {
    "lits": DatasetEntry("fedseg.data.lits:LiTSPreprocessing", "fedseg.data.lits:load_lits_site",
                         "fedseg.data.lits:load_lits_test_centre", "fedseg.data.transforms:augment_batch", 1),
    "polypgen": DatasetEntry("fedseg.data.polypgen:PolypGenPreprocessing", "fedseg.data.polypgen:load_polypgen_site",
                             "fedseg.data.polypgen:load_polypgen_test_centre",
                             "fedseg.data.transforms:augment_polypgen_batch", 3),
    # 2.5D U-Net: in_channels = the 5 slices of a view; every hospital has its own test cases
    "covid": DatasetEntry("fedseg.data.covid:CovidPreprocessing", "fedseg.data.covid:load_covid_site",
                          "fedseg.data.covid:load_covid_test", "fedseg.data.covid:augment_covid_batch", 5,
                          site_parts=("train", "val", "test")),
}


def _entry(dataset: str) -> DatasetEntry:
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; known: {sorted(DATASETS)}")
    return DATASETS[dataset]


def _resolve(ref: str):
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def preprocessing(dataset: str, data_args: Optional[Dict[str, Any]] = None):
    cls = _resolve(_entry(dataset).preprocessing)
    try:
        return cls(**dict(data_args or {}))
    except TypeError as e:
        raise ConfigError(f"bad {dataset} data_args {data_args}: {e}") from e


def augmenter(dataset: str) -> Callable:
    """The dataset's training augmentation: ``fn(images, masks, generator=...) -> (images, masks)``."""
    return _resolve(_entry(dataset).augment)


def in_channels(dataset: str) -> int:
    return _entry(dataset).in_channels


def site_parts(dataset: str) -> tuple[str, ...]:
    """The parts :func:`load_site_data` accepts for a site: ("train", "val"), or ("train", "val", "test") for a
    dataset whose sites hold their own test cases (covid)."""
    return tuple(_entry(dataset).site_parts)


def load_site_data(dataset: str, site_name: str, part: str, data_args: Optional[Dict[str, Any]] = None,
                   workspace_root: Optional[str | Path] = None, progress: bool = False) -> Tuple[Any, Any]:
    """Returns (dataset object, DataSource) of ``part`` (one of :func:`site_parts`) of ``site_name``'s data."""
    from fedseg.data.config import resolve_data_source

    prep = preprocessing(dataset, data_args)
    source = resolve_data_source(dataset, site_name, workspace_root)
    return _resolve(_entry(dataset).load_site)(source, site_name, part, prep, progress=progress), source


def load_test_data(dataset: str, data_args: Optional[Dict[str, Any]] = None, site_name: str = "server",
                   workspace_root: Optional[str | Path] = None, progress: bool = False) -> Tuple[Any, Any]:
    """Returns (test-centre dataset, DataSource) as configured for ``site_name`` (the server by default)."""
    from fedseg.data.config import resolve_data_source

    prep = preprocessing(dataset, data_args)
    source = resolve_data_source(dataset, "server" if site_name is None else site_name, workspace_root)
    return _resolve(_entry(dataset).load_test)(source, prep, progress=progress), source
