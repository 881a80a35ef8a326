"""``fedseg simulate JOB_FOLDER -w WS -n N -t T``: ``nvflare simulator`` (it runs underneath, same arguments) with
fedseg's port fix and watchdog (:mod:`fedseg.simulation`): a lost worker or a stalled run is stopped and retried in a
fresh workspace, and ``--timeout`` bounds the whole command. :func:`add_watchdog_arguments` gives ``fedseg cv`` and the
sweeps the same options."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedseg.errors import CommandError
from fedseg.simulation.runner import DEFAULT_RETRIES, DEFAULT_STALL_TIMEOUT, SimulationError, simulate


def add_watchdog_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="stop a simulator run (all its attempts together) after S seconds (default: no limit; the stall bound "
                        "still ends a hung run)")
    p.add_argument("--stall-timeout", type=float, default=DEFAULT_STALL_TIMEOUT, metavar="S",
                   help=f"a run with no output and no log growth for S seconds is hung: stopped and retried "
                        f"(default {DEFAULT_STALL_TIMEOUT:.0f}; 0 turns it off)")
    p.add_argument("--retries", type=int, default=DEFAULT_RETRIES,
                   help=f"fresh attempts after a lost worker or a stall (default {DEFAULT_RETRIES})")


def watchdog_kwargs(args) -> dict:
    """The keyword arguments of :func:`fedseg.simulation.simulate` from :func:`add_watchdog_arguments`' options."""
    if args.retries < 0:
        raise CommandError(f"--retries must be >= 0, got {args.retries}")
    for name in ("timeout", "stall_timeout"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise CommandError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    return {"timeout": args.timeout or None, "stall_timeout": args.stall_timeout or None, "retries": args.retries}


def register(subparsers):
    p = subparsers.add_parser(
        "simulate", help="run a job in nvflare simulator, safe from lost workers and hangs (stopped, retried)",
        description="Runs NVFlare's simulator (the arguments of `nvflare simulator`) with worker ports that cannot "
                    "collide, and a watchdog: a worker lost at start, a site that never connects, or no progress "
                    "for --stall-timeout seconds stops exactly this run's processes and retries in a fresh "
                    "workspace (its startup/ and local/ folders kept; the failed attempt moved to "
                    "WS.failed-attempt-K).")
    p.add_argument("job_folder", type=Path, help="job folder, e.g. jobs/fedgs_lits (fedseg jobs list)")
    p.add_argument("-w", "--workspace", type=Path, required=True, help="simulator workspace")
    p.add_argument("-n", "--n_clients", type=int, default=None, help="number of sites (site-1 .. site-N)")
    p.add_argument("-c", "--clients", default=None, help="site names, comma-separated")
    p.add_argument("-t", "--threads", type=int, default=None, help="sites running at a time")
    p.add_argument("-gpu", "--gpu", default=None, help="GPU ids, comma-separated")
    p.add_argument("-l", "--log_config", default=None, help="NVFlare log mode (concise, full, ...) or file")
    p.add_argument("--end_run_for_all", action="store_true", help="run END_RUN at every site")
    p.add_argument("--log", type=Path, default=None, help="also write the output to this file")
    add_watchdog_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    job = args.job_folder
    if not job.is_dir():
        from fedseg.jobs.recipes import JOBS

        hint = (f"; {job} is a job name: give its folder, jobs/{job} (from the repository root), or write it with "
                f"`fedseg jobs export {job} --out DIR`") if str(job) in JOBS else ""
        raise CommandError(f"job folder {job} not found{hint}")
    try:
        res = simulate(job, args.workspace, n_clients=args.n_clients, clients=args.clients, threads=args.threads,
                       gpu=args.gpu, log_config=args.log_config, end_run_for_all=args.end_run_for_all,
                       log_path=args.log, echo=True, **watchdog_kwargs(args))
    except SimulationError as e:
        raise CommandError(str(e)) from e
    print(f"fedseg simulate: {res.describe()}", flush=True)
    return 0 if res.ok else (res.returncode if res.returncode > 0 else 1)
