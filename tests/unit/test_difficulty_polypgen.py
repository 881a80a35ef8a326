"""PolypGen-mode difficulty (FedGS section 3.2): small flag from the smallest detected lesion, delta from the whole
mask. Every mask is synthetic; each test derives the expected flag in a comment.

Threshold reminder: small iff H*W / A_min >= tau = 150, i.e. on 512 x 512 iff the smallest lesion has at most
262144 / 150 = 1747.6 pixels (a disk of radius 23.6).
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from fedseg import difficulty as dif
from fedseg.difficulty import (
    POLYPGEN_BASE,
    POLYPGEN_TAU,
    MaskDifficulty,
    mask_difficulty,
    polypgen_difficulty,
    polypgen_working_factor,
    read_mask,
    smallest_lesion_area,
)
from fedseg.errors import ConfigError
from PIL import Image
from scipy import ndimage as ndi

TANH_1 = 0.7615941559557649  # tanh(1)
TANH_2_25 = 0.9780261147388136  # tanh(2.25)
EIGHT = np.ones((3, 3), dtype=bool)


def disks(shape: tuple[int, int], *circles: tuple[float, float, float]) -> np.ndarray:
    """Pixel (y, x) is lesion iff (y - cy)^2 + (x - cx)^2 <= r^2 for one of the (cy, cx, r)."""
    yy = np.arange(shape[0])[:, None]
    xx = np.arange(shape[1])[None, :]
    m = np.zeros(shape, dtype=bool)
    for cy, cx, r in circles:
        m |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return m


def n_components(m: np.ndarray) -> int:
    return ndi.label(m, structure=EIGHT)[1]


def attached(shape=(512, 512), k: float = 1.0) -> np.ndarray:
    """A disk of radius 80k with a disk of radius 15k attached: centres 92k apart, so they overlap by 3k."""
    h, w = shape
    cy, cx = h / 2, w * 0.4
    return disks(shape, (cy, cx, 80 * k), (cy, cx + 92 * k, 15 * k))


# ------------------------------------------------------------------------------------------ delta, hand computed
def test_delta_a_inv_100_uses_whole_mask():
    # 200 x 200: a 15 x 20 lesion (300 px) and a separate 10 x 10 lesion (100 px). Whole mask: 40000 / 400 = 100,
    # (log_100 100)^2 = 1 -> delta = tanh(1). The smallest lesion (100 px): 40000 / 100 = 400 >= 150 -> small.
    # Using the smallest lesion's a_inv instead would give tanh((log_100 400)^2) = tanh(1.30103^2) = 0.934488.
    m = np.zeros((200, 200), dtype=bool)
    m[20:35, 20:40] = True
    m[150:160, 150:160] = True
    d = polypgen_difficulty(m)
    assert d == MaskDifficulty(height=200, width=200, lesion_pixels=400, inverse_area=100.0, small=True,
                               delta=pytest.approx(TANH_1, abs=1e-12))
    assert smallest_lesion_area(m) == 100.0
    assert abs(d.delta - 0.9344875855993819) > 0.1


def test_delta_a_inv_1000():
    # 200 x 250 = 50000 px, one 5 x 10 lesion: a_inv = 1000, the lesion is also the smallest: 1000 >= 150 -> small;
    # (log_100 1000)^2 = 1.5^2 = 2.25 -> delta = tanh(2.25)
    m = np.zeros((200, 250), dtype=np.uint8)
    m[100:105, 120:130] = 1
    d = polypgen_difficulty(m)
    assert (d.inverse_area, d.small) == (1000.0, True)
    assert d.delta == pytest.approx(TANH_2_25, abs=1e-12)


def test_delta_of_large_plus_small_lesion_uses_whole_mask_inverse_area():
    # 512 x 512: disk r=100 (31417 px) and a separate disk r=10 (317 px). The small disk: 262144 / 317 = 827 -> small.
    # delta uses the whole mask: a_inv = 262144 / 31734 = 8.26 -> tanh((log_100 8.26)^2) = tanh(0.2102) = 0.2072.
    m = disks((512, 512), (256, 200, 100), (100, 420, 10))
    count = int(m.sum())
    a_inv = 512 * 512 / count
    d = polypgen_difficulty(m)
    assert d.small is True and d.lesion_pixels == count and d.inverse_area == pytest.approx(a_inv)
    assert d.delta == pytest.approx(math.tanh((math.log(a_inv) / math.log(100)) ** 2), abs=1e-12)
    assert d.delta == pytest.approx(0.2072, abs=1e-3)
    assert smallest_lesion_area(m) == float(disks((512, 512), (100, 420, 10)).sum())  # 317: exact pixel count


def test_base_and_tau_options():
    m = np.zeros((200, 200), dtype=bool)
    m[20:35, 20:40] = True
    m[150:160, 150:160] = True
    # tau 401: the smallest lesion's 400 < 401 -> not small; base 10: (log_10 100)^2 = 4 -> tanh(4)
    assert polypgen_difficulty(m, tau=401).small is False
    assert polypgen_difficulty(m, tau=400).small is True  # equality counts as small
    assert polypgen_difficulty(m, base=10).delta == pytest.approx(math.tanh(4.0), abs=1e-12)


# ------------------------------------------------------------------------------------------ mask families
@pytest.mark.parametrize("angle", [0.0, 45.0, 150.0])
def test_large_lesion_with_small_one_attached_is_small(angle):
    # Disk r=80 and disk r=15, centres 92 apart (3 px overlap): the circles cross 79.56 px from the big centre with
    # half-chord sqrt(80^2 - 79.56^2) = 8.4, so ONE connected lesion with a ~17 px neck (wider than the paper's
    # 11 x 11 erosion kernel). Whole mask: 262144 / ~20800 = 12.6 (not small as a whole). The small disk's
    # inscribed radius 15 exceeds 1.3 x 8.4 = 10.9, so an erosion radius between 8.4 and 15 separates it; its
    # region is its ~707 px (pi 15^2) plus a share of the neck: 262144 / ~700 = ~370 >= 150 -> small.
    t = math.radians(angle)
    m = disks((512, 512), (256, 230, 80), (256 + 92 * math.sin(t), 230 + 92 * math.cos(t), 15))
    assert n_components(m) == 1 and 512 * 512 / m.sum() < 150
    d = polypgen_difficulty(m)
    assert d.small is True
    assert 600 <= smallest_lesion_area(m) <= 850
    assert d.delta == pytest.approx(math.tanh((math.log(d.inverse_area) / math.log(100)) ** 2), abs=1e-12)


def test_attached_lesion_with_thin_neck_and_tiny_attached_lesion():
    # A disk r=8 overlapping a disk r=80 by 2 px (centres 86 apart, neck ~11 px): separated at an erosion radius in
    # (5.5, 8); its region ~200 px -> 262144 / 200 = ~1300 >= 150 -> small.
    m = disks((512, 512), (256, 200, 80), (256, 286, 8))
    assert n_components(m) == 1
    assert polypgen_difficulty(m).small is True
    assert 150 <= smallest_lesion_area(m) <= 260


def test_bump_as_wide_as_itself_is_part_of_the_lesion():
    # A disk r=14 centred ON the boundary of a disk r=80: the circles cross with half-chord 13.9, i.e. the "neck"
    # is as wide as the bump, so no erosion separates it (that needs inscribed radius >= 1.3 x neck half-width):
    # a lobulated lesion, not an attached polyp. One lesion of ~20400 px: 262144 / 20400 = 12.8 -> not small.
    m = disks((512, 512), (256, 200, 80), (256, 280, 14))
    assert polypgen_difficulty(m).small is False
    assert smallest_lesion_area(m) == float(m.sum())


def test_many_tiny_lesions_are_small():
    # 30 separate disks of radius 3 (29 px each) on a grid. Smallest lesion: 262144 / 29 = 9040 >= 150 -> small.
    # Whole mask: 262144 / 870 = 301.3 -> delta = tanh((log_100 301.3)^2) = tanh(1.5405) = 0.911511.
    m = disks((512, 512), *[(40 + 60 * i, 40 + 60 * j, 3) for i in range(6) for j in range(5)])
    assert m.sum() == 870 and n_components(m) == 30
    d = polypgen_difficulty(m)
    assert d.small is True and d.inverse_area == pytest.approx(262144 / 870)
    assert d.delta == pytest.approx(0.9115110576988683, abs=1e-12)
    assert smallest_lesion_area(m) == 29.0


def test_one_large_lesion_is_not_small():
    # Disk r=100: 31417 px -> 262144 / 31417 = 8.3 < 150 -> not small, delta 0; its area is its pixel count.
    m = disks((512, 512), (256, 256, 100))
    d = polypgen_difficulty(m)
    assert (d.small, d.delta) == (False, 0.0) and d.inverse_area == pytest.approx(262144 / m.sum())
    assert smallest_lesion_area(m) == float(m.sum())


def test_large_square_and_lobulated_jagged_lesion_are_not_small():
    # Corners and a wavy, jagged boundary give the LoG small-scale responses, but they belong to one region whose
    # area (40000 px; ~27000 px) decides: 262144 / 40000 = 6.6 and 262144 / ~27000 = ~9.7 -> not small.
    square = np.zeros((512, 512), dtype=bool)
    square[100:300, 150:350] = True
    assert polypgen_difficulty(square).small is False and smallest_lesion_area(square) == 40000.0
    yy, xx = np.mgrid[:512, :512]
    theta = np.arctan2(yy - 256, xx - 256)
    radius = 90 * (1 + 0.15 * np.cos(5 * theta))
    rng = np.random.default_rng(0)
    for k in range(6, 41):  # jitter: harmonics 6..40 (wavelengths 14..94 px), about +-5 px in all
        radius = radius + rng.normal(0, 1.2) / math.sqrt(k) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
    lobed = np.hypot(yy - 256, xx - 256) <= radius
    assert n_components(lobed) == 1
    assert polypgen_difficulty(lobed).small is False


def test_ring_is_one_lesion_not_small():
    # Ring: outer r=100, inner r=80 -> ~11310 px (pi (100^2 - 80^2)) -> 262144 / 11310 = 23 -> not small. (In the
    # reference the ring's centroid lies in the hole, OpenCV's colour filter drops it, and "no keypoint" -> small.)
    m = disks((512, 512), (256, 256, 100)) & ~disks((512, 512), (256, 256, 80))
    assert polypgen_difficulty(m).small is False
    assert smallest_lesion_area(m) == float(m.sum())


def test_thin_bars_are_measured_by_area():
    # Decision: a bar is one lesion measured by its area (tau is an area threshold; reading a bar's width as its
    # size would make every elongated lesion small). 8 x 400 = 3200 px -> 262144 / 3200 = 81.9 -> not small, even
    # though every erosion removes it. 3 x 300 = 900 px -> 291.3 -> small. A 1-px-wide diagonal line of 300 px
    # -> 873.8 -> small (a contour without area, which the reference's OpenCV detector drops).
    wide = np.zeros((512, 512), dtype=bool)
    wide[252:260, 56:456] = True
    assert polypgen_difficulty(wide).small is False and smallest_lesion_area(wide) == 3200.0
    thin = np.zeros((512, 512), dtype=bool)
    thin[252:255, 100:400] = True
    assert polypgen_difficulty(thin).small is True and smallest_lesion_area(thin) == 900.0
    diagonal = np.zeros((512, 512), dtype=bool)
    idx = np.arange(100, 400)
    diagonal[idx, idx] = True
    assert polypgen_difficulty(diagonal).small is True and smallest_lesion_area(diagonal) == 300.0


def test_lesions_cut_by_the_image_border_use_the_visible_area():
    # The visible part is what the network segments, so it is the lesion's area.
    # Half disk r=60 centred on the left border: ~5655 px (pi 60^2 / 2) -> 262144 / 5655 = 46 -> not small.
    half = disks((512, 512), (256, 0, 60))
    assert polypgen_difficulty(half).small is False and smallest_lesion_area(half) == float(half.sum())
    # Disk r=60 centred 50 px outside: a cap of height 10, ~450 px -> 262144 / 450 = ~580 -> small. Outside the image
    # counts as lesion for the erosion, so the border does not erase it either.
    cap = disks((512, 512), (256, -50, 60))
    assert 400 < cap.sum() < 500
    assert polypgen_difficulty(cap).small is True and smallest_lesion_area(cap) == float(cap.sum())
    # A 100 px band across the full width touches both borders: 51200 px -> 5.1 -> not small.
    band = np.zeros((512, 512), dtype=bool)
    band[200:300] = True
    assert polypgen_difficulty(band).small is False


def test_full_and_empty_masks():
    full = np.ones((300, 400), dtype=bool)
    d = polypgen_difficulty(full)  # one lesion covering the frame: a_inv 1 -> not small
    assert (d.inverse_area, d.small, d.delta) == (1.0, False, 0.0) and smallest_lesion_area(full) == 120000.0
    for shape in [(512, 512), (1080, 1920), (7, 3)]:
        d = polypgen_difficulty(np.zeros(shape, dtype=np.uint8))
        assert d == MaskDifficulty(height=shape[0], width=shape[1], lesion_pixels=0, inverse_area=math.inf,
                                   small=False, delta=0.0)
        assert d.to_json_dict()["inverse_area"] is None
        assert smallest_lesion_area(np.zeros(shape, dtype=bool)) is None


def test_specks_below_one_pixel_of_the_512_grid_are_not_lesions():
    # On 512 x 512 a single pixel is a lesion (its LoG scores 1/pi = 0.32 > 0.25): 262144 / 1 -> small.
    one = np.zeros((512, 512), dtype=bool)
    one[10, 10] = True
    assert polypgen_difficulty(one).small is True and smallest_lesion_area(one) == 1.0
    # On 1080 x 1920 a pixel is 1/8 of a 512-grid pixel (sqrt(1080 * 1920) / 512 = 2.81 px per 512-grid px): its LoG
    # at sigma >= 2.81 is at most 1 / (pi 2.81^2) = 0.04, a 2 x 2 speck's 4 times that, 0.16 < 0.25 -> not a
    # lesion, not small, at the working resolution and at full resolution alike. A 9 x 9 lesion (81 px, about ten
    # 512-grid pixels) is detected: 1080 * 1920 / 81 = 25600 >= 150 -> small.
    speck = np.zeros((1080, 1920), dtype=bool)
    speck[500:502, 700:702] = True
    for mwp in (dif.DEFAULT_MAX_WORKING_PIXELS, None):
        d = polypgen_difficulty(speck, max_working_pixels=mwp)
        assert (d.lesion_pixels, d.small, d.delta) == (4, False, 0.0)
        assert smallest_lesion_area(speck, max_working_pixels=mwp) is None
    # A 2 x 3 speck (6 px) passes the no-detector shortcut at full resolution (6 >= 0.9 * 0.25 * pi * 2.81^2 = 5.59),
    # so there the LoG itself rejects it: at most 6 / (pi 2.81^2) = 0.24 < 0.25.
    six = np.zeros((1080, 1920), dtype=bool)
    six[500:502, 700:703] = True
    assert 6 >= 0.9 * 0.25 * math.pi * (math.sqrt(1080 * 1920) / 512) ** 2
    assert smallest_lesion_area(six, max_working_pixels=None) is None
    nine = np.zeros((1080, 1920), dtype=bool)
    nine[501:510, 701:710] = True
    for mwp in (dif.DEFAULT_MAX_WORKING_PIXELS, None):
        assert polypgen_difficulty(nine, max_working_pixels=mwp).small is True
        assert smallest_lesion_area(nine, max_working_pixels=mwp) == 81.0


# ------------------------------------------------------------------------------------------ resolution
def test_working_factor_bounds_the_grid():
    # f = smallest block size with ceil(H/f) * ceil(W/f) <= 512 * 512
    assert polypgen_working_factor(512, 512) == 1
    assert polypgen_working_factor(100, 100) == 1
    assert polypgen_working_factor(513, 512) == 2
    assert polypgen_working_factor(1080, 1920) == 3  # 360 x 640 = 230400; f=2 would be 540 x 960 = 518400
    assert polypgen_working_factor(3000, 4000) == 7  # 429 x 572 = 245388; f=6 would be 500 x 667 = 333500
    assert polypgen_working_factor(3000, 4000, None) == 1
    for h, w in [(1080, 1920), (3000, 4000), (1, 100000), (4321, 17)]:
        f = polypgen_working_factor(h, w)
        assert math.ceil(h / f) * math.ceil(w / f) <= 512 * 512
        assert f == 1 or math.ceil(h / (f - 1)) * math.ceil(w / (f - 1)) > 512 * 512


def _frames(shape: tuple[int, int]) -> dict[str, tuple[np.ndarray, bool]]:
    """PolypGen-like masks at any resolution, scaled from the 512 x 512 geometry by k = sqrt(H W) / 512."""
    h, w = shape
    k = math.sqrt(h * w) / 512
    yy, xx = np.mgrid[:h, :w]
    large = ((yy - 0.5 * h) / (0.2 * h)) ** 2 + ((xx - 0.4 * w) / (0.15 * w)) ** 2 <= 1  # ~9.4 % -> a_inv ~10.6
    # separate small disk r = 8k: ~201 k^2 px -> H*W / A = 262144 / 201 = ~1300 -> small
    return {
        "large": (large, False),  # a_inv ~10.6 -> not small
        "large+small": (large | disks(shape, (0.2 * h, 0.8 * w, 8 * k)), True),
        "attached": (attached(shape, k), True),  # the 512 x 512 attached case scaled: ~370 -> small
        # a bar ~3k x 300k: ~900 k^2 px -> ~291 -> small
        "bar": ((np.abs(yy - 0.5 * h) < 1.5 * k) & (np.abs(xx - 0.5 * w) < 150 * k), True),
    }


@pytest.mark.parametrize("shape", [(1080, 1920), (288, 384), (2048, 300)])
def test_non_square_frames_flag_matches_full_resolution(shape):
    for name, (m, expected) in _frames(shape).items():
        work = polypgen_difficulty(m)
        full = polypgen_difficulty(m, max_working_pixels=None)
        assert work.small is expected, name
        assert full.small is expected, name
        a_work, a_full = smallest_lesion_area(m), smallest_lesion_area(m, max_working_pixels=None)
        assert a_work == pytest.approx(a_full, rel=0.1), name


def test_very_high_resolution_is_fast_and_matches_full_resolution():
    # 3000 x 4000 (12 Mpx): worked on a 429 x 572 grid. Full resolution is checked for two of the masks (slow).
    frames = _frames((3000, 4000))
    for name, (m, expected) in frames.items():
        t0 = time.perf_counter()
        d = polypgen_difficulty(m)
        elapsed = time.perf_counter() - t0
        assert d.small is expected, name
        assert elapsed < 3.0, f"{name}: {elapsed:.2f} s"  # typically ~0.05 s; generous for a loaded CI machine
    for name in ("large", "attached"):
        m, expected = frames[name]
        assert polypgen_difficulty(m, max_working_pixels=None).small is expected
        assert smallest_lesion_area(m) == pytest.approx(smallest_lesion_area(m, max_working_pixels=None), rel=0.1)


def test_flag_is_invariant_to_flips_and_transposition():
    # difficulty is a property of the mask, so augmentation (flips, 90-degree rotations) must not change it
    cases = {"attached": (attached(), True), "ring": (disks((512, 512), (256, 256, 100))
                                                       & ~disks((512, 512), (256, 256, 80)), False)}
    for name, (m, expected) in cases.items():
        for view in (m, m.T, m[::-1], m[:, ::-1], np.rot90(m)):
            assert polypgen_difficulty(view).small is expected, name


# ------------------------------------------------------------------------------------------ inputs
def _jpeg_roundtrip(m: np.ndarray, quality: int, path) -> np.ndarray:
    Image.fromarray(m.astype(np.uint8) * 255).save(path, quality=quality)
    return np.asarray(Image.open(path).convert("L"))


@pytest.mark.parametrize("quality", [90, 30])
def test_jpeg_artefacted_masks_binarised_by_read_mask(tmp_path, quality):
    # JPEG leaves grey values 1..254 around the edges (and faint ringing further out). read_mask keeps grey > 127,
    # which restores the lesion up to a few edge pixels, so the flag is the clean mask's.
    tiny = disks((512, 512), *[(40 + 60 * i, 40 + 60 * j, 3) for i in range(6) for j in range(5)])
    cases = {"attached": (attached(), True), "tiny": (tiny, True),
             "large": (disks((512, 512), (256, 256, 100)), False),
             "bump": (disks((512, 512), (256, 200, 80), (256, 280, 14)), False)}
    for name, (m, expected) in cases.items():
        path = tmp_path / f"{name}_mask.jpg"
        raw = _jpeg_roundtrip(m, quality, path)
        assert np.any((raw > 0) & (raw < 255)), "the JPEG should have artefacts"
        read = read_mask(path)
        assert polypgen_difficulty(read).small is expected, name
        assert abs(int(read.sum()) - int(m.sum())) <= 0.02 * m.sum() + 10
        # nonzero = lesion: raw grey levels (not binarised) count every faint artefact -- the caller's job
        assert polypgen_difficulty(raw).lesion_pixels == int(np.count_nonzero(raw)) > int(read.sum())


def test_bool_01_0255_int_float_inputs_agree():
    m = attached()
    expected = polypgen_difficulty(m)
    for arr in (m.astype(np.uint8), m.astype(np.uint8) * 255, m.astype(np.int64), m.astype(np.float32),
                np.asfortranarray(m)):
        assert polypgen_difficulty(arr) == expected


def test_bad_inputs_and_options():
    with pytest.raises(ValueError, match="2-D"):
        polypgen_difficulty(np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="NaN"):
        polypgen_difficulty(np.full((4, 4), np.nan))
    with pytest.raises(ConfigError, match="tau"):
        polypgen_difficulty(np.ones((4, 4)), tau=0)
    with pytest.raises(ConfigError, match="base"):
        polypgen_difficulty(np.ones((4, 4)), base=1)
    with pytest.raises(ValueError, match="erosion_radius"):
        polypgen_difficulty(np.ones((4, 4)), erosion_radius=-1)
    with pytest.raises(ValueError, match="max_working_pixels"):
        polypgen_difficulty(np.ones((4, 4)), max_working_pixels=0)
    with pytest.raises(ValueError, match="blob_threshold"):
        smallest_lesion_area(np.ones((4, 4)), blob_threshold=0)


def test_mask_difficulty_dispatches_polypgen():
    m = attached()
    assert mask_difficulty(m, mode="polypgen") == polypgen_difficulty(m, base=POLYPGEN_BASE, tau=POLYPGEN_TAU)
    assert mask_difficulty(m, mode="polypgen", tau=1e6).small is False  # ~370 < 1e6
    assert dif.mode_defaults("polypgen") == (100.0, 150.0)


# ------------------------------------------------------------------------------------------ detector
def test_has_blob_is_blob_log():
    # _has_blob(c) must equal len(skimage.feature.blob_log(...)) > 0 with the same scales and threshold.
    from skimage.feature import blob_log

    crops = {"disk4": disks((9, 9), (4, 4, 4)).astype(float), "bar": np.ones((3, 40)), "pixel": np.ones((1, 1)),
             "diagonal": np.eye(15), "faint pixel": np.full((1, 1), 0.5), "faint 2x2": np.full((2, 2), 0.2),
             "quarter 3x3": np.full((3, 3), 0.25), "empty": np.zeros((5, 5))}
    for name, crop in crops.items():
        for sigma_min, sigma_max, thr in [(1.0, 1.0, 0.25), (1.0, 4.5, 0.25), (2.81, 6.0, 0.25), (1.0, 16.7, 0.5)]:
            sigmas = dif._blob_sigmas(sigma_min, sigma_max)
            assert sigmas[0] == pytest.approx(sigma_min) and sigmas[-1] == pytest.approx(sigma_max)
            assert np.all(sigmas[1:] / sigmas[:-1] <= 1.3 + 1e-9)
            image = np.pad(crop, math.ceil(2 * sigma_max) + 1)
            blobs = blob_log(image, min_sigma=sigma_min, max_sigma=sigma_max, num_sigma=len(sigmas), threshold=thr,
                             log_scale=True, exclude_border=False)
            assert dif._has_blob(crop, sigma_min, sigma_max, thr) == (len(blobs) > 0), (name, sigma_min, thr)
            # the shortcut that skips regions without calling the detector never skips one blob_log would accept
            if crop.sum() < 0.9 * thr * math.pi * sigma_min ** 2:
                assert len(blobs) == 0, name
