"""fedseg.simulation.runner against stand-in simulators (small Python scripts) that hang the ways NVFlare's does:
the watchdog must recognise each, stop exactly the stand-in's process tree (a setsid worker included), retry in a fresh
workspace that keeps startup/ and local/, and never retry a simulator that exited by itself."""

import os
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from fedseg.simulation import SimulationError, simulate

# The stand-in: attempt number from a counter file; BEHAVIOUR[attempt] says what that attempt does. Every attempt
# starts a "worker" in a session of its own (as NVFlare does) that writes its pid and sleeps.
STAND_IN = textwrap.dedent("""
    import json, os, subprocess, sys, time
    from pathlib import Path
    ws, state = Path(sys.argv[1]), Path(sys.argv[2])
    n = int(state.read_text()) + 1 if state.exists() else 1
    state.write_text(str(n))
    plan = json.loads(sys.argv[3])
    what = plan[min(n, len(plan)) - 1]
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    (ws / f"worker_pid_{n}").write_text(str(worker.pid))
    (ws / f"attempt_{n}").write_text("x")
    print(f"attempt {n}: {what}", flush=True)
    if what == "connect":
        print("SimulatorClientRunner - ERROR - run_client_thread error: RuntimeError: Failed to create connection "
              "to the child process in SimulatorClientRunner, timeout: 60.0", flush=True)
        time.sleep(600)
    elif what == "errorlog":
        (ws / "site-2").mkdir(exist_ok=True)
        (ws / "site-2" / "error_log.txt").write_text("OSError: [Errno 98] Address already in use\\n")
        time.sleep(600)
    elif what == "silent":
        time.sleep(600)
    elif what == "chatty":
        for i in range(6000):
            print(f"round {i}", flush=True)
            time.sleep(0.1)
    elif what == "orphan":  # exits, leaving its worker running
        sys.exit(0)
    elif what.startswith("exit"):
        worker.kill()
        (ws / "results.txt").write_text("done")
        sys.exit(int(what[4:]))
""")


def _run(tmp_path, plan, **kw):
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    ws = tmp_path / "ws"
    import json
    cmd = [sys.executable, str(script), str(ws), str(tmp_path / "state"), json.dumps(plan)]
    kw.setdefault("poll", 0.2)
    res = simulate(tmp_path, ws, command=cmd, log_path=tmp_path / "run.log", **kw)
    return res, ws


