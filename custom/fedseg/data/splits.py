"""Split files: which case (volume) ids belong to which centre and part, and which FLARE site holds which centre.

A split is data, not code. JSON format (``description`` is optional free text)::

    {
      "dataset": "lits",
      "description": "how the ids were assigned",
      "centres": {"centre-1": {"train": [0, 1], "val": [2], "test": []},
                  "centre-5": {"test": [9, 10]}},
      "sites": {"site-1": "centre-1"},
      "test_centre": "centre-5"
    }

Missing parts are empty. ``load_split`` accepts:

* ``"paper"``: the packaged FedGS LiTS split (``fedseg/data/splits/lits_paper.json``, 131 volumes);
* a path to a split JSON;
* ``"auto"``: one centre ``"local"`` with all cases on disk (1/8 for validation, at least one, seeded);
* ``None``: ``<root>/split.json`` if it exists, else ``"auto"``.

Validation (DataError naming the split file): ids that are not on disk, an id listed twice (within or
across centres and parts), sites that name unknown centres, an unknown test centre, malformed entries.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from fedseg.errors import DataError

__all__ = ["PARTS", "AUTO_CENTRE", "AUTO_VAL_FRACTION", "AUTO_SEED", "Split", "load_split", "centre_for_site",
           "paper_split_path", "split_to_json", "automatic_split", "parse_site_map"]

PARTS = ("train", "val", "test")
AUTO_CENTRE = "local"
AUTO_VAL_FRACTION = 1.0 / 8.0
AUTO_SEED = 0


@dataclass
class Split:
    """Centre -> part -> case ids, plus the FLARE site -> centre mapping."""

    dataset: str
    centres: dict[str, dict[str, list[int]]]  # centre -> {"train": [...], "val": [...], "test": [...]}
    sites: dict[str, str]  # FLARE site name -> centre, e.g. {"site-1": "centre-1"}
    test_centre: str | None
    source: str = ""  # where the split came from (file path or "automatic ..."), for messages
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def all_ids(self) -> list[int]:
        return sorted(i for parts in self.centres.values() for ids in parts.values() for i in ids)

    def ids(self, centre: str, part: str) -> list[int]:
        return list(self.centres[centre][part])


def parse_site_map(sites: Any, centres: Iterable[str], path: str) -> dict[str, str]:
    """The ``"sites"`` object of a split file (FLARE site name -> centre name), checked against ``centres``.

    DataError (naming ``path``) when it is not a str -> str object or names a centre that is not in ``centres``.
    """
    centres = list(centres)
    if not isinstance(sites, dict) or not all(isinstance(v, str) for v in sites.values()):
        raise DataError(f"{path}: \"sites\" must map FLARE site names to centre names, e.g. "
                        f'{{"site-1": "centre-1"}}')
    for site, centre in sites.items():
        if centre not in centres:
            raise DataError(f"{path}: sites[{site!r}] names centre {centre!r}, which is not in \"centres\" "
                            f"({', '.join(centres)}); fix the site mapping")
    return dict(sites)


def paper_split_path() -> Path:
    """Path of the packaged FedGS LiTS split file."""
    return Path(str(resources.files("fedseg.data") / "splits" / "lits_paper.json"))


def split_to_json(split: Split) -> dict[str, Any]:
    """The JSON object of a split (the file format above)."""
    out: dict[str, Any] = {"dataset": split.dataset}
    if split.description:
        out["description"] = split.description
    out["centres"] = {c: {p: list(map(int, parts.get(p, []))) for p in PARTS} for c, parts in split.centres.items()}
    out["sites"] = dict(split.sites)
    out["test_centre"] = split.test_centre
    return out


def automatic_split(case_ids: Iterable[int], dataset: str = "lits", source: str = "automatic split") -> Split:
    """One centre ``"local"`` of all cases: ``max(1, round(n / 8))`` seeded validation cases (none if n < 2)."""
    ids = sorted(int(i) for i in case_ids)
    n = len(ids)
    n_val = 0 if n < 2 else max(1, int(round(n * AUTO_VAL_FRACTION)))
    rng = np.random.default_rng(AUTO_SEED)
    val_idx = set(rng.permutation(n)[:n_val].tolist())
    val = sorted(ids[i] for i in val_idx)
    train = sorted(ids[i] for i in range(n) if i not in val_idx)
    return Split(dataset=dataset, centres={AUTO_CENTRE: {"train": train, "val": val, "test": []}}, sites={},
                 test_centre=None, source=source,
                 description=f"automatic: all {n} cases in one centre, {n_val} (1/8, >= 1) for validation, seed "
                             f"{AUTO_SEED}")


def _parse_ids(value: Any, where: str, path: str) -> list[int]:
    if not isinstance(value, list):
        raise DataError(f"{path}: {where} must be a list of integer case ids, got {type(value).__name__}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise DataError(f"{path}: {where} contains {v!r}; case ids are non-negative integers "
                            f"(the <i> of volume-<i>.nii)")
        out.append(int(v))
    return out


def _parse_split(data: Any, path: str) -> Split:
    if not isinstance(data, dict):
        raise DataError(f"{path}: a split file must be a JSON object with \"centres\", \"sites\", \"test_centre\"")
    unknown = sorted(set(data) - {"dataset", "description", "centres", "sites", "test_centre", "comment"})
    if unknown:
        raise DataError(f"{path}: unknown key(s) {unknown} in split file; allowed: dataset, description, centres, "
                        f"sites, test_centre")
    centres_raw = data.get("centres")
    if not isinstance(centres_raw, dict) or not centres_raw:
        raise DataError(f"{path}: \"centres\" must be a non-empty object like "
                        f'{{"centre-1": {{"train": [0, 1], "val": [2]}}}}')
    centres: dict[str, dict[str, list[int]]] = {}
    for name, parts in centres_raw.items():
        if not isinstance(parts, dict):
            raise DataError(f"{path}: centres[{name!r}] must be an object with train/val/test id lists")
        bad = sorted(set(parts) - set(PARTS))
        if bad:
            raise DataError(f"{path}: centres[{name!r}] has unknown part(s) {bad}; parts are {', '.join(PARTS)}")
        centres[str(name)] = {p: _parse_ids(parts.get(p, []), f"centres[{name!r}][{p!r}]", path) for p in PARTS}
    sites = parse_site_map(data.get("sites", {}), centres, path)
    test_centre = data.get("test_centre")
    if test_centre is not None and (not isinstance(test_centre, str) or test_centre not in centres):
        raise DataError(f"{path}: test_centre {test_centre!r} is not one of the centres ({', '.join(centres)})")
    description = data.get("description", "")
    return Split(dataset=str(data.get("dataset", "lits")), centres=centres, sites=sites,
                 test_centre=test_centre, source=path, description=str(description or ""))


def _validate(split: Split, case_ids: Iterable[int], root: Path) -> None:
    seen: dict[int, str] = {}
    for centre, parts in split.centres.items():
        for part in PARTS:
            for i in parts[part]:
                here = f"{centre}/{part}"
                if i in seen:
                    raise DataError(f"{split.source}: case {i} is listed twice ({seen[i]} and {here}); each case "
                                    f"must belong to exactly one centre and part")
                seen[i] = here
    on_disk = set(int(i) for i in case_ids)
    missing = sorted(set(seen) - on_disk)
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (f", ... ({len(missing)} in all)" if len(missing) > 20 else "")
        raise DataError(f"{split.source}: case id(s) {shown} are in the split but have no volume-<i>.nii[.gz] / "
                        f"segmentation-<i>.nii[.gz] pair in {root}; add the files, or use a split that matches "
                        f"the data (\"split\": null uses {root}/split.json or an automatic split)")


def load_split(spec: str | Path | None, root: Path, case_ids: list[int]) -> Split:
    """Load and validate the split ``spec`` for the cases ``case_ids`` found in ``root`` (see module doc)."""
    root = Path(root)
    if spec is None:
        candidate = root / "split.json"
        if not candidate.is_file():
            return automatic_split(case_ids, source=f"automatic split of {root} (no split.json)")
        spec = candidate
    if isinstance(spec, str) and spec == "auto":
        return automatic_split(case_ids, source=f"automatic split of {root}")
    path = paper_split_path() if (isinstance(spec, str) and spec == "paper") else Path(spec)
    if not path.is_file():
        raise DataError(f"split file {path} does not exist; use \"paper\", \"auto\", null, or the path of a split "
                        f"JSON file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read split file ({e}); fix or replace it") from e
    split = _parse_split(data, str(path))
    _validate(split, case_ids, root)
    return split


def centre_for_site(split: Split, site_name: str, explicit: str | None) -> str:
    """The centre a site holds: ``explicit`` if given, else the split's site mapping, else -- for a split
    without a site mapping, such as the automatic one -- its only (non-test) centre."""
    known_centres = ", ".join(split.centres) or "(none)"
    if explicit is not None:
        if explicit not in split.centres:
            raise DataError(f"site {site_name}: centre {explicit!r} is not in the split {split.source} (centres: "
                            f"{known_centres}); fix \"centre\" in the site's data configuration")
        return explicit
    if site_name in split.sites:
        return split.sites[site_name]
    trainable = [c for c in split.centres if c != split.test_centre]
    if not split.sites and len(trainable) == 1:  # e.g. the automatic split: every site holds "local"
        return trainable[0]
    known_sites = ", ".join(f"{s} -> {c}" for s, c in split.sites.items()) or "(none)"
    raise DataError(f"site {site_name!r} is not mapped to a centre in the split {split.source} (sites: {known_sites}; "
                    f"centres: {known_centres}); set \"centre\" for this site in its fedseg_data.json, or add it to "
                    f"the split's \"sites\"")
