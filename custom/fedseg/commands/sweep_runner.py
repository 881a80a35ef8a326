"""The machinery that the experiment sweeps (`fedseg privacy sweep`, `fedseg security sweep`) share.

A sweep is a list of job variants (:func:`fedseg.jobs.recipes.override`), each exported to ``OUT/jobs/<job>`` and run
with ``nvflare simulator`` in ``OUT/runs/<variant>`` (log ``OUT/logs/<variant>.log``); ``OUT/sweep_plan.json`` lists
the variants so that a report can be redone from the folder alone. This module holds what does not depend on the
experiment:

- :func:`add_run_arguments` / :func:`run_arguments_command`: the common options (``--set``, ``--parallel``,
  ``--threads``, ``--rerun``, ``--out``) and their part of the command line written into the table;
- :func:`check_run_arguments`: their checks (CommandError before anything is started);
- :func:`variant_entry`: one plan entry (folders, log, sites, rounds) plus the experiment's own keys;
- :func:`run_plan`: makes the folders, writes the plan, reuses finished runs (``OUT/runs/<variant>/variant.json``
  holds the job settings of a finished run; ``--rerun`` ignores it), runs the rest ``parallel`` at a time with a
  progress bar, and reports each failed run with its exit code and the last lines of its log;
- :func:`load_plan`: reads the plan back (CommandError naming the sweep command when the folder is no sweep);
- :func:`report_failures`: prints the failed runs and gives the command's exit code;
- :func:`write_report`: ``sweep.json``, ``table.md`` and the plot of a collected summary, and the exit code;
- :func:`pyplot` / :func:`save_figure`, :func:`footer_lines`, :func:`fmt` / :func:`pct`: the plots' and tables'
  common parts.

The simulator call is :func:`simulate`; :func:`run_plan` takes it as an argument so that a command (and its tests)
can pass a stand-in.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

from fedseg.commands.simulate_cmd import add_watchdog_arguments, watchdog_kwargs
from fedseg.errors import CommandError
from fedseg.simulation import simulate as run_simulation

PLAN = "sweep_plan.json"
RESULTS = Path("server") / "simulate_job" / "results"


def canonical(obj: Any) -> Any:
    """``obj`` as JSON gives it back (sorted keys, tuples as lists, other objects as strings): comparable."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


# ---------------------------------------------------------------------- arguments
def add_run_arguments(parser, set_example: str) -> None:
    """The options every sweep has; ``set_example`` completes the help of --set (e.g. ``--set num_rounds=5``)."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a job setting in every variant, e.g. {set_example}")
    parser.add_argument("--parallel", type=int, default=1, help="simulator runs at a time (default 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="simulator threads per run (default: one per site)")
    parser.add_argument("--rerun", action="store_true", help="re-run variants that already finished")
    parser.add_argument("--out", type=Path, required=True, help="sweep folder (jobs/, runs/, logs/, table, plot)")
    add_watchdog_arguments(parser)


def run_arguments_command(args) -> list[str]:
    """The common options' part of the sweep's command line (for the table), rebuilt from the arguments."""
    parts: list[str] = []
    for item in args.set:
        parts += ["--set", item]
    parts += ["--parallel", str(args.parallel)]
    if args.threads:
        parts += ["--threads", str(args.threads)]
    parts += ["--out", str(args.out)]
    return parts


def quote_command(parts: list[str]) -> str:
    return " ".join(shlex.quote(p) for p in parts)


def check_run_arguments(args) -> Path:
    """CommandError on --parallel / --threads below 1, bad watchdog options or an --out that is a file; the
    resolved --out."""
    watchdog_kwargs(args)
    if args.parallel < 1:
        raise CommandError(f"--parallel must be >= 1, got {args.parallel}")
    if args.threads is not None and args.threads < 1:
        raise CommandError(f"--threads must be >= 1, got {args.threads}")
    out = args.out.resolve()
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is a file; give a folder for the sweep")
    return out


# ---------------------------------------------------------------------- running
def variant_entry(name: str, job, **extra) -> dict[str, Any]:
    """The plan entry of one variant: its name, the experiment's keys (``extra``), and where its job, run and log
    are (relative to the sweep folder)."""
    return {"name": name, **extra, "job_dir": f"jobs/{job.name}", "workspace": f"runs/{name}",
            "log": f"logs/{name}.log", "sites": job.min_clients, "num_rounds": job.num_rounds}


def finished(run_ws: Path, summary: dict) -> bool:
    """True when ``run_ws`` holds a finished run of exactly this variant (same job settings)."""
    marker = run_ws / "variant.json"
    if not (run_ws / RESULTS / "metrics.json").is_file() or not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) == canonical(summary)
    except json.JSONDecodeError:
        return False


def simulate(job_dir: Path, run_ws: Path, log_path: Path, sites: int, threads: int,
             **watchdog) -> tuple[int, float]:
    """``job_dir`` in the simulator in ``run_ws`` through fedseg's runner (:func:`fedseg.simulation.simulate`:
    port fix, watchdog, retries; ``watchdog`` = its timeout / stall_timeout / retries), output to ``log_path``:
    (exit code, s)."""
    res = run_simulation(job_dir, run_ws, n_clients=sites, threads=threads, log_path=log_path, **watchdog)
    return res.returncode, res.seconds


def log_tail(path: Path, n: int = 8) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("      " + line for line in lines[-n:])


def run_plan(out: Path, plan: dict, variants: list[tuple[dict, Any]], *, rerun: bool, parallel: int,
             threads: int | None, desc: str, simulate: Callable = simulate,
             watchdog: dict | None = None) -> list[tuple[str, str]]:
    """Make ``OUT/jobs|runs|logs``, write ``plan`` (its ``variants`` are the entries of ``variants``: pairs of
    (:func:`variant_entry`, job)) to ``OUT/sweep_plan.json``, reuse the finished runs (unless ``rerun``) and run the
    others (``simulate`` with the ``watchdog`` keyword arguments). [(name, reason)] of the failed runs."""
    for sub in ("jobs", "runs", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    plan = dict(plan, variants=[entry for entry, _ in variants])
    todo = []
    for entry, job in variants:
        run_ws = out / entry["workspace"]
        if not rerun and finished(run_ws, job.summary()):
            print(f"{entry['name']}: finished run found in {run_ws}; reused (--rerun runs it again)")
            continue
        todo.append((entry, job))
    (out / PLAN).write_text(json.dumps(plan, indent=2))
    return _run_all(out, todo, parallel, threads, desc, simulate, watchdog or {})


def _run_all(out: Path, todo: list, parallel: int, threads: int | None, desc: str,
             simulate: Callable, watchdog: dict) -> list[tuple[str, str]]:
    """Run the variants (``parallel`` at a time) with a progress bar; [(name, reason)] of the failed ones."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tqdm.auto import tqdm

    if not todo:
        return []

    def one(entry, job):
        run_ws, log_path = out / entry["workspace"], out / entry["log"]
        if run_ws.exists():  # an unfinished or outdated run of this variant: start it afresh
            shutil.rmtree(run_ws)
        job_dir = job.export(out / "jobs")
        sites = job.min_clients
        rc, seconds = simulate(job_dir, run_ws, log_path, sites, threads or sites, **watchdog)
        ok = rc == 0 and (run_ws / RESULTS / "metrics.json").is_file()
        if ok:
            (run_ws / "variant.json").write_text(json.dumps(canonical(job.summary()), indent=1))
        return entry, rc, seconds, ok

    failures = []
    with ThreadPoolExecutor(max_workers=parallel) as pool, tqdm(total=len(todo), desc=desc, unit="run") as bar:
        futures = [pool.submit(one, entry, job) for entry, job in todo]
        for fut in as_completed(futures):
            entry, rc, seconds, ok = fut.result()
            log_path = out / entry["log"]
            if ok:
                tqdm.write(f"{entry['name']}: done in {seconds:.0f} s (log {log_path})")
            else:
                why = (f"exit code {rc}" if rc != 0 else "no results/metrics.json") + f"; log {log_path}"
                failures.append((entry["name"], why))
                tqdm.write(f"{entry['name']}: FAILED ({why}); last lines:\n{log_tail(log_path)}", file=sys.stderr)
            bar.update(1)
    return failures


