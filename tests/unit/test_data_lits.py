"""LiTS reader: slices, fixed scaling, binary masks, difficulty manifest, cache reuse/rebuild, bad inputs."""

from __future__ import annotations

import gzip
import json
import math
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fedseg.data import lits as lits_mod
from fedseg.data.config import DataSource, ensure_builtin_lits
from fedseg.data.lits import LiTSPreprocessing, find_lits_cases, load_lits_site, load_lits_test_centre
from fedseg.difficulty import lits_difficulty
from fedseg.errors import DataError

P3 = LiTSPreprocessing(image_size=128, min_tumour_pixels=3)


@pytest.fixture
def tiny_master(tiny_lits):
    return tiny_lits


@pytest.fixture
def tiny(tmp_path, tiny_master):
    """A private copy (tests may modify files or leave caches)."""
    import shutil

    return Path(shutil.copytree(tiny_master, tmp_path / "lits"))


def _src(root, split=None, centre=None, cache_dir=None):
    return DataSource("lits", Path(root), split, centre, cache_dir, "test config")


# ------------------------------------------------------------------------------------------ handmade data
def _save(path: Path, arr: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))


def _write_case(root: Path, i: int, vol: np.ndarray, seg: np.ndarray, ext: str = ".nii.gz") -> None:
    root.mkdir(parents=True, exist_ok=True)
    _save(root / f"volume-{i}{ext}", vol)
    _save(root / f"segmentation-{i}{ext}", seg)


def _hand_case() -> tuple[np.ndarray, np.ndarray]:
    """64 x 64 x 5: slice 1 has 4 tumour px, slice 2 has 2 px, slice 3 has 256 px, slices 0/4 none."""
    vol = np.full((64, 64, 5), 100, dtype=np.int16)  # max HU of slice 1 is 100 < hu_max
    vol[:8, :8, :] = -500
    vol[60:, 60:, 3] = 300
    seg = np.zeros((64, 64, 5), dtype=np.uint8)
    seg[16:48, 16:48, :] = 1
    seg[20:22, 30:32, 1] = 2
    seg[40, 40:42, 2] = 2
    seg[24:40, 24:40, 3] = 2
    return vol, seg


def _hand_root(tmp_path: Path) -> Path:
    root = tmp_path / "hand"
    vol, seg = _hand_case()
    _write_case(root, 0, vol, seg)
    _write_case(root, 1, vol, seg)
    _write_case(root, 2, vol, seg)
    (root / "split.json").write_text(json.dumps({
        "centres": {"c1": {"train": [0], "val": [1]}, "c5": {"test": [2]}},
        "sites": {"site-1": "c1"}, "test_centre": "c5"}))
    return root


HAND = LiTSPreprocessing(image_size=64, min_tumour_pixels=3)


# ------------------------------------------------------------------------------------------ reading
def test_hand_computed_slices_scaling_and_difficulty(tmp_path):
    ds = load_lits_site(_src(_hand_root(tmp_path)), "site-1", "train", HAND)
    assert len(ds) == 2  # slice 2 (2 px < 3) and the empty slices are dropped
    assert [r["slice_index"] for r in ds.manifest] == [1, 3]
    assert [r["tumour_pixels"] for r in ds.manifest] == [4, 256]
    # fixed scaling (hu - 0) / 200 after clipping to [-200, 200] -- not per-volume min-max
    img1 = np.asarray(ds.images[0], dtype=np.float32)
    assert img1[30, 30] == pytest.approx(0.5) and img1[0, 0] == pytest.approx(-1.0)
    img3 = np.asarray(ds.images[1], dtype=np.float32)
    assert img3[62, 62] == pytest.approx(1.0) and img3[30, 10] == pytest.approx(0.5)
    # mask = label 2 only
    assert np.array_equal(np.asarray(ds.masks[0]), (_hand_case()[1][:, :, 1] == 2).astype(np.uint8))
    # difficulty on the native mask: 64*64 / 4 = 1024 >= 1000 -> small, delta = tanh((log_1000 1024)^2)
    r1, r3 = ds.manifest
    assert r1["inverse_area"] == pytest.approx(1024.0) and r1["small"] is True
    assert r1["delta"] == pytest.approx(math.tanh((math.log(1024) / math.log(1000)) ** 2)) == pytest.approx(0.76447,
                                                                                                          abs=1e-5)
    assert r3["inverse_area"] == pytest.approx(16.0) and r3["small"] is False and r3["delta"] == 0.0
    assert (r1["height"], r1["width"], r1["case_id"], r1["site"], r1["centre"], r1["split"]) == (
        64, 64, 0, "site-1", "c1", "train")
    assert ds.delta.dtype == np.float32 and ds.delta.tolist() == pytest.approx([0.76447, 0.0], abs=1e-5)
    assert ds.small.tolist() == [True, False] and ds.nonempty.tolist() == [True, True]


