"""A real `fedseg security sweep` on tiny settings: clean and mask-flip runs of fedgs_lits_robust under norm screening,
each a real `nvflare simulator` run (3 sites, 2 rounds, 32x32 images); the table, sweep.json and plot are written,
the mask-flip attacker's warning is in its run log and the aggregator's verdicts are counted for every round."""

import json

import pytest

from fedseg.cli import main

pytestmark = pytest.mark.integration


def test_security_sweep_runs_a_clean_and_a_mask_flip_run(tiny_data, tmp_path, monkeypatch, capsys):
    _, cfg = tiny_data
    monkeypatch.setenv("FEDSEG_DATA_CONFIG", str(cfg))
    out = tmp_path / "sweep"
    argv = ["security", "sweep", "--job", "fedgs_lits_robust", "--attacks", "none", "mask_flip",
            "--defences", "norm_screening", "--attack-sites", "site-3",
            "--set", "num_rounds=2", "--set", "min_clients=3", "--set", "max_steps_per_round=2",
            "--set", "num_threads=1", "--set", "test_every_n_rounds=0",
            "--set", 'data_args={"image_size": 32, "min_tumour_pixels": 4}', "--set", 'model_args={"base_chan": 4}',
            "--parallel", "2", "--out", str(out)]
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]

    summary = json.loads((out / "sweep.json").read_text())
    rows = {r["name"]: r for r in summary["rows"]}
    assert set(rows) == {"none__norm_screening", "mask_flip__norm_screening"}
    for row in rows.values():
        assert row["status"] == "ok"
        assert 0.0 <= row["test"]["dice"] <= 1.0
        assert row["rejections"]["rounds"] == 2  # one verdict of the robust aggregator per round
        assert row["rejections"]["rule_errors"] == 0
    attacked = rows["mask_flip__norm_screening"]
    assert attacked["drop_same_defence"]["dice"] == pytest.approx(
        rows["none__norm_screening"]["test"]["dice"] - attacked["test"]["dice"])
    assert set(attacked["rejections"]["attacker_rejected"]) == {"site-3"}
    # the data attack announces itself at setup and in every round it trains
    log = (out / attacked["log"]).read_text()
    assert "SIMULATED ATTACK at site-3: mask_flip, every training mask is flipped" in log
    assert log.count("SIMULATED ATTACK at site-3: mask_flip (round") == 2
    assert attacked["attack_warnings"]["site-3"] == 3
    assert "SIMULATED ATTACK" not in (out / rows["none__norm_screening"]["log"]).read_text()

    table = (out / "table.md").read_text()
    assert "| clean | norm_screening (factor=3) |" in table and "| mask flip | norm_screening (factor=3) |" in table
    assert "--attacks none mask_flip --defences norm_screening --attack-sites site-3" in table
    assert (out / "attack_defence.png").read_bytes()[:4] == b"\x89PNG"

    # a second sweep reuses both finished runs
    assert main(argv) == 0
    assert captured.out.count("finished run found") == 0
    assert capsys.readouterr().out.count("finished run found") == 2
