"""`fedseg privacy sweep|report`: planning, argument errors, resume, and the table / plot on fabricated run folders."""

import json

import pytest
from fedseg.cli import main
from fedseg.commands import privacy_cmd
from fedseg.commands.privacy_cmd import RESULTS, collect, plan_variants, variant_name
from fedseg.errors import CommandError
from fedseg.simulation.runner import DEFAULT_RETRIES, DEFAULT_STALL_TIMEOUT


def _metrics(test_dice, site_dice, eps_round=None, rounds=3, test=True):
    """A results/metrics.json of one run: two sites, optionally the test centre and a privacy summary."""
    m = lambda d: {"dice": d, "dice_s": d / 2, "dice_l": d + 0.05, "n": 4}  # noqa: E731
    out = {"sites": {"site-1": m(site_dice - 0.1), "site-2": m(site_dice + 0.1)},
           "test_centre": m(test_dice) if test else None}
    if eps_round is not None:
        per_site = {s: {"rounds": rounds, "epsilon_round": eps_round, "epsilon_total": rounds * eps_round + k,
                        "delta_total": 0.0, "mechanism": "laplace"} for k, s in enumerate(("site-1", "site-2"))}
        out["privacy"] = {"per_site": per_site, "by_round": [], "guarantee": "text"}
    return out


def _sweep_folder(tmp_path, runs, test=True):
    """runs: [(name, method, epsilon, metrics or None for a failed run)] -> a sweep folder as sweep leaves it."""
    out = tmp_path / "sweep"
    plan = {"job": "fedgs_lits", "command": "fedseg privacy sweep ...", "settings": {"dp_mechanism": "laplace"},
            "variants": []}
    for name, method, eps, metrics in runs:
        ws = out / "runs" / name
        ws.mkdir(parents=True)
        if metrics is not None:
            (ws / RESULTS).mkdir(parents=True)
            (ws / RESULTS / "metrics.json").write_text(json.dumps(metrics))
        plan["variants"].append({"name": name, "method": method, "epsilon": eps, "workspace": f"runs/{name}",
                                 "log": f"logs/{name}.log", "sites": 2, "num_rounds": 3})
    (out / "sweep_plan.json").write_text(json.dumps(plan))
    return out


def test_report_table_gaps_epsilons_and_plot(tmp_path, capsys):
    out = _sweep_folder(tmp_path, [
        ("none", "none", None, _metrics(0.8, 0.6)),
        ("fixed_eps10", "fixed", 10.0, _metrics(0.4, 0.3, eps_round=10.0)),
        ("adaptive_eps10", "adaptive", 10.0, _metrics(0.72, 0.5, eps_round=11.0)),
        ("adaptive_eps100", "adaptive", 100.0, None),  # started, no results: failed
    ])
    assert main(["privacy", "report", "--run", str(out)]) == 1  # one planned run has no results
    summary = json.loads((out / "sweep.json").read_text())
    rows = {r["name"]: r for r in summary["rows"]}
    assert summary["reference"] == "none"
    assert rows["adaptive_eps10"]["gap"]["test.dice"] == pytest.approx((0.72 - 0.8) / 0.8)
    assert rows["fixed_eps10"]["gap"]["site_mean.dice_s"] == pytest.approx((0.15 - 0.3) / 0.3)
    assert rows["none"]["gap"]["test.dice"] == 0.0
    # the largest over sites (site-2 spent one more in this fabricated record)
    assert rows["adaptive_eps10"]["epsilon_total"] == pytest.approx(34.0)
    assert rows["adaptive_eps10"]["epsilon_round"] == 11.0 and rows["adaptive_eps10"]["rounds_released"] == 3
    assert rows["adaptive_eps100"]["status"] == "failed"
    assert rows["adaptive_eps10"]["site_mean"]["dice"] == pytest.approx(0.5)
    table = (out / "table.md").read_text()
    assert "| DP, adaptive clipping | 10 | 11 | 34 (3) | 0.7200 | 0.3600 | 0.7700 | 0.5000 |" in table
    assert "| -10.0% | -10.0% | ok |" in table  # Dice and DiceS gap of the test centre
    assert "| DP, adaptive clipping | 100 |" in table and "| failed |" in table
    assert table.index("non-private") < table.index("DP, fixed clipping") < table.index("| DP, adaptive clipping | 10")
    assert (out / "privacy_utility.png").read_bytes()[:4] == b"\x89PNG"
    assert "runs without results: ['adaptive_eps100']" in capsys.readouterr().err


