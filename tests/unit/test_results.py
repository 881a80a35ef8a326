"""Results folder: JSON, markdown table and plots written from metrics."""

import json

import numpy as np
from fedseg.results import history_by_tag, markdown_table, write_results


def _m(d, s, l):
    return {"dice": d, "dice_s": s, "dice_l": l, "n": 10, "n_small": 2, "n_large": 7}


def test_markdown_table_rows_and_missing_values():
    md = markdown_table({"site-2": _m(0.5, None, 0.6), "site-1": _m(0.25, 0.125, 0.3)}, _m(0.75, 0.5, 0.8))
    lines = md.strip().splitlines()
    assert lines[2].startswith("| site-1 | 0.2500 | 0.1250 | 0.3000 | 10 (2 / 7) |")
    assert "| site-2 | 0.5000 | n/a | 0.6000 |" in lines[3]
    assert lines[4].startswith("| test centre | 0.7500 | 0.5000 | 0.8000 |")


def test_history_grouping_sorts_steps():
    h = [{"site": "a", "tag": "val_dice", "step": 2, "value": 0.3}, {"site": "a", "tag": "val_dice", "step": 1, "value": 0.1}]
    assert history_by_tag(h) == {"val_dice": {"a": [(1, 0.1), (2, 0.3)]}}


def test_write_results_writes_every_artifact(tmp_path):
    history = [{"site": s, "tag": t, "step": r, "value": 0.1 * r} for s in ("site-1", "site-2")
               for t in ("val_dice", "train_loss") for r in range(3)]
    paths = write_results(tmp_path / "res", job_name="j", site_metrics={"site-1": _m(0.5, 0.25, 0.6)},
                          test_metrics=_m(0.7, float("nan"), 0.75), initial_test_metrics=_m(0.01, 0, 0.02),
                          test_curve={1: _m(0.3, 0.1, 0.4)}, history=history, config={"lr": 1e-3})
    for p in paths.values():
        assert p.is_file() and p.stat().st_size > 0
    data = json.loads(paths["metrics"].read_text())
    assert data["test_centre"]["dice_s"] is None  # NaN is not valid JSON
    assert data["test_centre_untrained"]["dice"] == 0.01
    assert "untrained model 0.0100 -> trained 0.7000" in paths["table"].read_text()
    assert paths["curves"].read_bytes()[:4] == b"\x89PNG"


def test_overlay_colours_for_grey_and_colour_images():
    import numpy as np
    from fedseg.results import overlay_rgb

    truth = np.array([[1, 1], [0, 0]])
    pred = np.array([[1, 0], [1, 0]])
    for image in (np.zeros((2, 2)), np.zeros((3, 2, 2))):
        rgb = overlay_rgb(image, truth, pred)
        assert rgb.shape == (2, 2, 3)
        assert tuple(rgb[0, 0]) == (0.1, 0.85, 0.1)  # true positive
        assert tuple(rgb[0, 1]) == (0.15, 0.35, 1.0)  # false negative
        assert tuple(rgb[1, 0]) == (0.9, 0.1, 0.1)  # false positive
        assert tuple(rgb[1, 1]) == (0.0, 0.0, 0.0)


# ---------------------------------------------------------------- personalized metrics (Per-FedAvg adaptation)

def _site(d, s, l, pd=None, ps=None, pl=None, part=None):
    m = _m(d, s, l)
    if pd is not None:
        m["personalized"] = {"dice": pd, "dice_s": ps, "dice_l": pl, "n": 10, "n_small": 2, "n_large": 7}
    if part:
        m["part"] = part
    return m


def test_site_means_are_unweighted_and_skip_missing_values():
    from fedseg.results import site_means

    sites = {"a": _site(0.5, None, 0.6, 0.75, 0.25, None), "b": _site(0.25, 0.125, 0.3, 0.5, None, 0.4),
             "c": _site(0.0, 0.0, 0.0)}
    means = site_means(sites)
    assert means["global"] == {"n_sites": 3, "dice": 0.25, "dice_s": 0.0625, "dice_l": 0.3}
    assert means["personalized"] == {"n_sites": 2, "dice": 0.625, "dice_s": 0.25, "dice_l": 0.4}


def test_markdown_table_with_personalized_columns_and_mean_row():
    sites = {"site-2": _site(0.5, None, 0.6, 0.75, 0.25, None), "site-1": _site(0.25, 0.125, 0.3, 0.5, 0.5, 0.4)}
    lines = markdown_table(sites, _m(0.7, 0.5, 0.8)).strip().splitlines()
    assert lines[0] == ("| data | Dice | DiceS | DiceL | Dice (personalized) | DiceS (personalized) | "
                        "DiceL (personalized) | images (small / large) |")
    assert lines[1] == "|---|---|---|---|---|---|---|---|"
    assert lines[2] == "| site-1 | 0.2500 | 0.1250 | 0.3000 | 0.5000 | 0.5000 | 0.4000 | 10 (2 / 7) |"
    assert lines[3] == "| site-2 | 0.5000 | n/a | 0.6000 | 0.7500 | 0.2500 | n/a | 10 (2 / 7) |"
    # means: global (0.25+0.5)/2, DiceS only site-1, (0.3+0.6)/2; personalized (0.5+0.75)/2, (0.5+0.25)/2, 0.4
    assert lines[4] == "| mean over 2 sites | 0.3750 | 0.1250 | 0.4500 | 0.6250 | 0.3750 | 0.4000 | - |"
    assert lines[5] == "| test centre | 0.7000 | 0.5000 | 0.8000 | - | - | - | 10 (2 / 7) |"