def test_reader_on_generated_nifti_matches_direct_computation(tiny):
    ds = load_lits_site(_src(tiny), "site-2", "train", P3)  # site-2 -> centre-2 -> case 2
    vol = np.asarray(nib.load(tiny / "volume-2.nii.gz").dataobj)
    seg = np.asarray(nib.load(tiny / "segmentation-2.nii.gz").dataobj)
    counts = (seg == 2).sum(axis=(0, 1))
    keep = np.flatnonzero(counts >= 3)
    assert len(ds) == keep.size > 0
    assert [r["slice_index"] for r in ds.manifest] == keep.tolist()
    for j, k in enumerate(keep):
        direct = lits_difficulty(seg[:, :, k] == 2)
        rec = ds.manifest[j]
        assert rec["tumour_pixels"] == direct.lesion_pixels
        assert rec["inverse_area"] == pytest.approx(direct.inverse_area)
        assert rec["small"] == direct.small and rec["delta"] == pytest.approx(direct.delta)
        assert np.array_equal(np.asarray(ds.masks[j]), (seg[:, :, k] == 2).astype(np.uint8))
        expected = (np.clip(vol[:, :, k].astype(np.float32), -200, 200) / 200).astype(np.float16)
        assert np.array_equal(np.asarray(ds.images[j]), expected)


def test_resized_images_and_binary_masks(tiny):
    prep = LiTSPreprocessing(image_size=64, min_tumour_pixels=3)
    ds = load_lits_site(_src(tiny), "site-1", "train", prep)
    assert ds.images.shape == ds.masks.shape == (len(ds), 64, 64)
    assert ds.images.dtype == np.float16 and ds.masks.dtype == np.uint8
    assert set(np.unique(np.asarray(ds.masks)).tolist()) <= {0, 1}
    assert float(np.min(ds.images)) >= -1.0 and float(np.max(ds.images)) <= 1.0
    # difficulty stays the native one (128 x 128), not the resized mask's
    assert all(r["height"] == 128 and r["inverse_area"] == pytest.approx(128 * 128 / r["tumour_pixels"])
               for r in ds.manifest)


def test_dataset_api(tiny):
    ds = load_lits_site(_src(tiny), "site-1", "train", P3)
    item = ds[0]
    assert set(item) == {"image", "mask", "delta", "small", "index"}
    assert item["image"].shape == item["mask"].shape == (1, 128, 128)
    assert item["image"].dtype == item["mask"].dtype == torch.float32
    assert item["delta"].dtype == torch.float32 and item["delta"].ndim == 0 and item["small"].dtype == torch.bool
    assert item["index"] == 0
    images, masks, delta, small = ds.tensors()
    n = len(ds)
    assert images.shape == masks.shape == (n, 1, 128, 128) and delta.shape == small.shape == (n,)
    assert torch.equal(images[0], item["image"]) and torch.equal(small, torch.from_numpy(ds.small))
    expected_keys = {"site", "centre", "split", "case_id", "slice_index", "tumour_pixels", "height", "width",
                     "inverse_area", "small", "delta"}
    assert expected_keys <= set(ds.manifest[0])
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers (spawn): re-opens the memmap, no copy pickled
    assert len(pickle.dumps(ds)) < 200_000 and isinstance(clone.images, np.memmap)
    assert np.array_equal(np.asarray(clone.images), np.asarray(ds.images))


