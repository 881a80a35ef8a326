"""PolypGen reader: discovery, decoding, normalisation, resize rules, difficulty manifest, cache, folds, bad inputs."""

from __future__ import annotations

import json
import pickle
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedseg import difficulty as dif
from fedseg.data import polypgen as pg
from fedseg.data.config import CONFIG_ENV, DataSource, builtin_data_root, ensure_builtin_polypgen, resolve_data_source
from fedseg.data.polypgen import (IMAGENET_MEAN, IMAGENET_STD, PolypGenPreprocessing, check_mask_binary,
                                  find_polypgen_centres, load_polypgen_site, load_polypgen_split,
                                  load_polypgen_test_centre, read_polypgen_mask)
from fedseg.data.synthetic_polypgen import synth_polypgen
from fedseg.errors import ConfigError, DataError

P64 = PolypGenPreprocessing(image_size=64)


@pytest.fixture(scope="module")
def tiny_master(tmp_path_factory):
    return synth_polypgen(tmp_path_factory.mktemp("pg") / "polypgen", preset="tiny", seed=0, progress=False)


@pytest.fixture
def tiny(tmp_path, tiny_master):
    """A private copy (tests may modify files or leave caches)."""
    return Path(shutil.copytree(tiny_master, tmp_path / "polypgen"))


def _src(root, split=None, centre=None, cache_dir=None):
    return DataSource("polypgen", Path(root), split, centre, cache_dir, "test config")


# ------------------------------------------------------------------------------------------ handmade data
def _save(path: Path, arr: np.ndarray, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)


def _hand_image(h=16, w=16) -> np.ndarray:
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[..., 1] = np.arange(w, dtype=np.uint8)[None, :] * 10
    rgb[..., 2] = np.arange(h, dtype=np.uint8)[:, None] * 5
    return rgb


def _hand_mask(h=16, w=16, box=(4, 8, 4, 10)) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    r0, r1, c0, c1 = box
    m[r0:r1, c0:c1] = 255
    return m


def _pair(root: Path, n: int, stem: str, rgb: np.ndarray, mask: np.ndarray, ext=".png", mask_ext=".png") -> None:
    _save(root / f"data_C{n}" / f"images_C{n}" / f"{stem}{ext}", rgb)
    _save(root / f"data_C{n}" / f"masks_C{n}" / f"{stem}_mask{mask_ext}", mask)


def _hand_root(tmp_path: Path, centres=(1, 6), per_centre=5) -> Path:
    """PNG pairs (lossless): centre n, image i has a box lesion of i+1 rows; one empty mask in centre 1."""
    root = tmp_path / "hand"
    for n in centres:
        for i in range(per_centre):
            mask = _hand_mask(box=(2, 3 + i, 2, 10)) if not (n == 1 and i == 0) else np.zeros((16, 16), np.uint8)
            _pair(root, n, f"c{n}_{i}", _hand_image(), mask)
    return root


# ------------------------------------------------------------------------------------------ discovery
def test_find_centres_extensions_and_nesting(tmp_path):
    root = tmp_path / "release" / "PolypGen2021_MultiCenterData_v3"
    _pair(root, 2, "b", _hand_image(), _hand_mask(), ext=".jpg", mask_ext=".jpg")
    _pair(root, 2, "a", _hand_image(), _hand_mask(), ext=".jpeg", mask_ext=".png")
    _pair(root, 5, "x", _hand_image(), _hand_mask(), ext=".tif", mask_ext=".tif")
    (root / "data_C2" / "images_C2" / ".DS_Store").write_text("junk")  # hidden files are ignored
    (root / "data_C2" / "bbox_C2").mkdir()  # other folders of the release are ignored
    found = find_polypgen_centres(tmp_path / "release")  # data_C<n> one level below the given root
    assert sorted(found) == [2, 5]
    assert [(i.name, m.name) for i, m in found[2]] == [("a.jpeg", "a_mask.png"), ("b.jpg", "b_mask.jpg")]
    assert [(i.name, m.name) for i, m in found[5]] == [("x.tif", "x_mask.tif")]