def test_report_without_test_centre_uses_the_site_mean(tmp_path):
    out = _sweep_folder(tmp_path, [("none", "none", None, _metrics(0.8, 0.6, test=False)),
                                   ("adaptive_eps1", "adaptive", 1.0, _metrics(0.8, 0.3, eps_round=1.1, test=False))])
    assert privacy_cmd.report(out) == 0
    table = (out / "table.md").read_text()
    assert "| -50.0% | -50.0% | ok |" in table  # site mean 0.3 vs 0.6
    assert "| n/a | n/a | n/a | 0.3000 |" in table


def test_report_marks_a_dp_run_without_privacy_record_and_missing_reference(tmp_path):
    out = _sweep_folder(tmp_path, [("fixed_eps1", "fixed", 1.0, _metrics(0.5, 0.5))])
    summary = collect(out)
    assert summary["reference"] is None
    assert summary["rows"][0]["status"] == "ok, no privacy record"
    assert summary["rows"][0]["gap"]["test.dice"] is None
    assert privacy_cmd.report(out) == 0
    assert "not available: no finished non-private run" in (out / "table.md").read_text()


def test_report_on_a_folder_that_is_no_sweep(tmp_path, capsys):
    assert main(["privacy", "report", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "sweep_plan.json not found" in err and "fedseg privacy sweep" in err
    assert main(["privacy", "report", "--run", str(tmp_path / "nope")]) == 2


def test_variant_names_are_folder_safe():
    assert variant_name("none", None) == "none"
    assert variant_name("fixed", 10.0) == "fixed_eps10"
    assert variant_name("adaptive", 0.5) == "adaptive_eps0p5"
    assert variant_name("adaptive", 1e6) == "adaptive_eps1e06"
    assert variant_name("adaptive", 1e-3) == "adaptive_eps0p001"


@pytest.mark.parametrize("argv, message", [
    (["--job", "no_such_job", "--methods", "none"], "unknown job 'no_such_job'"),
    (["--job", "fedgs_lits", "--epsilons", "10", "-1"], "--epsilons must be positive"),
    (["--job", "fedgs_lits", "--epsilons", "0"], "--epsilons must be positive"),
    (["--job", "fedgs_lits", "--methods", "none", "adaptive"], "need --epsilons"),
    (["--job", "fedgs_lits", "--epsilons", "10", "--set", "dp_epsilon=3"], "what the sweep varies"),
    (["--job", "fedgs_lits", "--methods", "none", "--set", "no_such_field=3"], "unknown job setting"),
    (["--job", "fedgs_lits_adp_he", "--epsilons", "10"], "uses HE"),
    (["--job", "fedgs_lits", "--methods", "none", "--parallel", "0"], "--parallel must be >= 1"),
])
def test_sweep_argument_errors(argv, message, tmp_path, capsys):
    assert main(["privacy", "sweep", *argv, "--out", str(tmp_path / "s")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s" / "runs").exists()  # nothing was started


def test_plan_variants_sets_dp_and_epsilon():
    variants = plan_variants("fedgs_lits", ["none", "fixed", "adaptive", "none"], [100.0, 10.0, 10.0], None,
                             {"num_rounds": 2, "dp_clip_init": 50.0})
    assert [v["name"] for v in variants] == ["none", "fixed_eps10", "fixed_eps100", "adaptive_eps10",
                                             "adaptive_eps100"]
    by = {v["name"]: v["job"] for v in variants}
    assert by["none"].dp == "none" and by["adaptive_eps100"].dp == "adaptive"
    assert by["fixed_eps10"].dp_epsilon == 10.0 and by["fixed_eps10"].dp_clip_init == 50.0
    assert all(j.num_rounds == 2 for j in by.values())
    assert by["adaptive_eps10"].name == "fedgs_lits_adaptive_eps10"
    cfg = by["adaptive_eps10"].client_config()
    dp_filter = cfg["task_result_filters"][0]["filters"][0]
    assert dp_filter["path"] == "fedseg.flare.dp_filter.AdaptiveDPFilter"
    assert dp_filter["args"]["epsilon"] == 10.0 and dp_filter["args"]["clipping"] == "adaptive"
    assert by["none"].client_config()["task_result_filters"] == []


def test_plan_refuses_a_bad_dp_setting_before_any_run():
    with pytest.raises(CommandError, match="percentile"):
        plan_variants("fedgs_lits", ["adaptive"], [10.0], None, {"dp_percentile": 150.0})


def test_sweep_runs_resumes_and_reports_a_failed_run(tmp_path, monkeypatch, capsys):
    """The simulator is replaced by a stand-in that writes a results folder (or fails for one variant): the second
    sweep reuses finished runs, re-runs the failed one, and a changed setting re-runs everything."""
    calls = []

    def fake_simulate(job_dir, run_ws, log_path, sites, threads, **watchdog):
        assert watchdog == {"timeout": None, "stall_timeout": DEFAULT_STALL_TIMEOUT, "retries": DEFAULT_RETRIES}
        name = job_dir.name.removeprefix("fedgs_lits_")
        calls.append(name)
        log_path.write_text(f"simulated {name}\nlast line of {name}\n")
        run_ws.mkdir(parents=True)
        if name == "adaptive_eps10" and fail_adaptive:
            return 3, 0.1
        cfg = json.loads((job_dir / "app/config/config_fed_client.json").read_text())
        dp = cfg["task_result_filters"][0]["filters"][0]["args"] if cfg["task_result_filters"] else None
        (run_ws / RESULTS).mkdir(parents=True)
        metrics = _metrics(0.8 if dp is None else 0.7, 0.6, eps_round=None if dp is None else dp["epsilon"])
        (run_ws / RESULTS / "metrics.json").write_text(json.dumps(metrics))
        return 0, 0.1

    monkeypatch.setattr(privacy_cmd, "_simulate", fake_simulate)
    out = tmp_path / "sweep"
    argv = ["privacy", "sweep", "--job", "fedgs_lits", "--methods", "none", "adaptive", "--epsilons", "10",
            "--set", "num_rounds=2", "--parallel", "2", "--out", str(out)]
    fail_adaptive = True
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "FAILED adaptive_eps10: exit code 3" in err and "last line of adaptive_eps10" in err
    assert sorted(calls) == ["adaptive_eps10", "none"]
    assert (out / "jobs" / "fedgs_lits_adaptive_eps10" / "meta.json").is_file()
    rows = {r["name"]: r for r in json.loads((out / "sweep.json").read_text())["rows"]}
    assert rows["adaptive_eps10"]["status"] == "failed" and rows["none"]["status"] == "ok"

    calls.clear()
    fail_adaptive = False
    assert main(argv) == 0  # resumes: only the failed variant runs again
    assert calls == ["adaptive_eps10"]
    assert "none: finished run found" in capsys.readouterr().out
    rows = {r["name"]: r for r in json.loads((out / "sweep.json").read_text())["rows"]}
    assert rows["adaptive_eps10"]["gap"]["test.dice"] == pytest.approx(-0.125)
    assert "--set num_rounds=2" in (out / "table.md").read_text()

    calls.clear()
    assert main(argv[:-4] + ["--set", "num_rounds=3", "--out", str(out)]) == 0  # other settings: run again
    assert sorted(calls) == ["adaptive_eps10", "none"]
