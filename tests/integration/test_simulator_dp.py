"""Real `nvflare simulator` runs of the differential-privacy jobs on tiny settings (exported from the same recipes as
jobs/): the DP filter at every site, the accountant's totals in the results folder and the streamed metrics."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from fedseg.jobs.recipes import JOBS

pytestmark = pytest.mark.integration

TINY = dict(num_rounds=2, local_epochs=1, max_steps_per_round=2, min_clients=2, num_threads=1,
            data_args={"image_size": 32, "min_tumour_pixels": 4}, model_args={"base_chan": 4},
            test_every_n_rounds=1)


def _simulate(run_simulator, job, tmp_path, data_cfg, n_sites=2, before=None):
    job_dir = job.export(tmp_path / "jobs")
    ws = tmp_path / "ws"
    if before is not None:
        before(ws)
    _, log = run_simulator(job_dir, ws, n_sites, data_cfg=data_cfg)
    return ws, log


def _round_cost(job):
    from fedseg.algorithms.adaptive_dp import DPConfig

    return DPConfig(mechanism=job.dp_mechanism, epsilon=job.dp_epsilon, delta=job.dp_delta, clipping=job.dp,
                    clip_init=job.dp_clip_init, percentile=job.dp_percentile, quantile_epsilon=job.dp_quantile_epsilon,
                    clip_lr=job.dp_clip_lr, per_layer=job.dp_per_layer, adjacency=job.dp_adjacency).round_cost()


def _check_privacy(ws, log, job, sites=("site-1", "site-2")):
    """The privacy record of a finished DP run: per site one report a round, totals = rounds x round cost."""
    run_dir = ws / "server" / "simulate_job"
    res = run_dir / "results"
    eps_round, _ = _round_cost(job)
    metrics = json.loads((res / "metrics.json").read_text())
    privacy = json.loads((res / "privacy.json").read_text())
    assert metrics["privacy"] == privacy
    assert set(privacy["per_site"]) == set(sites)
    for site in sites:
        s = privacy["per_site"][site]
        assert s["protected"] is True and s["rounds"] == job.num_rounds
        assert s["epsilon_total"] == pytest.approx(job.num_rounds * eps_round, rel=1e-9)
        assert s["epsilon_round"] == pytest.approx(eps_round, rel=1e-9)
        assert s["mechanism"] == job.dp_mechanism and s["clipping"] == job.dp and s["accountant"] == "pure"
        assert f"DP round 0 at {site}: epsilon" in log
    records = [json.loads(x) for x in (run_dir / "privacy.jsonl").read_text().splitlines()]
    assert sorted((r["site"], r["round"]) for r in records) == sorted(
        (s, r) for s in sites for r in range(job.num_rounds))
    assert "one site's model update in one round" in privacy["guarantee"]
    md = (res / "results.md").read_text()
    assert "## Privacy" in md and (res / "privacy.png").stat().st_size > 0
    return metrics, privacy


def test_adaptive_dp_job_runs_and_reports_its_privacy(tiny_data, tmp_path, run_simulator):
    _, cfg = tiny_data
    job = replace(JOBS["fedgs_lits_adp"], **TINY)
    ws, log = _simulate(run_simulator, job, tmp_path, cfg)
    metrics, privacy = _check_privacy(ws, log, job)
    # the noised updates were aggregated and the model evaluated as in a plaintext run
    assert log.count("aggregated 2 site(s)") == job.num_rounds
    test = metrics["test_centre"]
    assert test is not None and 0.0 <= test["dice"] <= 1.0
    for m in metrics["sites"].values():
        assert 0.0 <= m["dice"] <= 1.0 and m["n"] > 0
    # the accountant's totals and the thresholds were streamed with the metrics (TensorBoard + history)
    streamed = {(h["site"], h["tag"], h["step"]): h["value"] for h in metrics["history"]}
    eps_round, _ = _round_cost(job)
    for site in ("site-1", "site-2"):
        assert streamed[(site, "dp_epsilon_total", 1)] == pytest.approx(2 * eps_round)
        assert streamed[(site, "dp_clip", 0)] == pytest.approx(job.dp_clip_init)  # round 0 clips at clip_init
        assert (site, "dp_noise_scale", 1) in streamed
    # adaptive clipping moved the threshold away from its start for round 1
    by_round = {(r["site"], r["round"]): r["dp"] for r in privacy["by_round"]}
    assert by_round[("site-1", 1)]["clip"] != pytest.approx(job.dp_clip_init)


def test_budget_stop_releases_nothing_past_the_budget_and_ends_the_job(tiny_data, tmp_path, run_simulator):
    """A budget of one round with budget_action "stop": round 0 is released, in round 1 every site refuses
    (PRIVACY_BUDGET_EXHAUSTED), ScatterAndGather cannot reach min_clients and ends the job; the run folder keeps the
    privacy record of round 0 and no update of round 1 reached the server."""
    _, cfg = tiny_data
    job = replace(JOBS["fedgs_lits_adp"], **TINY)
    eps_round, _ = _round_cost(job)
    job = replace(job, dp_budget_epsilon=eps_round, dp_budget_action="stop")
    job_dir = job.export(tmp_path / "jobs")
    ws = tmp_path / "ws"
    res, log = run_simulator(job_dir, ws, 2, data_cfg=cfg, check=False)
    assert res.failure is None, res.describe()  # the job ended by itself
    assert "privacy budget exhausted" in log and "PRIVACY_BUDGET_EXHAUSTED" in log
    assert "Cannot reach min_responses" in log
    assert log.count("aggregated 2 site(s)") == 1 and "round 1: aggregated" not in log
    assert "DP round 1 at" not in log  # nothing was noised (and so released) in round 1
    run_dir = ws / "server" / "simulate_job"
    records = [json.loads(x) for x in (run_dir / "privacy.jsonl").read_text().splitlines()]
    assert sorted((r["site"], r["round"]) for r in records) == [("site-1", 0), ("site-2", 0)]
    assert all(r["dp"]["epsilon_total"] == pytest.approx(eps_round) for r in records)
    assert not (run_dir / "results").exists()


def test_dp_then_he_job_runs_and_records_the_privacy_of_encrypted_updates(tiny_data, tmp_path, run_simulator):
    """fedgs_lits_adp_he: each site noises its update, then encrypts it (FLARE's TenSEAL HE); the server aggregates
    ciphertexts, stores the model encrypted, and still records the sites' DP reports (the meta stays plaintext)."""
    _, cfg = tiny_data
    job = replace(JOBS["fedgs_lits_adp_he"], **{**TINY, "test_every_n_rounds": 0})

    def contexts(ws):
        proc = subprocess.run([sys.executable, "-m", "fedseg.cli", "he-context", "--workspace", str(ws)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr

    ws, log = _simulate(run_simulator, job, tmp_path, cfg, before=contexts)
    metrics, _ = _check_privacy(ws, log, job)
    lines = [line for line in log.splitlines() if "aggregated 2 site(s)" in line]
    assert len(lines) == job.num_rounds and all("(ciphertexts)" in line for line in lines)  # HE aggregator only
    assert metrics["test_centre"] is None  # the server holds no secret key: no test-centre evaluation
    assert set(metrics["sites"]) == {"site-1", "site-2"}
    for m in metrics["sites"].values():
        assert 0.0 <= m["dice"] <= 1.0
    res = ws / "server" / "simulate_job" / "results"
    assert (res / "global_model_encrypted.pt").is_file() and not (res / "global_model.pt").exists()
