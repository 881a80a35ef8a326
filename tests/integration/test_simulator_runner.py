"""fedseg's simulator runner against NVFlare's real lost-worker failure: a worker port taken by another socket
(docs/upstream/nvflare_port_race_repro.py) makes the worker die and NVFlare wait forever; the runner recognises it
within seconds, stops the whole process tree, and the retry in a fresh workspace finishes the job. Also `fedseg
simulate`, the command the README gives."""

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from fedseg.jobs.recipes import JOBS, override
from fedseg.simulation import simulate

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
REPRO = REPO / "docs" / "upstream" / "nvflare_port_race_repro.py"
TINY = {"num_rounds": 1, "local_epochs": 1, "max_steps_per_round": 1, "num_threads": 1, "test_every_n_rounds": 0,
        "min_clients": 2, "data_args.image_size": 32, "model_args.base_chan": 4}


@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory):
    return override(JOBS["fedavg_polypgen"], TINY).export(tmp_path_factory.mktemp("jobs"))


def _python_processes_under(path: Path) -> list[int]:
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if any(str(path) in part for part in (p.info["cmdline"] or [])):
            found.append(p.info["pid"])
    return found


def test_a_lost_worker_is_recognised_stopped_and_retried_to_a_finished_run(tiny_job, tiny_polypgen, tmp_path):
    ws, marker = tmp_path / "ws", tmp_path / "stolen"
    (ws / "local").mkdir(parents=True)
    (ws / "local" / "fedseg_data.json").write_text(Path(tiny_polypgen).read_text())  # site-local data config
    cmd = [sys.executable, str(REPRO), str(tiny_job), "-w", str(ws), "-n", "2", "-t", "2", "--steal-once", str(marker)]
    res = simulate(tiny_job, ws, command=cmd, log_path=tmp_path / "run.log", timeout=400, stall_timeout=120,
                   retries=1)
    log = (tmp_path / "run.log").read_text()
    aside = tmp_path / "ws.failed-attempt-1"
    first_log = (aside / "fedseg_simulate.log").read_text()  # attempt 1's output moved with its workspace
    assert marker.exists() and "repro: port" in first_log and "repro: port" not in log
    first, second = res.attempts
    assert "could not bind its port" in first.failure and first.seconds < 45, first_log[-3000:]  # NVFlare: 60 s, then forever
    assert res.ok and second.failure is None, log[-3000:]
    assert (ws / "server" / "simulate_job" / "results" / "metrics.json").is_file()
    assert (ws / "local" / "fedseg_data.json").is_file()  # the fresh workspace kept the site-local configuration
    assert "Address already in use" in "".join(p.read_text() for p in aside.glob("*/error_log.txt"))
    assert _python_processes_under(aside) == [] and _python_processes_under(ws) == []  # nothing left running


def test_fedseg_simulate_command_runs_a_job_and_names_its_runner(tiny_job, tiny_polypgen, tmp_path):
    ws = tmp_path / "ws"
    proc = subprocess.run([sys.executable, "-m", "fedseg.cli", "simulate", str(tiny_job), "-w", str(ws), "-n", "2",
                           "-t", "2", "--timeout", "400", "--stall-timeout", "120", "--log", str(tmp_path / "s.log")],
                          env={**os.environ, "FEDSEG_DATA_CONFIG": str(tiny_polypgen)},
                          capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "worker ports from fedseg's PortAllocator" in proc.stdout  # nvflare simulator ran underneath, port-fixed
    assert "fedseg simulate: simulator run finished" in proc.stdout
    assert (ws / "server" / "simulate_job" / "results" / "metrics.json").is_file()
    assert "PortAllocator" in (tmp_path / "s.log").read_text()