def test_test_centre_and_empty_parts(tiny):
    te = load_lits_test_centre(_src(tiny), P3)
    assert te.centre == "centre-5" and te.part == "test" and len(te) > 0 and te.site is None
    assert {r["case_id"] for r in te.manifest} == {8, 9}
    empty = load_lits_site(_src(tiny, centre="centre-5"), "site-1", "val", P3)  # centre-5 has no val cases
    assert len(empty) == 0 and empty.tensors()[0].shape == (0, 1, 128, 128)
    with pytest.raises(DataError, match="no test centre"):
        load_lits_test_centre(_src(tiny, split="auto"), P3)


def test_builtin_source_generates_data_once(tmp_path, tiny_builtin):
    calls = tiny_builtin(lits_mod, ensure_builtin_lits)
    src = DataSource("lits", None, None, None, None, "built-in")
    ds = load_lits_site(src, "site-3", "train", P3)
    assert len(ds) > 0 and ds.centre == "centre-3"
    assert str(ds.cache_path).startswith(str(tmp_path / "data_home" / "lits_builtin" / ".fedseg_cache"))
    assert calls == [1]


# ------------------------------------------------------------------------------------------ cache
def test_second_load_uses_the_cache_without_reading_nifti(tiny, monkeypatch):
    first = load_lits_site(_src(tiny), "site-1", "train", P3)
    folder = first.cache_path
    assert sorted(p.name for p in folder.iterdir()) == ["images.npy", "manifest.json", "masks.npy"]
    assert json.loads((folder / "manifest.json").read_text())["fingerprint"]

    def fail(*a, **k):
        raise AssertionError("NIfTI read although the cache is valid")

    monkeypatch.setattr(nib, "load", fail)
    second = load_lits_site(_src(tiny), "site-1", "train", P3)
    assert isinstance(second.images, np.memmap) and second.cache_path == folder
    assert np.array_equal(np.asarray(second.images), np.asarray(first.images))
    assert second.manifest == first.manifest


def test_cache_is_rebuilt_when_data_or_parameters_change(tiny):
    first = load_lits_site(_src(tiny), "site-1", "train", P3)
    n_before = len(first)
    # remove the tumour of one kept slice in the training volume (case 0): the data changed
    seg_img = nib.load(tiny / "segmentation-0.nii.gz")
    seg = np.asarray(seg_img.dataobj).copy()
    k = first.manifest[0]["slice_index"]
    seg[:, :, k][seg[:, :, k] == 2] = 1
    _save(tiny / "segmentation-0.nii.gz", seg)
    rebuilt = load_lits_site(_src(tiny), "site-1", "train", P3)
    assert rebuilt.cache_path == first.cache_path and len(rebuilt) == n_before - 1
    assert k not in [r["slice_index"] for r in rebuilt.manifest]
    # other preprocessing -> its own cache folder; the first one is kept
    thr = max(r["tumour_pixels"] for r in rebuilt.manifest)
    other = load_lits_site(_src(tiny), "site-1", "train", LiTSPreprocessing(image_size=128, min_tumour_pixels=thr))
    assert other.cache_path != rebuilt.cache_path and 1 <= len(other) < len(rebuilt)
    assert all(r["tumour_pixels"] >= thr for r in other.manifest)
    # an explicit cache folder is used
    custom = load_lits_site(_src(tiny, cache_dir=tiny.parent / "cc"), "site-1", "train", P3)
    assert custom.cache_path.parent == tiny.parent / "cc"


# ------------------------------------------------------------------------------------------ bad inputs
def _err(root, site="site-1", part="train", prep=HAND, **kw) -> str:
    with pytest.raises(DataError) as e:
        load_lits_site(_src(root, **kw), site, part, prep)
    return str(e.value)


