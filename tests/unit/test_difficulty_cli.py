"""`fedseg difficulty`: JSON lines, table, --batch eta, formats, and errors (in-process and one subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from fedseg.cli import main

TANH_1 = 0.7615941559557649


@pytest.fixture()
def masks(tmp_path):
    """100x100 masks with 10 lesion pixels (a_inv 1000, small, delta tanh(1)) in every format, plus extras."""
    m = np.zeros((100, 100), np.uint8)
    m[0, :10] = 1
    paths = {}
    np.save(tmp_path / "small.npy", m.astype(bool))
    paths["npy"] = tmp_path / "small.npy"
    Image.fromarray(m).save(tmp_path / "small.png")  # value 1: nonzero = lesion
    paths["png"] = tmp_path / "small.png"
    # JPEG: a 4x5 block of 255 on a 200x250 image -> 20 px, a_inv = 50000/20 = 2500,
    # log_1000 2500 = 1.132647, squared 1.282888, tanh = 0.857253 (e^2.565777 = 13.0107 -> 12.0107 / 14.0107)
    j = np.zeros((200, 250), np.uint8)
    j[96:100, 120:125] = 255
    Image.fromarray(j).save(tmp_path / "small.jpg", quality=90)
    paths["jpg"] = tmp_path / "small.jpg"
    nib.save(nib.Nifti1Image(m[:, :, None], np.eye(4)), tmp_path / "small.nii.gz")
    paths["nii"] = tmp_path / "small.nii.gz"
    np.save(tmp_path / "empty.npy", np.zeros((64, 32), np.uint8))
    paths["empty"] = tmp_path / "empty.npy"
    big = np.zeros((100, 100), np.uint8)
    big[:50] = 1  # a_inv = 2 -> not small -> delta 0
    np.save(tmp_path / "big.npy", big)
    paths["big"] = tmp_path / "big.npy"
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
    paths["corrupt"] = tmp_path / "corrupt.png"
    return paths


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.strip().splitlines()]


def test_json_all_formats(masks, capsys):
    files = [str(masks[k]) for k in ("npy", "png", "nii", "jpg", "empty", "big")]
    assert main(["difficulty", "--json", *files]) == 0
    rows = _json_lines(capsys.readouterr().out)
    assert [r["path"] for r in rows] == files
    for r in rows:
        assert set(r) == {"path", "height", "width", "lesion_pixels", "inverse_area", "small", "delta",
                          "mode", "base", "tau"}
        assert (r["mode"], r["base"], r["tau"]) == ("lits", 1000.0, 1000.0)
    for r in rows[:3]:  # npy, png, nii.gz: the same 100x100 mask with 10 pixels
        assert (r["height"], r["width"], r["lesion_pixels"], r["inverse_area"], r["small"]) == (100, 100, 10, 1000.0,
                                                                                              True)
        assert r["delta"] == pytest.approx(TANH_1, abs=1e-12)
    jpg = rows[3]
    assert (jpg["height"], jpg["width"], jpg["lesion_pixels"], jpg["inverse_area"]) == (200, 250, 20, 2500.0)
    assert jpg["small"] is True and jpg["delta"] == pytest.approx(0.857253, abs=1e-6)
    empty = rows[4]
    assert (empty["height"], empty["width"], empty["lesion_pixels"]) == (64, 32, 0)
    assert empty["inverse_area"] is None and empty["small"] is False and empty["delta"] == 0.0
    big = rows[5]
    assert big["inverse_area"] == 2.0 and big["small"] is False and big["delta"] == 0.0


def test_json_batch_eta(masks, capsys):
    files = [str(masks[k]) for k in ("npy", "png", "empty", "big")]
    assert main(["difficulty", "--json", "--batch", *files]) == 0
    rows = _json_lines(capsys.readouterr().out)
    assert len(rows) == 5 and rows[-1].keys() == {"eta"}
    # 1 + 2/4 * (tanh(1) + tanh(1) + 0 + 0) = 1 + tanh(1)
    assert rows[-1]["eta"] == pytest.approx(1 + TANH_1, abs=1e-12)


def test_base_and_tau_options(masks, capsys):
    # tau 1001: a_inv 1000 is no longer small; base 10 with tau 2: big mask a_inv 2 -> (log_10 2)^2 = 0.090619
    assert main(["difficulty", "--json", "--tau", "1001", str(masks["npy"])]) == 0
    r = _json_lines(capsys.readouterr().out)[0]
    assert r["small"] is False and r["delta"] == 0.0 and r["tau"] == 1001.0
    assert main(["difficulty", "--json", "--base", "10", "--tau", "2", str(masks["big"])]) == 0
    r = _json_lines(capsys.readouterr().out)[0]
    assert r["small"] is True and r["base"] == 10.0
    assert r["delta"] == pytest.approx(0.0903718, abs=1e-6)  # tanh(0.0906191) = x - x^3/3


def test_table_output(masks, capsys):
    files = [str(masks["npy"]), str(masks["empty"])]
    assert main(["difficulty", "--batch", *files]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("mode lits  base 1000  tau 1000")
    assert out[1].split() == ["path", "height", "width", "lesion_pixels", "inverse_area", "small", "delta"]
    assert out[2].split()[1:] == ["100", "100", "10", "1000.00", "yes", "0.761594"]
    assert out[3].split()[1:] == ["64", "32", "0", "empty", "no", "0.000000"]
    # columns aligned: every data row's last column ends where the header's does
    assert len({len(line) for line in out[1:4]}) == 1
    assert out[4].startswith("eta = 1.761594")  # N = 2: 1 + 2/2 * (0.761594 + 0)


def test_bad_file_fails_before_printing(masks, capsys):
    rc = main(["difficulty", "--json", str(masks["npy"]), str(masks["corrupt"]), str(masks["npy"]) + ".missing.npy"])
    assert rc == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    assert "corrupt.png" in cap.err and "cannot read mask" in cap.err
    assert "small.npy.missing.npy" in cap.err and "does not exist" in cap.err
    assert "Traceback" not in cap.err


def test_unsupported_extension(tmp_path, capsys):
    (tmp_path / "mask.bmp").write_bytes(b"BM")
    assert main(["difficulty", str(tmp_path / "mask.bmp")]) == 2
    err = capsys.readouterr().err
    assert "mask.bmp" in err and "unsupported" in err and ".nii.gz" in err


@pytest.fixture()
def polyp_masks(tmp_path):
    """200 x 200 PolypGen-style masks: two lesions (one small), one large lesion, empty; .npy and .jpg."""
    two = np.zeros((200, 200), np.uint8)
    two[20:35, 20:40] = 255  # 300 px
    two[150:160, 150:160] = 255  # 100 px: the smallest lesion, 40000 / 100 = 400 >= 150 -> small
    big = np.zeros((200, 200), np.uint8)
    big[50:150, 50:150] = 255  # one lesion, 40000 / 10000 = 4 -> not small
    paths = {}
    for name, arr in (("two", two), ("big", big), ("empty", np.zeros((200, 200), np.uint8))):
        np.save(tmp_path / f"{name}.npy", arr)
        paths[name] = tmp_path / f"{name}.npy"
    Image.fromarray(two).save(tmp_path / "two_mask.jpg", quality=75)  # grey > 127 = lesion
    paths["jpg"] = tmp_path / "two_mask.jpg"
    return paths


def test_polypgen_mode_json(polyp_masks, capsys):
    files = [str(polyp_masks[k]) for k in ("two", "big", "empty", "jpg")]
    assert main(["difficulty", "--mode", "polypgen", "--json", "--batch", *files]) == 0
    rows = _json_lines(capsys.readouterr().out)
    assert len(rows) == 5
    for r in rows[:4]:
        assert (r["mode"], r["base"], r["tau"]) == ("polypgen", 100.0, 150.0)
    two, big, empty, jpg = rows[:4]
    # whole mask: 40000 / 400 = 100 -> delta = tanh((log_100 100)^2) = tanh(1), small because of the 100 px lesion
    assert (two["lesion_pixels"], two["inverse_area"], two["small"]) == (400, 100.0, True)
    assert two["delta"] == pytest.approx(TANH_1, abs=1e-12)
    assert (big["inverse_area"], big["small"], big["delta"]) == (4.0, False, 0.0)
    assert (empty["inverse_area"], empty["small"], empty["delta"]) == (None, False, 0.0)
    assert jpg["small"] is True and abs(jpg["lesion_pixels"] - 400) <= 8  # JPEG edges, binarised at > 127
    # eta over the 4: 1 + 2/4 * (tanh(1) + 0 + 0 + delta_jpg)
    assert rows[4]["eta"] == pytest.approx(1 + 0.5 * (TANH_1 + jpg["delta"]), abs=1e-12)


def test_polypgen_mode_table_and_options(polyp_masks, capsys):
    assert main(["difficulty", "--mode", "polypgen", str(polyp_masks["two"])]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("mode polypgen  base 100  tau 150") and "smallest detected lesion" in out[0]
    assert out[2].split()[1:] == ["200", "200", "400", "100.00", "yes", "0.761594"]
    # tau 401: the smallest lesion's 40000 / 100 = 400 < 401 -> not small
    assert main(["difficulty", "--mode", "polypgen", "--json", "--tau", "401", str(polyp_masks["two"])]) == 0
    r = _json_lines(capsys.readouterr().out)[0]
    assert (r["small"], r["delta"], r["tau"]) == (False, 0.0, 401.0)


def test_bad_base(masks, capsys):
    assert main(["difficulty", "--base", "1", str(masks["npy"])]) == 2
    assert "--base" in capsys.readouterr().err


def test_subprocess_module_entry(masks):
    cmd = [sys.executable, "-m", "fedseg.cli", "difficulty", "--json", "--batch", str(masks["nii"]),
           str(masks["empty"])]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    rows = _json_lines(res.stdout)
    assert rows[0]["delta"] == pytest.approx(TANH_1) and rows[1]["inverse_area"] is None
    assert rows[2]["eta"] == pytest.approx(1 + TANH_1)  # 1 + 2/2 * (tanh(1) + 0)
    bad = subprocess.run([sys.executable, "-m", "fedseg.cli", "difficulty", str(masks["corrupt"])],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "corrupt.png" in bad.stderr and "Traceback" not in bad.stderr
