"""Cross-validation summary and Table 1 assembly (pure parts; real runs are in tests/integration)."""

import json

import numpy as np
import pytest

from fedseg.commands.cv_cmd import summarize_folds
from fedseg.commands.report_cmd import RunResult, build_table, lesion_window, load_run
from fedseg.errors import CommandError


def test_fold_summary_uses_sample_std_and_skips_missing():
    s = summarize_folds({0: {"dice": 0.5, "dice_s": None, "dice_l": 0.6},
                         1: {"dice": 0.7, "dice_s": 0.2, "dice_l": 0.8}})
    assert s["dice"]["mean"] == pytest.approx(0.6)
    assert s["dice"]["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert s["dice_s"] == {"mean": 0.2, "std": 0.0, "values": [0.2]}


def _run(ds, model, agg, vals, stds=None, n=1):
    return RunResult(path=f"/r/{ds}-{model}-{agg}", dataset=ds, model=model, aggregation=agg,
                     values=dict(zip(("dice_s", "dice_l", "dice"), vals)),
                     stds=dict(zip(("dice_s", "dice_l", "dice"), stds or (None,) * 3)), n_folds=n)


def test_table_layout_bold_winners_and_fold_std():
    runs = [_run("polypgen", "utnet", "fedavg", (0.39, 0.77, 0.72), (0.02, 0.01, 0.02), 5),
            _run("polypgen", "utnet", "fedgs", (0.41, 0.76, 0.71), (0.03, 0.01, 0.01), 5),
            _run("lits", "utnet", "fedavg", (0.4287, 0.6561, 0.6237)),
            _run("lits", "utnet", "fedgs", (0.4499, 0.6390, 0.6120))]
    md, rows, datasets, models = build_table(runs)
    assert datasets == ["polypgen", "lits"] and models == ["utnet"]
    assert md[0] == ("| Model | FL method | PolypGen DiceS | PolypGen DiceL | PolypGen Dice | LiTS DiceS | LiTS DiceL "
                     "| LiTS Dice |")
    assert md[2] == "| UTNet | FedAvg | 0.39±0.02 | **0.77±0.01** | **0.72±0.02** | 0.4287 | **0.6561** | **0.6237** |"
    assert md[3] == "| UTNet | FedGS | **0.41±0.03** | 0.76±0.01 | 0.71±0.01 | **0.4499** | 0.6390 | 0.6120 |"
    assert len(rows) == 1 + 4 * 3


def test_load_run_reads_results_and_explains_bad_paths(tmp_path):
    res = tmp_path / "ws" / "server" / "simulate_job" / "results"
    res.mkdir(parents=True)
    (res / "metrics.json").write_text(json.dumps({
        "config": {"dataset": "lits", "model": "utnet", "aggregation": "fedgs"},
        "test_centre": {"dice": 0.5, "dice_s": 0.1, "dice_l": 0.6},
        "best": {"round": 3, "test_centre": {"dice": 0.55, "dice_s": 0.2, "dice_l": 0.65}}}))
    run = load_run(tmp_path / "ws")
    assert run.key == ("lits", "utnet", "fedgs") and run.values["dice"] == 0.55  # the best checkpoint
    with pytest.raises(CommandError, match="neither cv_summary.json"):
        load_run(tmp_path / "nothing")


def test_lesion_window_is_square_and_contains_the_lesion():
    m = np.zeros((128, 96), np.uint8)
    m[120:124, 90:93] = 1
    win = lesion_window(m)
    crop = m[win]
    assert crop.shape[0] == crop.shape[1] == 48 and crop.sum() == m.sum()
