"""`fedseg security sweep|report`: the plan of variants, argument errors, rejection counting from log lines, and the
table / plot on fabricated run folders (a failed run, a reused finished run, hand-computed drops)."""

import json

import pytest
from fedseg.cli import main
from fedseg.commands import security_cmd
from fedseg.commands.security_cmd import (collect, count_rejections, default_rule_args, plan_variants,
                                          variant_name)
from fedseg.commands.sweep_runner import RESULTS
from fedseg.errors import CommandError

ALL_DEFENCES = ["none", "median", "trimmed_mean", "krum", "multi_krum", "norm_screening"]


def _m(d):
    return {"dice": d, "dice_s": d / 2, "dice_l": d + 0.05, "n": 4}


def _metrics(test_dice, best_dice=None, best_round=3):
    """A results/metrics.json of one run: two sites, the test centre, optionally the best model."""
    out = {"sites": {"site-1": _m(test_dice - 0.1), "site-2": _m(test_dice + 0.1)}, "test_centre": _m(test_dice),
           "best": None}
    if best_dice is not None:
        out["best"] = {"round": best_round, "val_dice": 0.5, "file": "best_global_model.pt",
                       "test_centre": _m(best_dice)}
    return out


def _verdict(r, rule, kept, rejected):
    """A log line as fedseg.flare.robust_aggregator writes it (behind FLARE's prefix)."""
    rej = "; ".join(f"{s}: update norm 9.1 exceeds 3 x the median norm 1 = 3" for s in rejected) or "none"
    return (f"2026-12-06 18:47:30,331 - RobustAggregator - INFO - [identity=simulator_server, run=simulate_job]: "
            f"round {r}: {rule} kept {kept}, rejected {rej}")


def _sweep_folder(tmp_path, runs, attack_sites=("site-3",)):
    """runs: [(attack, defence, metrics or None for a failed run, log lines)] -> a sweep folder as sweep leaves it."""
    out = tmp_path / "sweep"
    plan = {"job": "fedgs_lits_robust", "command": "fedseg security sweep ...",
            "settings": {"num_rounds": 3, "attack_gamma": 4.0}, "variants": []}
    (out / "logs").mkdir(parents=True)
    for attack, defence, metrics, lines in runs:
        name = variant_name(attack, defence)
        ws = out / "runs" / name
        ws.mkdir(parents=True)
        if metrics is not None:
            (ws / RESULTS).mkdir(parents=True)
            (ws / RESULTS / "metrics.json").write_text(json.dumps(metrics))
        (out / "logs" / f"{name}.log").write_text("\n".join(lines) + "\n")
        plan["variants"].append({"name": name, "attack": attack, "defence": defence, "rule_args": {},
                                 "attack_sites": list(attack_sites), "workspace": f"runs/{name}",
                                 "log": f"logs/{name}.log", "sites": 3, "num_rounds": 3})
    (out / "sweep_plan.json").write_text(json.dumps(plan))
    return out


# ---------------------------------------------------------------------- planning
def test_plan_one_variant_per_attack_and_defence_with_rule_defaults():
    variants = plan_variants("fedgs_lits_robust", ["none", "scale", "mask_flip", "scale"], ALL_DEFENCES, None,
                             {"num_rounds": 2})
    assert len(variants) == 3 * 6
    assert variants[0]["name"] == "none__none" and variants[-1]["name"] == "mask_flip__norm_screening"
    by = {v["name"]: v["job"] for v in variants}
    assert all(j.num_rounds == 2 and j.attack_sites == ["site-4"] for j in by.values())
    assert by["none__median"].attack == "none" and by["none__median"].robust_rule == "median"
    assert by["none__none"].robust_rule == "none" and by["none__none"].robust_args is None
    assert by["scale__krum"].attack == "scale" and by["scale__krum"].name == "fedgs_lits_robust_scale__krum"
    # 4 sites, 1 attacker: Krum can only tolerate f = 0 (n >= 2f + 3), Multi-Krum drops one, trimmed mean trims one
    assert by["scale__krum"].robust_args == {"f": 0}
    assert by["scale__multi_krum"].robust_args == {"f": 0, "m": 3}
    assert by["scale__trimmed_mean"].robust_args == {"beta": 0.25}
    assert by["scale__median"].robust_args is None
    assert by["scale__norm_screening"].robust_args == {"factor": 3.0}
    agg = by["mask_flip__trimmed_mean"].server_config()["components"]
    robust = next(c for c in agg if c["id"] == "aggregator")
    assert robust["path"] == "fedseg.flare.robust_aggregator.RobustAggregator"
    assert robust["args"]["rule"] == "trimmed_mean" and robust["args"]["rule_args"] == {"beta": 0.25}
    trainer = by["mask_flip__none"].client_config()["executors"][0]["executor"]["args"]
    assert trainer["simulated_attack"] == {"attack": "mask_flip", "sites": ["site-4"]}
    assert "simulated_attack" not in by["scale__none"].client_config()["executors"][0]["executor"]["args"]


