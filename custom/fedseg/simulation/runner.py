"""Run ``nvflare simulator`` with a watchdog: every run ends, by itself or stopped, and a lost worker is retried.

:func:`simulate` starts NVFlare's simulator (through :mod:`fedseg.simulation.nvflare_main`, which also removes the
worker-port race at its cause) in its own process group and watches it:

- **failure signatures** in its output or in a worker's ``error_log.txt``: a worker that could not bind its port, a
  site whose worker never connected, a worker that died or lost its connection. NVFlare logs these and then waits
  forever for the missing site;
- **no progress**: no output line and no growth of any ``log.txt`` in the workspace for ``stall_timeout`` seconds;
- **the deadline** ``timeout`` over all attempts.

On any of these it stops exactly its own process tree (the simulator, its multiprocessing child and the worker
processes, which NVFlare starts in sessions of their own, tracked while the run lasts), and, for the first two and
while ``retries`` allow, moves the attempt's workspace aside (``WS.failed-attempt-K``, with the attempt's output) and
starts again in a fresh ``WS`` holding the ``startup/`` and ``local/`` folders it had before the first attempt, saying
so; the log then holds the new attempt's output only, so that what a report reads from it comes from one run. A simulator that
exits by itself is never retried: its return code is the job's verdict.

Nothing here imports nvflare: the watchdog only reads text and processes.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

import psutil

from fedseg.errors import FedsegError

DEFAULT_STALL_TIMEOUT = 1800.0  # s without any output or log growth: a hung run (a paper-scale round logs sooner)
DEFAULT_RETRIES = 2

# (pattern in the simulator's output or a worker's error log, what it means); each leaves NVFlare waiting forever
SIGNATURES: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"Address already in use"), "a worker could not bind its port (NVFlare's worker-port race)"),
    (re.compile(r"Failed to create connection to the child process"), "a site's worker process never connected"),
    (re.compile(r"Subprocess died for client (\S+)"), "the worker process of {0} died"),
    (re.compile(r"Communication error with client (\S+)"), "the simulator lost the connection to {0}'s worker"),
)
KEPT_FOLDERS = ("startup", "local")
ATTEMPT_LOG = "fedseg_simulate.log"  # a failed attempt's output, in its moved-aside workspace  # what a fresh workspace keeps: HE contexts, site-local data configuration


class SimulationError(FedsegError):
    """A simulator run that could not be started (bad arguments, missing job folder)."""


@dataclass
class Attempt:
    number: int
    returncode: int | None  # None: stopped by the watchdog
    seconds: float
    failure: str | None = None  # why the watchdog stopped it
    workspace: Path | None = None  # where its files are now


@dataclass
class SimulationResult:
    returncode: int
    workspace: Path
    seconds: float
    attempts: list[Attempt] = field(default_factory=list)
    log_path: Path | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def retries(self) -> int:
        return len(self.attempts) - 1

    @property
    def failure(self) -> str | None:
        """Why the last attempt was stopped (None when the simulator exited by itself)."""
        return self.attempts[-1].failure if self.attempts else None

    def describe(self) -> str:
        last = self.attempts[-1] if self.attempts else None
        head = "finished" if self.ok else (f"stopped: {last.failure}" if last and last.failure
                                           else f"failed (exit code {self.returncode})")
        extra = f" after {self.retries} retr{'y' if self.retries == 1 else 'ies'}" if self.retries else ""
        return f"simulator run {head}{extra} in {self.seconds:.0f} s (workspace {self.workspace})"


def simulator_command(job_dir: Path, workspace: Path, *, n_clients: int | None = None, clients: str | None = None,
                      threads: int | None = None, gpu: str | None = None, log_config: str | None = None,
                      end_run_for_all: bool = False) -> list[str]:
    """The command line of one attempt: NVFlare's simulator with fedseg's port allocator, the given arguments."""
    cmd = [sys.executable, "-m", "fedseg.simulation.nvflare_main", str(job_dir), "-w", str(workspace)]
    for flag, value in (("-n", n_clients), ("-c", clients), ("-t", threads), ("-gpu", gpu), ("-l", log_config)):
        if value is not None:
            cmd += [flag, str(value)]
    if end_run_for_all:
        cmd.append("--end_run_for_all")
    return cmd


# ---------------------------------------------------------------------- the process tree
RUN_MARKER = "FEDSEG_SIMULATION_RUN"  # set to a fresh id in each attempt's environment; every descendant inherits it


class ProcessTree:
    """The processes started from one root: remembered as they appear, and found by the run's id in their
    environment (``RUN_MARKER``), which every descendant inherits, also one that was orphaned before it was seen
    (NVFlare's workers call setsid); so exactly these can be stopped. psutil guards against reused pids."""

    def __init__(self, pid: int, run_id: str | None = None):
        self.root_pid = pid
        self.run_id = run_id
        self.seen: dict[int, psutil.Process] = {}
        try:
            self.seen[pid] = psutil.Process(pid)
        except psutil.NoSuchProcess:
            pass

    def refresh(self) -> None:
        root = self.seen.get(self.root_pid)
        if root is None:
            return
        try:
            children = root.children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        for p in children:
            self.seen.setdefault(p.pid, p)
        # descendants of remembered processes that were reparented (their parent died) are still ours
        for p in list(self.seen.values()):
            if p.pid == self.root_pid:
                continue
            try:
                for c in p.children(recursive=True):
                    self.seen.setdefault(c.pid, c)
            except psutil.NoSuchProcess:
                pass

    def marked(self) -> list[psutil.Process]:
        """This run's processes by the id in their environment (processes of this user; others are not readable)."""
        if not self.run_id:
            return []
        found = []
        for p in psutil.process_iter():
            if p.pid == os.getpid():
                continue
            try:
                if p.environ().get(RUN_MARKER) == self.run_id:
                    found.append(p)
            except psutil.Error:
                continue
        return found

    def alive(self) -> list[psutil.Process]:
        for p in self.marked():
            self.seen.setdefault(p.pid, p)
        return [p for p in self.seen.values() if _running(p)]

    def stop(self, grace: float = 5.0, root_unreaped: bool = True) -> list[int]:
        """SIGSTOP every remembered process (no new children), then SIGKILL them and wait; the pids stopped.
        ``root_unreaped``: the root has not been waited for, so its pid is still the id of its process group and the
        whole group (children started since the last look) is killed too."""
        self.refresh()
        procs = self.alive()
        if root_unreaped:
            try:
                os.killpg(self.root_pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for p in procs:
            try:
                p.suspend()
            except psutil.Error:
                pass
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=grace)
        return sorted(p.pid for p in procs)


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# ---------------------------------------------------------------------- one attempt
class _Watch:
    """Reads the simulator's output line by line (to the sinks), notes failure signatures and the last progress."""

    def __init__(self, stream, sinks: list[TextIO], workspace: Path, recognise: bool = True):
        self.sinks = sinks
        self.recognise = recognise
        self.workspace = workspace
        self.failure: str | None = None
        self.last_progress = time.monotonic()
        self._log_sizes: dict[Path, int] = {}
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _note(self, text: str) -> None:
        if self.failure is not None or not self.recognise:
            return
        for pattern, meaning in SIGNATURES:
            m = pattern.search(text)
            if m:
                self.failure = meaning.format(*m.groups())
                return

    def _read(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            with self._lock:
                for sink in self.sinks:
                    sink.write(line)
                    sink.flush()
                self.last_progress = time.monotonic()
                self._note(line)
        stream.close()

    def scan_workspace(self) -> None:
        """Worker error logs (a worker that dies at start may print nothing) and log growth (progress)."""
        grew = False
        for path in list(self.workspace.glob("*/error_log.txt")) + list(self.workspace.glob("*/log.txt")):
            try:
                size = path.stat().st_size
            except OSError:
                continue
            if size != self._log_sizes.get(path, 0):
                grew = True
                if path.name == "error_log.txt":
                    with open(path, "rb") as f:
                        f.seek(self._log_sizes.get(path, 0))
                        with self._lock:
                            self._note(f.read().decode("utf-8", errors="replace"))
                self._log_sizes[path] = size
        if grew:
            with self._lock:
                self.last_progress = time.monotonic()


def _run_once(cmd: list[str], workspace: Path, env: dict, sinks: list[TextIO], *, deadline: float | None,
              stall_timeout: float | None, poll: float, say: Callable[[str], None],
              recognise: bool = True, on_start: Callable[[int], None] | None = None
              ) -> tuple[int | None, str | None, bool]:
    """One attempt: (return code or None, why it was stopped or None, whether a retry may help)."""
    run_id = uuid.uuid4().hex
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=dict(env, **{RUN_MARKER: run_id}), start_new_session=True)
    tree = ProcessTree(proc.pid, run_id)
    if on_start is not None:
        on_start(proc.pid)
    watch = _Watch(proc.stdout, sinks, workspace, recognise)
    why, retry = None, False
    try:
        while True:
            try:
                rc = proc.wait(timeout=poll)
            except subprocess.TimeoutExpired:
                rc = None
            if rc is not None:
                break
            tree.refresh()
            watch.scan_workspace()
            now = time.monotonic()
            if watch.failure:
                why, retry = watch.failure, True
            elif stall_timeout and now - watch.last_progress > stall_timeout:
                why, retry = f"no progress (no output, no log growth) for {stall_timeout:.0f} s", True
            elif deadline is not None and now > deadline:
                why, retry = "the time limit (--timeout) was reached", False
            if why:
                pids = tree.stop()
                say(f"fedseg simulate: {why}; stopped the simulator's process tree (pids {pids})")
                proc.wait()
                watch.thread.join(timeout=10)
                return None, why, retry
    except BaseException:  # KeyboardInterrupt, or an error of ours: never leave the tree behind
        tree.stop()
        raise
    leftover = tree.alive()
    if leftover:  # workers that outlived the simulator: ours, so stopped (they may also hold its output pipe open)
        tree.stop(root_unreaped=False)
        say(f"fedseg simulate: stopped {len(leftover)} process(es) left after the simulator exited")
    watch.thread.join(timeout=10)
    return rc, None, False


# ---------------------------------------------------------------------- the runner
def simulate(job_dir: str | Path, workspace: str | Path, *, n_clients: int | None = None, clients: str | None = None,
             threads: int | None = None, gpu: str | None = None, log_config: str | None = None,
             end_run_for_all: bool = False, log_path: str | Path | None = None, echo: bool = False,
             env: dict | None = None, timeout: float | None = None,
             stall_timeout: float | None = DEFAULT_STALL_TIMEOUT, retries: int = DEFAULT_RETRIES, poll: float = 1.0,
             command: list[str] | None = None, recognise: bool = True,
             on_start: Callable[[int], None] | None = None) -> SimulationResult:
    """Run ``job_dir`` in the simulator in ``workspace`` (the arguments of ``nvflare simulator``), with the watchdog
    described in the module docstring. Output goes to ``log_path`` (overwritten) and, with ``echo``, to stdout;
    the watchdog's messages to both and to stderr. ``command`` replaces the simulator command (tests, and the stress
    script's plain ``nvflare simulator`` loop, which also sets ``recognise=False`` so only the time bounds stop a run);
    ``on_start`` is called with each attempt's process id (a benchmark that samples the process tree)."""
    job_dir, workspace = Path(job_dir).resolve(), Path(workspace).resolve()
    if command is None and not (job_dir / "meta.json").is_file() and not (job_dir / "app").is_dir():
        raise SimulationError(f"{job_dir} is not an NVFlare job folder (no meta.json); give a folder under jobs/ "
                              "(`fedseg jobs list`) or one written by `fedseg jobs export`")
    if retries < 0:
        raise SimulationError(f"retries must be >= 0, got {retries}")
    cmd = command or simulator_command(job_dir, workspace, n_clients=n_clients, clients=clients, threads=threads,
                                       gpu=gpu, log_config=log_config, end_run_for_all=end_run_for_all)
    run_env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    log = None
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "w")
    sinks = [s for s in (log, sys.stdout if echo else None) if s is not None]

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)
        if log is not None:
            log.write(msg + "\n")
            log.flush()

    t0 = time.monotonic()
    deadline = t0 + timeout if timeout else None
    workspace.mkdir(parents=True, exist_ok=True)
    kept = Path(tempfile.mkdtemp(prefix="fedseg-simulate-kept-"))
    attempts: list[Attempt] = []
    try:
        for name in KEPT_FOLDERS:
            if (workspace / name).is_dir():
                shutil.copytree(workspace / name, kept / name)
        for number in range(1, retries + 2):
            if log is not None:
                log.write(f"$ {' '.join(cmd)}  # attempt {number}\n")
                log.flush()
            start = time.monotonic()
            rc, why, retry = _run_once(cmd, workspace, run_env, sinks, deadline=deadline,
                                       stall_timeout=stall_timeout, poll=poll, say=say, recognise=recognise,
                                       on_start=on_start)
            attempt = Attempt(number, rc, time.monotonic() - start, why, workspace)
            attempts.append(attempt)
            if why is None or not retry or number == retries + 1:
                break
            if deadline is not None and time.monotonic() > deadline:  # no time left for another attempt
                attempt.failure = f"{why}; no retry: the time limit (--timeout) was reached"
                break
            aside = workspace.with_name(f"{workspace.name}.failed-attempt-{number}")
            if aside.exists():
                shutil.rmtree(aside)
            workspace.rename(aside)
            attempt.workspace = aside
            if log is not None:  # the log holds the last attempt only (a report reads it); earlier output moves aside
                log.flush()
                shutil.copyfile(log_path, aside / ATTEMPT_LOG)
                log.seek(0)
                log.truncate()
                log.write(f"# attempt {number} stopped: {why}; its output: {aside / ATTEMPT_LOG}\n")
            workspace.mkdir(parents=True)
            for name in KEPT_FOLDERS:
                if (kept / name).is_dir():
                    shutil.copytree(kept / name, workspace / name)
            say(f"fedseg simulate: retrying in a fresh workspace {workspace} (attempt {number + 1} of {retries + 1}; "
                f"the failed attempt's files are in {aside})")
    finally:
        shutil.rmtree(kept, ignore_errors=True)
        if log is not None:
            log.close()
    last = attempts[-1]
    rc = last.returncode if last.returncode is not None else -signal.SIGKILL
    return SimulationResult(rc, workspace, time.monotonic() - t0, attempts, Path(log_path) if log_path else None)
