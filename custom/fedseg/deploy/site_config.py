"""A participant's site-local settings (``<kit>/local/``) for running fedseg jobs.

``nvflare provision`` writes ``local/resources.json.default``; FLARE reads ``local/resources.json`` when it exists
and the ``.default`` file otherwise. :func:`configure_kit` writes ``resources.json`` from the default with:

- **job storage outside /tmp** (server): the job store (``job_manager.uri_root``) and the snapshot store
  (``snapshot_persistor`` root) default to ``/tmp/nvflare/...``, which a reboot or tmp cleaner wipes; they go under
  ``state_dir`` (e.g. ``/var/lib/fedseg``);
- **the class allow-list** (every participant, ``allow_fedseg=True``): ``"fedseg."`` appended to
  ``class_allow_list``, so jobs exported with ``fedseg jobs export --no-byoc`` (no ``app/custom``) run their fedseg
  components from the installed package. Without it, fedseg's jobs run as *bring your own code* (their
  ``app/custom`` folder), which needs the submitter's ``byoc`` right (``project_admin`` and ``lead`` have it in
  FLARE's default ``authorization.json``; ``org_admin`` does not);
- **GPUs** (sites): ``GPUResourceManager`` ``num_of_gpus`` / ``mem_per_gpu_in_GiB``, which FLARE checks against a
  job's ``resource_spec`` before it schedules the job on the site;
- **how soon a silent site is declared gone** (server, ``heartbeat_timeout``): FLARE's ``heart_beat_timeout``
  (600 s by default); a job waiting for a site that crashed goes on after this plus FLARE's 60 s dead-client grace;
- **data** (sites and, for a test centre, the server): ``local/fedseg_data.json``, fedseg's site-local data
  configuration (see the README's "Using real LiTS data").

The original ``resources.json.default`` is left as it is, so a later re-provisioning can be compared with it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from fedseg.deploy.kits import Kit, KitError

ALLOW_PREFIX = "fedseg."
RESOURCES = "resources.json"


def _read_resources(kit: Kit) -> dict[str, Any]:
    for name in (RESOURCES, RESOURCES + ".default"):
        p = kit.local / name
        if p.is_file():
            try:
                return json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise KitError(f"{p} is not valid JSON ({e}); restore it from {RESOURCES}.default") from None
    raise KitError(f"{kit.local} has neither {RESOURCES} nor {RESOURCES}.default: the kit is incomplete; copy it "
                   "again from the provisioning workspace")


def _component(resources: dict, cid: str) -> dict | None:
    return next((c for c in resources.get("components", []) if c.get("id") == cid), None)


def configure_kit(kit: Kit, *, state_dir: str | Path | None = None, allow_fedseg: bool = False,
                  gpus: int | None = None, gpu_mem_gib: float | None = None,
                  data_config: str | Path | None = None, allow_tmp: bool = False,
                  heartbeat_timeout: float | None = None) -> dict[str, Any]:
    """Write ``kit/local/resources.json`` (and ``fedseg_data.json``); return a summary of what was set.
    ``allow_tmp``: accept a ``state_dir`` under /tmp (POC systems and tests only)."""
    res = _read_resources(kit)
    done: dict[str, Any] = {"kit": str(kit.path), "participant": kit.name, "kind": kit.kind}
    if kit.kind == "admin":
        raise KitError(f"{kit.path} is an admin kit: site settings belong to the server's and the sites' kits")
    if state_dir is not None:
        if kit.kind != "server":
            raise KitError(f"--state-dir is a server setting (job and snapshot storage); {kit.name} is a site")
        state = Path(state_dir).expanduser().resolve()
        if not allow_tmp and (str(state).startswith("/tmp/") or str(state) == "/tmp"):
            raise KitError(f"--state-dir {state} is under /tmp, which a reboot or tmp cleaner empties: choose a "
                           "persistent folder such as /var/lib/fedseg")
        jobs, snaps = state / "jobs-storage", state / "snapshot-storage"
        jm = _component(res, "job_manager")
        if jm is None:
            raise KitError(f"{kit.local}/{RESOURCES}.default has no job_manager component; re-provision the server")
        jm.setdefault("args", {})["uri_root"] = str(jobs)
        snap = res.get("snapshot_persistor")
        if snap is not None:
            snap["args"]["storage"]["args"]["root_dir"] = str(snaps)
        for d in (jobs, snaps):
            d.mkdir(parents=True, exist_ok=True)
        done.update(job_storage=str(jobs), snapshot_storage=str(snaps))
    if heartbeat_timeout is not None:
        if kit.kind != "server":
            raise KitError("--heartbeat-timeout is a server setting")
        if not heartbeat_timeout > 0:
            raise KitError(f"--heartbeat-timeout must be > 0 seconds, got {heartbeat_timeout}")
        for srv in res.setdefault("servers", [{}]):
            srv["heart_beat_timeout"] = float(heartbeat_timeout)
        done["heart_beat_timeout"] = float(heartbeat_timeout)
    if allow_fedseg:
        allow = res.setdefault("class_allow_list", [])
        if ALLOW_PREFIX not in allow:
            allow.append(ALLOW_PREFIX)
        done["class_allow_list"] = f"+ {ALLOW_PREFIX}"
    if gpus is not None or gpu_mem_gib is not None:
        if kit.kind != "client":
            raise KitError("--gpus / --gpu-mem are site settings (the server does not train)")
        rm = _component(res, "resource_manager")
        if rm is None:
            raise KitError(f"{kit.local}/{RESOURCES}.default has no resource_manager component; re-provision")
        if gpus is not None and gpus < 0:
            raise KitError(f"--gpus must be >= 0, got {gpus}")
        if gpu_mem_gib is not None and gpu_mem_gib < 0:
            raise KitError(f"--gpu-mem must be >= 0 GiB, got {gpu_mem_gib}")
        args = rm.setdefault("args", {})
        if gpus is not None:
            args["num_of_gpus"] = int(gpus)
        if gpu_mem_gib is not None:
            args["mem_per_gpu_in_GiB"] = float(gpu_mem_gib)
        done.update(num_of_gpus=args.get("num_of_gpus"), mem_per_gpu_in_GiB=args.get("mem_per_gpu_in_GiB"))
    if data_config is not None:
        src = Path(data_config).expanduser().resolve()
        try:
            json.loads(src.read_text())
        except FileNotFoundError:
            raise KitError(f"data configuration {src} does not exist") from None
        except json.JSONDecodeError as e:
            raise KitError(f"data configuration {src} is not valid JSON ({e})") from None
        shutil.copyfile(src, kit.local / "fedseg_data.json")
        done["data_config"] = str(kit.local / "fedseg_data.json")
    (kit.local / RESOURCES).write_text(json.dumps(res, indent=2) + "\n")
    done["resources"] = str(kit.local / RESOURCES)
    return done
