"""What a real multi-process FLARE system costs over ``nvflare simulator`` for the same job, and how many sites fit
on this machine (on demand: ``python -m pytest tests/benchmarks/test_poc_overhead.py -m benchmark -s``).

One run measures, on the same tiny ``fedgs_lits`` job (JOB below: 3 sites, 5 rounds, 3 local steps a round,
32x32 tiny synthetic LiTS, UTNet base 4, 1 torch thread a site, no test-centre evaluation):

1. **Simulator**: ``nvflare simulator -n 3 -t 3`` (one process for the server, one worker process a site), data
   through ``FEDSEG_DATA_CONFIG``; run once before and once after the provisioned runs, the baseline is their mean.
2. **Provisioned system**: ``nvflare provision`` of a 4-site project (``fedseg.deploy.project``) whose server is
   named ``localhost`` on two free ports (loopback only: every listening socket of the started processes is
   checked), kits configured with ``configure_kit`` (state dir in the temp folder, the same data config),
   ``start_system`` of the server and site-1..3 (timed: server start -> every site registered), the same job folder
   submitted through the FLARE API (``submit_job``), result downloaded. Then, on the same system, the job on 2 sites
   (``deploy_map`` site-1, site-2; site-3 stays connected, idle) and, after ``start_system`` of site-4, on 4 sites.
   ``stop_system`` in a finally block stops every started process and its job processes.

Per-round seconds come from the server job log (simulator: ``<ws>/server/log.txt`` in FLARE 2.9, which has no
``simulate_job/log.txt``; provisioned: the downloaded ``<result_dir>/workspace/log.txt``): round N lasts from
"Round N started." to "Round N+1 started." (persisting and ROUND_DONE handlers included, as in
``test_round_time``); the median is over rounds 1..3 (round 0, which includes the sites' first task fetch, is
reported on its own).

Memory: a sampler thread reads every 0.5 s each participant's process tree (the registry
``<prod>/fedseg_processes.json`` gives each participant's PID; its children are FLARE's job processes) and sums USS
(memory unique to the processes; RSS, which counts shared libraries in every process, alongside) and CPU seconds
(user + system of every process seen; a process's last < 0.5 s before it exits is missed). The same sampler
follows the simulator's process tree (its workers are labelled by their ``--client``). Sites that fit =
floor((total memory - server peak - 2 GiB reserve) / site peak).

Ratios are against the simulator measured in the same run. Nothing here asserts a timing; the run fails only when a
job does not complete, a round marker is missing or a process listens on a non-loopback address.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import threading
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import psutil
import pytest

from fedseg.deploy.system import free_loopback_ports

pytestmark = pytest.mark.benchmark

ROUNDS = 5
MEDIAN_ROUNDS = range(1, ROUNDS - 1)  # round N = start(N) -> start(N + 1); round 0 (warm-up) reported separately
JOB = {"num_rounds": ROUNDS, "local_epochs": 1, "max_steps_per_round": 3, "min_clients": 3, "num_threads": 1,
       "data_args": {"image_size": 32, "min_tumour_pixels": 4}, "model_args": {"base_chan": 4},
       "test_every_n_rounds": 0}
ALL_SITES = ("site-1", "site-2", "site-3", "site-4")
ADMIN = "admin@coordinator.org"
SERVER = "localhost"
RESERVE_GIB = 2.0
MIB = 2 ** 20
SAMPLE_S = 0.5

_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", flags=re.MULTILINE)
_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*Round (\d+) (started|finished)\.\s*$",
                   flags=re.MULTILINE)


# ------------------------------------------------------------------------------------------------ log parsing
def _round_marks(log_text: str) -> dict[str, dict[int, float]]:
    """{"started": {round: epoch seconds}, "finished": {...}} from ScatterAndGather's lines (local time stamps)."""
    marks: dict[str, dict[int, float]] = {"started": {}, "finished": {}}
    for m in _LINE.finditer(log_text):
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        marks[m.group(3)].setdefault(int(m.group(2)), t)
    return marks


