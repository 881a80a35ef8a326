"""`fedseg privacy sweep|report`: the privacy-utility experiment (paper 003) as one command.

``sweep`` builds one variant of a job per (method, epsilon) with :func:`fedseg.jobs.recipes.override`
(``dp="none"`` once, ``dp="fixed"`` / ``dp="adaptive"`` at every ``--epsilons`` value, all other DP settings from the
job and ``--set``), exports each to ``OUT/jobs/<variant>``, runs ``nvflare simulator`` for each (``--parallel`` at a
time, one log per run in ``OUT/logs/``) and then writes the table and the plot (the ``report`` step):

- ``OUT/sweep.json``: per variant the method, epsilon, status, the test centre's and the site mean's Dice / DiceS /
  DiceL, the epsilon spent per round and in total (largest over sites), and the relative gap to the non-private run;
- ``OUT/table.md``: the same as a table, with the settings that were held fixed and the command;
- ``OUT/privacy_utility.png``: Dice and DiceS against the per-round epsilon (log x), one line per DP method, the
  non-private run as a horizontal line.

An interrupted sweep resumes: a variant whose run finished with the same job settings (``OUT/runs/<variant>/
variant.json``) is reused, not re-run (``--rerun`` re-runs everything). A failed run is reported with its exit code
and log, kept in the table as failed, and makes the command exit 1 after the table is written. The runs inherit the
environment (``FEDSEG_DATA_CONFIG`` points them at real data; without it the built-in synthetic data is used).

``report --run OUT`` redoes the table and plot from the runs in ``OUT`` (``OUT/sweep_plan.json``, written by sweep).
The running, reuse and report-writing machinery is :mod:`fedseg.commands.sweep_runner` (shared with
``fedseg security sweep``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedseg.commands import sweep_runner
from fedseg.commands.jobs_cmd import parse_sets
from fedseg.commands.sweep_runner import PLAN, RESULTS  # noqa: F401  (re-exported: the tests' folder layout)
from fedseg.commands.sweep_runner import fmt as _f
from fedseg.commands.sweep_runner import pct as _pct
from fedseg.commands.sweep_runner import simulate as _simulate  # module attribute: tests pass a stand-in
from fedseg.errors import CommandError

METHODS = ("none", "fixed", "adaptive")
MECHANISMS = ("laplace", "gaussian")
KEYS = (("dice", "Dice"), ("dice_s", "DiceS"), ("dice_l", "DiceL"))
METHOD_LABELS = {"none": "non-private", "fixed": "DP, fixed clipping", "adaptive": "DP, adaptive clipping"}


def register(subparsers):
    p = subparsers.add_parser("privacy", help="privacy-utility sweep of a job over epsilon (non-private, fixed-clip "
                              "DP, adaptive DP) with nvflare simulator; table and plot")
    sub = p.add_subparsers(dest="privacy_command", metavar="ACTION")
    sub.required = True
    sw = sub.add_parser("sweep", help="run the job for every method and epsilon, then write sweep.json, table.md "
                        "and privacy_utility.png")
    sw.add_argument("--job", required=True, help="job name (fedseg jobs list), e.g. fedgs_lits")
    sw.add_argument("--epsilons", type=float, nargs="+", default=[],
                    help="per-round epsilons of the update noise (the DP methods run once per value)")
    sw.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                    help="none (non-private, run once), fixed (fixed clipping), adaptive (noisy-quantile clipping)")
    sw.add_argument("--mechanism", choices=MECHANISMS, default=None,
                    help="noise mechanism (default: the job's dp_mechanism, laplace unless set)")
    sweep_runner.add_run_arguments(sw, "--set num_rounds=5 --set dp_clip_init=100")
    sw.set_defaults(func=run_sweep)
    rp = sub.add_parser("report", help="write sweep.json, table.md and privacy_utility.png from a sweep's runs")
    rp.add_argument("--run", type=Path, required=True, help="the sweep folder (the --out of fedseg privacy sweep)")
    rp.set_defaults(func=run_report)


# ---------------------------------------------------------------------- planning
def variant_name(method: str, epsilon: float | None) -> str:
    """``none`` / ``fixed_eps10`` / ``adaptive_eps0p5`` / ``adaptive_eps1e06``: a folder- and job-safe name."""
    if method == "none":
        return "none"
    tag = format(float(epsilon), "g").replace(".", "p").replace("+", "").replace("-", "m")
    return f"{method}_eps{tag}"


def plan_variants(job_name: str, methods: list[str], epsilons: list[float], mechanism: str | None,
                  assignments: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per run: {"name", "method", "epsilon", "job"} with ``job`` the SegJob variant. Raises CommandError
    on arguments that cannot make a sweep (unknown job, epsilon <= 0, no epsilons for a DP method, an HE job,
    a setting the job or the DP mechanism refuses)."""
    from fedseg.jobs.recipes import JOBS, override

    if job_name not in JOBS:
        raise CommandError(f"unknown job {job_name!r}; known: {sorted(JOBS)}")
    methods = list(dict.fromkeys(methods))  # keep the order, drop repeats
    if not methods:
        raise CommandError("--methods needs at least one of " + ", ".join(METHODS))
    bad = [e for e in epsilons if not (math.isfinite(e) and e > 0)]
    if bad:
        raise CommandError(f"--epsilons must be positive finite numbers, got {bad}")
    dp_methods = [m for m in methods if m != "none"]
    if dp_methods and not epsilons:
        raise CommandError(f"--methods {' '.join(dp_methods)} need --epsilons (the per-round epsilons to sweep)")
    for key in ("dp", "dp_epsilon", "name"):
        if key in assignments:
            raise CommandError(f"--set {key}=... is what the sweep varies (--methods / --epsilons); leave it out")
    try:
        base = override(JOBS[job_name], assignments)
        if mechanism:
            base = override(base, {"dp_mechanism": mechanism})
    except (ValueError, TypeError) as e:
        raise CommandError(str(e)) from e
    if getattr(base, "he", False):
        raise CommandError(f"job {job_name} uses HE: every run would need TenSEAL contexts in its workspace. Sweep "
                           "its plaintext twin (HE does not change the DP noise or the accuracy beyond CKKS error)")
    if getattr(base, "secure_aggregation", "none") != "none":
        raise CommandError(f"job {job_name} uses secure_aggregation={base.secure_aggregation!r}; the DP filter "
                           "protects plaintext WEIGHT_DIFF updates: sweep a plaintext job")
    variants = []
    for method in methods:
        for eps in ([None] if method == "none" else sorted(set(epsilons))):
            name = variant_name(method, eps)
            changes: dict[str, Any] = {"dp": method, "name": f"{job_name}_{name}"}
            if eps is not None:
                changes["dp_epsilon"] = float(eps)
            try:
                job = override(base, changes)
            except (ValueError, TypeError) as e:
                raise CommandError(f"variant {name}: {e}") from e
            if method != "none":
                _check_dp(job, name)
            variants.append({"name": name, "method": method, "epsilon": eps, "job": job})
    return variants


