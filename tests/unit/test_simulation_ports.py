"""fedseg.simulation.ports: simulator worker ports that the kernel never hands out by itself, reserved across
processes, checked free; the patch of NVFlare's simulator modules and the job component that installs it."""

import socket
import subprocess
import sys
import textwrap

import pytest

from fedseg.simulation import ports
from fedseg.simulation.ports import PortAllocator, ephemeral_range, port_is_free


def test_ports_lie_below_the_ephemeral_range_are_distinct_and_free(tmp_path):
    lo, _ = ephemeral_range()
    alloc = PortAllocator(lock_dir=tmp_path)
    got = alloc.allocate(20) + [alloc.allocate(1)[0] for _ in range(20)]
    assert len(set(got)) == 40 and all(ports.DEFAULT_LOW <= p < lo for p in got)
    for p in got:  # free: a worker can bind it (as multiprocessing's Listener does)
        with socket.socket() as s:
            s.bind(("localhost", p))
    assert alloc.held == sorted(got)


def test_ephemeral_range_is_read_from_the_kernel_file(tmp_path):
    f = tmp_path / "range"
    f.write_text("40000\t50000\n")
    assert ephemeral_range(str(f)) == (40000, 50000)
    assert ephemeral_range(str(tmp_path / "missing")) == ports.FALLBACK_EPHEMERAL


def test_a_port_in_use_is_skipped(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))  # any port we can hold; the allocator's range is set around it
        busy.listen(1)
        p = busy.getsockname()[1]
        assert not port_is_free(p)
        alloc = PortAllocator(low=p, high=p + 1, lock_dir=tmp_path, seed=0) if p < 65535 else None
        if alloc is None:
            pytest.skip("the kernel gave the last port")
        if not port_is_free(p + 1):
            pytest.skip(f"port {p + 1} is in use by something else")
        assert alloc.allocate(1) == [p + 1]
        with pytest.raises(RuntimeError, match=rf"no free port left in \[{p}, {p + 1}\]"):
            alloc.allocate(1)


CHILD = textwrap.dedent("""
    import sys
    from fedseg.simulation.ports import PortAllocator
    a = PortAllocator(low=int(sys.argv[1]), high=int(sys.argv[1]) + 199, lock_dir=sys.argv[2], seed=0)
    print(" ".join(map(str, a.allocate(60))), flush=True)
    sys.stdin.read()  # keep the reservations until told to end
""")


def test_two_processes_never_get_the_same_port(tmp_path):
    """Two simulator runs side by side (sweep --parallel), same range and same start: no port handed to both."""
    low = 21000
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(low), str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        got = [set(map(int, p.stdout.readline().split())) for p in procs]
    finally:
        for p in procs:
            p.communicate(timeout=30)
    assert len(got[0]) == len(got[1]) == 60 and not got[0] & got[1]
    # reservations end with their process: a new allocator can take those ports again
    again = PortAllocator(low=low, high=low + 199, lock_dir=tmp_path, seed=0).allocate(120)
    assert set(again) & (got[0] | got[1])


def test_within_one_process_two_allocators_do_not_share(tmp_path):
    a = PortAllocator(low=22000, high=22049, lock_dir=tmp_path, seed=1)
    b = PortAllocator(low=22000, high=22049, lock_dir=tmp_path, seed=1)
    pa, pb = a.allocate(20), b.allocate(20)
    assert not set(pa) & set(pb)
    a.release_all()
    assert a.held == []


def test_bad_range_is_explained(tmp_path):
    with pytest.raises(ValueError, match="ephemeral range starts at"):
        PortAllocator(low=500, high=400, lock_dir=tmp_path)


def test_install_replaces_get_open_ports_in_the_simulator_modules_only(tmp_path):
    import nvflare.fuel.utils.network_utils as nu
    from nvflare.private.fed.app.deployer import simulator_deployer
    from nvflare.private.fed.app.simulator import simulator_runner

    alloc = PortAllocator(lock_dir=tmp_path)
    try:
        assert ports.install(alloc) == list(ports.SIMULATOR_MODULES)
        assert simulator_runner.get_open_ports == alloc.allocate
        assert simulator_deployer.get_open_ports == alloc.allocate
        assert nu.get_open_ports is not alloc.allocate  # the rest of NVFlare keeps its own
        p = simulator_runner.get_open_ports(1)
        assert p == alloc.held and p[0] < ephemeral_range()[0]
    finally:
        ports.uninstall()
    assert simulator_runner.get_open_ports is nu.get_open_ports


def test_job_component_patches_only_inside_the_simulator(monkeypatch):
    from nvflare.private.fed.app.simulator import simulator_runner

    from fedseg.flare.simulator_ports import RUNNER_MODULE, SimulatorPortGuard

    try:
        monkeypatch.delitem(sys.modules, RUNNER_MODULE)  # a provisioned server never loads the simulator
        assert SimulatorPortGuard().patched == []
        monkeypatch.setitem(sys.modules, RUNNER_MODULE, simulator_runner)
        guard = SimulatorPortGuard()
        assert guard.patched == list(ports.SIMULATOR_MODULES)
        assert simulator_runner.get_open_ports == ports._allocator.allocate
    finally:
        ports.uninstall()


def test_every_job_carries_the_port_guard():
    from fedseg.jobs.recipes import JOBS

    for name, job in JOBS.items():
        comps = {c["id"]: c["path"] for c in job.server_config()["components"]}
        assert comps.get("simulator_ports") == "fedseg.flare.simulator_ports.SimulatorPortGuard", name