def _stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _rounds(log_path: Path) -> dict:
    text = log_path.read_text(errors="replace")
    marks = _round_marks(text)
    s, f = marks["started"], marks["finished"]
    assert set(range(ROUNDS)) <= set(s) and ROUNDS - 1 in f, f"round markers missing in {log_path}: {marks}"
    per_round = [s[n + 1] - s[n] for n in range(ROUNDS - 1)]
    stamps = _STAMP.findall(text)
    return {"per_round": per_round, "round0": per_round[0],
            "median": statistics.median(per_round[n] for n in MEDIAN_ROUNDS),
            "first_start": s[0], "last_finish": f[ROUNDS - 1], "training": f[ROUNDS - 1] - s[0],
            "steady": (s[MEDIAN_ROUNDS.start], s[MEDIAN_ROUNDS.stop]), "log_end": _stamp(stamps[-1])}


def _timing(r: dict, t0: float, t1: float, sampler: TreeSampler) -> dict:
    """Phases of one job run from its log marks and the caller's clock, and its CPU use (sampler)."""
    mem = sampler.window(t0, t1)
    busy = sampler.rate(*r["steady"])
    return {**r, "wall": t1 - t0, "to_round0": r["first_start"] - t0, "after_last": t1 - r["last_finish"],
            "to_log_end": r["log_end"] - r["last_finish"], "log_end_to_done": t1 - r["log_end"],
            "cpu": sum(v["cpu"] for v in mem.values()), "mem": mem, "busy": busy,
            "busy_total": sum(busy.values()),
            "cpu_round": sum(busy.values()) * (r["steady"][1] - r["steady"][0]) / len(MEDIAN_ROUNDS),
            "t0": t0, "t1": t1}


# ------------------------------------------------------------------------------------------------ sampling
class TreeSampler(threading.Thread):
    """Every SAMPLE_S seconds: per label, the summed USS / RSS (bytes), process count and CPU seconds of a process
    tree. ``roots()`` returns {label: psutil.Process}; ``split`` (optional) relabels a tree's processes. CPU seconds
    of a label = the last seen user + system time of every process ever sampled under it (so a job process that has
    exited keeps counting; what it used in its last < SAMPLE_S seconds is missed)."""

    def __init__(self, roots, split=None):
        super().__init__(daemon=True)
        self.roots, self.split = roots, split
        self.samples: list[tuple[float, dict[str, dict[str, float]]]] = []
        self.listening: set[tuple[str, int, str]] = set()
        self.uss_ok = True
        self._cpu: dict[tuple[int, float], tuple[str, float]] = {}  # (pid, create_time) -> (label, cpu s)
        self._labels: dict[tuple[int, float], str] = {}  # a process keeps the label it had when first seen
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    def _mem(self, p: psutil.Process) -> tuple[float, float]:
        if self.uss_ok:
            try:
                m = p.memory_full_info()
                return float(m.uss), float(m.rss)
            except psutil.AccessDenied:
                self.uss_ok = False
        rss = float(p.memory_info().rss)
        return rss, rss

    def sample(self, check_listen: bool = False) -> None:
        now, out = time.time(), {}
        for label, root in self.roots().items():
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            for p in procs:
                try:
                    key = (p.pid, p.create_time())
                    if key not in self._labels:
                        self._labels[key] = self.split(p, label) if self.split else label
                    name = self._labels[key]
                    uss, rss = self._mem(p)
                    ct = p.cpu_times()
                    self._cpu[key] = (name, ct.user + ct.system)
                    if check_listen:
                        for c in p.net_connections("tcp"):
                            if c.status == psutil.CONN_LISTEN:
                                self.listening.add((c.laddr.ip, c.laddr.port, name))
                except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                    continue
                d = out.setdefault(name, {"uss": 0.0, "rss": 0.0, "procs": 0, "cpu": 0.0})
                d["uss"] += uss
                d["rss"] += rss
                d["procs"] += 1
        for name, cpu in self._cpu.values():
            out.setdefault(name, {"uss": 0.0, "rss": 0.0, "procs": 0, "cpu": 0.0})["cpu"] += cpu
        self.samples.append((now, out))

    def run(self) -> None:
        i = 0
        while not self._halt.is_set():
            t0 = time.time()
            self.sample(check_listen=i % 4 == 0)
            i += 1
            self._halt.wait(max(0.0, SAMPLE_S - (time.time() - t0)))
        self.sample(check_listen=True)

    def window(self, t0: float, t1: float) -> dict[str, dict[str, float]]:
        """Per label in [t0, t1]: peak USS / RSS (MiB), peak process count, CPU seconds used in the window."""
        rows = [s for t, s in self.samples if t0 <= t <= t1]
        before = [s for t, s in self.samples if t < t0]
        res: dict[str, dict[str, float]] = {}
        for s in rows:
            for name, d in s.items():
                r = res.setdefault(name, {"uss": 0.0, "rss": 0.0, "procs": 0, "cpu": 0.0})
                r["uss"] = max(r["uss"], d["uss"] / MIB)
                r["rss"] = max(r["rss"], d["rss"] / MIB)
                r["procs"] = max(r["procs"], d["procs"])
        for name, r in res.items():
            start = before[-1].get(name, {}).get("cpu", 0.0) if before else 0.0
            r["cpu"] = rows[-1].get(name, {}).get("cpu", start) - start
        return res

    def rate(self, t0: float, t1: float) -> dict[str, float]:
        """Per label: CPU cores busy between the last sample at or before t0 and the first at or after t1."""
        a = next((s for s in reversed(self.samples) if s[0] <= t0), self.samples[0])
        b = next((s for s in self.samples if s[0] >= t1), self.samples[-1])
        dt = max(b[0] - a[0], 1e-9)
        return {n: (d["cpu"] - a[1].get(n, {}).get("cpu", 0.0)) / dt for n, d in b[1].items()}

    def total_peak(self, t0: float, t1: float) -> float:
        """Peak over the samples in [t0, t1] of the USS summed over every label (MiB)."""
        return max((sum(d["uss"] for d in s.values()) / MIB for t, s in self.samples if t0 <= t <= t1), default=0.0)