# ------------------------------------------------------------------------------------------ reading
def test_hand_computed_normalisation_masks_and_manifest(tmp_path):
    root = _hand_root(tmp_path)
    prep = PolypGenPreprocessing(image_size=16)  # native size: no resize, exact values
    tr = load_polypgen_site(_src(root), "site-1", "train", prep)
    va = load_polypgen_site(_src(root), "site-1", "val", prep)
    assert len(tr) == 4 and len(va) == 1  # 5 images, contiguous folds of 1
    assert [r["stem"] for r in va.manifest] == ["c1_0"]  # automatic split: fold 0 = first sorted stem
    rgb = _hand_image().astype(np.float32) / 255
    expected = ((rgb - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32))
    expected = expected.transpose(2, 0, 1).astype(np.float16)
    assert tr.images.dtype == np.float16 and tr.images.shape == (4, 3, 16, 16)
    assert np.array_equal(np.asarray(tr.images[0]), expected)
    # red 200 -> (200/255 - 0.485) / 0.229
    assert float(tr.images[0][0, 0, 0]) == pytest.approx((200 / 255 - 0.485) / 0.229, abs=2e-3)
    r = tr.manifest[0]  # c1_1: box rows 2..3 (2 rows) x cols 2..9 (8 cols) = 16 px
    assert np.array_equal(np.asarray(tr.masks[0]), (_hand_mask(box=(2, 4, 2, 10)) > 0).astype(np.uint8))
    direct = dif.polypgen_difficulty(_hand_mask(box=(2, 4, 2, 10)) > 0, base=100.0, tau=150.0)
    assert {k: r[k] for k in ("height", "width", "lesion_pixels", "inverse_area", "small", "delta")} == \
        direct.to_json_dict()
    assert (r["lesion_pixels"], r["height"], r["width"], r["inverse_area"]) == (16, 16, 16, 16.0)
    assert (r["site"], r["centre"], r["split"], r["fold"], r["stem"]) == ("site-1", "centre-1", "train", 1, "c1_1")
    assert r["image"] == "data_C1/images_C1/c1_1.png" and r["mask"] == "data_C1/masks_C1/c1_1_mask.png"
    # the empty mask: inverse area None (inf), not small, delta 0, nonempty False
    e = va.manifest[0]
    assert (e["lesion_pixels"], e["inverse_area"], e["small"], e["delta"]) == (0, None, False, 0.0)
    assert va.nonempty.tolist() == [False] and tr.nonempty.all()
    assert tr.delta.dtype == np.float32 and tr.small.dtype == bool
    assert tr.delta.tolist() == pytest.approx([m["delta"] for m in tr.manifest])


def test_resize_rules_hand_computed():
    # 8x8 -> 4x4 masks: area (box) average of each 2x2 block, lesion where >= 0.5
    m = np.zeros((8, 8), bool)
    m[0:2, 0:2] = True  # 4/4 -> 1
    m[0, 2:4] = True  # 2/4 -> 1 (0.5)
    m[0, 4] = True  # 1/4 -> 0
    m[6:8, 6] = True  # 2/4 -> 1
    assert pg._resize_mask(m, 4).tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]
    # 4x4 -> 8x8 (bilinear, >= 0.5): a 2x2 corner block becomes the 4x4 corner block exactly
    small = np.zeros((4, 4), bool)
    small[:2, :2] = True
    up = pg._resize_mask(small, 8)
    assert up.dtype == np.uint8 and up.sum() == 16 and up[:4, :4].all()
    # images: a constant colour stays constant whatever the resize; output [3, S, S] float32 in [0, 1]
    rgb = np.full((30, 50, 3), (10, 128, 250), np.uint8)
    out = pg._resize_image(rgb, 20)
    assert out.shape == (3, 20, 20) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 7, 3], np.array([10, 128, 250]) / 255, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(1, 2)), 0, atol=1e-5)


