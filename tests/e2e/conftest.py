"""A real provisioned FLARE system on loopback for the end-to-end tests.

``nvflare provision`` writes a 3-site project whose server is named ``localhost`` (so it listens on 127.0.0.1 only)
on two free ports, with HE contexts; the kits get fedseg's site settings (job storage in the temp folder, the tiny
LiTS data); ``fedseg.deploy.system`` starts the server and the sites from their kits and stops exactly those
processes (and their job processes) when the module's tests are done. HOME is the test session's temp HOME.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
from fedseg.data.synthetic import synth_lits
from fedseg.deploy.kits import find_kits
from fedseg.deploy.project import make_project, provision, write_project
from fedseg.deploy.site_config import configure_kit
from fedseg.deploy.system import free_loopback_ports, start_system, stop_system
from fedseg.jobs.recipes import JOBS

SITES = ("site-1", "site-2", "site-3")
ADMIN = "admin@coordinator.org"
TINY = dict(num_rounds=2, local_epochs=1, max_steps_per_round=2, min_clients=3, num_threads=1,
            data_args={"image_size": 32, "min_tumour_pixels": 4}, model_args={"base_chan": 4}, test_every_n_rounds=1)


free_ports = free_loopback_ports


def tiny_job(name: str, out, byoc: bool = True, **overrides):
    job = replace(JOBS[name], **{**TINY, **overrides})
    return job.export(out, byoc=byoc)


@pytest.fixture(scope="module")
def tiny_lits(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e_lits")
    synth_lits(root, preset="tiny", seed=1, progress=False)
    cfg = root.parent / f"{root.name}_data.json"
    cfg.write_text(json.dumps({"lits": {"root": str(root)}}))
    return cfg


# how fast the server gives up on a site that went silent: FLARE's heart_beat_timeout (server resources.json, 600 s by
# default) and its dead-client grace / check lead time (60 s / 30 s by default, NVFLARE_* environment variables)
HEARTBEAT_TIMEOUT = 20.0
FAST_DEAD_CLIENT = {"NVFLARE_DEAD_CLIENT_GRACE_PERIOD": "3", "NVFLARE_DEAD_CLIENT_CHECK_LEAD_TIME": "3"}


def provisioned(tmp, name, data_cfg, he=True, sites=SITES):
    fl, admin = free_ports(2)
    project = make_project(name, list(sites), server="localhost", fl_port=fl, admin_port=admin,
                           admins=[(ADMIN, "coordinator", "project_admin")], he=he)
    prod = provision(write_project(project, tmp / "project.yml"), tmp / "ws")
    for kit in find_kits(prod):
        if kit.kind != "admin":
            server = kit.kind == "server"
            configure_kit(kit, state_dir=(tmp / "state") if server else None, data_config=data_cfg, allow_tmp=True,
                          heartbeat_timeout=HEARTBEAT_TIMEOUT if server else None)
    return prod


@pytest.fixture(scope="module")
def flare_system(tmp_path_factory, tiny_lits):
    """(prod folder of kits, admin kit) of a running 3-site system; stopped after the module."""
    tmp = tmp_path_factory.mktemp("flare_system")
    prod = provisioned(tmp, "fedseg_e2e", tiny_lits)
    try:
        start_system(prod, timeout=180, env=dict(os.environ, **FAST_DEAD_CLIENT))
        yield prod, prod / ADMIN
    finally:
        stop_system(prod)