def _registry_roots(prod: Path):
    cache: dict[str, psutil.Process] = {}

    def roots() -> dict[str, psutil.Process]:
        try:
            reg = json.loads((prod / "fedseg_processes.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):  # not written yet / being replaced
            return dict(cache)
        live = {}
        for name, e in reg.items():
            p = cache.get(name)
            if p is None or p.pid != int(e["pid"]):
                try:
                    p = psutil.Process(int(e["pid"]))
                    if abs(p.create_time() - float(e["create_time"])) > 1.0:
                        continue
                except psutil.NoSuchProcess:
                    continue
            live[name] = cache[name] = p
        return live

    return roots


def _sim_label(p: psutil.Process, _label: str) -> str:
    try:
        cmd = p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "server"
    return cmd[cmd.index("--client") + 1] if "--client" in cmd else "server"  # the CLI and the server process


# ------------------------------------------------------------------------------------------------ helpers
def _export(jobs_dir: Path, sites: tuple[str, ...] | None, n: int) -> Path:
    from fedseg.jobs.recipes import JOBS

    job = replace(JOBS["fedgs_lits"], **{**JOB, "min_clients": n})
    path = job.export(jobs_dir / f"n{n}")
    if sites is not None:  # run on these sites only (others stay connected, idle)
        meta = json.loads((path / "meta.json").read_text())
        meta["deploy_map"] = {"app": ["server", *sites]}  # FLARE refuses a deploy_map without the server
        (path / "meta.json").write_text(json.dumps(meta, indent=2))
    return path


def _run_simulator(job_dir: Path, ws: Path, data_cfg: Path, n: int) -> dict:
    from fedseg.simulation import simulate

    env = dict(os.environ, FEDSEG_DATA_CONFIG=str(data_cfg))
    samplers = []

    def started(pid: int) -> None:  # sample the simulator's process tree (its workers are labelled by --client)
        root = psutil.Process(pid)
        samplers.append(TreeSampler(lambda: {"sim": root}, split=_sim_label))
        samplers[-1].start()

    t0 = time.time()
    try:  # no retry: a retried run would mix two attempts into the timings
        res = simulate(job_dir, ws, n_clients=n, threads=n, env=env, log_path=ws.parent / f"{ws.name}.out",
                       timeout=900, stall_timeout=300, retries=0, on_start=started)
    finally:
        for sampler in samplers:
            sampler.stop()
    t1 = time.time()
    assert res.ok, res.describe() + "\n" + (ws.parent / f"{ws.name}.out").read_text(errors="replace")[-4000:]
    sampler = samplers[-1]
    # FLARE 2.9's simulator writes the server's job log to <ws>/server/log.txt (earlier versions: simulate_job/)
    log = next((p for p in (ws / "server" / "simulate_job" / "log.txt", ws / "server" / "log.txt") if p.is_file()),
               None)
    assert log is not None, f"no server log under {ws / 'server'}: {sorted(map(str, (ws / 'server').iterdir()))}"
    d = _timing(_rounds(log), t0, t1, sampler)
    return {**d, "total_uss": sampler.total_peak(t0, t1), "listening": sampler.listening}


def _submit(job_dir: Path, admin: Path, sampler: TreeSampler, n: int) -> dict:
    from fedseg.deploy.submit import submit_job

    t0 = time.time()
    res = submit_job(job_dir, admin, timeout=900, poll=1, progress=lambda m: None)
    t1 = time.time()
    assert res.ok, (n, res.status, res.reason)
    return _timing(_rounds(res.result_dir / "workspace" / "log.txt"), t0, t1, sampler)


def _start(prod: Path, only=None) -> dict:
    from fedseg.deploy.system import start_system

    events: list[tuple[float, str]] = []
    t0 = time.time()
    start_system(prod, only=only, timeout=300, progress=lambda m: events.append((time.time(), m)))
    t1 = time.time()
    first_site = next((t for t, m in events if m.startswith("started site")), t0)
    return {"seconds": t1 - t0, "to_sites": first_site - t0, "register": t1 - first_site}


# ------------------------------------------------------------------------------------------------ the benchmark
def test_poc_system_overhead_vs_simulator_and_sites_per_machine(tmp_path):
    from fedseg.data.synthetic import synth_lits
    from fedseg.deploy.kits import find_kits
    from fedseg.deploy.project import make_project, provision, write_project
    from fedseg.deploy.site_config import configure_kit
    from fedseg.deploy.system import stop_system

    bench_t0 = time.time()
    load0 = os.getloadavg()
    data = tmp_path / "tiny_lits"
    synth_lits(data, preset="tiny", seed=1, progress=False)
    data_cfg = tmp_path / "fedseg_data.json"
    data_cfg.write_text(json.dumps({"lits": {"root": str(data)}}))
    jobs = tmp_path / "jobs"
    job3 = _export(jobs, None, 3)

    # (a) the simulator
    sims = [_run_simulator(job3, tmp_path / "sim_ws_1", data_cfg, 3)]
    load_sim = os.getloadavg()

    # (b) a provisioned loopback system: 4 kits, 3 started first
    fl, adm = free_loopback_ports(2)
    project = make_project("fedseg_bench", list(ALL_SITES), server=SERVER, fl_port=fl, admin_port=adm,
                           admins=[(ADMIN, "coordinator", "project_admin")], he=False)
    tp = time.time()
    prod = provision(write_project(project, tmp_path / "project.yml"), tmp_path / "prov")
    provision_s = time.time() - tp
    for kit in find_kits(prod):
        if kit.kind != "admin":
            configure_kit(kit, state_dir=(tmp_path / "state") if kit.kind == "server" else None,
                          data_config=data_cfg, allow_tmp=True)
    sampler = TreeSampler(_registry_roots(prod))
    poc: dict[int, dict] = {}
    starts: dict[str, dict] = {}
    try:
        sampler.start()
        starts["server + 3 sites"] = _start(prod, only=[SERVER, *ALL_SITES[:3]])
        time.sleep(2 * SAMPLE_S)
        idle = sampler.window(time.time() - 2 * SAMPLE_S - 0.1, time.time())
        poc[3] = _submit(job3, prod / ADMIN, sampler, 3)
        load_poc = os.getloadavg()
        poc[2] = _submit(_export(jobs, ALL_SITES[:2], 2), prod / ADMIN, sampler, 2)
        starts["+ site-4"] = _start(prod, only=[ALL_SITES[3]])
        poc[4] = _submit(_export(jobs, ALL_SITES, 4), prod / ADMIN, sampler, 4)
    finally:
        sampler.stop()
        stop_system(prod, progress=lambda m: None)
    load_after_poc = os.getloadavg()
    # (a) again, so that the simulator baseline brackets the provisioned runs (the machine's load drifts)
    sims.append(_run_simulator(job3, tmp_path / "sim_ws_2", data_cfg, 3))
    load_end = os.getloadavg()
    for d in sims:
        assert all(ip in ("127.0.0.1", "::1") for ip, _, _ in d["listening"]), d["listening"]
    assert all(ip in ("127.0.0.1", "::1") for ip, _, _ in sampler.listening), sampler.listening
    keys = ("median", "round0", "training", "to_round0", "after_last", "to_log_end", "log_end_to_done", "wall",
            "cpu", "cpu_round", "busy_total", "total_uss")
    sim = {k: statistics.mean(d[k] for d in sims) for k in keys}

    # ---------------------------------------------------------------------------------------------- report
    vm = psutil.virtual_memory()
    metric = "USS" if sampler.uss_ok else "RSS"
    p3 = poc[3]
    site_names3 = ALL_SITES[:3]
    print(f"\n[benchmark] POC/provisioned system vs nvflare simulator, same job folder: fedgs_lits, 3 sites, "
          f"{ROUNDS} rounds x {JOB['max_steps_per_round']} steps, 32x32 tiny synthetic LiTS, UTNet base 4, "
          f"1 torch thread a site, no test-centre evaluation; {psutil.cpu_count()} CPUs; load average "
          f"{load0[0]:.1f} at start, {load_sim[0]:.1f} after simulator run 1, {load_poc[0]:.1f} after the POC "
          f"3-site job, {load_after_poc[0]:.1f} after the last POC job, {load_end[0]:.1f} after simulator run 2")
    print(f"    per round = 'Round N started.' -> 'Round N+1 started.' in the server job log; median of rounds "
          f"{MEDIAN_ROUNDS.start}..{MEDIAN_ROUNDS.stop - 1}")
    print(f"    {'':31s} {'sim 1':>7s} {'sim 2':>7s} {'sim':>7s} {'POC':>7s} {'POC/sim':>8s} {'POC-sim':>8s}")

    def row(label, key):
        a, b = sim[key], p3[key]
        print(f"    {label:31s} {sims[0][key]:7.2f} {sims[1][key]:7.2f} {a:7.2f} {b:7.2f} {b / a:8.2f} {b - a:+8.2f}")

    row("per-round median (s)", "median")
    row("round 0 (s)", "round0")
    row(f"rounds 0..{ROUNDS - 1} (s)", "training")
    row("start -> round 0 started (s)", "to_round0")
    row("last round finished -> end (s)", "after_last")
    row("  of which: -> job log ends (s)", "to_log_end")
    row("  job log ends -> done (s)", "log_end_to_done")
    row("job wall time (s)", "wall")
    row("CPU s, all processes, job", "cpu")
    row("CPU s a round (rounds 1..3)", "cpu_round")
    row("cores busy (rounds 1..3)", "busy_total")
    print("    sim = mean of simulator runs 1 (before) and 2 (after the provisioned runs); 'CPU s a round' = CPU "
          "seconds of all processes from 'Round 1 started.' to 'Round 4 started.' / 3")
    print(f"    per-round seconds: simulator {[round(x, 2) for x in sims[0]['per_round']]}, "
          f"{[round(x, 2) for x in sims[1]['per_round']]}; POC {[round(x, 2) for x in p3['per_round']]}")
    print("    job wall time: simulator = process start to exit; POC = submit_job call to FINISHED:COMPLETED seen "
          "(poll 1 s) and the result downloaded")
    s = starts["server + 3 sites"]
    print(f"    system start (start_system: server start -> all 3 sites registered) {s['seconds']:.1f} s "
          f"(server port open after {s['to_sites']:.1f} s, sites registered {s['register']:.1f} s later); "
          f"adding site-4 {starts['+ site-4']['seconds']:.1f} s; nvflare provision {provision_s:.1f} s")

    print(f"[benchmark] memory ({metric} summed over each process tree, peak of {SAMPLE_S} s samples; RSS "
          f"alongside), MiB")
    print(f"    {'participant':24s} {'idle':>8s} {'3-site job':>10s} {'RSS':>8s} {'procs':>5s} {'CPU s':>6s} "
          f"{'cores, rounds 1..3':>18s}")
    m3 = p3["mem"]
    for name in (SERVER, *site_names3):
        print(f"    POC {name:20s} {idle.get(name, {}).get('uss', float('nan')):8.1f} {m3[name]['uss']:10.1f} "
              f"{m3[name]['rss']:8.1f} {m3[name]['procs']:5.0f} {m3[name]['cpu']:6.1f} "
              f"{p3['busy'].get(name, 0.0):18.2f}")
    for name in ("server", *site_names3):
        d = sims[0]["mem"].get(name)
        if d:
            print(f"    sim {name:20s} {'':8s} {d['uss']:10.1f} {d['rss']:8.1f} {d['procs']:5.0f} {d['cpu']:6.1f} "
                  f"{sims[0]['busy'].get(name, 0.0):18.2f}")
    poc_total = sampler.total_peak(p3["t0"], p3["t1"])
    print(f"    (sim rows: simulator run 1)\n    peak total, 3-site job: POC {poc_total:.0f} MiB, simulator "
          f"{sim['total_uss']:.0f} MiB "
          f"(POC/sim {poc_total / sim['total_uss']:.2f})")
    site_peak = max(d["uss"] for n in poc for k, d in poc[n]["mem"].items() if k != SERVER)
    site_peak_rss = max(d["rss"] for n in poc for k, d in poc[n]["mem"].items() if k != SERVER)
    server_peak = max(poc[n]["mem"][SERVER]["uss"] for n in poc)
    server_peak_rss = max(poc[n]["mem"][SERVER]["rss"] for n in poc)
    total_mib = vm.total / MIB
    fit = math.floor((total_mib - server_peak - RESERVE_GIB * 1024) / site_peak)
    fit_rss = math.floor((total_mib - server_peak_rss - RESERVE_GIB * 1024) / site_peak_rss)
    print(f"    machine memory {total_mib / 1024:.1f} GiB (available at the end {vm.available / 2 ** 30:.1f} GiB); "
          f"site peak {site_peak:.0f} MiB {metric} ({site_peak_rss:.0f} RSS), server peak {server_peak:.0f} MiB "
          f"({server_peak_rss:.0f} RSS), over the 2-, 3- and 4-site jobs")
    print(f"    sites that fit = floor(({total_mib:.0f} - {server_peak:.0f} - {RESERVE_GIB * 1024:.0f}) / "
          f"{site_peak:.0f}) = {fit} by {metric} (by RSS, which counts shared libraries per process: {fit_rss})")

    print("[benchmark] provisioned system, per-round time by number of sites (same system; 2 sites: deploy_map "
          "site-1, site-2 with site-3 connected and idle)")
    print(f"    {'sites':>5s} {'median s':>9s} {'vs 2':>6s} {'round 0':>8s} {'->round 0':>9s} {'end->done':>9s} "
          f"{'job wall':>9s} {'CPU s':>7s} {'cores':>6s} {'peak MiB':>9s}  per round")
    for n in sorted(poc):
        d = poc[n]
        print(f"    {n:5d} {d['median']:9.2f} {d['median'] / poc[2]['median']:6.2f} {d['round0']:8.2f} "
              f"{d['to_round0']:9.2f} {d['after_last']:9.2f} {d['wall']:9.1f} {d['cpu']:7.1f} "
              f"{d['busy_total']:6.2f} {sampler.total_peak(d['t0'], d['t1']):9.0f}  "
              f"{[round(x, 2) for x in d['per_round']]}")
    ns = sorted(poc)
    xs, ys = ns, [poc[n]["cpu_round"] for n in ns]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    base = my - slope * mx
    cores = psutil.cpu_count()
    floor_s = poc[2]["median"]
    n_cpu = (cores * floor_s - base) / slope if slope > 0 else float("inf")
    print(f"    CPU s a round (all FLARE processes, rounds 1..3) = {base:.2f} + {slope:.2f} x sites (least squares "
          f"over {ns}); 'cores' = that / the round's seconds")
    print(f"    CPU becomes the limit when a round's CPU work exceeds {cores} cores x the 2-site round "
          f"({floor_s:.2f} s): ({cores} x {floor_s:.2f} - {base:.2f}) / {slope:.2f} = about {n_cpu:.0f} sites, "
          f"against {fit} by memory; per-round time 2 -> 4 sites x{poc[4]['median'] / poc[2]['median']:.2f}")
    print(f"[benchmark] total benchmark time {time.time() - bench_t0:.0f} s")