def _check_dp(job, name: str) -> None:
    """The DP settings of a variant, checked now rather than by every site at the start of its run."""
    from fedseg.algorithms.adaptive_dp import DPConfig
    from fedseg.errors import ConfigError

    try:
        DPConfig(mechanism=job.dp_mechanism, epsilon=job.dp_epsilon, delta=job.dp_delta, clipping=job.dp,
                 clip_init=job.dp_clip_init, percentile=job.dp_percentile, quantile_epsilon=job.dp_quantile_epsilon,
                 clip_lr=job.dp_clip_lr, per_layer=job.dp_per_layer, adjacency=job.dp_adjacency).validate()
    except ConfigError as e:
        raise CommandError(f"variant {name}: {e}") from e


# ---------------------------------------------------------------------- running
def sweep_command(args) -> str:
    """The sweep's command line (for the table), rebuilt from its arguments."""
    parts = ["fedseg", "privacy", "sweep", "--job", args.job]
    if args.epsilons:
        parts += ["--epsilons", *(format(e, "g") for e in args.epsilons)]
    parts += ["--methods", *args.methods]
    if args.mechanism:
        parts += ["--mechanism", args.mechanism]
    return sweep_runner.quote_command(parts + sweep_runner.run_arguments_command(args))


def run_sweep(args) -> int:
    out = sweep_runner.check_run_arguments(args)
    variants = plan_variants(args.job, args.methods, args.epsilons, args.mechanism, parse_sets(args.set))
    plan = {"job": args.job, "command": sweep_command(args), "settings": _fixed_settings(variants[0]["job"])}
    entries = [(sweep_runner.variant_entry(v["name"], v["job"], method=v["method"], epsilon=v["epsilon"]), v["job"])
               for v in variants]
    failures = sweep_runner.run_plan(out, plan, entries, rerun=args.rerun, parallel=args.parallel,
                                     threads=args.threads, desc="privacy sweep", simulate=_simulate,
                                     watchdog=sweep_runner.watchdog_kwargs(args))
    return sweep_runner.report_failures(failures, report(out))