def report_failures(failures: list[tuple[str, str]], report_rc: int) -> int:
    """Print the failed runs (after the table); 1 when a run failed or the report found runs without results."""
    for name, msg in failures:
        print(f"FAILED {name}: {msg}", file=sys.stderr)
    return 1 if failures or report_rc else 0


# ---------------------------------------------------------------------- reporting
def load_plan(out: Path, sweep_command: str) -> dict[str, Any]:
    """``OUT/sweep_plan.json`` (with its ``variants`` list); CommandError naming ``sweep_command`` otherwise."""
    plan_file = Path(out) / PLAN
    if not plan_file.is_file():
        raise CommandError(f"{plan_file} not found: {out} is not a sweep folder of {sweep_command} ({sweep_command} "
                           "--out writes it)")
    try:
        plan = json.loads(plan_file.read_text())
        if not isinstance(plan["variants"], list):
            raise TypeError("variants is not a list")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CommandError(f"{plan_file} is not a sweep plan ({e}); run {sweep_command} again") from e
    return plan


def check_report_folder(run: Path, sweep_command: str) -> Path:
    out = run.resolve()
    if not out.is_dir():
        raise CommandError(f"--run {out} is not a folder; give the --out folder of {sweep_command}")
    return out


def fmt(v, spec: str = ".4f") -> str:
    return "n/a" if v is None else format(v, spec)


def pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:+.1f}%"


def footer_lines(summary: dict) -> list[str]:
    """The table's last lines: the settings held fixed and the command that made the sweep."""
    lines = []
    if summary.get("settings"):
        lines += ["", "Held fixed: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in summary["settings"].items()) + "."]
    if summary.get("command"):
        lines += ["", f"Made with: `{summary['command']}`"]
    return lines


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, title: str, out_png: Path) -> Path:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    pyplot().close(fig)
    return out_png


def write_report(out: Path, summary: dict, text: str, plot: Callable, png: str, label: str) -> int:
    """Write ``summary`` to ``OUT/sweep.json``, ``text`` to ``OUT/table.md`` and ``plot(summary, OUT/png)``; print
    the table; 1 when a planned run has no results (a row whose status is not ``ok...``)."""
    (out / "sweep.json").write_text(json.dumps(summary, indent=2))
    (out / "table.md").write_text(text)
    plot(summary, out / png)
    print(text)
    print(f"{label}: {out / 'table.md'}, {out / 'sweep.json'}, {out / png}")
    missing = [r["name"] for r in summary["rows"] if not r["status"].startswith("ok")]
    if missing:
        print(f"runs without results: {missing} (see {out / 'logs'})", file=sys.stderr)
    return 1 if missing else 0
