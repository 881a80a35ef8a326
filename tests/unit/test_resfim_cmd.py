"""`fedseg resfim restyle` on tiny built-in-format PolypGen data: every site's style computed as in a run, the figure,
the bank file (reusable with --bank) and clear errors."""

import json

import numpy as np
import pytest

from fedseg.algorithms.spectral import StyleBank
from fedseg.cli import main


@pytest.fixture(scope="module")
def polyp_cfg(tiny_polypgen):
    return tiny_polypgen


def test_restyle_writes_the_figure_and_a_bank_that_can_be_reused(polyp_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("FEDSEG_DATA_CONFIG", raising=False)
    out = tmp_path / "a"
    assert main(["resfim", "restyle", "--data-config", str(polyp_cfg), "--data-args", '{"image_size": 32}',
                 "--site", "site-2", "--out", str(out)]) == 0
    assert (out / "restyle.png").stat().st_size > 5000
    info = json.loads((out / "restyle.json").read_text())
    assert info["site"] == "site-2" and info["sites"] == [f"site-{i}" for i in range(1, 6)]
    assert info["style_shape"] == [3, 3, 3]  # beta 0.05 of 32 px: b = 1, a 3x3 window per channel
    assert set(info["mean_abs_change"]) == {"site-1", "site-3", "site-4", "site-5"}
    assert all(v > 0 for v in info["mean_abs_change"].values())
    bank = StyleBank.from_dict(dict(np.load(out / "styles.npz")))
    assert bank.sites == info["sites"] and bank.beta == 0.05
    # the same figure from the saved bank (how a hospital uses the bank of a run)
    again = tmp_path / "b"
    assert main(["resfim", "restyle", "--data-config", str(polyp_cfg), "--data-args", '{"image_size": 32}',
                 "--site", "site-2", "--bank", str(out / "styles.npz"), "--out", str(again)]) == 0
    assert json.loads((again / "restyle.json").read_text())["mean_abs_change"] == pytest.approx(
        info["mean_abs_change"])


def test_restyle_refuses_a_job_without_resfim_a_row_out_of_range_and_a_bad_bank(polyp_cfg, tmp_path, capsys):
    base = ["resfim", "restyle", "--data-config", str(polyp_cfg), "--data-args", '{"image_size": 32}', "--out",
            str(tmp_path)]
    assert main(base + ["--job", "fedavg_polypgen"]) != 0
    assert "does not use ResFIM" in capsys.readouterr().err
    assert main(base + ["--index", "10000"]) != 0
    assert "outside site-1's" in capsys.readouterr().err
    (tmp_path / "x.npz").write_text("no")
    assert main(base + ["--bank", str(tmp_path / "x.npz")]) != 0
    assert "not a style bank" in capsys.readouterr().err
    assert not (tmp_path / "restyle.png").exists()
