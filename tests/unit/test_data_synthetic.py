"""Synthetic LiTS generator: real NIfTI output, reproducibility, anatomy intensities, per-centre heterogeneity."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from fedseg.data.splits import load_split
from fedseg.data.synthetic import CENTRE_SPECS, PRESETS, synth_lits
from fedseg.errors import ConfigError


@pytest.fixture
def tiny(tiny_lits):
    return tiny_lits


def _arrays(root, i):
    v = nib.load(root / f"volume-{i}.nii.gz")
    s = nib.load(root / f"segmentation-{i}.nii.gz")
    return v, s, np.asarray(v.dataobj), np.asarray(s.dataobj)


def test_tiny_layout_and_nifti_format(tiny):
    p = PRESETS["tiny"]
    files = sorted(f.name for f in tiny.iterdir())
    assert files == sorted([f"volume-{i}.nii.gz" for i in range(10)] + [f"segmentation-{i}.nii.gz" for i in range(10)]
                           + ["split.json", "synthetic.json"])
    split = load_split(None, tiny, list(range(10)))
    assert split.sites == {f"site-{i}": f"centre-{i}" for i in range(1, 5)} and split.test_centre == "centre-5"
    assert split.centres["centre-1"] == {"train": [0], "val": [1], "test": []}
    assert split.centres["centre-5"] == {"train": [], "val": [], "test": [8, 9]}
    meta = json.loads((tiny / "synthetic.json").read_text())
    for case in meta["cases"]:
        v, s, vol, seg = _arrays(tiny, case["case_id"])
        assert vol.dtype == np.int16 and seg.dtype == np.uint8
        assert vol.shape == seg.shape and vol.shape[:2] == (p.size, p.size)
        assert 10 <= vol.shape[2] <= 18
        assert set(np.unique(seg).tolist()) == {0, 1, 2}
        # pixdim / affine: in-plane pixel = FOV / size, z = the centre's slice thickness
        thick = CENTRE_SPECS[case["centre"]].thickness_mm * p.thickness_scale
        np.testing.assert_allclose(v.header.get_zooms(), (360 / 128, 360 / 128, thick), rtol=1e-5)
        np.testing.assert_allclose(np.diag(v.affine)[:3], (360 / 128, 360 / 128, thick), rtol=1e-5)
        # tumour is inside the liver region: labels 2 only where the liver mask would be, HU hypodense
        assert ((seg == 2).sum() > 0) and np.all(vol[seg == 2].mean() < vol[seg == 1].mean())


def test_same_seed_same_bytes_other_seed_different(tmp_path, tiny):
    again = synth_lits(tmp_path / "again", preset="tiny", seed=0, progress=False)
    other = synth_lits(tmp_path / "other", preset="tiny", seed=1, progress=False)
    for i in range(10):
        for kind in ("volume", "segmentation"):
            assert (tiny / f"{kind}-{i}.nii.gz").read_bytes() == (again / f"{kind}-{i}.nii.gz").read_bytes()
    _, _, va, _ = _arrays(tiny, 0)
    _, _, vb, _ = _arrays(other, 0)
    assert va.shape != vb.shape or not np.array_equal(va, vb)


def test_anatomy_intensities_look_like_ct(tiny):
    """Air outside the body, fat, liver ~60 HU, hypodense tumours, bone (before per-centre calibration noise)."""
    _, _, vol, seg = _arrays(tiny, 0)  # centre-1: scale 1, offset 0, low noise
    assert vol[0, 0, :].mean() < -900  # corner = air
    liver = vol[seg == 1].astype(float)
    tumour = vol[seg == 2].astype(float)
    assert 45 < np.median(liver) < 75
    assert np.median(tumour) < np.median(liver) - 20
    assert (vol > 500).sum() > 0  # bone
    assert ((vol > -150) & (vol < -50)).sum() > 0.03 * vol.size  # fat


def test_scanner_styles_differ_per_centre(tiny):
    med = {}
    meta = json.loads((tiny / "synthetic.json").read_text())
    for case in meta["cases"]:
        _, _, vol, seg = _arrays(tiny, case["case_id"])
        med.setdefault(case["centre"], []).append(float(np.median(vol[seg == 1])))
    # centre-2 calibration: 1.08 * HU + 12 -> liver ~77; centre-3: 0.92 * HU - 15 -> ~40
    assert np.mean(med["centre-2"]) > np.mean(med["centre-1"]) + 8 > np.mean(med["centre-3"]) + 16


def test_heterogeneity_of_tumour_sizes(tmp_path):
    # the quick layout (6 volumes per centre) at a small in-plane size keeps this fast; min pixels scaled too
    root = synth_lits(tmp_path / "q", preset="quick", seed=0, progress=False, size=96)
    meta = json.loads((root / "synthetic.json").read_text())
    counts: dict[str, list[int]] = {}
    for case in meta["cases"]:
        seg = np.asarray(nib.load(root / f"segmentation-{case['case_id']}.nii.gz").dataobj)
        c = (seg == 2).sum(axis=(0, 1))
        counts.setdefault(case["centre"], []).extend(c[c >= 2].tolist())
    mean_area = {c: float(np.mean(v)) for c, v in counts.items()}
    small = {c: float(np.mean(96 * 96 / np.asarray(v) >= 1000)) for c, v in counts.items()}
    assert all(len(counts[f"centre-{i}"]) >= 30 for i in range(1, 5))  # tens of tumour slices per site
    assert mean_area["centre-1"] > 1.5 * mean_area["centre-2"] and mean_area["centre-1"] > 1.5 * mean_area["centre-3"]
    assert small["centre-1"] < 0.12  # rich in large tumours, small ones rare
    assert small["centre-1"] < small["centre-4"] and small["centre-1"] < small["centre-5"]
    assert 0.15 <= small["centre-5"] <= 0.40  # the test centre has a meaningful share of small tumours
    kinds = {c: [t["kind"] for case in meta["cases"] if case["centre"] == c for t in case["tumours"]]
             for c in counts}
    assert "small" not in kinds["centre-1"] and kinds["centre-5"].count("small") >= 12


def test_bad_preset_and_override(tmp_path):
    with pytest.raises(ConfigError, match="unknown synthetic LiTS preset"):
        synth_lits(tmp_path / "x", preset="huge", progress=False)
    with pytest.raises(ConfigError, match="sizee"):
        synth_lits(tmp_path / "x", preset="tiny", progress=False, sizee=64)


def test_progress_bar(tmp_path, capsys):
    synth_lits(tmp_path / "p", preset="tiny", seed=2, progress=True, train_volumes=1, val_volumes=0, test_volumes=1)
    assert "synth lits (tiny)" in capsys.readouterr().err
