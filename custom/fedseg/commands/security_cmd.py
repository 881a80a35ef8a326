"""`fedseg security sweep|report`: the attack x defence experiment of robust aggregation (paper 002) as one command.

``sweep`` builds one variant of a job per (attack, defence) with :func:`fedseg.jobs.recipes.override`: ``attack``
from ``--attacks`` (``none`` = the clean runs, ``scale`` = model replacement x ``attack_gamma``, ``noise``,
``mask_flip`` = the attackers train on flipped masks) at ``--attack-sites`` (default: the job's), ``robust_rule``
from ``--defences`` (``none`` = FedGS's steps-weighted mean) with the rule's default parameters for the job's site
count (:func:`default_rule_args`; ``--set robust_args.KEY=VALUE`` changes them for the rules that take KEY). Each
variant is exported to ``OUT/jobs/<job>_<attack>__<defence>`` and run with ``nvflare simulator``
(:mod:`fedseg.commands.sweep_runner`: ``--parallel`` at a time, logs in ``OUT/logs/``, finished runs reused, failed
runs reported and exit 1), then the report is written:

- ``OUT/sweep.json``: per variant the attack, defence, rule parameters, status, the test centre's Dice / DiceS /
  DiceL of the final and of the best (by validation Dice) global model, the site mean, the Dice drop against the
  clean run with the same defence and against the clean run without defence, and from the server's log lines of the
  robust aggregator (``round R: <rule> kept [...], rejected site: reason; ...``) the rounds each attacker was
  rejected and the honest sites' wrong rejections;
- ``OUT/table.md``: the same as tables (one row per run, and a Dice grid attack x defence), with the settings held
  fixed and the command;
- ``OUT/attack_defence.png``: grouped bars of Dice and DiceS per attack, one bar per defence.

The drops are absolute (Dice points, ``clean - attacked``; positive = the attack hurt). ``report --run OUT`` redoes
the report from the runs in ``OUT``. The runs inherit the environment (``FEDSEG_DATA_CONFIG`` points them at real
data; without it the built-in synthetic data is used).
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any

from fedseg.commands import sweep_runner
from fedseg.commands.jobs_cmd import parse_sets
from fedseg.commands.sweep_runner import RESULTS, fmt
from fedseg.commands.sweep_runner import simulate as _simulate  # module attribute: tests pass a stand-in
from fedseg.errors import CommandError

ATTACKS = ("none", "scale", "noise", "mask_flip")
DEFENCES = ("none", "median", "trimmed_mean", "krum", "multi_krum", "norm_screening")
KEYS = (("dice", "Dice"), ("dice_s", "DiceS"), ("dice_l", "DiceL"))
ATTACK_LABELS = {"none": "clean", "scale": "model replacement", "noise": "noise", "mask_flip": "mask flip"}
SWEEP = "fedseg security sweep"
# varied by the sweep (or fixed per variant): refused in --set
VARIED = ("name", "attack", "robust_rule", "robust_args")


def register(subparsers):
    p = subparsers.add_parser("security", help="attack x defence sweep of a job (simulated poisoning vs robust "
                              "aggregation) with nvflare simulator; table and plot")
    sub = p.add_subparsers(dest="security_command", metavar="ACTION")
    sub.required = True
    sw = sub.add_parser("sweep", help="run the job for every attack and defence, then write sweep.json, table.md "
                        "and attack_defence.png")
    sw.add_argument("--job", required=True, help="job name (fedseg jobs list), e.g. fedgs_lits_robust")
    sw.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS,
                    help="none (clean), scale (model replacement x attack_gamma), noise (Gaussian noise in place of "
                    "the update, attack_noise_scale x its norm), mask_flip (the attackers train on flipped masks)")
    sw.add_argument("--defences", nargs="+", default=["none", "median", "trimmed_mean", "krum", "norm_screening"],
                    choices=DEFENCES, help="robust aggregation rules; none = FedGS's steps-weighted mean")
    sw.add_argument("--attack-sites", nargs="+", default=None, metavar="SITE",
                    help="the attacking sites (default: the job's attack_sites)")
    sweep_runner.add_run_arguments(sw, "--set num_rounds=5 --set attack_gamma=10 --set robust_args.factor=2")
    sw.set_defaults(func=run_sweep)
    rp = sub.add_parser("report", help="write sweep.json, table.md and attack_defence.png from a sweep's runs")
    rp.add_argument("--run", type=Path, required=True, help="the sweep folder (the --out of fedseg security sweep)")
    rp.set_defaults(func=run_report)


# ---------------------------------------------------------------------- planning
def variant_name(attack: str, defence: str) -> str:
    """``none__none``, ``mask_flip__norm_screening``: attack and defence, folder- and job-safe."""
    return f"{attack}__{defence}"


def default_rule_args(rule: str, n_sites: int, n_attackers: int) -> dict[str, Any]:
    """Rule parameters that tolerate the attackers where the site count allows it (fedseg.algorithms.robust):

    - median: none; trimmed mean: ``beta = max(1, a) / n`` (trims exactly the attackers' count per side; must stay
      < 0.5, else CommandError);
    - Krum: ``f = min(max(1, a), (n - 3) // 2)`` (Krum needs ``n >= 2f + 3``: f = 0 with 4 sites, which still
      selects the single most central update);
    - Multi-Krum: the same f and ``m = n - max(1, a)`` selected updates (drops as many as there are attackers);
    - norm screening: ``factor = 3`` (the job's default; rejects updates above 3 x the median norm).
    """
    a = max(1, n_attackers)
    if rule in ("none", "median"):
        return {}
    if rule == "trimmed_mean":
        beta = a / n_sites
        if beta >= 0.5:
            raise CommandError(f"trimmed_mean: {a} attacker(s) of {n_sites} sites need beta = {beta:g} >= 0.5 "
                               "(more than a minority); use fewer --attack-sites or more sites")
        return {"beta": beta}
    f = max(0, min(a, (n_sites - 3) // 2))
    if rule == "krum":
        return {"f": f}
    if rule == "multi_krum":
        return {"f": f, "m": max(1, min(n_sites - a, n_sites - f))}
    if rule == "norm_screening":
        return {"factor": 3.0}
    raise CommandError(f"unknown defence {rule!r}; choose from {list(DEFENCES)}")


def _rule_params(rule: str) -> set[str]:
    from fedseg.algorithms.robust import RULES

    return set(inspect.signature(RULES[rule].__init__).parameters) - {"self"}


def _check_rule(rule: str, args: dict, n_sites: int, name: str) -> None:
    """Build the rule and aggregate ``n_sites`` dummy updates: parameter and site-count errors now, not in round 0."""
    import numpy as np

    from fedseg.algorithms.robust import make_rule
    from fedseg.errors import ConfigError

    try:
        make_rule(rule, **args).aggregate({f"site-{i + 1}": {"w": np.full(2, float(i))} for i in range(n_sites)})
    except ConfigError as e:
        raise CommandError(f"variant {name}: {e}") from e


def plan_variants(job_name: str, attacks: list[str], defences: list[str], attack_sites: list[str] | None,
                  assignments: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per run: {"name", "attack", "defence", "rule_args", "job"} with ``job`` the SegJob variant.
    CommandError on arguments that cannot make a sweep (unknown job, attack or defence, a job without the robust
    settings, HE / secure aggregation, attack sites that are no site of the job, a rule the site count refuses)."""
    from fedseg.jobs.recipes import JOBS, SegJob, override

    if job_name not in JOBS:
        raise CommandError(f"unknown job {job_name!r}; known: {sorted(JOBS)}")
    attacks, defences = list(dict.fromkeys(attacks)), list(dict.fromkeys(defences))  # keep the order, drop repeats
    for what, given, known in (("attack", attacks, ATTACKS), ("defence", defences, DEFENCES)):
        if not given:
            raise CommandError(f"--{what}s needs at least one of " + ", ".join(known))
        bad = [x for x in given if x not in known]
        if bad:
            raise CommandError(f"unknown {what}(s) {bad}; choose from {list(known)}")
    fields = ("robust_rule", "robust_args", "attack", "attack_sites")
    missing = [f for f in fields if f not in SegJob.__dataclass_fields__]
    if missing:
        raise CommandError(f"job {job_name} has no robust-aggregation / attack settings {missing}")
    rule_sets = {k: v for k, v in assignments.items() if k.startswith("robust_args.")}
    for key in assignments:
        if key in VARIED:
            raise CommandError(f"--set {key}=... is what the sweep varies (--attacks / --defences"
                               + (" and robust_args.KEY=VALUE for one parameter" if key == "robust_args" else "")
                               + "); leave it out")
    if attack_sites is not None and "attack_sites" in assignments:
        raise CommandError("give the attackers once: --attack-sites or --set attack_sites=..., not both")
    try:
        base = override(JOBS[job_name], {k: v for k, v in assignments.items() if k not in rule_sets})
        if attack_sites is not None:
            base = override(base, {"attack_sites": list(attack_sites)})
    except (ValueError, TypeError) as e:
        raise CommandError(str(e)) from e
    if getattr(base, "he", False) or getattr(base, "secure_aggregation", "none") != "none":
        raise CommandError(f"job {job_name} encrypts its updates (HE / secure aggregation): a robust rule needs "
                           "plaintext updates at the server; sweep its plaintext twin")
    n_sites = int(base.min_clients)
    sites = list(base.attack_sites or [])
    if any(a != "none" for a in attacks):
        if not sites:
            raise CommandError(f"job {job_name} names no attack_sites: give --attack-sites (e.g. site-{n_sites})")
        known = {f"site-{i}" for i in range(1, n_sites + 1)}
        unknown = [s for s in sites if s not in known]
        if unknown:
            raise CommandError(f"attack sites {unknown} (--attack-sites, else the job's attack_sites) are no site "
                               f"of the job's {n_sites} simulated sites "
                               f"(site-1 ... site-{n_sites})")
        if 2 * len(sites) >= n_sites:
            raise CommandError(f"{len(sites)} attackers of {n_sites} sites is no minority: no robust rule is meant "
                               "to hold against that")
    for key in rule_sets:
        param = key.partition(".")[2]
        if not any(param in _rule_params(d) for d in defences if d != "none"):
            raise CommandError(f"--set {key}: no swept defence takes {param!r} (parameters: "
                               + ", ".join(f"{d}: {sorted(_rule_params(d))}" for d in defences if d != "none") + ")")
    variants = []
    for attack in attacks:
        for defence in defences:
            name = variant_name(attack, defence)
            rule_args = default_rule_args(defence, n_sites, len(sites))
            if defence != "none":
                params = _rule_params(defence)
                given = {k.partition(".")[2]: v for k, v in rule_sets.items()}
                rule_args.update({k: v for k, v in given.items() if k in params})
                _check_rule(defence, rule_args, n_sites, name)
            changes = {"name": f"{job_name}_{name}", "attack": attack, "robust_rule": defence,
                       "robust_args": rule_args or None}
            try:
                job = override(base, changes)
            except (ValueError, TypeError) as e:
                raise CommandError(f"variant {name}: {e}") from e
            variants.append({"name": name, "attack": attack, "defence": defence, "rule_args": rule_args,
                             "job": job})
    return variants


# ---------------------------------------------------------------------- running
def sweep_command(args) -> str:
    """The sweep's command line (for the table), rebuilt from its arguments."""
    parts = ["fedseg", "security", "sweep", "--job", args.job, "--attacks", *args.attacks,
             "--defences", *args.defences]
    if args.attack_sites:
        parts += ["--attack-sites", *args.attack_sites]
    return sweep_runner.quote_command(parts + sweep_runner.run_arguments_command(args))


def _fixed_settings(job) -> dict[str, Any]:
    keys = ("num_rounds", "min_clients", "local_epochs", "max_steps_per_round", "lr", "aggregation", "model",
            "model_args", "data_args", "attack_sites", "attack_gamma", "attack_noise_scale", "robust_weighted",
            "min_accepted", "seed")
    return {k: getattr(job, k) for k in keys if hasattr(job, k)}


def run_sweep(args) -> int:
    out = sweep_runner.check_run_arguments(args)
    variants = plan_variants(args.job, args.attacks, args.defences, args.attack_sites, parse_sets(args.set))
    plan = {"job": args.job, "command": sweep_command(args), "settings": _fixed_settings(variants[0]["job"])}
    entries = [(sweep_runner.variant_entry(v["name"], v["job"], attack=v["attack"], defence=v["defence"],
                                           rule_args=v["rule_args"], attack_sites=list(v["job"].attack_sites or [])),
                v["job"]) for v in variants]
    failures = sweep_runner.run_plan(out, plan, entries, rerun=args.rerun, parallel=args.parallel,
                                     threads=args.threads, desc="security sweep", simulate=_simulate,
                                     watchdog=sweep_runner.watchdog_kwargs(args))
    return sweep_runner.report_failures(failures, report(out))


# ---------------------------------------------------------------------- reading the runs
VERDICT = re.compile(r"round (\d+): (\w+) kept \[([^\]]*)\], rejected (.*)$")
REJECTED_SITE = re.compile(r"(?:^|; )([A-Za-z0-9_.\-]+): ")
RULE_ERROR = "the global model is kept unchanged this round"


def count_rejections(lines, rule: str, attack_sites: list[str]) -> dict[str, Any]:
    """From the robust aggregator's log lines (``round R: <rule> kept [...], rejected S: reason; T: reason`` or
    ``rejected none``): the rounds with a verdict, per attacker the rounds it was rejected, per honest site its wrong
    rejections, and the rounds in which the rule failed and the model was kept. A round logged twice (the simulator
    log holds each line once; a run log merged from several files may not) counts once."""
    verdicts: dict[int, set[str]] = {}
    errors = 0
    for line in lines:
        m = VERDICT.search(line)
        if m and m.group(2) == rule:
            rejected = m.group(4).strip()
            verdicts[int(m.group(1))] = set() if rejected == "none" else set(REJECTED_SITE.findall(rejected))
        elif RULE_ERROR in line and f"{rule}:" in line:
            errors += 1
    attackers = {s: 0 for s in attack_sites}
    honest: dict[str, int] = {}
    for rejected in verdicts.values():
        for site in rejected:
            if site in attackers:
                attackers[site] += 1
            else:
                honest[site] = honest.get(site, 0) + 1
    return {"rounds": len(verdicts), "attacker_rejected": attackers, "honest_rejected": dict(sorted(honest.items())),
            "honest_rejected_total": sum(honest.values()), "rule_errors": errors}


def _log_lines(out: Path, v: dict) -> list[str]:
    """The run's log: the sweep's log of the simulator's output, else the simulator's own server log."""
    for path in (out / v["log"] if v.get("log") else None, out / v["workspace"] / "server" / "log.txt",
                 out / v["workspace"] / "server" / "simulate_job" / "log.txt"):
        if path is not None and path.is_file():
            return path.read_text(errors="replace").splitlines()
    return []


def _metric_set(m: dict | None) -> dict | None:
    return {k: m.get(k) for k, _ in KEYS} if m else None


def _drop(clean: dict | None, mine: dict | None, where: str) -> dict | None:
    if clean is None or mine is None:
        return None
    c, d = (clean.get(where) or {}), (mine.get(where) or {})
    return {k: (c[k] - d[k]) if c.get(k) is not None and d.get(k) is not None else None for k, _ in KEYS}


def collect(out: Path) -> dict[str, Any]:
    """Read every planned variant's results: {"job", "command", "settings", "where", "rows": [...]}."""
    from fedseg.results import site_means

    out = Path(out)
    plan = sweep_runner.load_plan(out, SWEEP)
    rows = []
    for v in plan["variants"]:
        results_dir = out / v["workspace"] / RESULTS
        row = {k: v.get(k) for k in ("name", "attack", "defence", "rule_args", "attack_sites", "sites", "num_rounds")}
        row.update(status="missing", test=None, best=None, best_round=None, site_mean=None, rejections=None,
                   attack_warnings=None, log=v.get("log"), results=str(results_dir))
        metrics_file = results_dir / "metrics.json"
        if metrics_file.is_file():
            metrics = json.loads(metrics_file.read_text())
            row["status"] = "ok"
            row["test"] = _metric_set(metrics.get("test_centre"))
            best = metrics.get("best") or {}
            row["best"] = _metric_set(best.get("test_centre"))
            row["best_round"] = best.get("round")
            if metrics.get("sites"):
                row["site_mean"] = _metric_set(site_means(metrics["sites"])["global"])
        elif (out / v["workspace"]).exists():
            row["status"] = "failed"
        lines = _log_lines(out, v)
        attackers = list(v.get("attack_sites") or []) if v.get("attack") != "none" else []
        if v.get("defence") not in (None, "none"):
            row["rejections"] = count_rejections(lines, v["defence"], attackers)
        if attackers:
            row["attack_warnings"] = {s: sum(f"SIMULATED ATTACK at {s}:" in line for line in lines) for s in attackers}
        rows.append(row)
    where = "test" if any(r.get("test") for r in rows) else "site_mean"
    ok = {(r["attack"], r["defence"]): r for r in rows if r["status"] == "ok"}
    for r in rows:
        r["drop_same_defence"] = _drop(ok.get(("none", r["defence"])), r if r["status"] == "ok" else None, where)
        r["drop_no_defence"] = _drop(ok.get(("none", "none")), r if r["status"] == "ok" else None, where)
    return {"job": plan.get("job"), "command": plan.get("command"), "settings": plan.get("settings", {}),
            "where": where, "rows": rows}


# ---------------------------------------------------------------------- the table and the plot
def _signed(v) -> str:
    return "n/a" if v is None else f"{v:+.4f}"


def _rejections_cell(r: dict) -> tuple[str, str]:
    rej = r.get("rejections")
    if rej is None:
        return "-", "-"
    if not rej["rounds"] and not rej.get("rule_errors") and r["status"] != "ok":
        return "n/a", "n/a"  # a run without results and without a verdict in its log: nothing to count
    rounds = rej["rounds"]
    err = f" ({rej['rule_errors']} rounds rule error)" if rej.get("rule_errors") else ""
    attackers = ", ".join(f"{s} {n}/{rounds}" for s, n in rej["attacker_rejected"].items()) or "-"
    honest = f"{rej['honest_rejected_total']}" + (
        " (" + ", ".join(f"{s} {n}" for s, n in rej["honest_rejected"].items()) + ")" if rej["honest_rejected"] else "")
    return attackers + err, honest


def _args_text(args: dict | None) -> str:
    return ", ".join(f"{k}={format(v, 'g') if isinstance(v, float) else v}" for k, v in (args or {}).items())


def markdown(summary: dict) -> str:
    rows = summary["rows"]
    where = summary.get("where", "test")
    place = "test centre" if where == "test" else "site mean"
    a_order = {a: i for i, a in enumerate(ATTACKS)}
    d_order = {d: i for i, d in enumerate(DEFENCES)}
    rows = sorted(rows, key=lambda r: (a_order.get(r["attack"], 9), d_order.get(r["defence"], 9)))
    lines = [f"# Attack x defence sweep: {summary.get('job')}\n",
             f"Global model on the {place}: final model, and the best model by validation Dice where the run kept "
             "one. Drops are absolute Dice points (clean - attacked; positive = the attack hurt).\n",
             "| attack | defence | Dice | DiceS | DiceL | best-model Dice (round) | drop vs clean, same defence | "
             "drop vs clean, no defence | attacker rejected (rounds) | honest rejected (site-rounds) | status |",
             "|---" * 11 + "|"]
    for r in rows:
        m = r.get(where) or {}
        best = "n/a" if not r.get("best") else f"{fmt(r['best'].get('dice'))} ({r.get('best_round')})"
        same, none = r.get("drop_same_defence") or {}, r.get("drop_no_defence") or {}
        attackers, honest = _rejections_cell(r)
        defence = r["defence"] + (f" ({_args_text(r.get('rule_args'))})" if r.get("rule_args") else "")
        lines.append(f"| {ATTACK_LABELS.get(r['attack'], r['attack'])} | {defence} | "
                     + " | ".join(fmt(m.get(k)) for k, _ in KEYS)
                     + f" | {best} | {'-' if r['attack'] == 'none' else _signed(same.get('dice'))} | "
                     f"{'-' if r['attack'] == 'none' and r['defence'] == 'none' else _signed(none.get('dice'))} | "
                     f"{attackers} | {honest} | {r['status']} |")
    attacks = [a for a in ATTACKS if any(r["attack"] == a for r in rows)]
    defences = [d for d in DEFENCES if any(r["defence"] == d for r in rows)]
    by = {(r["attack"], r["defence"]): r for r in rows}
    lines += ["", f"Dice ({place}, final model): attack x defence", "",
              "| attack \\ defence | " + " | ".join(defences) + " |", "|---" * (len(defences) + 1) + "|"]
    for a in attacks:
        cells = [fmt(((by.get((a, d)) or {}).get(where) or {}).get("dice")) for d in defences]
        lines.append(f"| {ATTACK_LABELS.get(a, a)} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Attacker rejected: rounds in which the robust rule rejected the attacking site, of the rounds it "
                 "aggregated (from the server's log lines `round R: <rule> kept [...], rejected ...`); honest "
                 "rejected: rejections of non-attacking sites summed over rounds (median and trimmed mean never "
                 "reject whole sites: they act per coordinate). Clean runs have no attacker.")
    return "\n".join(lines + sweep_runner.footer_lines(summary)) + "\n"


def plot(summary: dict, out_png: Path) -> Path:
    """Grouped bars: per attack (x) one bar per defence, Dice and DiceS of the final global model."""
    import numpy as np

    plt = sweep_runner.pyplot()
    rows = [r for r in summary["rows"] if r["status"] == "ok"]
    where = summary.get("where", "test")
    attacks = [a for a in ATTACKS if any(r["attack"] == a for r in summary["rows"])]
    defences = [d for d in DEFENCES if any(r["defence"] == d for r in summary["rows"])]
    by = {(r["attack"], r["defence"]): r for r in rows}
    x = np.arange(len(attacks))
    width = 0.8 / max(len(defences), 1)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], KEYS[:2]):
        for i, d in enumerate(defences):
            vals = [((by.get((a, d)) or {}).get(where) or {}).get(key) for a in attacks]
            ax.bar(x + (i - (len(defences) - 1) / 2) * width, [np.nan if v is None else v for v in vals], width,
                   label=d)
        ax.set_xticks(x, [ATTACK_LABELS.get(a, a) for a in attacks])
        ax.set_ylabel(f"{label} ({'test centre' if where == 'test' else 'mean over sites'})")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(title="defence", fontsize=8)
    return sweep_runner.save_figure(fig, f"{summary.get('job')}: global model under attack, per defence", out_png)


def report(out: Path) -> int:
    """Write sweep.json, table.md and attack_defence.png in ``out``; 1 when a planned run has no results."""
    summary = collect(Path(out))
    return sweep_runner.write_report(Path(out), summary, markdown(summary), plot, "attack_defence.png",
                                     "security sweep")


def run_report(args) -> int:
    return report(sweep_runner.check_report_folder(args.run, SWEEP))
