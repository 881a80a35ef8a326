"""Real `nvflare simulator` runs of the LiTS jobs on tiny settings (exported from the same recipes as jobs/)."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from fedseg.jobs.recipes import JOBS

pytestmark = pytest.mark.integration

TINY = dict(num_rounds=2, local_epochs=1, max_steps_per_round=3, min_clients=2, num_threads=1,
            data_args={"image_size": 32, "min_tumour_pixels": 4}, model_args={"base_chan": 4},
            test_every_n_rounds=1)



POISON_FILTER = """
import numpy as np
from nvflare.apis.dxo import DataKind
from nvflare.apis.dxo_filter import DXOFilter


class PoisonFilter(DXOFilter):
    \"\"\"Test-only task-result filter: the named site's update gets NaN (a diverged or malicious site).\"\"\"

    def __init__(self, site):
        super().__init__(supported_data_kinds=[DataKind.WEIGHT_DIFF], data_kinds_to_filter=[DataKind.WEIGHT_DIFF])
        self.site = site

    def process_dxo(self, dxo, shareable, fl_ctx):
        if fl_ctx.get_identity_name() == self.site:
            name = sorted(dxo.data)[0]
            dxo.data[name] = np.full_like(dxo.data[name], np.nan)
        return dxo
"""


def _simulate(run_simulator, job_name, tmp_path, data_cfg, n_sites=2, extra_env=None, poison_site=None,
              via_local_folder=False):
    job = replace(JOBS[job_name], **TINY)
    job_dir = job.export(tmp_path / "jobs")
    if poison_site:
        (job_dir / "app/custom/poison_filter.py").write_text(POISON_FILTER)
        cfg_path = job_dir / "app/config/config_fed_client.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["task_result_filters"] = [{"tasks": ["train"], "filters": [
            {"path": "poison_filter.PoisonFilter", "args": {"site": poison_site}}]}]
        cfg_path.write_text(json.dumps(cfg))
    ws = tmp_path / "ws"
    env = dict(os.environ, **(extra_env or {}))
    if via_local_folder:  # site-local configuration: WS/local is copied into every site's workspace
        (ws / "local").mkdir(parents=True)
        (ws / "local" / "fedseg_data.json").write_text(data_cfg.read_text())
    else:
        env["FEDSEG_DATA_CONFIG"] = str(data_cfg)
    _, log = run_simulator(job_dir, ws, n_sites, env=env)
    return ws, log


def _results(ws):
    res = ws / "server" / "simulate_job" / "results"
    assert res.is_dir(), f"no results folder under {ws}"
    return res


@pytest.mark.parametrize("job_name, aggregation, via_local_folder",
                         [("fedgs_lits", "fedgs", False), ("fedavg_lits", "fedavg", True)])
def test_simulator_run_produces_model_metrics_and_plots(job_name, aggregation, via_local_folder, tiny_data, tmp_path,
                                                        run_simulator):
    _, cfg = tiny_data
    ws, log = _simulate(run_simulator, job_name, tmp_path, cfg, via_local_folder=via_local_folder)
    expected_origin = "local/fedseg_data.json" if via_local_folder else "FEDSEG_DATA_CONFIG"
    assert expected_origin in log
    res = _results(ws)
    assert "fedseg results:" in log and str(res) in log
    metrics = json.loads((res / "metrics.json").read_text())
    assert metrics["config"]["aggregation"] == aggregation
    assert set(metrics["sites"]) == {"site-1", "site-2"}
    for m in metrics["sites"].values():
        assert 0.0 <= m["dice"] <= 1.0 and m["n"] > 0 and m["data_origin"] == "site-config"
    test = metrics["test_centre"]
    assert test is not None and 0.0 <= test["dice"] <= 1.0 and test["n_small"] + test["n_large"] <= test["n"]
    assert metrics["test_centre_untrained"] is not None
    assert set(metrics["test_centre_by_round"]) == {"1", "2"}
    tags = {(h["site"], h["tag"]) for h in metrics["history"]}
    assert ("site-1", "val_dice") in tags and ("site-2", "train_loss") in tags
    best = metrics["best"]  # best checkpoint by image-weighted validation Dice, final model included
    assert best["round"] in (0, 1, 2) and set(best["val_dice_by_round"]) == {"0", "1", "2"}
    assert best["val_dice"] == max(best["val_dice_by_round"].values())
    assert best["test_centre"]["n"] == test["n"] and (res / "best_global_model.pt").is_file()
    for name in ("results.md", "training_curves.png", "dice_bars.png", "test_overlays.png"):
        assert (res / name).stat().st_size > 0
    # the global model loads into the configured network and differs from the untrained one
    from fedseg.models import get_model

    state = torch.load(res / "global_model.pt")
    net = get_model("utnet", in_channels=1, num_classes=1, base_chan=4)
    net.load_state_dict(state)
    # TensorBoard event files were streamed to the server
    tb = list((ws / "server" / "simulate_job" / "tb_events").rglob("events.out.tfevents*"))
    assert tb, "no TensorBoard files"
    # every round aggregated both sites
    assert log.count("aggregated 2 site(s)") == 2
    # a site that holds the test centre evaluates the downloaded model with the CLI and gets the server's numbers
    env = dict(os.environ, FEDSEG_DATA_CONFIG=str(cfg))
    cli = subprocess.run([sys.executable, "-m", "fedseg.cli", "evaluate", "--model", str(res / "global_model.pt"),
                          "--job", job_name, "--part", "test", "--out", str(tmp_path / "eval"),
                          "--model-args", json.dumps(TINY["model_args"]), "--data-args", json.dumps(TINY["data_args"])],
                         env=env, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["dice"] == pytest.approx(test["dice"], abs=1e-6)
    assert (tmp_path / "eval" / "overlays.png").stat().st_size > 0


def test_bad_update_from_a_site_is_rejected_and_the_round_goes_on(tiny_data, tmp_path, run_simulator):
    """A site whose update holds NaN is rejected with its name in the log; the other site's update is applied."""
    _, cfg = tiny_data
    ws, log = _simulate(run_simulator, "fedgs_lits", tmp_path, cfg, poison_site="site-2")
    assert "rejected the update of site 'site-2'" in log and "NaN/Inf" in log
    assert log.count("aggregated 1 site(s) ['site-1']") == 2
    assert (_results(ws) / "global_model.pt").is_file()


def test_a_site_with_a_bad_data_root_stops_the_job_with_a_clear_message(tiny_data, tmp_path, run_simulator):
    """site-2 points at a folder that does not exist: the job ends (no hang) and the log names the site and file."""
    root, _ = tiny_data
    cfg = tmp_path / "fedseg_data.json"
    missing = tmp_path / "no_such_lits"
    cfg.write_text(json.dumps({"lits": {"root": str(root)}, "sites": {"site-2": {"lits": {"root": str(missing)}}}}))
    job = replace(JOBS["fedgs_lits"], **TINY)
    job_dir = job.export(tmp_path / "jobs")
    res, log = run_simulator(job_dir, tmp_path / "ws", 2, data_cfg=cfg, check=False)
    assert res.failure is None, res.describe()  # the simulator ended by itself: the watchdog did not stop it
    assert "site-2 cannot train" in log and str(missing) in log
    assert "fedseg results" not in log  # no results from a run that could not train
