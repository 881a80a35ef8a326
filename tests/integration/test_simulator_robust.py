"""A real `nvflare simulator` run of fedgs_lits_robust on tiny settings: a simulated model-replacement attacker among
three sites is rejected by norm screening every round, and the job completes with the honest sites' model."""

import json
from dataclasses import replace

import pytest

from fedseg.jobs.recipes import JOBS

pytestmark = pytest.mark.integration


def test_norm_screening_rejects_the_model_replacement_attacker_every_round(tiny_data, tmp_path, run_simulator):
    _, cfg = tiny_data
    job = replace(JOBS["fedgs_lits_robust"], num_rounds=2, local_epochs=1, max_steps_per_round=2, min_clients=3,
                  num_threads=1, data_args={"image_size": 32, "min_tumour_pixels": 4}, model_args={"base_chan": 4},
                  test_every_n_rounds=0, attack_sites=["site-3"], attack_gamma=100.0,
                  robust_rule="norm_screening", robust_args={"factor": 3.0})
    job_dir = job.export(tmp_path / "jobs")
    ws = tmp_path / "ws"
    _, log = run_simulator(job_dir, ws, 3, data_cfg=cfg)
    assert log.count("SIMULATED ATTACK at site-3: model replacement, update x 100") == job.num_rounds
    verdicts = [line for line in log.splitlines() if "norm_screening kept" in line]
    assert len(verdicts) == job.num_rounds, log[-3000:]
    for line in verdicts:
        assert "kept ['site-1', 'site-2']" in line.replace('"', "'") or "kept ['site-2', 'site-1']" in line
        assert "rejected site-3:" in line
    metrics = json.loads((ws / "server" / "simulate_job" / "results" / "metrics.json").read_text())
    assert set(metrics["sites"]) == {"site-1", "site-2", "site-3"}
