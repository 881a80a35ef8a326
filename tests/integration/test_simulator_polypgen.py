"""PolypGen on tiny settings: `fedseg cv` with SD-UTNet (real simulator runs, 2 folds), a FedAvg UTNet run, and
`fedseg report table1` over their outputs."""

import json
import os
import subprocess
import sys

import pytest


pytestmark = pytest.mark.integration

TINY_SETS = ["num_rounds=2", "local_epochs=1", "max_steps_per_round=2", "num_threads=1", "test_every_n_rounds=0",
             "min_clients=3",  # 3 simulator workers: faster than 5 on 2 cores
             "data_args.image_size=32"]


@pytest.fixture(scope="module")
def polyp_env(tiny_polypgen):
    return dict(os.environ, FEDSEG_DATA_CONFIG=str(tiny_polypgen), PYTHONUNBUFFERED="1")


def _fedseg(args, env, timeout=900):
    proc = subprocess.run([sys.executable, "-m", "fedseg.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return proc.stdout


def test_cv_with_sd_utnet_then_table1(polyp_env, tmp_path):
    sets = [a for s in TINY_SETS + ["model_args.base_chan=4", "model_args.modality_grid=2"] for a in ("--set", s)]
    out = _fedseg(["cv", "fedgs_polypgen", "--model", "sd_utnet", "--folds", "0,1", "--workspace",
                   str(tmp_path / "cv_fedgs_sd"), *sets], polyp_env)
    assert "fold 1: best round" in out
    summary = json.loads((tmp_path / "cv_fedgs_sd" / "cv_summary.json").read_text())
    assert summary["model"] == "sd_utnet" and summary["aggregation"] == "fedgs" and summary["folds"] == [0, 1]
    assert len(summary["summary"]["dice"]["values"]) == 2 and 0 <= summary["summary"]["dice"]["mean"] <= 1
    # each fold trained on its own fold split: the fold-1 job says so
    fold1 = json.loads((tmp_path / "cv_fedgs_sd/jobs/fold1/fedgs_polypgen/app/config/config_fed_client.json").read_text())
    assert fold1["executors"][0]["executor"]["args"]["data_args"]["fold"] == 1
    # a FedAvg UTNet run (single fold) through the same command, then the paper's table over both
    sets_u = [a for s in TINY_SETS + ["model_args.base_chan=4"] for a in ("--set", s)]
    _fedseg(["cv", "fedavg_polypgen", "--folds", "0", "--workspace", str(tmp_path / "cv_fedavg_u"), *sets_u], polyp_env)
    table_dir = tmp_path / "table1"
    out = _fedseg(["report", "table1", str(tmp_path / "cv_fedgs_sd"), str(tmp_path / "cv_fedavg_u"),
                   "--out", str(table_dir), "--images", "2"], polyp_env)
    md = (table_dir / "table1.md").read_text()
    assert "| SD-UTNet | FedGS |" in md and "| UTNet | FedAvg |" in md and "PolypGen DiceS" in md
    assert "±" in md  # the 2-fold run reports mean±std
    rows = (table_dir / "table1.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 3
    for name in ("table1_bars.png", "table1_qualitative.png"):
        assert (table_dir / name).read_bytes()[:4] == b"\x89PNG"