def test_reader_on_generated_jpegs_matches_direct_computation(tiny):
    ds = load_polypgen_site(_src(tiny), "site-2", "train", P64)
    meta = {f["stem"]: f for f in json.loads((tiny / "synthetic.json").read_text())["frames"]}
    assert ds.images.shape == (len(ds), 3, 64, 64) and ds.masks.shape == (len(ds), 64, 64)
    assert set(np.unique(np.asarray(ds.masks)).tolist()) <= {0, 1}
    for i, r in enumerate(ds.manifest):
        gray = np.asarray(Image.open(tiny / r["mask"]).convert("L"))
        lesion = gray > 127
        direct = dif.polypgen_difficulty(lesion, base=100.0, tau=150.0)
        assert {k: r[k] for k in direct.to_json_dict()} == direct.to_json_dict()
        # the decoded JPEG mask is the generated mask up to compression artefacts
        assert abs(r["lesion_pixels"] - meta[r["stem"]]["lesion_pixels"]) <= max(3, 0.03 * r["lesion_pixels"])
        assert (r["height"], r["width"]) == (meta[r["stem"]]["height"], meta[r["stem"]]["width"])
        assert r["mask_pixels"] == int(np.asarray(ds.masks[i]).sum())
        rgb = np.asarray(Image.open(tiny / r["image"]).convert("RGB"))
        expected = ((pg._resize_image(rgb, 64) - np.array(IMAGENET_MEAN, np.float32)[:, None, None])
                    / np.array(IMAGENET_STD, np.float32)[:, None, None]).astype(np.float16)
        assert np.array_equal(np.asarray(ds.images[i]), expected)


def test_dataset_api(tiny):
    ds = load_polypgen_site(_src(tiny), "site-1", "train", P64)
    item = ds[0]
    assert set(item) == {"image", "mask", "delta", "small", "index"}
    assert item["image"].shape == (3, 64, 64) and item["mask"].shape == (1, 64, 64)
    assert item["image"].dtype == item["mask"].dtype == torch.float32
    assert item["delta"].dtype == torch.float32 and item["small"].dtype == torch.bool
    images, masks, delta, small = ds.tensors()
    n = len(ds)
    assert images.shape == (n, 3, 64, 64) and masks.shape == (n, 1, 64, 64) and delta.shape == small.shape == (n,)
    assert torch.equal(images[0], item["image"]) and torch.equal(ds[-1]["image"], images[-1])
    idx = np.array([0, 2])  # what the trainer / evaluation do: rows by index array
    assert np.array_equal(ds.images[idx], np.asarray(ds.images)[idx])
    expected = {"site", "centre", "split", "fold", "image", "mask", "height", "width", "lesion_pixels",
                "inverse_area", "small", "delta"}
    assert expected <= set(ds.manifest[0])
    blob = pickle.dumps(ds)
    clone = pickle.loads(blob)  # DataLoader workers (spawn): re-opens the memmap, no copy pickled
    assert len(blob) < 100_000 and isinstance(clone.images.base, np.memmap)
    assert np.array_equal(np.asarray(clone.images), np.asarray(ds.images))
    s = ds.summary()
    assert s["images"] == n and s["centre"] == "centre-1" and s["fold"] == 0


def test_builtin_source_generates_data_once(tmp_path, tiny_builtin):
    calls = tiny_builtin(pg, ensure_builtin_polypgen)
    src = DataSource("polypgen", None, None, None, None, "built-in")
    ds = load_polypgen_site(src, "site-3", "val", P64)
    assert len(ds) > 0 and ds.centre == "centre-3"
    assert str(ds.cache_path).startswith(str(tmp_path / "data_home" / "polypgen_builtin" / ".fedseg_cache"))
    assert calls == [1]


