"""FedGS difficulty (paper 000, eq. 3-4) against hand-computed values, and mask reading."""

from __future__ import annotations

import gzip
import json
import math

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from fedseg import difficulty as dif
from fedseg.difficulty import (
    LITS_BASE,
    LITS_TAU,
    POLYPGEN_BASE,
    POLYPGEN_TAU,
    MaskDifficulty,
    batch_eta,
    delta_from_inverse_area,
    inverse_area,
    lits_difficulty,
    lits_difficulty_from_counts,
    mask_difficulty,
    read_mask,
)
from fedseg.errors import ConfigError, DataError

TANH_1 = 0.7615941559557649  # tanh(1)


def mask_with(h: int, w: int, pixels: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m.flat[:pixels] = True
    return m


# ------------------------------------------------------------------------------------------ constants
def test_paper_constants():
    assert (LITS_BASE, LITS_TAU, POLYPGEN_BASE, POLYPGEN_TAU) == (1000.0, 1000.0, 100.0, 150.0)


# ------------------------------------------------------------------------------------------ inverse area
def test_inverse_area_hand_values():
    assert inverse_area(mask_with(100, 100, 10)) == 1000.0
    assert inverse_area(mask_with(512, 512, 262)) == pytest.approx(1000.549618320611, rel=1e-12)  # 262144/262
    assert inverse_area(mask_with(4, 4, 16)) == 1.0
    # the mask's own H*W, not 512*512: 64x32 with 8 pixels -> 2048/8
    assert inverse_area(mask_with(64, 32, 8)) == 256.0


def test_inverse_area_nonzero_is_lesion_and_empty_is_inf():
    m = np.zeros((10, 10), dtype=np.uint8)
    m[0, :5] = 2  # e.g. a tumour label: nonzero counts
    assert inverse_area(m) == 20.0
    assert inverse_area(np.zeros((10, 10))) == math.inf


def test_inverse_area_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        inverse_area(np.ones((2, 3, 3)))


# ------------------------------------------------------------------------------------------ delta formula
def test_delta_hand_values():
    # base 1000: a_inv = 1000 -> log = 1 -> tanh(1)
    assert delta_from_inverse_area(1000.0, 1000.0) == pytest.approx(TANH_1, abs=1e-12)
    # a_inv = 10^4: (4/3)^2 = 16/9 -> tanh(1.7778) = 0.944455650587616
    assert delta_from_inverse_area(1e4, 1000.0) == pytest.approx(0.944455650587616, abs=1e-12)
    # a_inv = 100 in base 1000: (2/3)^2 = 0.4444 -> tanh = 0.4173216500588711
    assert delta_from_inverse_area(100.0, 1000.0) == pytest.approx(0.4173216500588711, abs=1e-12)
    # PolypGen base 100: a_inv = 1000 -> 1.5^2 = 2.25 -> tanh(2.25) = 0.9780261147388136
    assert delta_from_inverse_area(1000.0, 100.0) == pytest.approx(0.9780261147388136, abs=1e-12)
    # a_inv = 1 (whole image is lesion): log = 0 -> 0
    assert delta_from_inverse_area(1.0, 1000.0) == 0.0


def test_square_is_on_the_logarithm_not_the_argument():
    """(log_l a)^2 vs log_l(a^2) differ at a = 1000 (1 vs 2) and a = 10^4 (16/9 vs 8/3)."""
    d = delta_from_inverse_area(1000.0, 1000.0)
    assert d == pytest.approx(math.tanh(1.0))
    assert d != pytest.approx(math.tanh(2.0))  # log_1000(1000^2) = 2 would give 0.9640275800758169
    d4 = delta_from_inverse_area(1e4, 1000.0)
    assert d4 != pytest.approx(0.9903904942256809)  # tanh(8/3), the log-of-square reading
    # below the base the two readings differ the other way round: (1/3)^2 = 1/9 vs 2/3
    assert delta_from_inverse_area(10.0, 1000.0) == pytest.approx(0.110656110524738, abs=1e-12)  # tanh(1/9) = x - x^3/3 + 2x^5/15 ..


def test_delta_vectorised_and_zero_for_empty():
    out = delta_from_inverse_area(np.array([np.inf, 1000.0, 1.0]), 1000.0)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_allclose(out, [0.0, TANH_1, 0.0], atol=1e-12)
    assert isinstance(delta_from_inverse_area(1000.0, 1000.0), float)
    assert delta_from_inverse_area(math.inf, 1000.0) == 0.0


@pytest.mark.parametrize("base", [1.0, 0.0, -5.0, math.inf, math.nan])
def test_delta_rejects_bad_base(base):
    with pytest.raises(ConfigError, match="base"):
        delta_from_inverse_area(1000.0, base)


# ------------------------------------------------------------------------------------------ LiTS mode
def test_lits_small_at_threshold_equality():
    d = lits_difficulty(mask_with(100, 100, 10))
    assert d == MaskDifficulty(height=100, width=100, lesion_pixels=10, inverse_area=1000.0, small=True,
                               delta=pytest.approx(TANH_1, abs=1e-12))


def test_lits_512_boundary():
    # 262 pixels: a_inv = 1000.5496 >= 1000 -> small; log_1000 = 1.0000795, squared 1.000159,
    # tanh = tanh(1) + (1 - tanh(1)^2) * 0.000159 = 0.761661
    d = lits_difficulty(mask_with(512, 512, 262))
    assert d.small is True
    assert d.inverse_area == pytest.approx(1000.549618320611)
    assert d.delta == pytest.approx(0.7616609630128197, abs=1e-9)
    # 263 pixels: a_inv = 996.745 < 1000 -> not small -> delta 0
    d = lits_difficulty(mask_with(512, 512, 263))
    assert d.small is False and d.delta == 0.0
    assert d.inverse_area == pytest.approx(996.7452471482889)


def test_lits_not_small_gives_zero_delta_even_though_formula_is_positive():
    # 100x100 with 100 pixels: a_inv = 100; tanh((2/3)^2) = 0.417 but s = 0 -> delta = 0
    d = lits_difficulty(mask_with(100, 100, 100))
    assert d.inverse_area == 100.0 and d.small is False and d.delta == 0.0


def test_lits_uses_own_image_size():
    # 10 pixels in 64x64: a_inv = 409.6 -> not small (it would be 26214.4 with the reference's 512*512)
    d = lits_difficulty(mask_with(64, 64, 10))
    assert d.inverse_area == pytest.approx(409.6) and not d.small and d.delta == 0.0


def test_lits_custom_base_and_tau():
    # a_inv = 100, tau = 100 -> small; base 10: (log_10 100)^2 = 4 -> tanh(4)
    d = lits_difficulty(mask_with(100, 100, 100), base=10.0, tau=100.0)
    assert d.small and d.delta == pytest.approx(0.999329299739067, abs=1e-12)


def test_lits_empty_mask():
    d = lits_difficulty(np.zeros((32, 48), dtype=np.uint8))
    assert d.height == 32 and d.width == 48 and d.lesion_pixels == 0
    assert d.inverse_area == math.inf and d.small is False and d.delta == 0.0
    j = d.to_json_dict()
    assert j == {"height": 32, "width": 48, "lesion_pixels": 0, "inverse_area": None, "small": False, "delta": 0.0}
    json.dumps(j, allow_nan=False)


def test_to_json_dict_keys_and_types():
    j = lits_difficulty(mask_with(100, 100, 10)).to_json_dict()
    assert list(j) == ["height", "width", "lesion_pixels", "inverse_area", "small", "delta"]
    assert type(j["small"]) is bool and type(j["lesion_pixels"]) is int and type(j["inverse_area"]) is float
    assert json.loads(json.dumps(j, allow_nan=False))["inverse_area"] == 1000.0


def test_from_counts_vectorised_matches_hand_values():
    counts = np.array([0, 10, 1, 262, 263, 100])
    hw = np.array([100, 100, 100, 512, 512, 100])
    a_inv, small, delta = lits_difficulty_from_counts(counts, hw, hw)
    np.testing.assert_allclose(a_inv, [np.inf, 1000.0, 1e4, 1000.549618320611, 996.7452471482889, 100.0])
    np.testing.assert_array_equal(small, [False, True, True, True, False, False])
    np.testing.assert_allclose(delta, [0.0, TANH_1, 0.944455650587616, 0.7616609630128197, 0.0, 0.0], atol=1e-9)
    assert small.dtype == bool and a_inv.dtype == np.float64 and delta.dtype == np.float64


def test_from_counts_broadcasts_scalar_size_and_agrees_with_per_mask():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 400, size=200)
    a_inv, small, delta = lits_difficulty_from_counts(counts, 512, 512)
    assert a_inv.shape == small.shape == delta.shape == (200,)
    for i in (0, 7, 50, 199):
        d = lits_difficulty(mask_with(512, 512, int(counts[i])))
        assert (d.inverse_area, d.small) == (a_inv[i], small[i])
        assert d.delta == pytest.approx(delta[i], abs=1e-15)


