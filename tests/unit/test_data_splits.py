"""Split files: the packaged FedGS LiTS paper split, validation, automatic split, site -> centre mapping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedseg.data.splits import Split, automatic_split, centre_for_site, load_split, paper_split_path, split_to_json
from fedseg.errors import DataError

ALL_LITS = list(range(131))


def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def test_paper_split_counts():
    split = load_split("paper", Path("/nonexistent"), ALL_LITS)
    assert split.dataset == "lits"
    assert split.all_ids() == ALL_LITS  # every LiTS volume exactly once
    sizes = {c: sum(len(v) for v in parts.values()) for c, parts in split.centres.items()}
    assert sizes == {"centre-1": 27, "centre-2": 27, "centre-3": 27, "centre-4": 27, "centre-5": 23}
    for c in ("centre-1", "centre-2", "centre-3", "centre-4"):
        assert (len(split.ids(c, "train")), len(split.ids(c, "val")), len(split.ids(c, "test"))) == (24, 3, 0)
    assert (len(split.ids("centre-5", "train")), len(split.ids("centre-5", "val"))) == (0, 0)
    assert split.sites == {f"site-{i}": f"centre-{i}" for i in range(1, 5)}
    assert split.test_centre == "centre-5"
    assert "reference" in split.description and "24 train / 3 val" in split.description


def test_paper_split_follows_the_reference_code():
    split = load_split("paper", Path("/nonexistent"), ALL_LITS)
    # get_center_nr: 0-29, 30-59, 60-89, 90-119 -> centres 1-4 (minus their in_test volumes), 120-130 -> centre 5
    for c in range(1, 5):
        ids = split.ids(f"centre-{c}", "train") + split.ids(f"centre-{c}", "val")
        assert all(30 * (c - 1) <= i < 30 * c for i in ids)
    # val / in_test volumes read from the reference CSVs (data_lits/splits/center_splits/c*/)
    assert split.ids("centre-1", "val") == [6, 11, 19]
    assert split.ids("centre-3", "val") == [62, 65, 77]
    assert {45, 51} <= set(split.ids("centre-2", "val")) and {96, 118} <= set(split.ids("centre-4", "val"))
    assert split.ids("centre-5", "test") == [4, 8, 21, 33, 37, 54, 71, 74, 85, 98, 112, 113, *range(120, 131)]


def test_paper_split_file_is_packaged():
    path = paper_split_path()
    assert path.is_file() and path.name == "lits_paper.json"
    assert json.loads(path.read_text())["test_centre"] == "centre-5"


def test_missing_ids_are_named_with_the_split_file(tmp_path):
    with pytest.raises(DataError) as e:
        load_split("paper", tmp_path, list(range(120)))
    msg = str(e.value)
    assert "lits_paper.json" in msg and "120, 121" in msg and "130" in msg and str(tmp_path) in msg


def _split_obj(**over):
    obj = {"dataset": "lits", "centres": {"a": {"train": [0, 1], "val": [2]}, "t": {"test": [3]}},
           "sites": {"site-1": "a"}, "test_centre": "t"}
    obj.update(over)
    return obj


def test_custom_split_file_and_root_split_json(tmp_path):
    path = _write(tmp_path / "split.json", _split_obj())
    for spec in (str(path), path, None):  # None: <root>/split.json
        split = load_split(spec, tmp_path, [0, 1, 2, 3, 4])
        assert split.centres["a"] == {"train": [0, 1], "val": [2], "test": []}
        assert split.centres["t"] == {"train": [], "val": [], "test": [3]}
        assert split.source == str(path)
    assert split_to_json(split)["centres"]["a"]["val"] == [2]


@pytest.mark.parametrize("centres, needle", [
    ({"a": {"train": [0, 1], "val": [1]}}, "case 1 is listed twice"),
    ({"a": {"train": [0]}, "b": {"test": [0]}}, "case 0 is listed twice"),
    ({"a": {"train": [0], "tset": [1]}}, "unknown part"),
    ({"a": {"train": [0, "x"]}}, "'x'"),
])
def test_overlap_and_malformed_parts(tmp_path, centres, needle):
    path = _write(tmp_path / "s.json", {"centres": centres})
    with pytest.raises(DataError) as e:
        load_split(path, tmp_path, [0, 1, 2])
    assert needle in str(e.value) and str(path) in str(e.value)


def test_bad_site_mapping_and_test_centre(tmp_path):
    with pytest.raises(DataError, match="names centre 'zz'"):
        load_split(_write(tmp_path / "s1.json", _split_obj(sites={"site-1": "zz"})), tmp_path, [0, 1, 2, 3])
    with pytest.raises(DataError, match="test_centre"):
        load_split(_write(tmp_path / "s2.json", _split_obj(test_centre="q")), tmp_path, [0, 1, 2, 3])
    with pytest.raises(DataError, match="does not exist"):
        load_split(tmp_path / "nope.json", tmp_path, [0])


def test_automatic_split():
    s = load_split(None, Path("/nonexistent"), list(range(16, 0, -1)))
    local = s.centres["local"]
    assert len(local["val"]) == 2 and len(local["train"]) == 14  # 16 / 8
    assert local["train"] == sorted(local["train"]) and local["val"] == sorted(local["val"])
    assert sorted(local["train"] + local["val"]) == list(range(1, 17))
    assert s.test_centre is None and s.sites == {}
    assert automatic_split(range(1, 17)).centres == s.centres  # seeded: same every time
    assert len(automatic_split(range(5)).centres["local"]["val"]) == 1  # at least one
    assert automatic_split([7]).centres["local"] == {"train": [7], "val": [], "test": []}
    assert load_split("auto", Path("/x"), [1, 2, 3]).centres == automatic_split([1, 2, 3]).centres


def test_centre_for_site():
    split = Split("lits", {"a": {"train": [0], "val": [], "test": []}, "b": {"train": [1], "val": [], "test": []},
                           "t": {"train": [], "val": [], "test": [2]}}, {"site-1": "a", "site-2": "b"}, "t",
                  source="s.json")
    assert centre_for_site(split, "site-1", None) == "a"
    assert centre_for_site(split, "site-1", "b") == "b"  # explicit wins
    with pytest.raises(DataError) as e:
        centre_for_site(split, "site-9", None)
    assert "site-1 -> a" in str(e.value) and "a, b, t" in str(e.value) and "site-9" in str(e.value)
    with pytest.raises(DataError, match="'zz' is not in the split"):
        centre_for_site(split, "site-1", "zz")
    single = automatic_split([0, 1, 2])
    assert centre_for_site(single, "any-site", None) == "local"
