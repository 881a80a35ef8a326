"""Synthetic PolypGen generator: real layout, reproducibility, endoscope styles, polyp-size mix per centre."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from fedseg import difficulty as dif
from fedseg.data.polypgen import find_polypgen_centres, load_polypgen_split, read_polypgen_mask
from fedseg.data.synthetic_polypgen import CENTRE_STYLES, PRESETS, plan_polypgen, synth_polypgen
from fedseg.errors import ConfigError

SMALL_KINDS = ("small", "attached", "large+small")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    t0 = time.perf_counter()
    root = synth_polypgen(tmp_path_factory.mktemp("pg") / "tiny", preset="tiny", seed=0, progress=False)
    assert time.perf_counter() - t0 < 10  # ~0.5 s; generous for a loaded test machine
    return root


@pytest.fixture(scope="module")
def quick_small(tmp_path_factory):
    """The quick preset's frames (212, same plan) at 0.4x resolution, to test statistics fast."""
    return synth_polypgen(tmp_path_factory.mktemp("pgq") / "q", preset="quick", seed=0, progress=False, scale=0.4)


def _meta(root):
    return json.loads((root / "synthetic.json").read_text())


def test_tiny_layout_and_formats(tiny):
    p = PRESETS["tiny"]
    meta = _meta(tiny)
    assert sorted(x.name for x in tiny.iterdir()) == [f"data_C{n}" for n in range(1, 7)] + ["split.json",
                                                                                          "synthetic.json"]
    on_disk = find_polypgen_centres(tiny)
    assert [len(on_disk[n]) for n in range(1, 7)] == list(p.images)
    split = load_polypgen_split(None, tiny, on_disk, 5)  # validates: every image in exactly one fold / test
    assert split.sites == {f"site-{n}": f"centre-{n}" for n in range(1, 6)} and split.test_centre == "centre-6"
    assert all(len(split.centres[f"centre-{n}"].folds) == 5 and all(split.centres[f"centre-{n}"].folds)
               for n in range(1, 6))  # >= 1 frame per fold
    assert sorted(split.centres["centre-6"].test) == sorted(pm[0].stem for pm in on_disk[6])
    for f in meta["frames"]:
        img, mask = Image.open(tiny / f["image"]), Image.open(tiny / f["mask"])
        assert img.format == mask.format == "JPEG" and img.mode == "RGB" and mask.mode == "L"
        assert img.size == mask.size == (f["width"], f["height"])
        w, h = CENTRE_STYLES[f["centre"]].size
        assert abs(f["width"] - w * p.scale) <= 2 and abs(f["height"] - h * p.scale) <= 2
        gray = np.asarray(mask)
        assert abs(int((gray > 127).sum()) - f["lesion_pixels"]) <= max(3, 0.03 * f["lesion_pixels"])
        assert read_polypgen_mask(tiny / f["mask"]).shape == (f["height"], f["width"])  # passes the binary check


def test_same_seed_same_bytes_other_seed_different(tmp_path, tiny):
    again = synth_polypgen(tmp_path / "again", preset="tiny", seed=0, progress=False)
    other = synth_polypgen(tmp_path / "other", preset="tiny", seed=1, progress=False)
    files = sorted(p.relative_to(tiny) for p in tiny.rglob("*") if p.is_file())
    assert len(files) == 2 * 41 + 2
    for rel in files:
        assert (tiny / rel).read_bytes() == (again / rel).read_bytes()
    first = _meta(tiny)["frames"][0]
    assert (tiny / first["image"]).read_bytes() != (other / first["image"]).read_bytes()