def test_from_counts_rejects_bad_counts():
    with pytest.raises(ValueError):
        lits_difficulty_from_counts(np.array([-1]), 10, 10)
    with pytest.raises(ValueError):
        lits_difficulty_from_counts(np.array([101]), 10, 10)
    with pytest.raises(ValueError):
        lits_difficulty_from_counts(np.array([1.5]), 10, 10)
    with pytest.raises(ConfigError, match="tau"):
        lits_difficulty_from_counts(np.array([1]), 10, 10, tau=0.0)


# ------------------------------------------------------------------------------------------ mode dispatch
def test_mask_difficulty_lits_defaults_and_overrides():
    m = mask_with(100, 100, 10)
    assert mask_difficulty(m) == lits_difficulty(m)
    # tau 1001 -> a_inv 1000 no longer small
    assert mask_difficulty(m, mode="lits", tau=1001.0).small is False
    assert mask_difficulty(m, mode="lits", base=10.0).delta == pytest.approx(math.tanh(9.0))


def test_mask_difficulty_polypgen_dispatch():
    # 100 x 100 with 10 lesion pixels in one row: one lesion, a_inv 1000 >= tau 150 -> small; (log_100 1000)^2 = 2.25
    # (the PolypGen mode itself is tested in test_difficulty_polypgen.py)
    d = mask_difficulty(mask_with(100, 100, 10), mode="polypgen")
    assert (d.inverse_area, d.small) == (1000.0, True)
    assert d.delta == pytest.approx(math.tanh(2.25), abs=1e-12)


