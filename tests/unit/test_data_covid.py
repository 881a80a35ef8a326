"""COVID data: synthetic generator, NIfTI reader and validation, cube cache, splits, 2.5D samples, hooks, augmentation."""

from __future__ import annotations

import gzip
import json
import pickle
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from fedseg.cli import main
from fedseg.data import covid as covid_mod
from fedseg.data.config import DataSource, ensure_builtin_covid
from fedseg.data.covid import (
    PAPER_OFFSETS,
    CovidPreprocessing,
    find_covid_cases,
    load_covid_cases,
    load_covid_site,
    load_covid_split,
    load_covid_test,
    offsets_from_mm,
    read_covid_case,
    resample_mask,
)
from fedseg.data.synthetic_covid import HOSPITALS, PRESETS, make_case, synth_covid
from fedseg.difficulty import lits_difficulty_from_counts
from fedseg.errors import ConfigError, DataError
from fedseg.sitedata import in_channels, load_site_data, load_test_data, site_parts

P24 = CovidPreprocessing(volume_size=24)


@pytest.fixture(scope="session")
def tiny_covid(tmp_path_factory):
    """The 'tiny' synthetic COVID data (seed 0), written once per session; copy it before modifying it."""
    return synth_covid(tmp_path_factory.mktemp("tinycovid") / "covid", preset="tiny", seed=0, progress=False)


@pytest.fixture
def tiny(tmp_path, tiny_covid):
    return Path(shutil.copytree(tiny_covid, tmp_path / "covid"))


def _src(root, split=None, centre=None, cache_dir=None):
    return DataSource("covid", Path(root), split, centre, cache_dir, "test config")


# ------------------------------------------------------------------------------------------ generator
def test_presets_match_the_paper_and_quick_rules():
    paper = PRESETS["paper"].counts
    assert sum(paper) == 180 and min(paper) == 9 and max(paper) == 119 and paper == (119, 22, 18, 12, 9)
    quick = PRESETS["quick"].counts
    assert min(quick) >= 5 and len(set(quick)) > 1
    thick = {t for h in HOSPITALS.values() for t in h.thickness_mm}
    assert thick == {1.0, 1.25, 2.0, 3.3, 5.0, 7.5}  # the paper's six slice thicknesses
    assert len({(h.hu_scale, h.hu_offset, h.noise_sigma) for h in HOSPITALS.values()}) == 5


def test_synthetic_layout_nifti_and_metadata(tiny_covid):
    meta = json.loads((tiny_covid / "synthetic.json").read_text())
    assert sorted(meta["cases"]) == ["A", "B", "C", "D", "E"]
    for h, cases in meta["cases"].items():
        assert len(cases) == 5
        for c in cases:
            img = nib.load(str(tiny_covid / h / "imagesTr" / f"{c['case']}.nii.gz"))
            lab = nib.load(str(tiny_covid / h / "labelsTr" / f"{c['case']}.nii.gz"))
            assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
            assert list(img.shape) == c["shape"] and np.allclose(img.affine, lab.affine)
            zooms = img.header.get_zooms()
            assert zooms[0] == pytest.approx(c["pixel_mm"], abs=1e-3)
            assert zooms[2] == pytest.approx(c["slice_thickness_mm"])
            assert c["slice_thickness_mm"] in HOSPITALS[h].thickness_mm
            y = np.asarray(lab.dataobj)
            assert set(np.unique(y).tolist()) <= {0, 1} and int(y.sum()) == c["infection_voxels"]
    kinds = {les["kind"] for cs in meta["cases"].values() for c in cs for les in c["lesions"]}
    assert kinds == {"small", "medium", "large"}
    assert sum(c["infection_voxels"] > 0 for cs in meta["cases"].values() for c in cs) >= 20


def test_generator_is_deterministic_and_seeded(tmp_path):
    a = synth_covid(tmp_path / "a", "tiny", seed=3, progress=False, counts=(1, 1, 1, 1, 1))
    b = synth_covid(tmp_path / "b", "tiny", seed=3, progress=False, counts=(1, 1, 1, 1, 1))
    for f in ("A/imagesTr/A000001.nii.gz", "D/labelsTr/D000001.nii.gz"):
        assert (a / f).read_bytes() == (b / f).read_bytes()
    hu3, _, _, _ = make_case("B", 0, PRESETS["tiny"], 3)
    hu4, _, _, _ = make_case("B", 0, PRESETS["tiny"], 4)
    assert np.array_equal(hu3, np.asarray(nib.load(str(a / "B/imagesTr/B000001.nii.gz")).dataobj))
    assert not np.array_equal(hu3, hu4)