def test_data_configuration_and_builtin_concurrency(tmp_path):
    cfg = tmp_path / "cfg" / "fedseg_data.json"
    (tmp_path / "cfg" / "pg").mkdir(parents=True)
    cfg.write_text(json.dumps({"polypgen": {"root": "pg", "split": "auto"},
                               "sites": {"site-2": {"polypgen": {"centre": "centre-4"}}}}))
    s1 = resolve_data_source("polypgen", "site-1", env={CONFIG_ENV: str(cfg)})
    s2 = resolve_data_source("polypgen", "site-2", env={CONFIG_ENV: str(cfg)})
    assert (s1.dataset, s1.root, s1.split, s1.centre) == ("polypgen", tmp_path / "cfg" / "pg", "auto", None)
    assert s2.centre == "centre-4"
    with pytest.raises(DataError, match="data_C<n>"):
        cfg.write_text(json.dumps({"polypgen": {"root": "nope"}}))
        resolve_data_source("polypgen", "site-1", env={CONFIG_ENV: str(cfg)})
    assert builtin_data_root("polypgen") == tmp_path / "data_home" / "polypgen_builtin"
    # two threads at once: one generation (flock on separate open file descriptions), both get the same data
    roots, errors = [], []

    def run():
        try:
            roots.append(ensure_builtin_polypgen(preset="tiny", seed=0))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and roots[0] == roots[1] == builtin_data_root("polypgen")
    home = tmp_path / "data_home"
    assert sorted(p.name for p in home.iterdir()) == [".polypgen_builtin.lock", "polypgen_builtin"]
    marker = json.loads((roots[0] / ".fedseg_builtin.json").read_text())
    assert marker["preset"] == "tiny" and marker["seed"] == 0
    assert ensure_builtin_polypgen(preset="tiny", seed=0) == roots[0]
    assert json.loads((roots[0] / ".fedseg_builtin.json").read_text()) == marker  # not regenerated


# ------------------------------------------------------------------------------------------ folds
def test_folds_are_disjoint_and_cover_every_image(tiny):
    split = json.loads((tiny / "split.json").read_text())
    on_disk = find_polypgen_centres(tiny)
    test = load_polypgen_test_centre(_src(tiny), P64)
    test_stems = {r["stem"] for r in test.manifest}
    assert test.centre == "centre-6" and test_stems == {p[0].stem for p in on_disk[6]}
    assert all(r["split"] == "test" and r["fold"] is None for r in test.manifest)
    for n in range(1, 6):
        all_stems = {p[0].stem for p in on_disk[n]}
        val_seen: list[str] = []
        for k in range(5):
            prep = PolypGenPreprocessing(image_size=64, fold=k)
            tr = load_polypgen_site(_src(tiny), f"site-{n}", "train", prep)
            va = load_polypgen_site(_src(tiny), f"site-{n}", "val", prep)
            trs, vas = {r["stem"] for r in tr.manifest}, {r["stem"] for r in va.manifest}
            assert not trs & vas and trs | vas == all_stems  # no leakage within the site
            assert not (trs | vas) & test_stems  # nor with the test centre
            assert vas == set(split["centres"][f"centre-{n}"]["folds"][k])
            assert all(r["fold"] == k for r in va.manifest) and all(r["fold"] != k for r in tr.manifest)
            assert tr.cache_path == va.cache_path  # one cache per centre, shared by every fold
            val_seen += sorted(vas)
        assert sorted(val_seen) == sorted(all_stems)  # every image in exactly one validation fold


def test_automatic_split_is_written_once_and_follows_the_data(tmp_path):
    root = _hand_root(tmp_path, centres=(1, 2, 6), per_centre=7)
    cache = tmp_path / "cache"
    ds = load_polypgen_site(_src(root, cache_dir=cache), "site-2", "val", PolypGenPreprocessing(image_size=16, fold=1))
    path = cache / "polypgen_split.json"
    saved = json.loads(path.read_text())
    # 7 sorted stems, 5 contiguous folds (unshuffled KFold): sizes 2, 2, 1, 1, 1
    assert saved["centres"]["centre-2"]["folds"] == [["c2_0", "c2_1"], ["c2_2", "c2_3"], ["c2_4"], ["c2_5"], ["c2_6"]]
    assert saved["centres"]["centre-6"] == {"test": [f"c6_{i}" for i in range(7)]}
    assert saved["sites"] == {"site-1": "centre-1", "site-2": "centre-2"} and saved["test_centre"] == "centre-6"
    assert [r["stem"] for r in ds.manifest] == ["c2_2", "c2_3"]
    mtime = path.stat().st_mtime_ns
    load_polypgen_site(_src(root, cache_dir=cache), "site-1", "train", PolypGenPreprocessing(image_size=16))
    assert path.stat().st_mtime_ns == mtime  # reused, not rewritten
    _pair(root, 2, "c2_7", _hand_image(), _hand_mask())  # new data: the automatic split follows it
    tr = load_polypgen_site(_src(root, cache_dir=cache), "site-2", "train", PolypGenPreprocessing(image_size=16))
    assert "c2_7" in {r["stem"] for r in tr.manifest}
    assert json.loads(path.read_text())["centres"]["centre-2"]["folds"][4] == ["c2_7"]
    load_polypgen_site(_src(root, cache_dir=cache), "site-2", "train", PolypGenPreprocessing(image_size=16, n_folds=3))
    assert len(json.loads((cache / "polypgen_split_3folds.json").read_text())["centres"]["centre-2"]["folds"]) == 3


