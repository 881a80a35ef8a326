"""`fedseg report sites`: per-site Dice of several runs (baselines, FL global and personalized) on hand-made runs."""

import csv
import json
from pathlib import Path

import pytest
from fedseg.cli import main
from fedseg.commands.report_cmd import load_site_columns, parse_run_spec, sites_table
from fedseg.errors import CommandError


def _m(dice, dice_s=None, part="test", **extra):
    return {"dice": dice, "dice_s": dice_s, "dice_l": dice, "n": 2, "n_small": 1, "n_large": 1, "part": part,
            **extra}


def _write(folder, payload):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(payload))
    return folder


@pytest.fixture
def runs(tmp_path):
    central = _write(tmp_path / "central", {"method": "central", "job": "j", "sites": {
        "site-1": _m(0.64, 0.5), "site-2": _m(0.62, 0.4), "site-3": _m(0.51, None)}})
    local = _write(tmp_path / "local", {"method": "local", "job": "j", "sites": {
        "site-1": _m(0.56), "site-2": _m(0.61), "site-3": _m(0.44)},
        "cross_site": {"site-1": {"site-1": 0.56}}})
    _write(tmp_path / "fedavg" / "results", {"job": "fedavg_covid", "sites": {
        "site-1": _m(0.51), "site-2": _m(0.60), "site-3": _m(0.50)}})
    pppml_ws = tmp_path / "pppml_ws"
    _write(pppml_ws / "server" / "simulate_job" / "results", {"job": "pppml_covid", "sites": {
        "site-1": _m(0.50, personalized=_m(0.62, 0.3)),
        "site-2": _m(0.58, personalized=_m(0.61, 0.2)),
        "site-3": _m(0.49, personalized=_m(0.51, 0.1))}})
    return {"central": central, "local": local, "fedavg": tmp_path / "fedavg", "pppml": pppml_ws}


def test_run_spec_syntax():
    assert parse_run_spec("Local=/a/b") == ("Local", None, Path("/a/b"))
    assert parse_run_spec("PPPML-HMI:personalized=ws")[:2] == ("PPPML-HMI", "personalized")
    assert parse_run_spec("FL:global=ws")[:2] == ("FL", "global")
    assert parse_run_spec("a:b=ws")[:2] == ("a:b", None)  # only :global / :personalized are views
    for bad in ("no-path", "=ws", "L=", ":personalized=ws"):
        with pytest.raises(CommandError):
            parse_run_spec(bad)


def test_table_with_personalized_columns_and_hand_computed_means(runs, tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["report", "sites", "--run", f"Centralized={runs['central']}", "--run", f"Local={runs['local']}",
               "--run", f"FedAvg={runs['fedavg']}", "--run", f"PPPML-HMI={runs['pppml']}", "--out", str(out)])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["sites.csv", "sites.md", "sites_bars.png"]
    md = (out / "sites.md").read_text().splitlines()
    assert md[2] == "| site | Centralized | Local | FedAvg | PPPML-HMI (global) | PPPML-HMI (personalized) |"
    assert md[4] == "| site-1 | 0.6400 | 0.5600 | 0.5100 | 0.5000 | 0.6200 |"
    assert md[6] == "| site-3 | 0.5100 | 0.4400 | 0.5000 | 0.4900 | 0.5100 |"
    # means by hand: (0.64+0.62+0.51)/3 = 0.59, (0.56+0.61+0.44)/3 = 0.536667, (0.51+0.60+0.50)/3 = 0.536667,
    # (0.50+0.58+0.49)/3 = 0.523333, (0.62+0.61+0.51)/3 = 0.58
    assert md[7] == "| mean over sites | 0.5900 | 0.5367 | 0.5367 | 0.5233 | 0.5800 |"
    rows = list(csv.reader((out / "sites.csv").open()))
    assert rows[0] == ["site", "Centralized", "Local", "FedAvg", "PPPML-HMI (global)", "PPPML-HMI (personalized)"]
    assert [r[0] for r in rows[1:]] == ["site-1", "site-2", "site-3", "mean over sites"]
    assert float(rows[4][1]) == pytest.approx(0.59) and float(rows[4][5]) == pytest.approx(0.58)
    text = "\n".join(md)
    assert "baseline central" in text and "pppml_ws/server/simulate_job/results/metrics.json" in text
    assert "WARNING" not in text  # every run is on the test parts


