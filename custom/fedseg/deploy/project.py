"""The consortium's ``project.yml`` and provisioning with FLARE's own tools.

:func:`make_project` builds a project definition (FLARE's ``api_version: 3`` format): one server, the hospital
sites, admins with FLARE's roles, and the builders a fedseg deployment needs: WorkspaceBuilder, StaticFileBuilder,
CertBuilder (mTLS certificates signed by the project's root CA), SignatureBuilder (signed kits) and, with ``he``,
HEBuilder (the TenSEAL contexts of FLARE's HE filters: ``server_context.tenseal`` without a secret key on the server,
``client_context.tenseal`` with the ONE secret key all sites share). ``provisioning/project.yml`` in the repository
is the template for a real consortium; the POC and the tests use this function with the server named
``localhost``, so that it listens on loopback only.

:func:`provision` runs ``nvflare provision``; re-running it with the same workspace keeps the root CA and every
existing participant's certificate (FLARE's ``state/cert.json``), which is how a hospital is added later without
re-issuing everyone's kit. :func:`poc_prepare` runs ``nvflare poc prepare -i`` with ``NVFLARE_POC_WORKSPACE``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedseg.deploy.kits import latest_prod_dir
from fedseg.errors import ConfigError, FedsegError

BUILDERS_BASE = ("nvflare.lighter.impl.workspace.WorkspaceBuilder", "nvflare.lighter.impl.static_file.StaticFileBuilder")
HE_BUILDER = "nvflare.lighter.impl.he.HEBuilder"
CERT_BUILDER = "nvflare.lighter.impl.cert.CertBuilder"
SIGNATURE_BUILDER = "nvflare.lighter.impl.signature.SignatureBuilder"
ROLES = ("project_admin", "org_admin", "lead", "member")


class ProvisionError(FedsegError, RuntimeError):
    """nvflare provision / poc prepare failed (the command's own message is included)."""


def make_project(name: str, sites: Sequence[str] | Sequence[tuple[str, str]], *, server: str = "localhost",
                 server_org: str = "coordinator", fl_port: int = 8002, admin_port: int = 8003,
                 admins: Sequence[tuple[str, str, str]] | None = None, he: bool = False,
                 description: str = "fedseg federated segmentation") -> dict[str, Any]:
    """A project definition. ``sites``: names (org = ``hospital_<i>``) or (name, org) pairs; ``admins``: (email,
    org, role) triples (default: one project_admin at the server's org). FLARE allows letters, digits and ``_`` in
    organisation names."""
    if not sites:
        raise ConfigError("a project needs at least one site")
    pairs = [(s, f"hospital_{i + 1}") if isinstance(s, str) else tuple(s) for i, s in enumerate(sites)]
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise ConfigError(f"site names must be unique, got {names}")
    admins = list(admins) if admins else [(f"admin@{server_org}.org", server_org, "project_admin")]
    for org in [server_org] + [o for _, o in pairs] + [o for _, o, _ in admins]:
        if not re.fullmatch(r"[A-Za-z0-9_]+", org):
            raise ConfigError(f"organisation name {org!r}: FLARE allows only letters, digits and '_' (e.g. "
                              f"{re.sub(r'[^A-Za-z0-9_]', '_', org)!r})")
    for email, _, role in admins:
        if role not in ROLES:
            raise ConfigError(f"admin {email}: role {role!r} is not one of {', '.join(ROLES)}")
    participants: list[dict[str, Any]] = [
        {"name": server, "type": "server", "org": server_org, "fed_learn_port": int(fl_port),
         "admin_port": int(admin_port)}]
    participants += [{"name": n, "type": "client", "org": o} for n, o in pairs]
    participants += [{"name": e, "type": "admin", "org": o, "role": r} for e, o, r in admins]
    builders: list[dict[str, Any]] = [{"path": BUILDERS_BASE[0]},
                                      {"path": BUILDERS_BASE[1], "args": {"config_folder": "config"}}]
    if he:
        builders.append({"path": HE_BUILDER})
    builders += [{"path": CERT_BUILDER}, {"path": SIGNATURE_BUILDER}]
    return {"api_version": 3, "name": name, "description": description, "participants": participants,
            "builders": builders}


def write_project(project: dict[str, Any], path: str | Path) -> Path:
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(project, sort_keys=False))
    return path


def _run(cmd: list[str], env: dict[str, str] | None, what: str, timeout: float = 300) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise ProvisionError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{out[-2000:]}")
    return out


def provision(project_file: str | Path, workspace: str | Path, env: dict[str, str] | None = None) -> Path:
    """``nvflare provision -p project_file -w workspace``; return the new ``prod_NN`` folder of kits."""
    project_file, workspace = Path(project_file).resolve(), Path(workspace).resolve()
    if not project_file.is_file():
        raise ProvisionError(f"project file {project_file} does not exist (start from provisioning/project.yml)")
    _run([sys.executable, "-m", "nvflare.cli", "provision", "-p", str(project_file), "-w", str(workspace), "--force"],
         env, "nvflare provision")
    return latest_prod_dir(workspace)


def poc_prepare(project: dict[str, Any], poc_workspace: str | Path, env: dict[str, str] | None = None) -> Path:
    """``nvflare poc prepare -i <project.yml> --force`` into ``poc_workspace``; return the folder of kits."""
    ws = Path(poc_workspace).resolve()
    ws.mkdir(parents=True, exist_ok=True)
    pfile = write_project(project, ws.parent / f"{ws.name}_project.yml")
    penv = dict(os.environ if env is None else env)
    penv["NVFLARE_POC_WORKSPACE"] = str(ws)
    _run([sys.executable, "-m", "nvflare.cli", "poc", "prepare", "-i", str(pfile), "--force"], penv,
         "nvflare poc prepare")
    return latest_prod_dir(ws)