def test_mask_difficulty_unknown_mode():
    with pytest.raises(ConfigError, match="lits"):
        mask_difficulty(mask_with(10, 10, 1), mode="kvasir")


# ------------------------------------------------------------------------------------------ eta
def test_batch_eta_hand_values():
    assert batch_eta([0.5, 0.0, 0.25, 0.0]) == 1.375  # 1 + 2/4 * 0.75
    assert batch_eta(np.array([0.0, 0.0, 0.0, 0.0])) == 1.0
    assert batch_eta(np.array([TANH_1])) == pytest.approx(1 + 2 * TANH_1)
    # sum, not mean: 3 small samples give a larger eta than 1 in a batch of 4
    assert batch_eta([0.8, 0.8, 0.8, 0.0]) == pytest.approx(2.2)
    assert batch_eta([0.8, 0.0, 0.0, 0.0]) == pytest.approx(1.4)


def test_batch_eta_torch_tensor():
    torch = pytest.importorskip("torch")
    assert batch_eta(torch.tensor([0.5, 0.0, 0.25, 0.0])) == 1.375


def test_batch_eta_rejects_empty_and_bad_values():
    with pytest.raises(ValueError, match="empty"):
        batch_eta([])
    with pytest.raises(ValueError):
        batch_eta([0.1, float("nan")])
    with pytest.raises(ValueError):
        batch_eta([-0.1])


# ------------------------------------------------------------------------------------------ read_mask
def _square(h=64, w=64, value=255, dtype=np.uint8) -> np.ndarray:
    m = np.zeros((h, w), dtype=dtype)
    m[20:30, 10:40] = value  # 300 pixels
    return m


