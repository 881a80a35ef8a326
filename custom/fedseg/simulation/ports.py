"""Ports for NVFlare simulator workers that no other socket on the machine can take.

NVFlare 2.9's simulator gives each worker process a port from ``get_open_ports(1)``: it binds port 0, reads the
number, closes the socket and passes the number to a new process, which binds it a few seconds later (after its
imports). In between, the kernel may hand the same number to any other socket that asks for an ephemeral port (a
``bind(("", 0))`` elsewhere, another simulator thread, the source port of an outgoing connection). The worker then
dies with ``Address already in use`` and the run waits for that site forever (docs/upstream/nvflare_simulator_port_race.md).

:class:`PortAllocator` removes that race instead of retrying around it:

- it hands out ports **below the kernel's ephemeral range** (``/proc/sys/net/ipv4/ip_local_port_range``), which the
  kernel never assigns by itself, so no ``bind(0)`` or ``connect()`` anywhere can take one; only a program that names
  the number can;
- each port is **reserved** with an exclusive ``flock`` on a file per port (shared by every fedseg process of this
  user), held until the allocating process ends, so two simulator runs side by side (``--parallel``) never get the
  same number and no port is handed out twice in one run;
- each candidate is **checked free** (bound once on all addresses, without SO_REUSEADDR) before it is handed out, so a
  port that a service or a TIME_WAIT connection holds is skipped.

:func:`install` puts the allocator in place of ``get_open_ports`` in NVFlare's simulator modules (no other NVFlare
code is touched). This module does not import nvflare at import time.
"""

from __future__ import annotations

import fcntl
import os
import random
import socket
import tempfile
import threading
from pathlib import Path

# The simulator modules that call get_open_ports: the runner (one port per worker process) and the deployer (the
# server's port, taken once at start).
SIMULATOR_MODULES = (
    "nvflare.private.fed.app.simulator.simulator_runner",
    "nvflare.private.fed.app.deployer.simulator_deployer",
)
DEFAULT_LOW = 20000  # below this lie many well-known service ports (8002/8003 of FLARE, databases, ...)
FALLBACK_EPHEMERAL = (32768, 60999)  # Linux's default when /proc cannot be read


def ephemeral_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    """The kernel's ephemeral port range (first, last); Linux's default where it cannot be read."""
    try:
        lo, hi = (int(x) for x in Path(path).read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return FALLBACK_EPHEMERAL


def port_is_free(port: int) -> bool:
    """True when ``port`` can be bound on all IPv4 addresses right now (no listener, connection or TIME_WAIT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


class PortAllocator:
    """Hands out free TCP ports in ``[low, high]`` (default: from 20000 up to just below the ephemeral range), each
    reserved for this process by an exclusive lock file in ``lock_dir`` until the process ends."""

    def __init__(self, low: int | None = None, high: int | None = None, lock_dir: str | Path | None = None,
                 seed: int | None = None):
        eph_lo, _ = ephemeral_range()
        self.low = DEFAULT_LOW if low is None else low
        self.high = eph_lo - 1 if high is None else high
        if self.low < 1024 or self.high > 65535 or self.low > self.high:
            raise ValueError(f"port range [{self.low}, {self.high}] is not a range of unprivileged ports; the kernel's "
                             f"ephemeral range starts at {eph_lo} (/proc/sys/net/ipv4/ip_local_port_range)")
        self.lock_dir = Path(lock_dir) if lock_dir else Path(tempfile.gettempdir()) / f"fedseg-ports-{os.getuid()}"
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        self._next = random.Random(seed).randint(self.low, self.high)  # spread parallel runs over the range
        self._held: dict[int, int] = {}  # port -> fd of its lock file (the reservation)
        self._lock = threading.Lock()

    @property
    def held(self) -> list[int]:
        return sorted(self._held)

    def _reserve(self, port: int) -> bool:
        fd = os.open(self.lock_dir / f"{port}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another process holds it
            os.close(fd)
            return False
        self._held[port] = fd
        return True

    def allocate(self, number: int = 1) -> list[int]:
        """``number`` ports, each free now and never handed out before by a live allocator; RuntimeError when the
        range has no more."""
        ports: list[int] = []
        with self._lock:
            span = self.high - self.low + 1
            for _ in range(span):
                if len(ports) == number:
                    break
                port, self._next = self._next, self.low + (self._next + 1 - self.low) % span
                if port in self._held or not self._reserve(port):
                    continue
                if port_is_free(port):
                    ports.append(port)
                # a port in use stays reserved (never retried by this process): it is not handed out
        if len(ports) < number:
            raise RuntimeError(f"no free port left in [{self.low}, {self.high}] ({len(self._held)} reserved by this "
                               f"process); lock files in {self.lock_dir}")
        return ports

    def release_all(self) -> None:
        """Drop every reservation (tests; a process's reservations also end with it)."""
        with self._lock:
            for fd in self._held.values():
                os.close(fd)
            self._held.clear()


_allocator: PortAllocator | None = None
_originals: dict[str, object] = {}


def install(allocator: PortAllocator | None = None) -> list[str]:
    """Replace ``get_open_ports`` in NVFlare's simulator modules with ``allocator.allocate`` (a process-wide
    allocator by default); the names of the modules patched. Safe to call more than once."""
    import importlib

    global _allocator
    if allocator is None:
        _allocator = _allocator or PortAllocator()
        allocator = _allocator
    patched = []
    for name in SIMULATOR_MODULES:
        module = importlib.import_module(name)
        if not callable(getattr(module, "get_open_ports", None)):
            continue  # an NVFlare release without this call: nothing to replace
        _originals.setdefault(name, module.get_open_ports)
        module.get_open_ports = allocator.allocate
        patched.append(name)
    return patched


def uninstall() -> None:
    """Put NVFlare's own ``get_open_ports`` back (tests)."""
    import importlib

    for name, original in _originals.items():
        importlib.import_module(name).get_open_ports = original
    _originals.clear()
