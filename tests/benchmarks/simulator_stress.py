"""Stress test of simulator start-up (on demand, not in CI): many tiny 5-site jobs in a row.

    python tests/benchmarks/simulator_stress.py --runs 50 --out docs/experiments/simulator_stress

Modes, interleaved run by run so that all see the same machine load:

- ``runner``: ``fedseg.simulation.simulate`` (fedseg's port allocator in the simulator, watchdog, retries); reports
  the retries it needed.
- ``upstream``: plain ``nvflare simulator`` of the same job with fedseg's ``SimulatorPortGuard`` taken out of the
  server config, i.e. NVFlare 2.9's own port choice; each run bounded by ``--bound`` seconds (stopped with its whole
  process tree). A run that hits the bound is a hang.
- ``plain`` (optional): plain ``nvflare simulator`` of the job as shipped (the guard in its server config), bounded
  the same way: what a user who types ``nvflare simulator jobs/JOB`` gets.

The job: fedavg_polypgen on tiny built-in PolypGen-format data (5 sites = 5 simulator workers started at once, 1
round of 1 step, 32x32 images). Writes ``runs.jsonl`` (one line a run), ``summary.json`` and ``summary.md`` to
``--out`` and keeps the logs of runs that hung or failed under ``--out/failed_logs``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

TINY = {"num_rounds": 1, "local_epochs": 1, "max_steps_per_round": 1, "num_threads": 1, "test_every_n_rounds": 0,
        "data_args.image_size": 32, "model_args.base_chan": 4}


def _jobs(root: Path) -> dict[str, Path]:
    from fedseg.jobs.recipes import JOBS, override

    job = override(JOBS["fedavg_polypgen"], TINY)
    shipped = job.export(root / "shipped")
    upstream = job.export(root / "upstream")
    cfg_path = upstream / "app" / "config" / "config_fed_server.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["components"] = [c for c in cfg["components"] if c["id"] != "simulator_ports"]
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return {"shipped": shipped, "upstream": upstream}


def main(argv=None) -> int:
    from fedseg.simulation import simulate

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=50, help="runs per mode (default 50)")
    ap.add_argument("--modes", default="runner,upstream", help="comma-separated: runner, upstream, plain")
    ap.add_argument("--bound", type=float, default=180.0, help="time bound of one plain run, s (default 180)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    out = args.out.resolve()
    (out / "failed_logs").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="fedseg-stress-"))
    os.environ["HOME"] = str(tmp / "home")
    from fedseg.data.synthetic_polypgen import synth_polypgen

    synth_polypgen(tmp / "data", preset="tiny", seed=1, progress=False)
    cfg = tmp / "data.json"
    cfg.write_text(json.dumps({"polypgen": {"root": str(tmp / "data")}}))
    env = dict(os.environ, FEDSEG_DATA_CONFIG=str(cfg))
    jobs = _jobs(tmp / "jobs")
    records = []
    runs_file = open(out / "runs.jsonl", "w")
    bar = tqdm(total=args.runs * len(modes), desc="simulator runs", unit="run")
    for i in range(args.runs):
        for mode in modes:
            ws, log = tmp / "ws" / f"{mode}_{i}", tmp / "logs" / f"{mode}_{i}.log"
            if mode == "runner":
                res = simulate(jobs["shipped"], ws, n_clients=5, threads=5, log_path=log, env=env,
                               stall_timeout=120, timeout=3 * args.bound, retries=3)
            else:
                job = jobs["upstream" if mode == "upstream" else "shipped"]
                cmd = [sys.executable, "-m", "nvflare.cli", "simulator", str(job), "-w", str(ws), "-n", "5", "-t", "5"]
                res = simulate(job, ws, command=cmd, log_path=log, env=env, timeout=args.bound, stall_timeout=None,
                               retries=0, recognise=False)
            asides = [ws.with_name(f"{ws.name}.failed-attempt-{k}") for k in range(1, 4)]
            text = log.read_text(errors="replace") + "".join(
                (d / "fedseg_simulate.log").read_text(errors="replace") for d in asides
                if (d / "fedseg_simulate.log").is_file())
            rec = {"mode": mode, "run": i, "ok": res.ok, "returncode": res.returncode, "seconds": round(res.seconds, 1),
                   "retries": res.retries, "hung": (not res.ok) and res.failure is not None and mode != "runner",
                   "failures": [a.failure for a in res.attempts if a.failure],
                   "port_race_seen": "Address already in use" in text
                   or any("Address already in use" in p.read_text(errors="replace")
                          for d in [ws] + asides
                          for p in d.glob("*/error_log.txt")),
                   "lost_worker_seen": "Failed to create connection to the child process" in text
                   or "Communication error with client" in text or "Subprocess died for client" in text}
            records.append(rec)
            runs_file.write(json.dumps(rec) + "\n")
            runs_file.flush()
            if not res.ok or res.retries:
                shutil.copy(log, out / "failed_logs" / log.name)
            bar.set_postfix_str(f"{mode} {i}: {'ok' if res.ok else 'FAILED'} {res.seconds:.0f}s")
            bar.update(1)
            for d in ws.parent.glob(f"{ws.name}*"):
                shutil.rmtree(d, ignore_errors=True)
    bar.close()
    summary = {}
    for mode in modes:
        rs = [r for r in records if r["mode"] == mode]
        summary[mode] = {"runs": len(rs), "ok": sum(r["ok"] for r in rs), "hung": sum(r["hung"] for r in rs),
                         "runs_with_retries": sum(1 for r in rs if r["retries"]),
                         "retries": sum(r["retries"] for r in rs),
                         "port_race_seen": sum(r["port_race_seen"] for r in rs),
                         "lost_worker_seen": sum(r["lost_worker_seen"] for r in rs),
                         "mean_s": round(sum(r["seconds"] for r in rs) / max(len(rs), 1), 1)}
    (out / "summary.json").write_text(json.dumps({"command": " ".join(sys.argv), "bound_s": args.bound,
                                                  "job": "fedavg_polypgen tiny, 5 sites, -n 5 -t 5",
                                                  "summary": summary}, indent=2))
    lines = ["| mode | runs | ok | hung (hit the bound) | runs with retries | retries | port race seen | lost worker seen | mean s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mode, s in summary.items():
        lines.append(f"| {mode} | {s['runs']} | {s['ok']} | {s['hung']} | {s['runs_with_retries']} | {s['retries']} | "
                     f"{s['port_race_seen']} | {s['lost_worker_seen']} | {s['mean_s']} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if all(s["ok"] == s["runs"] for m, s in summary.items() if m == "runner") else 1


if __name__ == "__main__":
    sys.exit(main())