def test_plan_set_changes_only_the_rules_that_take_the_parameter():
    variants = plan_variants("fedgs_lits_robust", ["scale"], ["median", "norm_screening", "krum"], ["site-2"],
                             {"robust_args.factor": 2.0, "min_clients": 5})
    by = {v["defence"]: v["job"] for v in variants}
    assert by["norm_screening"].robust_args == {"factor": 2.0}
    assert by["median"].robust_args is None
    assert by["krum"].robust_args == {"f": 1}  # 5 sites: n >= 2f + 3 holds for f = 1
    assert all(j.attack_sites == ["site-2"] and j.min_clients == 5 for j in by.values())


def test_default_rule_args():
    assert default_rule_args("median", 4, 1) == {}
    assert default_rule_args("trimmed_mean", 5, 2) == {"beta": 0.4}
    assert default_rule_args("krum", 7, 2) == {"f": 2}
    assert default_rule_args("multi_krum", 7, 2) == {"f": 2, "m": 5}
    assert default_rule_args("krum", 3, 1) == {"f": 0}
    with pytest.raises(CommandError, match="beta = 0.5"):
        default_rule_args("trimmed_mean", 4, 2)


@pytest.mark.parametrize("argv, message", [
    (["--job", "no_such_job"], "unknown job 'no_such_job'"),
    (["--job", "fedgs_lits_robust", "--set", "robust_rule=median"], "what the sweep varies"),
    (["--job", "fedgs_lits_robust", "--set", "attack=noise"], "what the sweep varies"),
    (["--job", "fedgs_lits_robust", "--set", 'robust_args={"beta": 0.3}'], "robust_args.KEY=VALUE"),
    (["--job", "fedgs_lits_robust", "--defences", "median", "--set", "robust_args.factor=2"],
     "no swept defence takes 'factor'"),
    (["--job", "fedgs_lits_robust", "--attack-sites", "site-9"], "no site of the job's 4 simulated sites"),
    (["--job", "fedgs_lits_robust", "--attack-sites", "site-1", "site-2"], "no minority"),
    (["--job", "fedgs_lits", "--attacks", "scale"], "names no attack_sites"),
    (["--job", "fedgs_lits_adp_he", "--attacks", "none", "--defences", "median"], "plaintext"),
    (["--job", "fedgs_lits_robust", "--attacks", "none", "--defences", "krum", "--set", "min_clients=2"],
     "krum with f=0 Byzantine sites needs n >= 2f + 3 = 3 sites, got n=2"),
    (["--job", "fedgs_lits_robust", "--set", "no_such_field=3"], "unknown job setting"),
    (["--job", "fedgs_lits_robust", "--parallel", "0"], "--parallel must be >= 1"),
    (["--job", "fedgs_lits_robust", "--retries", "-1"], "--retries must be >= 0"),
    (["--job", "fedgs_lits_robust", "--stall-timeout", "-5"], "--stall-timeout must be >= 0"),
])
def test_sweep_argument_errors(argv, message, tmp_path, capsys):
    assert main(["security", "sweep", *argv, "--out", str(tmp_path / "s")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s" / "runs").exists()  # nothing was started


def test_unknown_attack_or_defence_in_the_plan():
    with pytest.raises(CommandError, match=r"unknown attack\(s\) \['flip'\]"):
        plan_variants("fedgs_lits_robust", ["flip"], ["none"], None, {})
    with pytest.raises(CommandError, match=r"unknown defence\(s\) \['bulyan'\]"):
        plan_variants("fedgs_lits_robust", ["none"], ["bulyan"], None, {})
    with pytest.raises(CommandError, match="needs at least one"):
        plan_variants("fedgs_lits_robust", [], ["none"], None, {})
    # the argument parser refuses them too
    with pytest.raises(SystemExit):
        main(["security", "sweep", "--job", "fedgs_lits_robust", "--attacks", "flip", "--out", "x"])


# ---------------------------------------------------------------------- rejection counting
def test_count_rejections_from_log_lines():
    lines = [
        _verdict(0, "norm_screening", ["site-1", "site-2"], ["site-3"]),
        "2026-12-06 - INFO - round 0: 12 local steps, loss 0.5",
        _verdict(1, "norm_screening", ["site-2"], ["site-1", "site-3"]),
        _verdict(2, "norm_screening", ["site-1", "site-2", "site-3"], []),
        _verdict(3, "krum", ["site-1"], ["site-2"]),  # another rule: not counted
        "ERROR - norm_screening: norm screening needs ...; the global model is kept unchanged this round",
    ]
    got = count_rejections(lines, "norm_screening", ["site-3"])
    assert got == {"rounds": 3, "attacker_rejected": {"site-3": 2}, "honest_rejected": {"site-1": 1},
                   "honest_rejected_total": 1, "rule_errors": 1}
    # a clean run: no attacker, every rejection is a wrong one; a round logged twice counts once
    got = count_rejections(lines[:2] + lines[:1], "norm_screening", [])
    assert got["rounds"] == 1 and got["attacker_rejected"] == {} and got["honest_rejected"] == {"site-3": 1}


def test_count_rejections_of_krum_reasons():
    line = ("round 4: krum kept ['site-2'], rejected site-1: krum score 3.1 is not among the 1 lowest (highest "
            "selected 1.2); site-4: krum score 99 is not among the 1 lowest (highest selected 1.2); site-3: krum "
            "score 2 is not among the 1 lowest (highest selected 1.2)")
    got = count_rejections([line], "krum", ["site-4"])
    assert got["attacker_rejected"] == {"site-4": 1}
    assert got["honest_rejected"] == {"site-1": 1, "site-3": 1} and got["honest_rejected_total"] == 2


# ---------------------------------------------------------------------- the report
def test_report_table_drops_rejections_and_plot(tmp_path, capsys):
    ns = "norm_screening"
    attack_log = ["SIMULATED ATTACK at site-3: model replacement, update x 4"] * 3
    out = _sweep_folder(tmp_path, [
        ("none", "none", _metrics(0.80, best_dice=0.82), []),
        ("none", ns, _metrics(0.75), [_verdict(r, ns, ["site-1", "site-2", "site-3"], []) for r in range(2)]
         + [_verdict(2, ns, ["site-2", "site-3"], ["site-1"])]),
        ("scale", "none", _metrics(0.20), attack_log),
        ("scale", ns, _metrics(0.70), attack_log + [_verdict(r, ns, ["site-1", "site-2"], ["site-3"])
                                                    for r in range(3)]),
        ("noise", ns, None, ["Traceback: boom"]),  # started, no results: failed
    ])
    assert main(["security", "report", "--run", str(out)]) == 1  # one planned run has no results
    summary = json.loads((out / "sweep.json").read_text())
    rows = {r["name"]: r for r in summary["rows"]}
    assert summary["where"] == "test"
    assert rows["scale__none"]["drop_same_defence"]["dice"] == pytest.approx(0.60)
    assert rows["scale__norm_screening"]["drop_same_defence"]["dice"] == pytest.approx(0.05)
    assert rows["scale__norm_screening"]["drop_no_defence"]["dice"] == pytest.approx(0.10)
    assert rows["none__norm_screening"]["drop_no_defence"]["dice_s"] == pytest.approx(0.025)  # the defence's cost
    assert rows["scale__norm_screening"]["rejections"]["attacker_rejected"] == {"site-3": 3}
    assert rows["scale__norm_screening"]["attack_warnings"] == {"site-3": 3}
    assert rows["none__norm_screening"]["rejections"]["honest_rejected"] == {"site-1": 1}
    assert rows["none__norm_screening"]["rejections"]["attacker_rejected"] == {}  # clean: no attacker
    assert rows["none__none"]["best"]["dice"] == 0.82 and rows["none__none"]["best_round"] == 3
    assert rows["noise__norm_screening"]["status"] == "failed" and rows["noise__norm_screening"]["test"] is None
    assert rows["noise__norm_screening"]["drop_same_defence"] is None
    table = (out / "table.md").read_text()
    assert "| clean | none | 0.8000 | 0.4000 | 0.8500 | 0.8200 (3) | - | - | - | - | ok |" in table
    assert ("| clean | norm_screening | 0.7500 | 0.3750 | 0.8000 | n/a | - | +0.0500 | - | 1 (site-1 1) | ok |"
            in table)
    assert "| model replacement | none | 0.2000 | 0.1000 | 0.2500 | n/a | +0.6000 | +0.6000 | - | - | ok |" in table
    assert ("| model replacement | norm_screening | 0.7000 | 0.3500 | 0.7500 | n/a | +0.0500 | +0.1000 | site-3 3/3 "
            "| 0 | ok |") in table
    assert "| noise | norm_screening | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a | failed |" in table
    assert "| model replacement | 0.2000 | 0.7000 |" in table  # the grid: attack x defence
    assert "| noise | n/a | n/a |" in table
    assert table.index("| clean | none") < table.index("| model replacement | none") < table.index("| noise |")
    assert "Held fixed: num_rounds=3, attack_gamma=4.0." in table and "`fedseg security sweep ...`" in table
    assert (out / "attack_defence.png").read_bytes()[:4] == b"\x89PNG"
    assert "runs without results: ['noise__norm_screening']" in capsys.readouterr().err


def test_report_without_test_centre_uses_the_site_mean(tmp_path):
    no_test = dict(_metrics(0.6), test_centre=None)
    out = _sweep_folder(tmp_path, [("none", "median", no_test, []),
                                   ("mask_flip", "median", dict(_metrics(0.4), test_centre=None), [])])
    assert security_cmd.report(out) == 0
    summary = collect(out)
    assert summary["where"] == "site_mean"
    rows = {r["name"]: r for r in summary["rows"]}
    assert rows["mask_flip__median"]["drop_same_defence"]["dice"] == pytest.approx(0.2)
    assert rows["mask_flip__median"]["drop_no_defence"] is None  # no clean run without defence
    assert "site mean" in (out / "table.md").read_text()


def test_report_refuses_a_folder_that_is_no_sweep_or_a_broken_plan(tmp_path, capsys):
    assert main(["security", "report", "--run", str(tmp_path / "nope")]) == 2
    assert "give the --out folder of fedseg security sweep" in capsys.readouterr().err
    with pytest.raises(CommandError, match="sweep_plan.json not found.*fedseg security sweep"):
        collect(tmp_path)
    (tmp_path / "sweep_plan.json").write_text('{"job": "x"}')
    with pytest.raises(CommandError, match="is not a sweep plan.*run fedseg security sweep again"):
        collect(tmp_path)


# ---------------------------------------------------------------------- the sweep with a stand-in simulator
def test_sweep_runs_reuses_a_finished_run_and_reports_a_failed_run(tmp_path, monkeypatch, capsys):
    """The simulator is replaced by a stand-in that writes a results folder and the aggregator's log lines (or fails
    for one variant): the second sweep reuses the finished runs and re-runs only the failed one."""
    calls = []

    def fake_simulate(job_dir, run_ws, log_path, sites, threads, **watchdog):
        assert watchdog == {"timeout": 900.0, "stall_timeout": 300.0, "retries": 1}  # the sweep's watchdog options
        name = job_dir.name.removeprefix("fedgs_lits_robust_")
        calls.append(name)
        run_ws.mkdir(parents=True)
        server = json.loads((job_dir / "app/config/config_fed_server.json").read_text())
        agg = next(c for c in server["components"] if c["id"] == "aggregator")
        lines = [f"simulated {name} with {sites} sites, {threads} threads"]
        attack, defence = name.split("__")
        if defence != "none":
            assert agg["args"]["rule"] == defence
            lines += [_verdict(r, defence, ["site-1", "site-2"], ["site-3"] if attack != "none" else [])
                      for r in range(2)]
        log_path.write_text("\n".join(lines) + "\nlast line of " + name + "\n")
        if name == "scale__median" and fail:
            return 3, 0.1
        (run_ws / RESULTS).mkdir(parents=True)
        dice = 0.8 if attack == "none" else (0.3 if defence == "none" else 0.7)
        (run_ws / RESULTS / "metrics.json").write_text(json.dumps(_metrics(dice)))
        return 0, 0.1

    monkeypatch.setattr(security_cmd, "_simulate", fake_simulate)
    out = tmp_path / "sweep"
    argv = ["security", "sweep", "--job", "fedgs_lits_robust", "--attacks", "none", "scale", "--defences", "none",
            "median", "--attack-sites", "site-3", "--set", "num_rounds=2", "--set", "min_clients=3", "--out", str(out),
            "--timeout", "900", "--stall-timeout", "300", "--retries", "1"]
    fail = True
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "FAILED scale__median: exit code 3" in err and "last line of scale__median" in err
    assert sorted(calls) == ["none__median", "none__none", "scale__median", "scale__none"]
    assert (out / "jobs" / "fedgs_lits_robust_scale__median" / "meta.json").is_file()
    rows = {r["name"]: r for r in json.loads((out / "sweep.json").read_text())["rows"]}
    assert rows["scale__median"]["status"] == "failed" and rows["scale__none"]["status"] == "ok"
    assert rows["scale__median"]["rejections"]["attacker_rejected"] == {"site-3": 2}  # the log of the failed run

    calls.clear()
    fail = False
    assert main(argv) == 0  # resumes: only the failed variant runs again
    assert calls == ["scale__median"]
    assert "none__none: finished run found" in capsys.readouterr().out
    rows = {r["name"]: r for r in json.loads((out / "sweep.json").read_text())["rows"]}
    assert rows["scale__median"]["drop_same_defence"]["dice"] == pytest.approx(0.1)
    assert rows["scale__none"]["drop_no_defence"]["dice"] == pytest.approx(0.5)
    table = (out / "table.md").read_text()
    assert "--attack-sites site-3 --set num_rounds=2 --set min_clients=3 --parallel 1" in table
    assert '"attack_sites": ["site-3"]' not in table and 'attack_sites=["site-3"]' in table

    calls.clear()
    assert main(argv + ["--rerun"]) == 0
    assert len(calls) == 4
