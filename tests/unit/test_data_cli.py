"""`fedseg data synth` / `fedseg data scan`: outputs, summaries consistent with the loader, errors."""

from __future__ import annotations

import json

import pytest

from fedseg.cli import main
from fedseg.data.config import DataSource
from fedseg.data.lits import LiTSPreprocessing, load_lits_site, load_lits_test_centre


@pytest.fixture
def tiny(synth_cli):
    return synth_cli("lits")


def test_synth_prints_path_progress_and_table(tiny):
    root, out, err = tiny
    assert str(root.resolve()) in out and "tiny" in out and "10 volumes" in out
    assert "synth lits (tiny)" in err  # tqdm progress bar
    lines = out.splitlines()
    header = next(i for i, l in enumerate(lines) if l.startswith("group"))
    rows = [l.split() for l in lines[header + 2:header + 7]]
    assert [r[0] for r in rows] == [f"centre-{i}" for i in range(1, 6)]
    assert all(int(r[3]) > 0 for r in rows)  # slices per centre
    assert (root / "volume-9.nii.gz").is_file() and (root / "split.json").is_file()


def test_scan_root_writes_histograms_and_consistent_summary(tiny, tmp_path, capsys):
    root, _, _ = tiny
    out_dir = tmp_path / "scan"
    assert main(["data", "scan", "--root", str(root), "--out", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    files = sorted(p.name for p in out_dir.iterdir())
    assert files == sorted([f"inverse_area_site-{i}.png" for i in range(1, 5)]
                           + ["inverse_area_test.png", "inverse_area_all.png", "summary.json", "summary.md"])
    assert all((out_dir / f).stat().st_size > 5000 for f in files if f.endswith(".png"))
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["min_tumour_pixels"] == 3 and summary["tau"] == 1000.0  # synthetic tiny: recommended 3 px
    groups = {g["group"]: g for g in summary["groups"]}
    src = DataSource("lits", root, None, None, None, "test")
    prep = LiTSPreprocessing(image_size=128, min_tumour_pixels=3)
    for site in ("site-1", "site-2"):
        train, val = load_lits_site(src, site, "train", prep), load_lits_site(src, site, "val", prep)
        g = groups[site]
        assert g["parts"]["train"]["slices"] == len(train) and g["parts"]["val"]["slices"] == len(val)
        assert g["small"] == int(train.small.sum() + val.small.sum())
    test = load_lits_test_centre(src, prep)
    assert groups["test"]["slices"] == len(test) and groups["test"]["centre"] == "centre-5"
    assert "site-1" in printed and "small frac" in printed
    assert "| site-1 | centre-1 |" in (out_dir / "summary.md").read_text()


def test_scan_with_data_config_and_selected_sites(tiny, tmp_path, capsys):
    root, _, _ = tiny
    cfg = tmp_path / "cfg" / "fedseg_data.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({"lits": {"root": "../tiny"}}))  # relative to the config file
    out_dir = tmp_path / "scan2"
    assert main(["data", "scan", "--data-config", str(cfg), "--sites", "site-3", "--no-test",
                 "--min-tumour-pixels", "20", "--out", str(out_dir)]) == 0
    summary = json.loads((out_dir / "summary.json").read_text())
    assert [g["group"] for g in summary["groups"]] == ["site-3"] and summary["min_tumour_pixels"] == 20
    assert str(cfg) in capsys.readouterr().out


def test_scan_errors_exit_2(tmp_path, capsys):
    assert main(["data", "scan", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["data", "scan", "--split", "paper", "--out", str(tmp_path / "o")]) == 2
    assert "--split only applies with --root" in capsys.readouterr().err