# ---------------------------------------------------------------------- the table and the plot
def _fixed_settings(job) -> dict[str, Any]:
    keys = ("num_rounds", "min_clients", "local_epochs", "max_steps_per_round", "model", "model_args", "data_args",
            "dp_mechanism", "dp_delta", "dp_clip_init", "dp_percentile", "dp_quantile_epsilon", "dp_clip_lr",
            "dp_per_layer", "dp_adjacency", "dp_budget_epsilon")
    return {k: getattr(job, k) for k in keys if hasattr(job, k)}


def _privacy_of(metrics: dict, results_dir: Path) -> dict | None:
    privacy = metrics.get("privacy")
    if privacy is None and (results_dir / "privacy.json").is_file():
        privacy = json.loads((results_dir / "privacy.json").read_text())
    return privacy


def collect(out: Path) -> dict[str, Any]:
    """Read every planned variant's results: {"job", "settings", "rows": [...], "reference": name or None}."""
    out = Path(out)
    plan = sweep_runner.load_plan(out, "fedseg privacy sweep")
    variants = plan["variants"]
    from fedseg.results import site_means

    rows = []
    for v in variants:
        results_dir = out / v["workspace"] / RESULTS
        row = {k: v.get(k) for k in ("name", "method", "epsilon", "sites", "num_rounds")}
        row.update(status="missing", test=None, site_mean=None, epsilon_round=None, epsilon_total=None,
                   delta_total=None, rounds_released=None, log=v.get("log"), results=str(results_dir))
        metrics_file = results_dir / "metrics.json"
        if metrics_file.is_file():
            metrics = json.loads(metrics_file.read_text())
            row["status"] = "ok"
            test = metrics.get("test_centre")
            row["test"] = {k: test.get(k) for k, _ in KEYS} if test else None
            sites = metrics.get("sites") or {}
            if sites:
                mean = site_means(sites)["global"]
                row["site_mean"] = {k: mean.get(k) for k, _ in KEYS}
            privacy = _privacy_of(metrics, results_dir)
            per_site = (privacy or {}).get("per_site") or {}
            done = [r for r in per_site.values() if r.get("rounds")]
            if done:  # the largest over sites: the guarantee every site has
                row["epsilon_round"] = max(float(r.get("epsilon_round") or 0) for r in done)
                row["epsilon_total"] = max(float(r.get("epsilon_total") or 0) for r in done)
                row["delta_total"] = max(float(r.get("delta_total") or 0) for r in done)
                row["rounds_released"] = max(int(r.get("rounds") or 0) for r in done)
            elif row["method"] != "none":
                row["status"] = "ok, no privacy record"
        elif (out / v["workspace"]).exists():
            row["status"] = "failed"
        rows.append(row)
    ref = next((r for r in rows if r["method"] == "none" and r["status"].startswith("ok")), None)
    for row in rows:
        row["gap"] = {}
        for where in ("test", "site_mean"):
            for k, _ in KEYS:
                mine = (row.get(where) or {}).get(k)
                base = ((ref or {}).get(where) or {}).get(k)
                gap = (mine - base) / base if mine is not None and base not in (None, 0) else None
                row["gap"][f"{where}.{k}"] = gap
    return {"job": plan.get("job"), "command": plan.get("command"), "settings": plan.get("settings", {}),
            "reference": ref["name"] if ref else None, "rows": rows}


