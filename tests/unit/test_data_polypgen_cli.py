"""`fedseg data synth polypgen` / `fedseg data scan polypgen`: outputs, summaries consistent with the loader."""

from __future__ import annotations

import json

import pytest

from fedseg.cli import main
from fedseg.data.config import DataSource
from fedseg.data.polypgen import PolypGenPreprocessing, load_polypgen_site, load_polypgen_test_centre


@pytest.fixture
def tiny(synth_cli):
    return synth_cli("polypgen")


def test_synth_prints_path_progress_and_table(tiny):
    root, out, err = tiny
    assert str(root.resolve()) in out and "tiny" in out and "41 frames in 6 centres" in out
    assert "synth polypgen (tiny)" in err  # tqdm progress bar
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("group"))
    rows = [line.split() for line in lines[header + 2:header + 8]]
    assert [r[0] for r in rows] == [f"centre-{i}" for i in range(1, 7)]
    assert [int(r[2]) for r in rows] == [7, 6, 7, 6, 7, 8]  # images per centre
    assert all(0 < float(r[6]) < 0.5 for r in rows)  # small fraction: a minority, present everywhere
    assert "attached" in out and "octagon" in out
    assert (root / "data_C6" / "masks_C6").is_dir() and (root / "split.json").is_file()


def test_scan_root_writes_histograms_and_consistent_summary(tiny, tmp_path, capsys):
    root, _, _ = tiny
    out_dir = tmp_path / "scan"
    assert main(["data", "scan", "polypgen", "--root", str(root), "--out", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    files = sorted(p.name for p in out_dir.iterdir())
    assert files == sorted([f"inverse_area_site-{i}.png" for i in range(1, 6)]
                           + ["inverse_area_test.png", "inverse_area_all.png", "summary.json", "summary.md"])
    assert all((out_dir / f).stat().st_size > 5000 for f in files if f.endswith(".png"))
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["tau"] == 150.0 and summary["base"] == 100.0 and summary["mask_threshold"] == 127
    groups = {g["group"]: g for g in summary["groups"]}
    src = DataSource("polypgen", root, None, None, None, "test")
    prep = PolypGenPreprocessing(image_size=32)
    for site in ("site-1", "site-4"):
        train, val = load_polypgen_site(src, site, "train", prep), load_polypgen_site(src, site, "val", prep)
        g = groups[site]
        assert g["images"] == len(train) + len(val) and g["folds"]["0"]["images"] == len(val)
        assert g["small"] == int(train.small.sum() + val.small.sum())  # same rule and masks as the loader
        assert g["folds"]["0"]["small"] == int(val.small.sum())
    test = load_polypgen_test_centre(src, prep)
    assert groups["test"]["images"] == len(test) and groups["test"]["small"] == int(test.small.sum())
    assert "site-1" in printed and "small frac" in printed and ">= 150" in printed
    assert "| site-1 | centre-1 |" in (out_dir / "summary.md").read_text()


def test_scan_with_data_config_and_selected_sites(tiny, tmp_path, capsys):
    root, _, _ = tiny
    cfg = tmp_path / "cfg" / "fedseg_data.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({"polypgen": {"root": "../tiny"}}))  # relative to the config file
    out_dir = tmp_path / "scan2"
    assert main(["data", "scan", "polypgen", "--data-config", str(cfg), "--sites", "site-3", "--no-test",
                 "--tau", "1000", "--out", str(out_dir)]) == 0
    summary = json.loads((out_dir / "summary.json").read_text())
    assert [g["group"] for g in summary["groups"]] == ["site-3"] and summary["tau"] == 1000.0
    assert str(cfg) in capsys.readouterr().out


def test_scan_errors_exit_2(tiny, tmp_path, capsys):
    root, _, _ = tiny
    assert main(["data", "scan", "polypgen", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["data", "scan", "polypgen", "--root", str(root), "--min-tumour-pixels", "5",
                 "--out", str(tmp_path / "o")]) == 2
    assert "lits only" in capsys.readouterr().err
    assert main(["data", "scan", "--root", str(root), "--mask-threshold", "100", "--out", str(tmp_path / "o")]) == 2
    assert "polypgen only" in capsys.readouterr().err