def test_read_npy_bool_int_float_and_singleton(tmp_path):
    for name, arr in {"b.npy": _square(value=True, dtype=bool), "i.npy": _square(value=2, dtype=np.int16),
                      "f.npy": _square(value=0.5, dtype=np.float32), "c.npy": _square(value=1)[None, :, :],
                      "d.npy": _square(value=1)[:, :, None]}.items():
        np.save(tmp_path / name, arr)
        m = read_mask(tmp_path / name)
        assert m.dtype == bool and m.shape == (64, 64) and int(m.sum()) == 300, name


def test_read_png_nonzero_is_lesion(tmp_path):
    # label value 1 (invisible in a viewer) still counts
    Image.fromarray(_square(value=1)).save(tmp_path / "l.png")
    assert int(read_mask(tmp_path / "l.png").sum()) == 300
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[20:30, 10:40, 2] = 1  # only the blue channel, barely nonzero
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert int(read_mask(tmp_path / "rgb.png").sum()) == 300
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 3] = 255  # opaque black background is background
    rgba[20:30, 10:40, :] = 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    assert int(read_mask(tmp_path / "rgba.png").sum()) == 300


def test_read_jpeg_thresholds_at_127(tmp_path):
    m = _square(value=255)
    for name in ("a.jpg", "b.JPEG"):
        Image.fromarray(m).save(tmp_path / name, format="JPEG", quality=75)
        out = read_mask(tmp_path / name)
        np.testing.assert_array_equal(out, m > 0)  # compression ringing (values < 128) does not grow the lesion
    dim = _square(value=100)  # grey 100 <= 127: background for JPEG
    Image.fromarray(dim).save(tmp_path / "dim.jpg", quality=95)
    assert int(read_mask(tmp_path / "dim.jpg").sum()) == 0


def test_read_nifti_2d_and_singleton_3d(tmp_path):
    m = _square(value=1)
    nib.save(nib.Nifti1Image(m, np.eye(4)), tmp_path / "a.nii.gz")
    nib.save(nib.Nifti1Image(m[:, :, None], np.eye(4)), tmp_path / "b.nii")
    for name in ("a.nii.gz", "b.nii"):
        out = read_mask(tmp_path / name)
        assert out.shape == (64, 64) and int(out.sum()) == 300


def test_read_rejects_3d_mask(tmp_path):
    vol = np.zeros((8, 8, 3), np.uint8)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "vol.nii.gz")
    np.save(tmp_path / "vol.npy", vol)
    for name in ("vol.nii.gz", "vol.npy"):
        with pytest.raises(DataError, match=r"vol\.(nii\.gz|npy).*\(8, 8, 3\).*2-D"):
            read_mask(tmp_path / name)


def test_read_errors_name_the_file(tmp_path):
    bad_png = tmp_path / "corrupt.png"
    bad_png.write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"corrupt\.png.*cannot read"):
        read_mask(bad_png)
    bad_gz = tmp_path / "trunc.nii.gz"
    bad_gz.write_bytes(gzip.compress(b"\x00" * 1000)[:30])
    with pytest.raises(DataError, match=r"trunc\.nii\.gz"):
        read_mask(bad_gz)
    bad_npy = tmp_path / "junk.npy"
    bad_npy.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataError, match=r"junk\.npy"):
        read_mask(bad_npy)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"obj\.npy"):
        read_mask(tmp_path / "obj.npy")
    nan = np.zeros((4, 4), np.float32)
    nan[0, 0] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    with pytest.raises(DataError, match=r"nan\.npy.*NaN"):
        read_mask(tmp_path / "nan.npy")
    (tmp_path / "mask.txt").write_text("0 1")
    with pytest.raises(DataError, match=r"mask\.txt.*unsupported.*\.npy"):
        read_mask(tmp_path / "mask.txt")
    with pytest.raises(DataError, match=r"missing\.png.*does not exist"):
        read_mask(tmp_path / "missing.png")


def test_read_truncated_png(tmp_path):
    Image.fromarray(_square(value=255)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.png"):
        read_mask(tmp_path / "cut.png")


def test_module_is_numpy_only():
    import sys
    import subprocess

    code = "import sys, fedseg.difficulty; print('torch' in sys.modules, 'nvflare' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout
    assert out.split() == ["False", "False"]
    assert dif.DIFFICULTY_MODES == ("lits", "polypgen")