def test_personalized_only_and_other_metric(runs):
    cols = load_site_columns("PPPML-HMI", "personalized", runs["pppml"])
    assert [c.label for c in cols] == ["PPPML-HMI"]
    cols += load_site_columns("Central", None, runs["central"])
    sites, values, means, notes = sites_table(cols, "dice_s")
    assert sites == ["site-1", "site-2", "site-3"]
    assert values["PPPML-HMI"] == {"site-1": 0.3, "site-2": 0.2, "site-3": 0.1}
    assert means["PPPML-HMI"] == pytest.approx(0.2)
    # site-3 of the central run has no DiceS (an empty group): n/a, the mean is over the other two sites
    assert values["Central"]["site-3"] is None and means["Central"] == pytest.approx(0.45)
    assert any("Central: no dice_s for ['site-3']" in n for n in notes)
    glob = load_site_columns("P", "global", runs["pppml"])
    assert [c.label for c in glob] == ["P"] and glob[0].metrics["site-2"]["dice"] == 0.58


def test_sites_that_differ_between_runs(runs, tmp_path, capsys):
    _write(tmp_path / "two", {"method": "local", "sites": {"site-1": _m(0.3), "site-2": _m(0.4),
                                                          "site-4": _m(0.2)}})
    args = ["report", "sites", "--run", f"C={runs['central']}", "--run", f"T={tmp_path / 'two'}",
            "--out", str(tmp_path / "r")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "common to all: ['site-1', 'site-2']" in err
    assert "C lacks ['site-4']" in err and "T lacks ['site-3']" in err and "--common-sites" in err
    assert main(args + ["--common-sites"]) == 0
    md = (tmp_path / "r" / "sites.md").read_text()
    assert "| site-2 | 0.6200 | 0.4000 |" in md and "site-3 |" not in md and "common sites only" in md
    assert "| mean over sites | 0.6300 | 0.3500 |" in md  # (0.64 + 0.62) / 2, (0.3 + 0.4) / 2


def test_bad_runs_are_explained(runs, tmp_path, capsys):
    def err(*run_args):
        args = ["report", "sites"] + [a for r in run_args for a in ("--run", r)] + ["--out", str(tmp_path / "x")]
        assert main(args) == 2
        return capsys.readouterr().err

    assert "no metrics.json in" in err(f"A={tmp_path / 'missing'}")
    _write(tmp_path / "nosites", {"job": "j", "sites": {}, "test_centre": {"dice": 0.5}})
    assert "has no per-site metrics" in err(f"A={tmp_path / 'nosites'}")
    assert "no personalized per-site metrics" in err(f"A:personalized={runs['local']}")
    assert "labels used twice" in err(f"A={runs['local']}", f"A={runs['central']}")


def test_different_held_out_parts_are_flagged(tmp_path, runs):
    val = _write(tmp_path / "val", {"sites": {s: _m(0.4, part="val") for s in ("site-1", "site-2", "site-3")}})
    cols = load_site_columns("V", None, val) + load_site_columns("C", None, runs["central"])
    *_, notes = sites_table(cols)
    assert any(n.startswith("WARNING") and "V: val" in n and "C: test" in n for n in notes)


def test_sites_sort_naturally(tmp_path):
    run = _write(tmp_path / "r", {"sites": {f"site-{i}": _m(i / 20) for i in (10, 2, 1)}})
    sites, *_ = sites_table(load_site_columns("R", None, run))
    assert sites == ["site-1", "site-2", "site-10"]
