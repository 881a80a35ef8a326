"""The POC scripts end to end: poc/poc.sh run prepares a 3-site HE system on loopback, starts it, submits an HE job
through the FLARE API, downloads the result and stops every process it started; poc/poc.sh clean removes it."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import psutil
import pytest

from .conftest import free_ports, tiny_job

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def test_poc_script_runs_an_he_job_and_stops_everything_it_started(tmp_path, tiny_lits):
    job = tiny_job("fedgs_lits_he", tmp_path / "jobs", test_every_n_rounds=0)
    ws = tmp_path / "poc"
    fl, admin = free_ports(2)
    env = dict(os.environ, FEDSEG_POC_WORKSPACE=str(ws), FEDSEG_POC_PORTS=f"{fl} {admin}", PYTHONUNBUFFERED="1")
    proc = subprocess.run(["bash", str(REPO / "poc" / "poc.sh"), "run", str(job), "--sites", "3", "--he",
                           "--data-config", str(tiny_lits), "--timeout", "400"],
                          env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "FINISHED:COMPLETED" in out and "3 site(s) registered" in out
    results = Path(re.search(r"results: (\S+)", out).group(1))
    assert (results / "global_model_encrypted.pt").is_file() and not (results / "global_model.pt").exists()
    kits = next((ws / "fedseg_poc").glob("prod_*"))
    assert (kits / "localhost" / "startup" / "server_context.tenseal").is_file()  # HE contexts provisioned
    assert (kits / "site-1" / "startup" / "client_context.tenseal").is_file()
    # every process it started is gone (PIDs from its own output), and nothing listens on the POC ports any more
    pids = {int(p) for p in re.findall(r"started \S+ \S+ \(pid (\d+)", out)}
    assert len(pids) == 4
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    listening = {c.laddr.port for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    assert not {fl, admin} & listening
    clean = subprocess.run(["bash", str(REPO / "poc" / "poc.sh"), "clean"], env=env, capture_output=True, text=True,
                           timeout=120)
    assert clean.returncode == 0, clean.stderr
    assert not ws.exists()
