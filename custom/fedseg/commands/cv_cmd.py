"""`fedseg cv JOB`: k-fold cross-validation through `nvflare simulator` (fedseg's runner: port fix, watchdog,
retries), one run per fold.

Each fold's run keeps its best global model by validation Dice (BestModelKeeper) and evaluates it on the test
centre; the summary reports the test-centre Dice / DiceS / DiceL of those best checkpoints as mean +- std over folds
(sample standard deviation, ddof = 1), as in the FedGS paper's PolypGen results.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from fedseg.commands.jobs_cmd import parse_sets
from fedseg.commands.simulate_cmd import add_watchdog_arguments, watchdog_kwargs
from fedseg.errors import CommandError
from fedseg.simulation import simulate

KEYS = ("dice", "dice_s", "dice_l")


def register(subparsers):
    p = subparsers.add_parser("cv", help="k-fold cross-validation of a job with nvflare simulator (one run per fold)")
    p.add_argument("job", help="job name (fedseg jobs list), e.g. fedgs_polypgen")
    p.add_argument("--workspace", type=Path, required=True, help="folder for the fold runs and the summary")
    p.add_argument("--model", default=None, help="segmentation model (e.g. utnet, sd_utnet); default: the job's")
    p.add_argument("--folds", default=None, help="comma-separated folds to run (default: all n_folds)")
    p.add_argument("--n-folds", type=int, default=5)
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="override a job setting (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="simulator threads (default: one per site)")
    add_watchdog_arguments(p)
    p.set_defaults(func=run)


def summarize_folds(per_fold: dict) -> dict:
    """{fold: {"dice":..}} -> {"dice": {"mean", "std", "values"}, ...} with sample std (ddof = 1)."""
    import numpy as np

    out = {}
    for k in KEYS:
        vals = [m[k] for m in per_fold.values() if m and m.get(k) is not None]
        arr = np.asarray(vals, dtype=np.float64)
        out[k] = {"mean": float(arr.mean()) if arr.size else None,
                  "std": float(arr.std(ddof=1)) if arr.size > 1 else (0.0 if arr.size else None),
                  "values": vals}
    return out


def run(args) -> int:
    from fedseg.jobs.recipes import JOBS, override

    if args.job not in JOBS:
        raise CommandError(f"unknown job {args.job!r}; known: {sorted(JOBS)}")
    job = JOBS[args.job]
    if "fold" not in job.data_args:
        raise CommandError(f"job {args.job} has no folds (data_args has no 'fold'); cross-validation needs a "
                           "dataset split into folds, e.g. fedgs_polypgen")
    try:
        if args.model:
            job = job.with_model(args.model)
        job = override(job, parse_sets(args.set))
    except (ValueError, TypeError) as e:
        raise CommandError(str(e)) from e
    folds = [int(f) for f in args.folds.split(",")] if args.folds else list(range(args.n_folds))
    bad = [f for f in folds if not 0 <= f < args.n_folds]
    if bad:
        raise CommandError(f"folds {bad} are outside 0..{args.n_folds - 1}")
    watchdog = watchdog_kwargs(args)
    ws = args.workspace.resolve()
    ws.mkdir(parents=True, exist_ok=True)
    sites = job.min_clients
    threads = args.threads or sites
    per_fold, runs = {}, {}
    for i, fold in enumerate(folds):
        assign = {"data_args.fold": fold}
        if args.n_folds != 5:
            assign["data_args.n_folds"] = args.n_folds
        fold_job = override(job, assign)
        job_dir = fold_job.export(ws / "jobs" / f"fold{fold}")
        run_ws = ws / f"fold{fold}"
        log_path = ws / f"fold{fold}.log"
        print(f"[{i + 1}/{len(folds)}] fold {fold}: nvflare simulator {job_dir} ({sites} sites, "
              f"{fold_job.num_rounds} rounds) -> log {log_path}", flush=True)
        t0 = time.perf_counter()
        res = simulate(job_dir, run_ws, n_clients=sites, threads=threads, log_path=log_path, **watchdog)
        metrics_file = run_ws / "server" / "simulate_job" / "results" / "metrics.json"
        if not res.ok or not metrics_file.is_file():
            raise CommandError(f"fold {fold} failed ({res.describe()}); see {log_path}")
        metrics = json.loads(metrics_file.read_text())
        best = metrics.get("best") or {}
        chosen = best.get("test_centre") or metrics.get("test_centre")
        if chosen is None:
            raise CommandError(f"fold {fold}: no test-centre result in {metrics_file} (does the server see the test data?)")
        per_fold[fold] = chosen
        runs[fold] = {"results": str(metrics_file.parent), "best_round": best.get("round"),
                      "best_val_dice": best.get("val_dice"), "final_test": metrics.get("test_centre")}
        print(f"    fold {fold}: best round {best.get('round')} (val Dice {best.get('val_dice') or 0:.4f}) -> test "
              + ", ".join(f"{k} {chosen[k]:.4f}" if chosen.get(k) is not None else f"{k} n/a" for k in KEYS)
              + f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
    summary = summarize_folds(per_fold)
    out = {"job": args.job, "dataset": job.dataset, "model": job.model, "aggregation": job.aggregation,
           "folds": folds, "n_folds": args.n_folds, "per_fold": per_fold, "runs": runs, "summary": summary,
           "config": job.summary(), "std": "sample standard deviation over folds (ddof = 1)"}
    (ws / "cv_summary.json").write_text(json.dumps(out, indent=2))
    lines = [f"# {args.job} ({job.model}, {job.aggregation}): {len(folds)}-fold cross-validation\n",
             "| metric | mean +- std | per fold |", "|---|---|---|"]
    for k, label in zip(KEYS, ("Dice", "DiceS", "DiceL")):
        s = summary[k]
        mean = f"{s['mean']:.4f} +- {s['std']:.4f}" if s["mean"] is not None else "n/a"
        lines.append(f"| {label} | {mean} | {', '.join(f'{v:.4f}' for v in s['values'])} |")
    (ws / "cv_summary.md").write_text("\n".join(lines) + "\n\nTest centre, best checkpoint of each fold by "
                                      "validation Dice.\n")
    print("\n".join(lines[1:]))
    print(f"cross-validation summary: {ws / 'cv_summary.json'}")
    return 0