def test_site_without_personalized_metrics_gets_dashes():
    md = markdown_table({"a": _site(0.5, 0.5, 0.5, 0.75, 0.75, 0.75), "b": _site(0.25, 0.25, 0.25)}, None)
    assert "| b | 0.2500 | 0.2500 | 0.2500 | - | - | - | 10 (2 / 7) |" in md
    assert "| mean over sites (2 global, 1 personalized) | 0.3750 | 0.3750 | 0.3750 | 0.7500 | 0.7500 | 0.7500 | - |" in md


def test_rows_name_their_part_when_parts_differ():
    lines = markdown_table({"a": _site(0.5, 0.5, 0.5, part="test"), "b": _site(0.25, 0.25, 0.25, part="val")},
                           None).splitlines()
    assert lines[2].startswith("| a (test) | 0.5000") and lines[3].startswith("| b (val) | 0.2500")
    same = markdown_table({"a": _site(0.5, 0.5, 0.5, part="test")}, None)
    assert "| a | 0.5000" in same


def test_write_results_personalized(tmp_path):
    sites = {"site-1": _site(0.5, 0.25, 0.6, 0.7, 0.5, 0.8, part="test"),
             "site-2": _site(0.3, None, 0.4, 0.5, None, 0.6, part="test")}
    paths = write_results(tmp_path / "res", job_name="j", site_metrics=sites,
                          config={"adaptation_steps": 3, "alpha": 0.001})
    assert paths["personalized_bars"].name == "personalized_bars.png"
    assert paths["personalized_bars"].read_bytes()[:4] == b"\x89PNG"
    data = json.loads(paths["metrics"].read_text())
    assert data["sites"]["site-1"]["personalized"]["dice"] == 0.7 and data["sites"]["site-2"]["part"] == "test"
    assert data["site_means"]["personalized"]["dice"] == 0.6 and data["site_means"]["global"]["dice"] == 0.4
    md = paths["table"].read_text()
    assert "Dice (personalized)" in md and "| mean over 2 sites | 0.4000 |" in md
    assert "Per-site rows: each site's own test part." in md
    assert "3 plain SGD step(s) of size alpha = 0.001" in md


def test_write_results_without_personalized_is_unchanged(tmp_path):
    paths = write_results(tmp_path / "res", job_name="j", site_metrics={"site-1": _m(0.5, 0.25, 0.6)})
    assert set(paths) == {"metrics", "table", "curves", "bars"}
    assert not (tmp_path / "res" / "personalized_bars.png").exists()
    data = json.loads(paths["metrics"].read_text())
    assert "site_means" not in data
    md = paths["table"].read_text()
    assert "personalized" not in md and "mean over" not in md
    assert "Per-site rows: each site's validation split." in md


# ---------------------------------------------------------------- FLARE final evaluation: pass-through

def _final_eval_result(fe, site, metrics):
    from types import SimpleNamespace

    from nvflare.apis.dxo import DXO, DataKind
    from nvflare.apis.fl_context import FLContext

    task = SimpleNamespace(client=SimpleNamespace(name=site), result=DXO(DataKind.METRICS, metrics).to_shareable())
    fe._on_result(task, FLContext())


def test_final_evaluation_keeps_personalized_and_part():
    from fedseg.flare.final_evaluation import FinalEvaluation

    fe = FinalEvaluation()
    fe.start_controller(None)
    _final_eval_result(fe, "site-1", _site(0.5, 0.25, 0.6, 0.7, 0.5, 0.8, part="test"))
    _final_eval_result(fe, "site-2", _m(0.4, 0.3, 0.5))
    _final_eval_result(fe, "site-3", {**_m(0.4, 0.3, 0.5), "personalized": 0.9})  # malformed: dropped, with a note
    assert fe._site_metrics["site-1"]["personalized"]["dice"] == 0.7
    assert fe._site_metrics["site-1"]["part"] == "test"
    assert fe._site_metrics["site-2"] == _m(0.4, 0.3, 0.5)
    assert "personalized" not in fe._site_metrics["site-3"]
    assert fe._notes and "site-3" in fe._notes[0]


def test_final_model_is_no_best_model_candidate_on_test_parts(tmp_path):
    from types import SimpleNamespace

    from fedseg.flare.best_model import BestModelKeeper
    from fedseg.flare.final_evaluation import FinalEvaluation
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_common.app_constant import AppConstants

    weights = {"w": np.zeros(2, np.float32)}
    for part, offered in (("val", True), ("test", False)):
        fe, keeper, ctx = FinalEvaluation(), BestModelKeeper(), FLContext()
        fe.start_controller(None)
        keeper.path = str(tmp_path / f"best_{part}.pt")
        keeper.offer(0, {"a": {"dice": 0.2, "n": 1}}, weights, ctx)
        ctx.set_prop(AppConstants.CURRENT_ROUND, 1, private=True, sticky=True)
        fe._site_metrics = {"a": {"dice": 0.9, "n": 1, "part": part}}
        out = tmp_path / part
        out.mkdir()
        best = fe._best_model(SimpleNamespace(get_component=lambda _, k=keeper: k), weights, None, ctx, str(out))
        assert (2 in keeper.by_round) is offered
        assert best["round"] == (2 if offered else 0)
        assert bool(fe._notes) is not offered
