"""Results folder: JSON, markdown table and plots written from metrics."""

import json

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
