"""Real `nvflare simulator` run of pppml_covid (PPPML-HMI: Per-FedAvg + CSAHE + final adaptation) on tiny settings,
then the per-site comparison report over it."""

import json
from dataclasses import replace

import pytest
from fedseg.cli import main
from fedseg.data.synthetic_covid import synth_covid
from fedseg.jobs.recipes import JOBS

pytestmark = pytest.mark.integration

N_SITES = 5
TINY = {"num_rounds": 2, "local_epochs": 1, "max_steps_per_round": 2, "num_threads": 1,
        "data_args": {"volume_size": 24, "min_lung_fraction": 0.05}, "model_args": {"base_chan": 2},
        "test_every_n_rounds": 0, "hop_timeout": 120}


@pytest.fixture(scope="module")
def tiny_covid(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_covid") / "covid"
    synth_covid(root, preset="tiny", seed=0, progress=False)
    cfg = root.parent / "fedseg_data.json"
    cfg.write_text(json.dumps({"covid": {"root": str(root)}}))
    return root, cfg


def test_pppml_covid_runs_perfedavg_with_csahe_and_reports_personalized_test_dice(tiny_covid, tmp_path, run_simulator):
    _, cfg = tiny_covid
    job = replace(JOBS["pppml_covid"], **TINY)
    job_dir = job.export(tmp_path / "jobs")
    ws = tmp_path / "ws"
    _, log = run_simulator(job_dir, ws, N_SITES, data_cfg=cfg)
    assert "fedseg results:" in log
    run_dir = ws / "server" / "simulate_job"
    results = run_dir / "results"
    metrics = json.loads((results / "metrics.json").read_text())
    assert metrics["config"]["algorithm"] == "perfedavg" and metrics["config"]["secure_aggregation"] == "csahe"
    sites = metrics["sites"]
    assert set(sites) == {f"site-{i}" for i in range(1, N_SITES + 1)}
    for name, m in sites.items():
        # every hospital is scored on its own test cases, with the global and the adapted (personalized) model
        assert m["part"] == "test", name
        assert 0.0 <= m["dice"] <= 1.0 and 0.0 <= m["personalized"]["dice"] <= 1.0
        assert "per_case_dice" not in m and "per_image_dice" not in m  # case-level detail stays at the site
    assert (results / "personalized_bars.png").stat().st_size > 0
    # the ring ran every round over all five sites with sample weights (n_k / sum n), no private context received
    records = [json.loads(line) for line in (run_dir / "csahe_rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1]
    for r in records:
        assert r["applied"] and r["private_context_received"] is False and len(r["sites"]) == N_SITES
        assert sum(r["weights"].values()) == pytest.approx(1.0)
    assert "sent its model update in plaintext" not in log

    # the per-site comparison table reads the run (global and personalized columns)
    out = tmp_path / "report"
    assert main(["report", "sites", "--run", f"PPPML-HMI={ws}", "--out", str(out)]) == 0
    table = (out / "sites.md").read_text()
    assert "PPPML-HMI (global)" in table and "PPPML-HMI (personalized)" in table
    assert all(f"site-{i}" in table for i in range(1, N_SITES + 1))
