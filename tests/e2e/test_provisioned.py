"""End to end on a provisioned system (real processes, loopback only): submit through the FLARE API, refusals."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from fedseg.deploy.kits import KitError, check_kit, find_kits, read_kit
from fedseg.deploy.submit import submit_job
from fedseg.deploy.system import server_address, start_participant, stop_system, system_status

from .conftest import FAST_DEAD_CLIENT, SITES, provisioned, tiny_job

pytestmark = pytest.mark.e2e


def _wait_for(log: Path, text: str, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while text not in (log.read_text(errors="replace") if log.is_file() else ""):
        assert time.time() < deadline, f"{text!r} not in {log} after {timeout:.0f} s"
        time.sleep(0.5)


def test_fedgs_lits_runs_to_completion_through_the_flare_api(flare_system, tmp_path):
    prod, admin = flare_system
    job = tiny_job("fedgs_lits", tmp_path / "jobs")
    lines = []
    res = submit_job(job, admin, timeout=400, poll=2, progress=lines.append)
    assert res.ok, (res.status, res.reason)
    assert any("RUNNING" in line for line in lines) and any("COMPLETED" in line for line in lines)
    results = res.results
    assert results is not None and (results / "results.md").is_file()
    metrics = json.loads((results / "metrics.json").read_text())
    assert set(metrics["sites"]) == set(SITES)
    assert {h["step"] for h in metrics["history"] if h["tag"] == "val_dice"} == {0, 1}  # both rounds recorded
    state = torch.load(results / "global_model.pt", map_location="cpu", weights_only=True)
    assert any(k.endswith("weight") for k in state) and all(torch.isfinite(v.float()).all() for v in state.values())
    # every participant still runs: the system outlives its jobs
    assert all(e["alive"] for e in system_status(prod).values())


def test_a_job_whose_class_is_outside_the_allow_list_is_refused_with_the_reason(flare_system, tmp_path):
    """Without app/custom (no BYOC) a fedseg job needs 'fedseg.' in the sites' class_allow_list; these kits have the
    FLARE default list, so the server refuses the job and says which component."""
    _, admin = flare_system
    job = tiny_job("fedgs_lits", tmp_path / "jobs", byoc=False, num_rounds=1)
    res = submit_job(job, admin, timeout=200, poll=2, progress=lambda m: None)
    assert res.status.startswith("FINISHED") and not res.ok
    assert res.reason is not None and "not in allow_list" in res.reason and "fedseg.flare." in res.reason


def test_a_site_with_another_projects_certificates_is_refused(flare_system, tiny_lits, tmp_path):
    prod, _ = flare_system
    server = next(k for k in find_kits(prod) if k.kind == "server")
    host, port = server_address(server)
    other = provisioned(tmp_path, "other_project", tiny_lits, he=False, sites=("site-9",))
    kit = read_kit(other / "site-9")
    # point the foreign kit at this system's server (same host name, this system's port)
    cfg_path = kit.startup / "fed_client.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["servers"][0]["service"]["target"] = f"{host}:{port}"
    cfg["servers"][0]["name"] = json.loads((server.startup / "fed_server.json").read_text())["servers"][0]["name"]
    cfg_path.write_text(json.dumps(cfg))
    # the kit check names the problem before anything connects ...
    with pytest.raises(KitError, match="belongs to another FLARE project"):
        check_kit(kit, expect_root=server.root_ca)
    # ... and the server refuses the connection when the site tries anyway
    server_log = Path(system_status(prod)[server.name]["log"])
    before = server_log.read_text(errors="replace")
    start_participant(kit, other)
    client_log_path = other / "fedseg_logs" / "site-9.log"
    try:
        deadline = time.time() + 60
        while "CERTIFICATE_VERIFY_FAILED" not in client_log_path.read_text(errors="replace"):
            assert time.time() < deadline, client_log_path.read_text(errors="replace")[-3000:]
            time.sleep(1)
        after = server_log.read_text(errors="replace")[len(before):]
        assert "New client site-9@" not in after
        assert "Successfully registered client:site-9" not in client_log_path.read_text(errors="replace")
    finally:
        stop_system(other)


def test_a_server_restarted_mid_job_resumes_from_its_round_checkpoint_with_no_lost_round(flare_system, tmp_path):
    """SIGKILL the server (and its job process) after round 1, start it again, resubmit the same job folder: the new
    job continues with round 2 from the checkpoint, and the results hold every round exactly once."""
    from fedseg.deploy.system import kill_participant, start_system

    prod, admin = flare_system
    server = next(k for k in find_kits(prod) if k.kind == "server")
    job = tiny_job("fedgs_lits", tmp_path / "jobs", num_rounds=3, max_steps_per_round=3)
    first = submit_job(job, admin, wait=False, progress=lambda m: None)
    log = server.path / first.job_id / "log.txt"
    _wait_for(log, "Round 1 finished.")
    kill_participant(prod, server.name)
    start_system(prod, timeout=120, env=dict(os.environ, **FAST_DEAD_CLIENT))  # the server again; the sites (still running) reconnect by themselves
    res = submit_job(job, admin, abort_running=True, timeout=400, poll=2, progress=lambda m: None)
    assert res.ok, (res.status, res.reason)
    text = (res.result_dir / "workspace" / "log.txt").read_text(errors="replace")
    resumed = [line for line in text.splitlines() if "resuming from checkpoint" in line]
    assert len(resumed) == 1, text[-3000:]
    finished = int(resumed[0].split("round ")[1].split(" was finished")[0])
    assert finished >= 1
    assert f"Round {finished + 1} started." in text and f"Round {finished} started." not in text
    metrics = json.loads((res.results / "metrics.json").read_text())
    for site in SITES:  # validation of every round's model at every site, each once
        steps = sorted(h["step"] for h in metrics["history"] if h["tag"] == "val_dice" and h["site"] == site)
        assert steps == [0, 1, 2], (site, steps)
    assert not list((server.path / "fedseg_resume").glob("fedgs_lits-*"))  # cleared once training finished


def test_a_site_that_dies_mid_job_does_not_stop_the_others(flare_system, tmp_path):
    """min_clients 2 of 3: after site-3 is SIGKILLed in round 1 the rounds go on with site-1 and site-2, FLARE declares site-3
    dead (heartbeat timeout + grace, shortened for the test), the final evaluation goes on without it and the job
    completes; the results say which site has no final result. site-3 is started again afterwards."""
    from fedseg.deploy.system import kill_participant, start_system

    prod, admin = flare_system
    server = next(k for k in find_kits(prod) if k.kind == "server")
    job = tiny_job("fedgs_lits", tmp_path / "jobs", num_rounds=3, max_steps_per_round=3, min_clients=2)
    first = submit_job(job, admin, wait=False, progress=lambda m: None)
    log = server.path / first.job_id / "log.txt"
    _wait_for(log, "Round 0 finished.")
    kill_participant(prod, "site-3")
    try:
        from fedseg.deploy.submit import open_session

        session = open_session(admin)
        try:
            session.monitor_job(first.job_id, timeout=300, poll_interval=2)
            status = session.get_job_meta(first.job_id)["status"]
            result = Path(session.download_job_result(first.job_id))
        finally:
            session.close()
        assert status == "FINISHED:COMPLETED", status
        text = (result / "workspace" / "log.txt").read_text(errors="replace")
        assert "Client site-3 is deemed disconnected" in text
        for rnd in (2,):  # the round after the crash was aggregated from the two live sites
            line = next(l for l in text.splitlines() if f"round {rnd}: aggregated" in l)
            assert "2 site(s)" in line and "site-3" not in line, line
        metrics = json.loads((result / "workspace" / "results" / "metrics.json").read_text())
        assert set(metrics["sites"]) == {"site-1", "site-2"}
        assert any("site-3" in n for n in metrics.get("notes", []))
    finally:
        start_system(prod, only=["site-3"], timeout=120, env=dict(os.environ, **FAST_DEAD_CLIENT))