def test_endoscope_styles_differ_per_centre(quick_small):
    meta = _meta(quick_small)
    aspect = {c: s["frame_size"][0] / s["frame_size"][1] for c, s in meta["centres"].items()}
    assert aspect["centre-1"] == pytest.approx(1.25, abs=0.02) and aspect["centre-6"] == pytest.approx(1.25, abs=0.02)
    assert aspect["centre-3"] == pytest.approx(4 / 3, abs=0.03) and aspect["centre-2"] == aspect["centre-4"] == 1.0
    colour: dict[str, list[np.ndarray]] = {}
    corner: dict[str, list[float]] = {}
    for f in meta["frames"]:
        rgb = np.asarray(Image.open(quick_small / f["image"]), dtype=np.float64)
        inner = rgb[rgb.shape[0] // 4: -rgb.shape[0] // 4, rgb.shape[1] // 4: -rgb.shape[1] // 4]
        colour.setdefault(f["centre"], []).append(inner.reshape(-1, 3).mean(0))
        corner.setdefault(f["centre"], []).append(float(rgb[:3, :3].mean()))
    mean = {c: np.mean(v, axis=0) for c, v in colour.items()}
    # pinkish mucosa everywhere: red > green, red > blue
    assert all(m[0] > m[1] + 30 and m[0] > m[2] + 30 for m in mean.values())
    # colour casts: centre-2 cool (blue gain 1.10), centre-4 yellowish (blue gain 0.82)
    assert mean["centre-2"][2] / mean["centre-2"][0] > 1.3 * mean["centre-4"][2] / mean["centre-4"][0]
    # field of view: black corners for octagon / circle endoscopes, image content for "none"
    for c, s in CENTRE_STYLES.items():
        if s.border == "none":
            assert np.mean(corner[c]) > 20
        else:
            assert np.mean(corner[c]) < 3


def test_polyp_size_mix_small_minority_everywhere_with_attached_ones():
    for preset in ("quick", "tiny"):
        plan = plan_polypgen(preset, seed=0)
        for centre, frames in plan.items():
            kinds = [f["kind"] for f in frames]
            n_small = sum(k in SMALL_KINDS for k in kinds)
            assert 1 <= n_small < len(kinds) / 2, (preset, centre, kinds)  # a minority, never absent
            if n_small >= 2:
                assert "attached" in kinds
    quick = plan_polypgen("quick", seed=0)
    frac = {c: np.mean([f["kind"] in SMALL_KINDS for f in fr]) for c, fr in quick.items()}
    assert frac["centre-3"] < frac["centre-1"] < frac["centre-4"]  # heterogeneous mixes (p_small 0.10 / 0.15 / 0.30)
    assert [len(quick[c]) for c in quick] == [36, 32, 40, 30, 34, 40]
    # stratified folds: the small-polyp frames of a centre spread over different folds
    for c in list(quick)[:5]:
        folds = [f["fold"] for f in quick[c] if f["kind"] in SMALL_KINDS]
        assert len(set(folds)) == min(len(folds), 5)


def test_rendered_polyps_follow_the_plan(quick_small):
    meta = _meta(quick_small)
    small_by_rule: dict[str, list[bool]] = {}
    attached = 0
    for f in meta["frames"]:
        mask = read_polypgen_mask(quick_small / f["mask"])
        d = dif.polypgen_difficulty(mask)
        small_by_rule.setdefault(f["centre"], []).append(bool(d.small))
        polyps = f["polyps"]
        hw = f["height"] * f["width"]
        if f["kind"] == "empty":
            assert not mask.any() and not d.small
        if f["kind"] == "small":  # isolated small polyps only: small by any estimator of the lesion area
            assert all(p["kind"] == "small" and hw / p["area_px"] >= 300 for p in polyps) and d.small
        if f["kind"] == "large":  # large polyps only: the smallest still has a_inv < 100 < tau
            assert all(hw / p["area_px"] < 100 for p in polyps) and not d.small
        if f["kind"] == "attached":  # the small polyp touches the large one: one connected mask
            attached += 1
            assert [p["kind"] for p in polyps] == ["large", "small"] and polyps[1]["attached_to"] == 0
            labels, n = ndimage.label(mask)
            x, y = (int(v) for v in polyps[1]["centre_xy"])
            assert n >= 1 and labels[y, x] > 0 and labels[y, x] == labels[int(polyps[0]["centre_xy"][1]),
                                                                          int(polyps[0]["centre_xy"][0])]
    assert attached >= 6
    for centre, flags in small_by_rule.items():
        assert 0 < np.mean(flags) < 0.5, (centre, np.mean(flags))  # small frames are a minority in every centre


def test_fedgs_rule_recovers_the_planned_kinds_on_tiny(tiny):
    """The generator's intent and fedseg.difficulty's blob-based rule agree frame by frame: frames with a small
    polyp (isolated, attached to a large one, or next to one) are small, the others are not."""
    kinds: dict[str, list[bool]] = {}
    for f in _meta(tiny)["frames"]:
        d = dif.polypgen_difficulty(read_polypgen_mask(tiny / f["mask"]))
        assert d.small == (f["kind"] in SMALL_KINDS), (f["stem"], f["kind"], d)
        kinds.setdefault(f["kind"], []).append(d.small)
    assert kinds["attached"] and all(kinds["attached"])


def test_bad_preset_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="unknown synthetic PolypGen preset"):
        synth_polypgen(tmp_path / "x", preset="huge", progress=False)
    with pytest.raises(ConfigError, match="scalee"):
        synth_polypgen(tmp_path / "x", preset="tiny", progress=False, scalee=2)
    with pytest.raises(ConfigError, match="one per fold"):
        synth_polypgen(tmp_path / "x", preset="tiny", progress=False, images=(4, 6, 6, 6, 6, 6))


def test_progress_bar(tmp_path, capsys):
    synth_polypgen(tmp_path / "p", preset="tiny", seed=2, progress=True, images=(5, 5, 5, 5, 5, 1))
    assert "synth polypgen (tiny)" in capsys.readouterr().err