def test_missing_and_empty_root(tmp_path):
    msg = _err(tmp_path / "nope")
    assert str(tmp_path / "nope") in msg and "does not exist" in msg and "test config" in msg
    (tmp_path / "empty").mkdir()
    msg = _err(tmp_path / "empty")
    assert "contains no cases" in msg and "fedseg data synth lits" in msg


def test_unpaired_and_duplicate_files(tmp_path):
    root = _hand_root(tmp_path)
    (root / "segmentation-1.nii.gz").unlink()
    msg = _err(root)
    assert "volume-1.nii.gz" in msg and "without segmentation" in msg
    root2 = _hand_root(tmp_path / "b")
    (root2 / "volume-2.nii.gz").unlink()
    msg = _err(root2)
    assert "segmentation-2.nii.gz" in msg and "without volume" in msg
    root3 = _hand_root(tmp_path / "c")
    vol, seg = _hand_case()
    _save(root3 / "volume-0.nii", vol)
    assert "appears twice" in _err(root3)
    assert set(find_lits_cases(_hand_root(tmp_path / "d"))) == {0, 1, 2}


@pytest.mark.parametrize("which", ["volume", "segmentation"])
def test_truncated_gzip(tmp_path, which):
    root = _hand_root(tmp_path)
    path = root / f"{which}-0.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    msg = _err(root)
    assert str(path) in msg and ("truncated" in msg or "corrupt" in msg)


def test_truncated_uncompressed_and_garbage_files(tmp_path):
    root = tmp_path / "raw"
    vol, seg = _hand_case()
    _write_case(root, 0, vol, seg, ext=".nii")
    path = root / "volume-0.nii"
    path.write_bytes(path.read_bytes()[:-1000])
    msg = _err(root, split="auto")
    assert str(path) in msg and "truncated" in msg
    root2 = _hand_root(tmp_path / "g")
    (root2 / "segmentation-1.nii.gz").write_bytes(gzip.compress(b"this is not a NIfTI file" * 20))
    msg = _err(root2, part="val")
    assert "segmentation-1.nii.gz" in msg and "cannot read" in msg


def test_shape_mismatch(tmp_path):
    root = _hand_root(tmp_path)
    vol, _ = _hand_case()
    _save(root / "volume-0.nii.gz", vol[:, :, :4])
    msg = _err(root)
    assert "volume-0.nii.gz" in msg and "segmentation-0.nii.gz" in msg and "(64, 64, 4)" in msg


def test_labels_outside_0_1_2(tmp_path):
    root = _hand_root(tmp_path)
    _, seg = _hand_case()
    seg[0, 0, 0] = 3
    _save(root / "segmentation-0.nii.gz", seg)
    msg = _err(root)
    assert "segmentation-0.nii.gz" in msg and "[3]" in msg and "{0, 1, 2}" in msg


def test_nan_in_volume(tmp_path):
    root = _hand_root(tmp_path)
    vol, _ = _hand_case()
    vol = vol.astype(np.float32)
    vol[5, 5, 3] = np.nan
    _save(root / "volume-0.nii.gz", vol)
    msg = _err(root)
    assert "volume-0.nii.gz" in msg and "NaN" in msg and "slice 3" in msg


def test_site_without_tumour_slices(tmp_path):
    root = _hand_root(tmp_path)
    msg = _err(root, prep=LiTSPreprocessing(image_size=64, min_tumour_pixels=300))
    assert "site-1" in msg and "read 1 volume(s)" in msg and ">= 300" in msg and "min_tumour_pixels" in msg


def test_split_with_ids_not_on_disk_and_unknown_site(tmp_path):
    root = _hand_root(tmp_path)
    msg = _err(root, split="paper")
    assert "lits_paper.json" in msg and "3, 4, 5" in msg
    msg = _err(root, site="site-9")
    assert "site-9" in msg and "site-1 -> c1" in msg
