"""Start and stop a FLARE system (provisioned or POC) from its startup kits, by PID.

Each participant is started with its kit's own ``startup/sub_start.sh --once`` (FLARE's start script without its
restart loop: it ``exec``\\ s the FLARE process, so the PID we record is the participant's process) in a session of
its own, with its console output in ``<kits>/fedseg_logs/<participant>.log``. The PIDs, with each process's start
time, go to ``<kits>/fedseg_processes.json``; :func:`stop_system` stops exactly those processes and every process
they started (FLARE runs each job in child processes), first with SIGTERM, then SIGKILL, and never a process whose
start time differs from the recorded one (a PID the OS has since given to something else).

The server starts first; the sites start once the server's port accepts connections, and :func:`start_system`
returns when every started site has registered (the server's log says so) or raises after ``timeout`` seconds
naming the sites that did not, with the tail of their logs.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedseg.deploy.kits import Kit, find_kits, latest_prod_dir
from fedseg.errors import FedsegError

PROCESSES = "fedseg_processes.json"
LOGS = "fedseg_logs"


class SystemError_(FedsegError, RuntimeError):
    """A FLARE system that did not start or stop as asked (names the participant and its log)."""


def server_address(server: Kit) -> tuple[str, int]:
    """(host, port) of the server's FL port, from its ``fed_server.json``."""
    target = server.config()["servers"][0]["service"]["target"]
    host, _, port = target.rpartition(":")
    return host, int(port)


def free_loopback_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 now (for POC systems and tests; another process may still take one
    before it is used)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _tail(path: Path, n: int = 12) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(lines[-n:])


def _registry(prod: Path) -> dict[str, Any]:
    p = prod / PROCESSES
    return json.loads(p.read_text()) if p.is_file() else {}


def _save_registry(prod: Path, reg: dict[str, Any]) -> None:
    tmp = prod / (PROCESSES + ".tmp")
    tmp.write_text(json.dumps(reg, indent=2) + "\n")
    tmp.replace(prod / PROCESSES)


def _proc(entry: dict[str, Any]):
    """The live psutil.Process of a registry entry, or None (gone, or the PID was reused)."""
    import psutil

    try:
        p = psutil.Process(int(entry["pid"]))
        if abs(p.create_time() - float(entry["create_time"])) > 1.0:
            return None
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, ValueError):
        return None