def _gone(pid: int, within: float = 5.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def test_lost_worker_is_stopped_with_its_setsid_worker_and_retried_in_a_fresh_workspace(tmp_path, capsys):
    ws = tmp_path / "ws"
    (ws / "startup").mkdir(parents=True)
    (ws / "startup" / "server_context.tenseal").write_text("ctx")
    (ws / "local").mkdir()
    (ws / "local" / "fedseg_data.json").write_text("{}")
    res, ws = _run(tmp_path, ["connect", "exit0"], retries=2)
    assert res.ok and res.retries == 1 and res.returncode == 0
    first, second = res.attempts
    assert first.returncode is None and "never connected" in first.failure and second.failure is None
    aside = tmp_path / "ws.failed-attempt-1"
    assert first.workspace == aside and (aside / "attempt_1").is_file()
    # attempt 1's worker (its own session) was stopped, not only the stand-in
    assert _gone(int((aside / "worker_pid_1").read_text()))
    # the fresh workspace: what the user had prepared, none of attempt 1's files
    assert (ws / "startup" / "server_context.tenseal").read_text() == "ctx"
    assert (ws / "local" / "fedseg_data.json").read_text() == "{}"
    assert not (ws / "attempt_1").exists() and (ws / "attempt_2").is_file() and (ws / "results.txt").is_file()
    err = capsys.readouterr().err
    assert "never connected" in err and "retrying in a fresh workspace" in err and "attempt 2 of 3" in err
    log = (tmp_path / "run.log").read_text()  # the last attempt's output only; attempt 1's moved with its workspace
    assert "attempt 2: exit0" in log and "attempt 1: connect" not in log and "attempt 1 stopped" in log
    assert "attempt 1: connect" in (aside / "fedseg_simulate.log").read_text()
    assert "after 1 retry" in res.describe()


def test_worker_error_log_is_recognised_even_when_the_simulator_prints_nothing(tmp_path):
    res, _ = _run(tmp_path, ["errorlog"], retries=0, stall_timeout=60)
    assert not res.ok and res.retries == 0
    assert "could not bind its port" in res.failure and res.seconds < 30


def test_no_progress_is_a_hang(tmp_path):
    res, ws = _run(tmp_path, ["silent", "silent"], retries=1, stall_timeout=2)
    assert not res.ok and res.retries == 1
    assert all("no progress" in a.failure for a in res.attempts)
    assert _gone(int((ws / "worker_pid_2").read_text()))
    assert _gone(int((tmp_path / "ws.failed-attempt-1" / "worker_pid_1").read_text()))


def test_deadline_stops_a_run_that_makes_progress_and_is_not_retried(tmp_path):
    res, ws = _run(tmp_path, ["chatty"], retries=2, timeout=3, stall_timeout=60)
    assert not res.ok and res.retries == 0 and "time limit" in res.failure
    assert res.returncode < 0 and res.seconds < 20
    assert _gone(int((ws / "worker_pid_1").read_text()))


def test_no_retry_once_the_deadline_has_passed(tmp_path, monkeypatch):
    """An attempt stopped for a retryable reason after the deadline has passed is not retried."""
    from fedseg.simulation import runner

    calls = []

    def stopped_attempt(*args, **kwargs):  # takes longer than the whole time limit, then "loses a worker"
        calls.append(1)
        time.sleep(0.3)
        return None, "a site's worker process never connected", True

    monkeypatch.setattr(runner, "_run_once", stopped_attempt)
    res = simulate(tmp_path, tmp_path / "ws", command=["true"], retries=2, timeout=0.2)
    assert len(calls) == 1 and res.retries == 0 and not res.ok
    assert "never connected" in res.failure and "no retry: the time limit" in res.failure


def test_a_simulator_that_exits_by_itself_is_never_retried(tmp_path):
    res, ws = _run(tmp_path, ["exit3", "exit0"], retries=2)
    assert res.returncode == 3 and res.retries == 0 and res.failure is None
    assert not (tmp_path / "ws.failed-attempt-1").exists()
    assert "exit code 3" in res.describe()


def test_workers_left_after_the_simulator_exits_are_stopped(tmp_path, capsys):
    res, ws = _run(tmp_path, ["orphan"], retries=0)
    assert res.ok and res.failure is None
    assert _gone(int((ws / "worker_pid_1").read_text()))
    assert "left after the simulator exited" in capsys.readouterr().err


def test_not_a_job_folder_is_explained(tmp_path):
    with pytest.raises(SimulationError, match="not an NVFlare job folder"):
        simulate(tmp_path / "nope", tmp_path / "ws")
    with pytest.raises(SimulationError, match="retries must be >= 0"):
        simulate(tmp_path, tmp_path / "ws", command=["true"], retries=-1)


def test_the_real_command_runs_nvflare_through_the_port_fix(tmp_path):
    from fedseg.simulation.runner import simulator_command

    cmd = simulator_command(Path("jobs/fedgs_lits"), tmp_path, n_clients=4, threads=4, gpu="0")
    assert cmd[:3] == [sys.executable, "-m", "fedseg.simulation.nvflare_main"]
    assert cmd[3:] == ["jobs/fedgs_lits", "-w", str(tmp_path), "-n", "4", "-t", "4", "-gpu", "0"]
    assert os.path.basename(cmd[0]).startswith("python")


def test_simulate_command_explains_a_job_name_and_bad_options(tmp_path, capsys):
    from fedseg.cli import main

    assert main(["simulate", "fedgs_lits", "-w", str(tmp_path / "ws")]) == 2
    assert "give its folder, jobs/fedgs_lits" in capsys.readouterr().err
    job = Path(__file__).resolve().parents[2] / "jobs" / "fedgs_lits"
    assert main(["simulate", str(job), "-w", str(tmp_path / "ws"), "--retries", "-1"]) == 2
    assert "--retries must be >= 0" in capsys.readouterr().err
    assert main(["simulate", str(job), "-w", str(tmp_path / "ws"), "--timeout", "-3"]) == 2
    assert "--timeout must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()  # nothing started