# ------------------------------------------------------------------------------------------ cache
def test_second_load_uses_the_cache_and_folds_share_it(tiny, monkeypatch):
    first = load_polypgen_site(_src(tiny), "site-1", "train", P64)
    folder = first.cache_path
    assert sorted(p.name for p in folder.iterdir()) == ["images.npy", "manifest.json", "masks.npy"]

    def fail(*a, **k):
        raise AssertionError("image decoded although the cache is valid")

    monkeypatch.setattr(pg, "_process_pair", fail)
    again = load_polypgen_site(_src(tiny), "site-1", "train", P64)
    other_fold = load_polypgen_site(_src(tiny), "site-1", "val", PolypGenPreprocessing(image_size=64, fold=3))
    assert again.cache_path == other_fold.cache_path == folder
    assert np.array_equal(np.asarray(again.images), np.asarray(first.images)) and again.manifest == first.manifest


def test_cache_is_rebuilt_when_data_or_parameters_change(tiny, monkeypatch):
    first = load_polypgen_site(_src(tiny), "site-1", "train", P64)
    rec = next(r for r in first.manifest if r["lesion_pixels"] > 0)
    mask_path = tiny / rec["mask"]
    gray = np.asarray(Image.open(mask_path).convert("L"))
    _save(mask_path, np.zeros_like(gray), quality=95)  # the polyp is gone: data changed
    rebuilt = load_polypgen_site(_src(tiny), "site-1", "train", P64)
    assert rebuilt.cache_path == first.cache_path
    new = next(r for r in rebuilt.manifest if r["stem"] == rec["stem"])
    assert new["lesion_pixels"] == 0 and new["delta"] == 0.0
    other = load_polypgen_site(_src(tiny), "site-1", "train", PolypGenPreprocessing(image_size=32))
    assert other.cache_path != first.cache_path and other.images.shape[-1] == 32
    assert first.cache_path.is_dir()  # the other preprocessing's cache is kept
    custom = load_polypgen_site(_src(tiny, cache_dir=tiny.parent / "cc"), "site-1", "train", P64)
    assert custom.cache_path.parent == tiny.parent / "cc"
    # concurrent builders: two threads, one build
    builds = []
    real = pg._build_centre_cache

    def counting(*a, **k):
        builds.append(1)
        return real(*a, **k)

    monkeypatch.setattr(pg, "_build_centre_cache", counting)
    prep = PolypGenPreprocessing(image_size=48)
    out: list = []
    threads = [threading.Thread(target=lambda: out.append(load_polypgen_site(_src(tiny), "site-2", "train", prep)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builds == [1] and len(out) == 2 and out[0].manifest == out[1].manifest


# ------------------------------------------------------------------------------------------ bad inputs
def _err(root, site="site-1", part="train", prep=P64, test=False, **kw) -> str:
    with pytest.raises(DataError) as e:
        if test:
            load_polypgen_test_centre(_src(root, **kw), prep)
        else:
            load_polypgen_site(_src(root, **kw), site, part, prep)
    return str(e.value)


def test_missing_and_empty_root(tmp_path):
    msg = _err(tmp_path / "nope")
    assert str(tmp_path / "nope") in msg and "does not exist" in msg and "test config" in msg
    (tmp_path / "empty").mkdir()
    msg = _err(tmp_path / "empty")
    assert "no centre folders" in msg and "fedseg data synth polypgen" in msg


def test_image_mask_size_mismatch(tmp_path):
    root = _hand_root(tmp_path)
    _save(root / "data_C1" / "masks_C1" / "c1_2_mask.png", _hand_mask(16, 20))
    msg = _err(root)
    assert "c1_2.png" in msg and "c1_2_mask.png" in msg and "16x16" in msg and "20x16" in msg


def test_masks_that_are_not_binary(tmp_path):
    root = _hand_root(tmp_path)
    yy, xx = np.mgrid[:64, :64]
    soft = np.clip(255 - 4 * np.hypot(yy - 32, xx - 32), 0, 255).astype(np.uint8)  # a probability-like blob
    _pair(root, 1, "c1_3", _hand_image(64, 64), soft)
    msg = _err(root)
    assert "c1_3_mask.png" in msg and "not binary" in msg and "0/255" in msg
    _pair(root, 1, "c1_3", _hand_image(), _hand_mask())
    label = (_hand_mask() > 0).astype(np.uint8)  # a 0/1 label mask would silently be empty
    _save(root / "data_C1" / "masks_C1" / "c1_3_mask.png", label)
    msg = _err(root)
    assert "c1_3_mask.png" in msg and "0/1 label" in msg
    # JPEG artefacts along the boundary are fine, even at low quality
    m = np.zeros((64, 64), np.uint8)
    m[10:40, 12:50] = 255
    yy, xx = np.mgrid[:64, :64]
    m[(yy - 52) ** 2 + (xx - 20) ** 2 < 20] = 255
    for q in (30, 75):
        _save(tmp_path / f"q{q}.jpg", m, quality=q)
        assert np.array_equal(read_polypgen_mask(tmp_path / f"q{q}.jpg"), m > 0)
    # the rule at its limit: 0.5 % of the pixels mid-grey away from the boundary pass, one more pixel fails
    g = np.zeros((100, 100), np.uint8)
    g[80:95, 80:95] = 255  # the lesion
    g[0:50:2, 10] = 100  # 50 isolated mid-grey background pixels = 0.5 %, far from the lesion
    g[0:50:2, 20] = 100
    assert check_mask_binary(g, 127).sum() == 225
    g[60, 0] = 100
    with pytest.raises(DataError, match="mid-grey"):
        check_mask_binary(g, 127, "m.png")


def test_centre_without_images_and_unpaired_files(tmp_path):
    root = _hand_root(tmp_path)
    (root / "data_C3" / "images_C3").mkdir(parents=True)
    (root / "data_C3" / "masks_C3").mkdir(parents=True)
    msg = _err(root)
    assert "centre-3" in msg and "images_C3" in msg and "contains no images" in msg
    shutil.rmtree(root / "data_C3")
    (root / "data_C1" / "masks_C1" / "c1_4_mask.png").unlink()
    msg = _err(root)
    assert "c1_4.png" in msg and "image without mask" in msg and "centre-1" in msg
    root2 = _hand_root(tmp_path / "b")
    (root2 / "data_C6" / "images_C6" / "c6_1.png").unlink()
    msg = _err(root2)
    assert "c6_1_mask.png" in msg and "mask without image" in msg and "centre-6" in msg
    root3 = _hand_root(tmp_path / "c")
    _save(root3 / "data_C1" / "images_C1" / "c1_2.jpg", _hand_image())
    assert "exists twice" in _err(root3)
    root4 = _hand_root(tmp_path / "d")
    shutil.rmtree(root4 / "data_C1" / "masks_C1")
    msg = _err(root4)
    assert "masks_C1" in msg and "centre-1" in msg


def test_missing_centre(tmp_path, tiny):
    shutil.rmtree(tiny / "data_C3")
    msg = _err(tiny, site="site-3")
    assert "site site-3 needs centre-3" in msg and "data_C3" in msg and "found: data_C1, data_C2, data_C4" in msg
    assert len(load_polypgen_site(_src(tiny), "site-1", "val", P64)) > 0  # other sites are unaffected
    shutil.rmtree(tiny / "data_C6")
    msg = _err(tiny, test=True)
    assert "centre-6" in msg and "data_C6" in msg and "test-centre" in msg
    root = _hand_root(tmp_path, centres=(1,))  # automatic split, no data_C6
    assert "data_C6" in _err(root, test=True)
    assert "site-2" in _err(root, site="site-2")  # not mapped: no data_C2, no site-2 in the automatic split


@pytest.mark.parametrize("which", ["image", "mask"])
def test_corrupt_and_truncated_files(tiny, which):
    stem = json.loads((tiny / "split.json").read_text())["centres"]["centre-1"]["folds"][1][0]
    path = tiny / "data_C1" / ("images_C1" if which == "image" else "masks_C1") / (
        f"{stem}.jpg" if which == "image" else f"{stem}_mask.jpg")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    msg = _err(tiny)
    assert str(path) in msg and "cannot read" in msg and which in msg
    path.write_bytes(b"not a jpeg at all" * 10)
    msg = _err(tiny)
    assert str(path) in msg and "corrupt" in msg


def test_bad_split_files(tiny):
    split_path = tiny / "split.json"
    good = json.loads(split_path.read_text())

    def with_split(obj) -> str:
        split_path.write_text(json.dumps(obj))
        return _err(tiny)

    s = json.loads(json.dumps(good))
    s["centres"]["centre-1"]["folds"][0].append("C1_9999")
    msg = with_split(s)
    assert "C1_9999" in msg and "not in" in msg and "split.json" in msg
    s = json.loads(json.dumps(good))
    dropped = s["centres"]["centre-2"]["folds"][1].pop()
    msg = with_split(s)
    assert dropped in msg and "in no fold" in msg and "excluded" in msg
    s["centres"]["centre-2"]["excluded"] = [dropped]  # leaving an image out on purpose is explicit
    split_path.write_text(json.dumps(s))
    tr = load_polypgen_site(_src(tiny), "site-2", "train", P64)
    assert dropped not in {r["stem"] for r in tr.manifest}
    s = json.loads(json.dumps(good))
    s["centres"]["centre-1"]["folds"][2].append(s["centres"]["centre-1"]["folds"][0][0])
    assert "listed twice" in with_split(s)
    s = json.loads(json.dumps(good))
    s["centres"]["centre-1"]["folds"] = s["centres"]["centre-1"]["folds"][:4]
    assert "5 stem lists" in with_split(s)
    split_path.write_text(json.dumps(good))
    msg = _err(tiny, prep=PolypGenPreprocessing(image_size=64, n_folds=3, fold=0))
    assert "5 folds" in msg and "n_folds = 3" in msg
    assert "no packaged" in _err(tiny, split="paper")
    assert "site-9" in _err(tiny, site="site-9")
    assert "test centre" in _err(tiny, site="site-1", centre="centre-6")


def test_bad_preprocessing_and_parts(tiny):
    with pytest.raises(ConfigError, match="fold"):
        PolypGenPreprocessing(fold=5)
    with pytest.raises(ConfigError, match="mask_threshold"):
        PolypGenPreprocessing(mask_threshold=255)
    with pytest.raises(ConfigError, match="image_size"):
        PolypGenPreprocessing(image_size=4)
    with pytest.raises(ConfigError, match="load_polypgen_test_centre"):
        load_polypgen_site(_src(tiny), "site-1", "test", P64)


def test_split_loader_validates_on_disk_only_the_centres_present(tmp_path, tiny):
    # a hospital holding only data_C2 can use the full split file: other centres are checked when needed
    local = tmp_path / "hospital2"
    shutil.copytree(tiny / "data_C2", local / "data_C2")
    shutil.copy(tiny / "split.json", local / "split.json")
    split = load_polypgen_split(None, local, find_polypgen_centres(local), 5)
    assert split.sites["site-2"] == "centre-2"
    assert len(load_polypgen_site(_src(local), "site-2", "train", P64)) > 0
    assert "data_C1" in _err(local, site="site-1")