def start_participant(kit: Kit, prod: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Start one participant from its kit; record and return its registry entry."""
    import psutil

    reg = _registry(prod)
    if kit.name in reg and _proc(reg[kit.name]) is not None:
        raise SystemError_(f"{kit.name} is already running (pid {reg[kit.name]['pid']}); stop it first "
                           f"(fedseg system stop {prod} --only {kit.name})")
    logs = prod / LOGS
    logs.mkdir(exist_ok=True)
    log = logs / f"{kit.name}.log"
    penv = dict(os.environ if env is None else env)
    penv.setdefault("PYTHONUNBUFFERED", "1")
    with open(log, "ab") as fh:
        proc = subprocess.Popen(["bash", str(kit.startup / "sub_start.sh"), "--once"], cwd=str(kit.path),
                                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=penv, start_new_session=True)
    entry = {"pid": proc.pid, "kind": kit.kind, "kit": str(kit.path), "log": str(log),
             "create_time": psutil.Process(proc.pid).create_time(), "started": time.time()}
    reg = _registry(prod)
    reg[kit.name] = entry
    _save_registry(prod, reg)
    return entry


def _registered(server_log: Path, site: str, since: int) -> bool:
    try:
        text = server_log.read_text(errors="replace")[since:]
    except FileNotFoundError:
        return False
    return re.search(rf"New client {re.escape(site)}@", text) is not None


def start_system(root: str | Path, only: Iterable[str] | None = None, env: dict[str, str] | None = None,
                 timeout: float = 180.0, progress=print) -> dict[str, Any]:
    """Start the server (unless already running) and the sites of the system under ``root``; wait for them."""
    prod = latest_prod_dir(root)
    kits = [k for k in find_kits(prod) if k.kind != "admin"]
    wanted = set(only) if only else {k.name for k in kits}
    unknown = wanted - {k.name for k in kits}
    if unknown:
        raise SystemError_(f"no startup kit for {', '.join(sorted(unknown))} under {prod}; kits there: "
                           f"{', '.join(k.name for k in kits)}")
    server = next((k for k in kits if k.kind == "server"), None)
    if server is None:
        raise SystemError_(f"no server kit under {prod}")
    reg = _registry(prod)
    server_log = Path(reg.get(server.name, {}).get("log", prod / LOGS / f"{server.name}.log"))
    host, port = server_address(server)
    deadline = time.time() + timeout
    if server.name in wanted and (server.name not in reg or _proc(reg[server.name]) is None):
        entry = start_participant(server, prod, env)
        server_log = Path(entry["log"])
        progress(f"started server {server.name} (pid {entry['pid']}), log {server_log}")
        while not _port_open(host, port):
            if _proc(entry) is None:
                raise SystemError_(f"server {server.name} exited during start; its log {server_log}:\n"
                                   f"{_tail(server_log)}")
            if time.time() > deadline:
                raise SystemError_(f"server {server.name} did not open {host}:{port} within {timeout:.0f} s; "
                                   f"its log {server_log}:\n{_tail(server_log)}")
            time.sleep(0.5)
    elif not _port_open(host, port):
        raise SystemError_(f"server {server.name} is not reachable at {host}:{port}; start it first")
    since = server_log.stat().st_size if server_log.is_file() else 0
    started = []
    for kit in kits:
        if kit.kind == "client" and kit.name in wanted:
            if kit.name in reg and _proc(reg[kit.name]) is not None:
                continue
            entry = start_participant(kit, prod, env)
            started.append((kit, entry))
            progress(f"started site {kit.name} (pid {entry['pid']})")
    waiting = {k.name: e for k, e in started}
    while waiting:
        for name in list(waiting):
            if _registered(server_log, name, since):
                waiting.pop(name)
            elif _proc(waiting[name]) is None:
                raise SystemError_(f"site {name} exited before registering; its log {waiting[name]['log']}:\n"
                                   f"{_tail(Path(waiting[name]['log']))}")
        if waiting and time.time() > deadline:
            details = "\n".join(f"--- {n} ({e['log']}):\n{_tail(Path(e['log']), 6)}" for n, e in waiting.items())
            raise SystemError_(f"site(s) {', '.join(waiting)} did not register with {host}:{port} within "
                               f"{timeout:.0f} s:\n{details}")
        time.sleep(0.5)
    if started:
        progress(f"{len(started)} site(s) registered with the server at {host}:{port}")
    return _registry(prod)


def _signal(procs: list, how: str, wait: float) -> list:
    """``terminate`` or ``kill`` every process, wait up to ``wait`` seconds; return those still alive."""
    import psutil

    for q in procs:
        try:
            getattr(q, how)()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=wait)
    return alive


def stop_system(root: str | Path, only: Iterable[str] | None = None, grace: float = 15.0,
                progress=print) -> list[str]:
    """Stop the recorded processes (sites first, then the server) and their children; return who was stopped."""

    prod = latest_prod_dir(root)
    reg = _registry(prod)
    names = [n for n in reg if not only or n in set(only)]
    names.sort(key=lambda n: reg[n].get("kind") == "server")  # sites first
    stopped = []
    for name in names:
        p = _proc(reg[name])
        if p is not None:
            tree = [p] + p.children(recursive=True)
            alive = _signal(tree, "terminate", grace)
            _signal(alive, "kill", 5)
            stopped.append(name)
            progress(f"stopped {name} (pid {reg[name]['pid']}, {len(tree)} process(es))")
        reg.pop(name)
    _save_registry(prod, reg)
    return stopped


def kill_participant(root: str | Path, name: str) -> None:
    """SIGKILL one participant and its job processes at once (a crash, for failure tests and drills)."""

    prod = latest_prod_dir(root)
    reg = _registry(prod)
    if name not in reg or (p := _proc(reg[name])) is None:
        raise SystemError_(f"{name} is not running under {prod}")
    _signal([p] + p.children(recursive=True), "kill", 10)
    reg.pop(name)
    _save_registry(prod, reg)


def system_status(root: str | Path) -> dict[str, dict[str, Any]]:
    """Per recorded participant: pid, kind, alive, log."""
    prod = latest_prod_dir(root)
    return {n: {**e, "alive": _proc(e) is not None} for n, e in _registry(prod).items()}