def test_hospitals_differ_in_scanner_calibration():
    # air in the image corners (outside the body) shows each scanner's HU map: scale * -1000 + offset, clipped at -1024
    for h, spec in HOSPITALS.items():
        hu, _, _, _ = make_case(h, 0, PRESETS["tiny"], 0)
        corner = np.median(hu[:4, :4, :])
        assert corner == pytest.approx(max(-1024.0, spec.hu_scale * -1000.0 + spec.hu_offset), abs=10.0)


def test_bad_preset_and_overrides():
    with pytest.raises(ConfigError, match="unknown synthetic COVID preset"):
        synth_covid("/nonexistent", "huge")
    with pytest.raises(ConfigError, match="override"):
        synth_covid("/nonexistent", "tiny", slices=3)
    with pytest.raises(ConfigError, match="counts"):
        synth_covid("/nonexistent", "tiny", counts=(1, 2))


# ------------------------------------------------------------------------------------------ handmade data
def _save(path: Path, arr: np.ndarray, affine=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.diag([0.8, 0.8, 2.0, 1.0]) if affine is None else affine), str(path))


def _hand_volume(n: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n^3 HU volume: body (0 HU + a ramp) with an air-like 'lung' box inside; infection block in the lung."""
    rng = np.random.default_rng(seed)
    hu = np.full((n, n, n), -1000, np.int16)
    hu[1:-1, 1:-1, :] = (rng.integers(-50, 50, size=(n - 2, n - 2, n))).astype(np.int16)
    hu[4:12, 4:12, 2:14] = -850
    lab = np.zeros((n, n, n), np.uint8)
    lab[6:10, 6:9, 5:9] = 1
    hu[lab > 0] = -500
    return hu, lab


def _hand_root(tmp_path: Path, n_cases: int = 5, hospitals=("H1", "H2")) -> Path:
    root = tmp_path / "hand"
    for hi, h in enumerate(hospitals):
        for i in range(n_cases):
            hu, lab = _hand_volume(seed=10 * hi + i)
            if i == 0:  # one healthy case per hospital
                hu[lab > 0] = -850
                lab[:] = 0
            _save(root / h / "imagesTr" / f"{h}_{i:02d}.nii.gz", hu)
            _save(root / h / "labelsTr" / f"{h}_{i:02d}.nii.gz", lab)
    return root


def test_samples_hold_three_views_with_offsets_and_edge_replication(tmp_path):
    root = _hand_root(tmp_path)
    prep = CovidPreprocessing(volume_size=16, min_lung_fraction=0.0)  # no resampling: cube == volume
    found = find_covid_cases(root)
    ds = load_covid_cases(root, found, {"H1": ["H1_01"]}, prep=prep, cache_dir=tmp_path / "cache", site="s",
                          centre="H1", part="train")
    hu, lab = _hand_volume(seed=1)
    cube = (np.clip(hu.astype(np.float32), -1000, 400) + 1000) / 1400
    assert len(ds) == 16 and len(ds.delta) == len(ds.images) == len(ds.masks) == 16
    x, y = ds.batch(np.array([0, 7]))
    assert x.shape == (2, 3, 5, 16, 16) and y.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    for row, k in ((0, 0), (1, 7)):
        sl = np.clip(k + np.array([-2, -1, 0, 1, 2]), 0, 15)
        np.testing.assert_allclose(x[row, 0].numpy(), cube[:, :, sl].transpose(2, 0, 1), atol=1e-3)  # xy: axial
        np.testing.assert_allclose(x[row, 1].numpy(), cube[sl], atol=1e-3)  # yz: sagittal
        np.testing.assert_allclose(x[row, 2].numpy(), cube[:, sl, :].transpose(1, 0, 2), atol=1e-3)  # xz
        np.testing.assert_array_equal(y[row, 0].numpy(), lab[:, :, k])
        np.testing.assert_array_equal(y[row, 1].numpy(), lab[k])
        np.testing.assert_array_equal(y[row, 2].numpy(), lab[:, k, :])
    # k = 0: slices (0, 0, 0, 1, 2) -- edge replication
    np.testing.assert_array_equal(x[0, 0, 0].numpy(), x[0, 0, 2].numpy())
    # the lazy arrays give the same samples
    np.testing.assert_array_equal(ds.images[7], x[1].numpy())
    np.testing.assert_array_equal(ds.masks[[0, 7]], y.numpy())
    item = ds[7]
    assert item["image"].shape == (3, 5, 16, 16) and item["mask"].shape == (3, 16, 16)


def test_difficulty_from_axial_mask_and_sample_selection(tmp_path):
    root = _hand_root(tmp_path)
    prep = CovidPreprocessing(volume_size=16, min_lung_fraction=0.05)
    found = find_covid_cases(root)
    ds = load_covid_cases(root, found, {"H1": ["H1_01"]}, prep=prep, cache_dir=tmp_path / "cache", site="s",
                          centre="H1", part="train")
    # lung box spans axial slices 2..13 (64 of 256 px = 0.25 >= 0.05): those are kept, 0, 1, 14, 15 are not
    assert ds.sample_index.tolist() == list(range(2, 14))
    # axial infection: 4 x 3 = 12 px in slices 5..8 -> a_inv = 256 / 12 < 1000: not small, delta 0
    _, y = ds.batch(np.arange(len(ds)))
    counts = y[:, 0].sum(dim=(1, 2)).numpy().astype(int)
    assert counts.tolist() == [0, 0, 0, 12, 12, 12, 12, 0, 0, 0, 0, 0]
    _, small, delta = lits_difficulty_from_counts(counts, 16, 16)
    np.testing.assert_array_equal(ds.small, small)
    np.testing.assert_allclose(ds.delta, delta)
    np.testing.assert_array_equal(ds.nonempty, counts > 0)
    # a larger threshold keeps only indices with infection in some view (never dropped)
    ds2 = load_covid_cases(root, found, {"H1": ["H1_01"]}, prep=CovidPreprocessing(volume_size=16,
                           min_lung_fraction=0.9), cache_dir=tmp_path / "cache", site="s", centre="H1", part="train")
    inf_any = [k for k in range(16) if lab_any(k)]
    assert ds2.sample_index.tolist() == inf_any


def lab_any(k: int) -> bool:
    _, lab = _hand_volume(seed=1)
    return bool(lab[:, :, k].any() or lab[k].any() or lab[:, k, :].any())


def test_small_flag_on_the_cube_slice(tmp_path):
    # one infected voxel in a 32^2 axial slice: a_inv = 1024 >= 1000 -> small, delta = tanh(log_1000(1024)^2)
    root = tmp_path / "one"
    hu = np.zeros((32, 32, 32), np.int16)
    hu[8:24, 8:24, :] = -900
    lab = np.zeros((32, 32, 32), np.uint8)
    lab[10, 10, 10] = 1
    _save(root / "H" / "imagesTr" / "c.nii.gz", hu)
    _save(root / "H" / "labelsTr" / "c.nii.gz", lab)
    ds = load_covid_cases(root, find_covid_cases(root), {"H": ["c"]}, prep=CovidPreprocessing(volume_size=32),
                          cache_dir=tmp_path / "cache", site=None, centre="H", part="test")
    i = int(np.flatnonzero(ds.sample_index == 10)[0])
    assert ds.small[i] and ds.nonempty[i] and ds.small.sum() == 1
    assert ds.delta[i] == pytest.approx(np.tanh((np.log(1024) / np.log(1000)) ** 2), rel=1e-6)


def test_resampling_to_the_cube_keeps_masks_binary(tmp_path):
    root = tmp_path / "aniso"
    hu = np.full((40, 30, 12), -1000, np.int16)
    hu[2:38, 2:28, :] = 20
    hu[5:35, 5:25, 1:11] = -850
    lab = np.zeros((40, 30, 12), np.uint8)
    lab[10:30, 8:22, 3:9] = 1
    _save(root / "H" / "imagesTr" / "c.nii.gz", hu)
    _save(root / "H" / "labelsTr" / "c.nii.gz", lab)
    ds = load_covid_cases(root, find_covid_cases(root), {"H": ["c"]}, prep=CovidPreprocessing(volume_size=20),
                          cache_dir=tmp_path / "cache", site=None, centre="H", part="test")
    cube, mask = ds.case_cube(0)
    assert cube.shape == mask.shape == (20, 20, 20)
    assert set(np.unique(mask).tolist()) == {0, 1}
    # the block covers 20/40 x 14/30 x 6/12 of the volume -> about that fraction of the cube
    assert mask.mean() == pytest.approx(0.5 * 14 / 30 * 0.5, rel=0.15)
    assert 0.0 <= cube.min() and cube.max() <= 1.0
    rec = ds.cases[0].record
    assert rec["shape"] == [40, 30, 12] and rec["spacing_mm"] == [0.8, 0.8, 2.0]


def test_zscore_intensity(tmp_path):
    root = _hand_root(tmp_path, n_cases=1, hospitals=("H",))
    ds = load_covid_cases(root, find_covid_cases(root), {"H": ["H_00"]},
                          prep=CovidPreprocessing(volume_size=16, intensity="zscore"), cache_dir=tmp_path / "c",
                          site=None, centre="H", part="test")
    cube, _ = ds.case_cube(0)
    hu, _ = _hand_volume(seed=0)
    body = hu > -500
    assert float(cube[body].mean()) == pytest.approx(0.0, abs=2e-3)
    assert float(cube[body].std()) == pytest.approx(1.0, abs=2e-3)


def test_preprocessing_arguments():
    assert CovidPreprocessing(offsets="paper").offsets == PAPER_OFFSETS == (-5, -2, 0, 2, 5)
    assert CovidPreprocessing(offsets=[-3, -1, 0, 1, 3]).offsets == (-3, -1, 0, 1, 3)
    assert offsets_from_mm((-5, -2, 0, 2, 5), 512, 512.0) == (-5, -2, 0, 2, 5)
    assert offsets_from_mm((-5, -2, 0, 2, 5), 64, 352.0) == (-1, 0, 0, 0, 1)  # 5.5 mm voxels
    for bad in ({"volume_size": 8}, {"volume_size": 64.0}, {"intensity": "minmax"}, {"offsets": [0, 1, 2]},
                {"offsets": [0, 0, 1, 2, 3]}, {"offsets": "authors"}, {"fold": 5}, {"hu_min": 500},
                {"min_lung_fraction": 2.0}, {"offsets": [-40, -1, 0, 1, 2], "volume_size": 32}):
        with pytest.raises(ConfigError):
            CovidPreprocessing(**bad)
    from fedseg.sitedata import preprocessing

    with pytest.raises(ConfigError, match="bad covid data_args"):
        preprocessing("covid", {"image_size": 64})


# ------------------------------------------------------------------------------------------ splits and sites
def test_automatic_five_fold_split_partitions_each_hospital(tiny_covid):
    found = find_covid_cases(tiny_covid)
    tests: dict[str, list[str]] = {h: [] for h in found}
    for fold in range(5):
        split = load_covid_split(None, tiny_covid, found, fold)
        assert split.sites == {"site-1": "A", "site-2": "B", "site-3": "C", "site-4": "D", "site-5": "E"}
        for h, parts in split.hospitals.items():
            tr, va, te = set(parts["train"]), set(parts["val"]), set(parts["test"])
            assert len(va) >= 1 and len(te) >= 1 and len(tr) == 3
            assert not (tr & va or tr & te or va & te) and tr | va | te == set(found[h])
            tests[h] += parts["test"]
            # validation is the next fold's test block
            nxt = load_covid_split(None, tiny_covid, found, (fold + 1) % 5)
            assert parts["val"] == nxt.hospitals[h]["test"]
    for h in found:
        assert sorted(tests[h]) == sorted(found[h])  # every case tested exactly once over the 5 folds


def test_split_file_sites_and_centre_override(tiny):
    split = {"dataset": "covid", "hospitals": {"A": {"train": ["A000001", "A000002"], "val": ["A000003"],
                                                     "test": ["A000004"]},
                                               "C": {"train": ["C000001"], "test": ["C000002"]}},
             "sites": {"site-1": "C", "site-9": "A"}}
    (tiny / "split.json").write_text(json.dumps(split))
    ds = load_covid_site(_src(tiny), "site-9", "train", P24)
    assert [c.name for c in ds.cases] == ["A000001", "A000002"] and ds.centre == "A"
    assert [c.name for c in load_covid_site(_src(tiny), "site-1", "test", P24).cases] == ["C000002"]
    assert load_covid_site(_src(tiny), "site-1", "val", P24).cases == []
    # data configuration "centre" wins over the split's sites
    assert load_covid_site(_src(tiny, centre="A"), "site-1", "val", P24).cases[0].name == "A000003"
    with pytest.raises(DataError, match="site-2 has no hospital"):
        load_covid_site(_src(tiny), "site-2", "train", P24)
    with pytest.raises(DataError, match="\"centre\" 'Z'"):
        load_covid_site(_src(tiny, centre="Z"), "site-1", "train", P24)
    test = load_covid_test(_src(tiny), P24)
    assert sorted(c.name for c in test.cases) == ["A000004", "C000002"] and test.centre == "all"


@pytest.mark.parametrize("split, msg", [
    ({"hospitals": {"Q": {"train": []}}}, "hospital 'Q' is not a folder"),
    ({"hospitals": {"A": {"train": ["A999999"]}}}, "case 'A999999'"),
    ({"hospitals": {"A": {"train": ["A000001"], "test": ["A000001"]}}}, "listed twice"),
    ({"hospitals": {"A": {"training": ["A000001"]}}}, "must map parts"),
    ({"hospitals": {"A": {"train": ["A000001"]}}, "sites": {"site-1": "B"}}, "\"sites\" must map"),
    ({"centres": {}}, "needs \"hospitals\""),
])
def test_bad_split_files(tiny, split, msg):
    (tiny / "split.json").write_text(json.dumps(split))
    with pytest.raises(DataError, match=msg):
        load_covid_site(_src(tiny), "site-1", "train", P24)


def test_too_few_cases_for_the_automatic_split(tmp_path):
    root = _hand_root(tmp_path, n_cases=4)
    with pytest.raises(DataError, match="hospital H1 has 4 case.*at least 5"):
        load_covid_site(_src(root), "site-1", "train", CovidPreprocessing(volume_size=16))
    with pytest.raises(DataError, match="no packaged"):
        load_covid_site(_src(root, split="paper"), "site-1", "train", CovidPreprocessing(volume_size=16))


def test_sitedata_registry_and_builtin_data(tiny_builtin):
    assert site_parts("covid") == ("train", "val", "test")
    assert site_parts("lits") == site_parts("polypgen") == ("train", "val")
    assert in_channels("covid") == 5
    calls = tiny_builtin(covid_mod, ensure_builtin_covid)
    for part in site_parts("covid"):
        ds, source = load_site_data("covid", "site-3", part, {"volume_size": 24})
        assert source.root is None and ds.centre == "C" and ds.part == part and len(ds.cases) >= 1
    test, _ = load_test_data("covid", {"volume_size": 24})
    assert len(test.cases) == 5 and {c.hospital for c in test.cases} == set("ABCDE")
    assert len(calls) == 4  # the generator wrapper is called per load; it generates once (marker)
    meta = json.loads((ensure_builtin_covid(preset="tiny") / "synthetic.json").read_text())
    assert meta["preset"] == "tiny"


# ------------------------------------------------------------------------------------------ cache
def test_cache_is_reused_and_rebuilt_when_inputs_or_cube_settings_change(tiny):
    src = _src(tiny)
    a = load_covid_site(src, "site-2", "train", P24)
    folder = a.cases[0].cache_path
    build_id = json.loads((folder / "manifest.json").read_text())["build_id"]
    b = load_covid_site(src, "site-2", "val", CovidPreprocessing(volume_size=24, fold=3, offsets="paper"))
    assert b.cases[0].cache_path == folder  # fold / offsets do not touch the cubes
    assert json.loads((folder / "manifest.json").read_text())["build_id"] == build_id
    c = load_covid_site(src, "site-2", "train", CovidPreprocessing(volume_size=24, hu_max=200.0))
    assert c.cases[0].cache_path != folder
    d = load_covid_site(src, "site-2", "train", CovidPreprocessing(volume_size=32))
    assert d.cases[0].cache_path not in (folder, c.cases[0].cache_path)
    assert d.images.shape[-1] == 32
    # a changed input file (new size / mtime) rebuilds the same folder
    img = tiny / "B" / "imagesTr" / "B000001.nii.gz"
    hu = np.asarray(nib.load(str(img)).dataobj)
    nib.save(nib.Nifti1Image(hu + np.int16(1), nib.load(str(img)).affine), str(img))
    load_covid_site(src, "site-2", "train", P24)
    assert json.loads((folder / "manifest.json").read_text())["build_id"] != build_id


def test_pickled_dataset_reopens_the_cache(tiny):
    ds = load_covid_site(_src(tiny), "site-4", "train", P24)
    blob = pickle.dumps(ds)
    assert len(blob) < 200_000  # no cube copies
    ds2 = pickle.loads(blob)
    idx = np.arange(min(5, len(ds)))
    assert torch.equal(ds2.batch(idx)[0], ds.batch(idx)[0])


# ------------------------------------------------------------------------------------------ bad inputs
def _bad(root: Path, msg: str, cases: bool = False) -> None:
    with pytest.raises(DataError, match=msg):
        if cases:
            find_covid_cases(root)
        else:
            load_covid_site(_src(root), "site-1", "train", P24)


def test_missing_root_and_folders(tmp_path, tiny):
    _bad(tmp_path / "nope", "does not exist.*fedseg data synth covid", cases=True)
    (tmp_path / "empty").mkdir()
    _bad(tmp_path / "empty", "no hospital folders", cases=True)
    shutil.rmtree(tiny / "C" / "labelsTr")
    _bad(tiny, r"C has imagesTr/ but no labelsTr/", cases=True)


def test_image_without_label(tiny):
    (tiny / "A" / "labelsTr" / "A000002.nii.gz").unlink()
    _bad(tiny, "A000002.nii.gz: image without label", cases=True)


def test_label_without_image(tiny):
    (tiny / "B" / "imagesTr" / "B000003.nii.gz").unlink()
    _bad(tiny, "B000003.nii.gz: label without image", cases=True)


def test_duplicate_case(tiny):
    src = tiny / "E" / "imagesTr" / "E000001.nii.gz"
    (tiny / "E" / "imagesTr" / "E000001.nii").write_bytes(gzip.decompress(src.read_bytes()))
    _bad(tiny, "appears twice", cases=True)


def test_corrupt_and_truncated_files(tiny):
    (tiny / "A" / "imagesTr" / "A000001.nii.gz").write_bytes(b"not a nifti at all")
    _bad(tiny, r"A000001.nii.gz: cannot read the COVID image")


def test_truncated_gzip(tiny):
    p = tiny / "A" / "labelsTr" / "A000003.nii.gz"
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    _bad(tiny, r"A000003.nii.gz: cannot read the COVID label")


def test_truncated_uncompressed(tmp_path):
    hu, lab = _hand_volume()
    _save(tmp_path / "c.nii", hu)
    _save(tmp_path / "l.nii", lab)
    p = tmp_path / "c.nii"
    p.write_bytes(p.read_bytes()[:-500])
    with pytest.raises(DataError, match="truncated"):
        read_covid_case(p, tmp_path / "l.nii")


def test_shape_affine_label_nan_and_dimension_errors(tmp_path):
    hu, lab = _hand_volume()
    img = tmp_path / "img.nii.gz"
    _save(img, hu)

    def check(label_arr, msg, affine=None, image=None):
        path = tmp_path / "lab.nii.gz"
        _save(path, label_arr, affine)
        with pytest.raises(DataError, match=msg):
            read_covid_case(image or img, path)

    check(lab[:, :, :10], r"has shape \(16, 16, 16\) but its label .* has \(16, 16, 10\)")
    check(lab, "different affines", affine=np.diag([1.0, 1.0, 1.0, 1.0]))
    bad = lab.copy()
    bad[0, 0, 0] = 2
    check(bad, r"values \[2\] besides 0 and 1")
    check(lab.astype(np.float32) * 255, r"values \[255.0\]")
    nan = tmp_path / "nan.nii.gz"
    _save(nan, np.where(lab > 0, np.nan, 0.0).astype(np.float32))
    check(lab, "NaN", image=nan)
    flat = tmp_path / "flat.nii.gz"
    _save(flat, hu[:, :, 0])
    check(lab, "expected a 3-D", image=flat)
    # valid: float 0/1 labels are accepted
    _save(tmp_path / "ok.nii.gz", lab.astype(np.float32))
    x, y, aff = read_covid_case(img, tmp_path / "ok.nii.gz")
    assert np.allclose(aff, np.diag([0.8, 0.8, 2.0, 1.0]))
    assert y.dtype == np.uint8 and int(y.sum()) == int(lab.sum()) and x.dtype == np.float32


def test_bad_case_inside_a_hospital_names_the_file_and_leaves_no_cache(tmp_path):
    root = _hand_root(tmp_path)
    lab_path = root / "H1" / "labelsTr" / "H1_02.nii.gz"
    _save(lab_path, np.full((16, 16, 16), 3, np.uint8))
    with pytest.raises(DataError, match="H1_02.nii.gz: the infection mask has values"):
        load_covid_site(_src(root, cache_dir=tmp_path / "cache"), "site-1", "train", CovidPreprocessing(volume_size=16))
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]


# ------------------------------------------------------------------------------------------ evaluation hook
class _Band(torch.nn.Module):
    """'Oracle' 2.5D model: views in ``views_on`` predict infection where the central slice lies in (lo, hi); the
    other views predict nothing."""

    def __init__(self, views_on: tuple[int, ...], lo: float = 0.3, hi: float = 0.4) -> None:
        super().__init__()
        self.views_on, self.lo, self.hi = views_on, lo, hi
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward_view(self, x, view):
        c = x[:, 2:3]  # offsets (-2, -1, 0, 1, 2): channel 2 is the central slice
        hit = (c > self.lo) & (c < self.hi) if view in self.views_on else torch.zeros_like(c, dtype=torch.bool)
        return hit.float() * 20.0 - 10.0


def test_evaluate_fuses_views_and_reports_volumetric_dice(tmp_path):
    root = _hand_root(tmp_path, n_cases=2, hospitals=("H",))
    ds = load_covid_cases(root, find_covid_cases(root), {"H": ["H_00", "H_01"]},
                          prep=CovidPreprocessing(volume_size=16), cache_dir=tmp_path / "c", site="s", centre="H",
                          part="test")
    # infection voxels are -500 HU -> 500 / 1400 = 0.357 in the window (lung 0.107, body ~0.71): the band finds them
    r = ds.evaluate(_Band((0, 1)), torch.device("cpu"), batch_size=5)
    # H_00 is healthy: empty truth and empty prediction -> Dice 1; H_01: two views right, one empty -> fused exact
    assert r["per_case_dice"] == {"H_00": 1.0, "H_01": 1.0}
    # 4 axial slices (5..8) with 12 infected px of 256 (not small): DiceL over them, no small slice
    assert r["dice"] == 1.0 and r["n"] == 2 and r["dice_l"] == 1.0 and r["n_large"] == 4 and r["dice_s"] is None
    assert r["n_small"] == 0 and r["n_slices"] == 32
    # one view right -> majority empty -> Dice 0 on the infected case, 1 on the healthy one
    r = ds.evaluate(_Band((2,)), torch.device("cpu"))
    assert r["per_case_dice"] == {"H_00": 1.0, "H_01": 0.0} and r["dice"] == 0.5 and r["dice_l"] == 0.0
    empty = load_covid_cases(root, find_covid_cases(root), {}, prep=CovidPreprocessing(volume_size=16),
                             cache_dir=tmp_path / "c", site="s", centre="H", part="val")
    assert empty.evaluate(_Band((0,)), torch.device("cpu"))["dice"] is None and len(empty.delta) == 0


# ------------------------------------------------------------------------------------------ augmentation
def test_augmentation_moves_slices_and_masks_together():
    from fedseg.data.covid import augment_covid_batch

    g = torch.Generator().manual_seed(0)
    y = (torch.rand(6, 3, 12, 12, generator=g) > 0.7).float()
    x = torch.stack([y + j for j in range(5)], dim=2)  # slice j = mask + j
    xa, ya = augment_covid_batch(x, y, generator=torch.Generator().manual_seed(1), p=1.0, scale=0.0, shift=0.0)
    for j in range(5):
        assert torch.equal(xa[:, :, j] - j, ya)
    assert set(ya.unique().tolist()) <= {0.0, 1.0}
    changed = [(not torch.equal(ya[b, v], y[b, v])) for b in range(6) for v in range(3)]
    assert sum(changed) >= 12  # p = 1: every (sample, view) gets a non-identity element (rare symmetric masks aside)
    # each result is one of the 8 dihedral images of the input
    for b in range(6):
        for v in range(3):
            cands = [torch.rot90(t, k, dims=(-2, -1)) for t in (y[b, v], y[b, v].flip(-1)) for k in range(4)]
            assert any(torch.equal(ya[b, v], c) for c in cands)
    # deterministic with the generator; p = 0 and no jitter: identity
    xb, yb = augment_covid_batch(x, y, generator=torch.Generator().manual_seed(1), p=1.0, scale=0.0, shift=0.0)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    xi, yi = augment_covid_batch(x, y, generator=torch.Generator().manual_seed(1), p=0.0, scale=0.0, shift=0.0)
    assert torch.equal(xi, x) and torch.equal(yi, y)
    # jitter: x * a + b with a in [0.9, 1.1], b in [-0.05, 0.05], one (a, b) per (sample, view)
    xj, yj = augment_covid_batch(x, y, generator=torch.Generator().manual_seed(2), p=0.0)
    assert torch.equal(yj, y)
    a = (xj[:, :, 1] - xj[:, :, 0]).reshape(6, 3, -1)  # slices differ by exactly 1 before the jitter
    assert torch.allclose(a, a[..., :1].expand_as(a), atol=1e-5)
    assert bool(((a[..., 0] >= 0.9 - 1e-6) & (a[..., 0] <= 1.1 + 1e-6)).all())
    with pytest.raises(ValueError):
        augment_covid_batch(x[:, 0], y, generator=g)


# ------------------------------------------------------------------------------------------ CLI
def test_data_synth_covid_cli(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["data", "synth", "covid", "--out", str(out), "--preset", "tiny", "--size", "24", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "25 volumes in 5 hospitals" in text and "| D | GE-like" in text and "| 7.5 |" in text
    assert nib.load(str(out / "A" / "imagesTr" / "A000001.nii.gz")).shape[:2] == (24, 24)
    assert main(["data", "synth", "lits", "--out", str(tmp_path / "l"), "--preset", "paper"]) == 2
    assert "covid only" in capsys.readouterr().err


def test_data_scan_covid_cli(tiny, tmp_path, capsys):
    out = tmp_path / "scan"
    assert main(["data", "scan", "covid", "--root", str(tiny), "--volume-size", "24", "--fold", "2",
                 "--sites", "site-2", "site-4", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = {(r["site"], r["part"]): r for r in summary["groups"]}
    assert set(rows) == {(s, p) for s in ("site-2", "site-4") for p in ("train", "val", "test")}
    assert rows[("site-4", "train")]["hospital"] == "D" and rows[("site-4", "test")]["slice_mm"] == [7.5]
    assert sum(rows[("site-2", p)]["cases"] for p in ("train", "val", "test")) == 5
    ds = load_covid_site(_src(tiny), "site-2", "val", CovidPreprocessing(volume_size=24, fold=2))
    assert rows[("site-2", "val")]["samples"] == len(ds) and rows[("site-2", "val")]["small"] == int(ds.small.sum())
    assert "| site-4 | D | train | 3 |" in capsys.readouterr().out
    assert main(["data", "scan", "covid", "--root", str(tiny), "--mask-threshold", "3"]) == 2


def test_resample_mask_round_trip():
    m = np.zeros((30, 20, 10), np.uint8)
    m[5:25, 4:16, 2:8] = 1
    back = resample_mask(resample_mask(m, (24, 24, 24)), m.shape)
    inter = int((back & m).sum())
    assert back.shape == m.shape and 2 * inter / (int(back.sum()) + int(m.sum())) > 0.95
