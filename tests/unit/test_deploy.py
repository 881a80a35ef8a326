"""fedseg.deploy without a running system: project.yml, real `nvflare provision`, kit checks, site settings,
submission errors, process registry. (Running systems: tests/e2e.)"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import yaml
from fedseg.cli import main
from fedseg.deploy.kits import KitError, check_kit, find_kits, latest_prod_dir, read_kit
from fedseg.deploy.project import make_project, provision, write_project
from fedseg.deploy.site_config import ALLOW_PREFIX, configure_kit
from fedseg.deploy.submit import SubmitError, submit_job
from fedseg.deploy.system import PROCESSES, _proc, stop_system, system_status
from fedseg.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prov")
    project = make_project("unit_proj", ["site-1", "site-2"], server="localhost", fl_port=18902, admin_port=18903,
                           he=True)
    return provision(write_project(project, tmp / "project.yml"), tmp / "ws")


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_make_project_has_roles_builders_and_validates_names():
    p = make_project("p", ["site-1", ("site-2", "clinic_b")], admins=[("a@x.org", "coordinator", "project_admin"),
                                                                       ("l@x.org", "clinic_b", "lead")], he=True)
    kinds = [(x["name"], x["type"], x["org"]) for x in p["participants"]]
    assert kinds[:3] == [("localhost", "server", "coordinator"), ("site-1", "client", "hospital_1"),
                         ("site-2", "client", "clinic_b")]
    assert [x.get("role") for x in p["participants"] if x["type"] == "admin"] == ["project_admin", "lead"]
    builders = [b["path"].rsplit(".", 1)[1] for b in p["builders"]]
    assert builders == ["WorkspaceBuilder", "StaticFileBuilder", "HEBuilder", "CertBuilder", "SignatureBuilder"]
    assert "HEBuilder" not in [b["path"].rsplit(".", 1)[1] for b in make_project("p", ["s"])["builders"]]
    with pytest.raises(ConfigError, match="only letters, digits and '_'.*'hospital_a'"):
        make_project("p", [("site-1", "hospital-a")])
    with pytest.raises(ConfigError, match="role 'owner'"):
        make_project("p", ["s"], admins=[("a@x.org", "coordinator", "owner")])
    with pytest.raises(ConfigError, match="unique"):
        make_project("p", ["s", "s"])


def test_the_repository_project_yml_is_a_valid_consortium():
    p = yaml.safe_load((REPO / "provisioning" / "project.yml").read_text())
    types = [x["type"] for x in p["participants"]]
    assert types.count("server") == 1 and types.count("client") >= 3
    roles = {x["role"] for x in p["participants"] if x["type"] == "admin"}
    assert roles == {"project_admin", "org_admin", "lead", "member"}
    builders = {b["path"].rsplit(".", 1)[1] for b in p["builders"]}
    assert {"CertBuilder", "SignatureBuilder", "HEBuilder"} <= builders
    server = next(x for x in p["participants"] if x["type"] == "server")
    assert "." in server["name"]  # an FQDN placeholder, not "server" / "localhost"


def test_provision_writes_kits_with_he_contexts_and_adding_a_site_keeps_every_certificate(kits, tmp_path):
    found = {k.name: k.kind for k in find_kits(kits)}
    assert found == {"localhost": "server", "site-1": "client", "site-2": "client", "admin@coordinator.org": "admin"}
    assert (kits / "localhost" / "startup" / "server_context.tenseal").is_file()
    assert (kits / "site-1" / "startup" / "client_context.tenseal").is_file()
    # add a hospital: same workspace, one more client -> prod_01 with the old certificates untouched
    ws = tmp_path / "ws"
    shutil.copytree(kits.parent.parent, ws)  # the provisioning workspace, with its state/ (the root CA)
    project = make_project("unit_proj", ["site-1", "site-2", "site-3"], server="localhost", fl_port=18902,
                           admin_port=18903, he=True)
    prod1 = provision(write_project(project, tmp_path / "project.yml"), ws)
    assert prod1.name == "prod_01" and (prod1 / "site-3").is_dir()
    prod0 = ws / kits.parent.name / "prod_00"
    for rel in ("site-1/startup/client.crt", "site-2/startup/client.crt", "localhost/startup/server.crt",
                "site-1/startup/rootCA.pem"):
        assert (prod0 / rel).read_bytes() == (prod1 / rel).read_bytes(), rel
    check_kit(read_kit(prod1 / "site-3"), expect_root=prod0 / "site-1" / "startup" / "rootCA.pem")
    assert latest_prod_dir(ws) == prod1


def test_check_kit_passes_a_good_kit_and_names_expired_missing_mixed_and_foreign_kits(kits, tmp_path):
    info = check_kit(read_kit(kits / "site-1"), expect_root=kits / "localhost" / "startup" / "rootCA.pem")
    assert info["kind"] == "client" and info["days_left"] > 300
    later = dt.datetime.fromisoformat(info["not_after"]) + dt.timedelta(days=1)
    with pytest.raises(KitError, match=r"client.crt of 'site-1' expired on .*new startup kit"):
        check_kit(read_kit(kits / "site-1"), now=later)
    broken = tmp_path / "site-1"
    shutil.copytree(kits / "site-1", broken)
    (broken / "startup" / "client.key").unlink()
    with pytest.raises(KitError, match=r"incomplete: .*client.key missing"):
        check_kit(read_kit(broken))
    other = provision(write_project(make_project("other", ["site-1"]), tmp_path / "o.yml"), tmp_path / "ows")
    with pytest.raises(KitError, match="belongs to another FLARE project"):
        check_kit(read_kit(other / "site-1"), expect_root=kits / "localhost" / "startup" / "rootCA.pem")
    mixed = tmp_path / "mixed"
    shutil.copytree(kits / "site-2", mixed)
    shutil.copyfile(other / "site-1" / "startup" / "rootCA.pem", mixed / "startup" / "rootCA.pem")
    with pytest.raises(KitError, match="not signed by the kit's own root CA"):
        check_kit(read_kit(mixed))
    with pytest.raises(KitError, match="not a FLARE startup kit"):
        read_kit(tmp_path)
    assert main(["site", "check", str(kits / "site-2")]) == 0


def test_configure_kit_moves_storage_allows_fedseg_sets_gpus_and_copies_data(kits, tmp_path):
    work = tmp_path / "k"
    shutil.copytree(kits, work)
    server, site = read_kit(work / "localhost"), read_kit(work / "site-1")
    with pytest.raises(KitError, match="under /tmp"):
        configure_kit(server, state_dir="/tmp/fedseg_state")
    state = tmp_path / "state"
    done = configure_kit(server, state_dir=state, allow_fedseg=True, allow_tmp=True, heartbeat_timeout=30)
    res = json.loads((server.local / "resources.json").read_text())
    jm = next(c for c in res["components"] if c["id"] == "job_manager")
    assert jm["args"]["uri_root"] == str(state / "jobs-storage") == done["job_storage"]
    assert res["snapshot_persistor"]["args"]["storage"]["args"]["root_dir"] == str(state / "snapshot-storage")
    assert res["servers"][0]["heart_beat_timeout"] == 30.0
    assert res["class_allow_list"].count(ALLOW_PREFIX) == 1
    configure_kit(server, allow_fedseg=True)  # idempotent
    assert json.loads((server.local / "resources.json").read_text())["class_allow_list"].count(ALLOW_PREFIX) == 1
    with pytest.raises(KitError, match="site settings"):
        configure_kit(server, gpus=1)
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"lits": {"root": "/data/LiTS"}}))
    configure_kit(site, gpus=2, gpu_mem_gib=40, data_config=data)
    rm = next(c for c in json.loads((site.local / "resources.json").read_text())["components"]
              if c["id"] == "resource_manager")
    assert rm["args"]["num_of_gpus"] == 2 and rm["args"]["mem_per_gpu_in_GiB"] == 40.0
    assert json.loads((site.local / "fedseg_data.json").read_text()) == {"lits": {"root": "/data/LiTS"}}
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(KitError, match="bad.json is not valid JSON"):
        configure_kit(site, data_config=bad)
    with pytest.raises(KitError, match="server setting"):
        configure_kit(site, state_dir=state)
    with pytest.raises(KitError, match="--gpus must be >= 0"):
        configure_kit(site, gpus=-1)


def test_submit_names_a_missing_job_folder_a_non_admin_kit_and_an_unreachable_server(kits, tmp_path):
    with pytest.raises(SubmitError, match="not a FLARE job folder"):
        submit_job(tmp_path, kits / "admin@coordinator.org")
    job = REPO / "jobs" / "fedgs_lits"
    with pytest.raises(KitError, match="is a client kit; submitting needs an admin"):
        submit_job(job, kits / "site-1")
    admin = tmp_path / "admin"
    shutil.copytree(kits / "admin@coordinator.org", admin)
    cfg = json.loads((admin / "startup" / "fed_admin.json").read_text())
    cfg["admin"]["port"] = _free_port()  # nothing listens there
    (admin / "startup" / "fed_admin.json").write_text(json.dumps(cfg))
    t = time.time()
    with pytest.raises(SubmitError, match=rf"cannot reach the FLARE server at localhost:{cfg['admin']['port']}"):
        submit_job(job, admin, connect_timeout=3)
    assert time.time() - t < 60


def test_the_process_registry_never_touches_a_reused_pid(kits, tmp_path):
    work = tmp_path / "k"
    shutil.copytree(kits, work)
    me = {"pid": os.getpid(), "kind": "client", "kit": str(work / "site-1"), "log": "x", "create_time": 1.0}
    (work / PROCESSES).write_text(json.dumps({"site-1": me}))
    assert _proc(me) is None  # our PID, but another start time: not the process that was started
    assert system_status(work)["site-1"]["alive"] is False
    assert stop_system(work, progress=lambda m: None) == []  # nothing killed (this test process is alive)
    assert json.loads((work / PROCESSES).read_text()) == {}


def test_poc_run_refuses_a_prepared_system_of_another_shape(tmp_path, capsys):
    ws = tmp_path / "poc"
    assert main(["poc", "prepare", "--workspace", str(ws), "--sites", "2", "--fl-port", str(_free_port()),
                 "--admin-port", str(_free_port())]) == 0
    kits = latest_prod_dir(ws / "fedseg_poc")
    assert {k.name for k in find_kits(kits)} == {"localhost", "site-1", "site-2", "admin@poc.org"}
    res = json.loads((kits / "localhost" / "local" / "resources.json").read_text())
    jm = next(c for c in res["components"] if c["id"] == "job_manager")
    assert jm["args"]["uri_root"] == str(ws.resolve() / "state" / "jobs-storage")  # not FLARE's /tmp/nvflare
    assert main(["poc", "run", str(REPO / "jobs" / "fedgs_lits"), "--workspace", str(ws), "--sites", "3"]) == 2
    assert "has 2 site(s)" in capsys.readouterr().err
    assert main(["poc", "clean", "--workspace", str(ws)]) == 0 and not ws.exists()