def markdown(summary: dict) -> str:
    rows = summary["rows"]
    settings = summary.get("settings") or {}
    head = ("| method | epsilon / round (noise) | epsilon / round (with quantile) | epsilon total (rounds) | "
            "test Dice | test DiceS | test DiceL | site-mean Dice | site-mean DiceS | site-mean DiceL | "
            "gap Dice | gap DiceS | status |")
    lines = [f"# Privacy-utility sweep: {summary.get('job')} ({settings.get('dp_mechanism', 'laplace')} mechanism)\n",
             head, "|---" * 13 + "|"]
    order = {m: i for i, m in enumerate(METHODS)}
    for r in sorted(rows, key=lambda r: (order.get(r["method"], 9), r["epsilon"] or 0)):
        test, mean = r.get("test") or {}, r.get("site_mean") or {}
        # the gap of the test centre's metric when the run has one, else of the site mean
        where = "test" if r.get("test") else "site_mean"
        total = "-" if r["method"] == "none" else \
            f"{_f(r.get('epsilon_total'), '.6g')} ({r.get('rounds_released') if r.get('rounds_released') else '?'})"
        lines.append(
            f"| {METHOD_LABELS.get(r['method'], r['method'])} | "
            f"{'-' if r['epsilon'] is None else format(r['epsilon'], 'g')} | "
            f"{'-' if r['method'] == 'none' else _f(r.get('epsilon_round'), '.6g')} | {total} | "
            + " | ".join(_f(test.get(k)) for k, _ in KEYS) + " | " + " | ".join(_f(mean.get(k)) for k, _ in KEYS)
            + f" | {_pct(r['gap'].get(f'{where}.dice'))} | {_pct(r['gap'].get(f'{where}.dice_s'))} | {r['status']} |")
    ref = summary.get("reference")
    lines.append("")
    lines.append("epsilon / round (noise): the epsilon of the update's noise (the swept value); with quantile: plus "
                 "the noisy-quantile estimate of adaptive clipping, i.e. what one round costs a site; epsilon total: "
                 "the accountant's total over the released rounds (largest over sites). Site mean: unweighted mean "
                 "over sites of each site's held-out part. Gap: relative difference to the non-private run "
                 + (f"({ref})" if ref else "(not available: no finished non-private run)")
                 + " of the test-centre metric (of the site mean when the run has no test centre).")
    return "\n".join(lines + sweep_runner.footer_lines(summary)) + "\n"


def plot(summary: dict, out_png: Path) -> Path:
    """Dice and DiceS against the per-round epsilon (log x): one line per DP method, the non-private run flat."""
    plt = sweep_runner.pyplot()
    rows = [r for r in summary["rows"] if r["status"].startswith("ok")]
    use_test = any(r.get("test") for r in rows)
    where = "test" if use_test else "site_mean"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], KEYS[:2]):
        for method, style in (("fixed", "s--"), ("adaptive", "o-")):
            pts = sorted((r["epsilon"], (r.get(where) or {}).get(key)) for r in rows
                         if r["method"] == method and (r.get(where) or {}).get(key) is not None)
            if pts:
                ax.plot(*zip(*pts), style, label=METHOD_LABELS[method])
        ref = next((r for r in rows if r["method"] == "none"), None)
        if ref and (ref.get(where) or {}).get(key) is not None:
            ax.axhline(ref[where][key], color="k", ls=":", label=METHOD_LABELS["none"])
        ax.set_xscale("log")
        ax.set_xlabel("epsilon per round (update noise)")
        ax.set_ylabel(f"{label} ({'test centre' if use_test else 'mean over sites'})")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return sweep_runner.save_figure(fig, f"{summary.get('job')}: privacy vs utility", out_png)


def report(out: Path) -> int:
    """Write sweep.json, table.md and privacy_utility.png in ``out``; 1 when a planned run has no results."""
    summary = collect(Path(out))
    return sweep_runner.write_report(Path(out), summary, markdown(summary), plot, "privacy_utility.png",
                                     "privacy sweep")


def run_report(args) -> int:
    return report(sweep_runner.check_report_folder(args.run, "fedseg privacy sweep"))
