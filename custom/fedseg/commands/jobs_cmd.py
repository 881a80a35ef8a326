"""`fedseg jobs list|export`: the job folders under jobs/ are exported from fedseg.jobs.recipes."""

from __future__ import annotations

import json
from pathlib import Path


def _default_jobs_dir() -> Path:
    # the repository's jobs/ folder when run from a checkout, else ./jobs
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").exists() and (parent / "jobs").is_dir():
            return parent / "jobs"
    return Path.cwd() / "jobs"


def parse_sets(items: list[str]) -> dict:
    """``--set KEY=VALUE`` options -> {KEY: VALUE}; VALUE is parsed as JSON, else kept as a bare string."""
    from fedseg.errors import CommandError

    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise CommandError(f"--set takes KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw  # a bare string such as sd_utnet
    return out


def register(subparsers):
    p = subparsers.add_parser("jobs", help="list or export the FLARE job folders (jobs/) from their Python recipes")
    sub = p.add_subparsers(dest="jobs_command", metavar="ACTION")
    sub.required = True
    ls = sub.add_parser("list", help="list the jobs with a one-line description")
    ls.set_defaults(func=run_list)
    ex = sub.add_parser("export", help="write job folders (default: all jobs into the repository's jobs/)")
    ex.add_argument("names", nargs="*", help="job names (default: all)")
    ex.add_argument("--out", type=Path, default=None, help="target folder (default: the repository's jobs/)")
    ex.add_argument("--check", action="store_true", help="only compare the folders with a fresh export; exit 1 if they differ")
    ex.add_argument("--no-byoc", action="store_true",
                    help="omit app/custom (for sites that allow 'fedseg.' in class_allow_list instead of BYOC)")
    ex.add_argument("--model", default=None, help="export with another model (e.g. sd_utnet) and its preset size")
    ex.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override a job setting, e.g. --set num_rounds=3 --set data_args.fold=2 (repeatable)")
    ex.set_defaults(func=run_export)


def run_list(args) -> int:
    from fedseg.jobs.recipes import JOBS

    width = max(len(n) for n in JOBS)
    for name, job in JOBS.items():
        print(f"{name:<{width}}  {job.description}")
    return 0


def run_export(args) -> int:
    from fedseg.cli import CommandError
    from fedseg.jobs.recipes import JOBS, diff_against, override

    out = args.out or _default_jobs_dir()
    unknown = [n for n in args.names if n not in JOBS]
    if unknown:
        raise CommandError(f"unknown job(s) {unknown}; known: {sorted(JOBS)}")
    variant = bool(args.model or args.set)
    if variant and args.out is None:
        raise CommandError("--model/--set make a variant of a committed job: give --out so jobs/ stays as its recipes say")
    if args.check and variant:
        raise CommandError("--check compares committed jobs with their recipes; it takes no --model/--set")
    if args.check:
        problems = diff_against(out)
        if args.names:
            problems = {k: v for k, v in problems.items() if k.split("/")[0] in args.names}
        for k, v in sorted(problems.items()):
            print(f"{out / k}: {v}")
        if problems:
            print("job folders are out of date: run `fedseg jobs export`")
            return 1
        print(f"job folders in {out} match their recipes")
        return 0
    assignments = parse_sets(args.set)
    for name in args.names or list(JOBS):
        job = JOBS[name]
        try:
            if args.model:
                job = job.with_model(args.model)
            job = override(job, assignments)
        except (ValueError, TypeError) as e:
            raise CommandError(str(e)) from e
        path = job.export(out, byoc=not args.no_byoc)
        print(f"exported {name} -> {path}")
    return 0
