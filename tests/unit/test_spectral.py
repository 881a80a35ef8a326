"""Spectral style transfer (DESIGN.md section 5, paper 004) against hand-computed spectra."""

import numpy as np
import pytest
from fedseg.algorithms.spectral import (
    StyleBank,
    amplitude_spectrum,
    low_freq_style,
    site_style,
    transfer,
    window_half_size,
    window_shape,
)
from fedseg.errors import ConfigError, DataError

H = W = 4
hh, ww = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
# 1 + sin(pi w / 2) + 0.5 (-1)^h: DC = 16, F(0, +-1) = -+8i (amplitude 8, phase -+pi/2), F(2, 0) = 8 (Nyquist row)
HAND = 1.0 + np.sin(np.pi * ww / 2) + 0.5 * (-1.0) ** hh
# beta = 0.25 on 4x4: b = 1, window = shifted rows/cols 1..3 = frequencies -1..1; [1, 1] is DC, [1, 0] / [1, 2] are
# frequencies (0, -1) / (0, +1)
HAND_STYLE = np.zeros((3, 3))
HAND_STYLE[1, 1] = 32.0
HAND_STYLE[1, 0] = HAND_STYLE[1, 2] = 4.0


def window_mask(shape, beta):
    """Bool mask (unshifted FFT order) of the low-frequency window: |u| <= b and |v| <= b."""
    h, w = shape
    b = int(np.floor(min(h, w) * beta + 1e-9))
    fu = np.fft.fftfreq(h, 1.0 / h)
    fv = np.fft.fftfreq(w, 1.0 / w)
    return (np.abs(fu)[:, None] <= b) & (np.abs(fv)[None, :] <= b)


# ---------------------------------------------------------------- geometry and spectra

def test_window_geometry():
    assert window_half_size((10, 10), 0.1) == 1 and window_shape((10, 10), 0.1) == (3, 3)
    assert window_half_size((100, 120), 0.29) == 29  # not 28: decimal slack
    assert window_shape((6, 9), 0.34) == (5, 5)  # b = floor(6 * 0.34) = 2
    assert window_shape((4, 4), 0.5) == (4, 4)  # b = 2 = n/2: clipped to the whole axis
    assert window_shape((5, 5), 0.5) == (5, 5)  # b = 2, odd side: 2b + 1 = 5
    assert window_shape((8, 8), 0.1) == (1, 1)  # b = 0: DC only


def test_amplitude_spectrum_hand_values():
    amp, phase = amplitude_spectrum(HAND)
    assert amp[0, 0] == pytest.approx(16.0)
    assert amp[0, 1] == pytest.approx(8.0) and phase[0, 1] == pytest.approx(-np.pi / 2)
    assert amp[0, 3] == pytest.approx(8.0) and phase[0, 3] == pytest.approx(np.pi / 2)
    assert amp[2, 0] == pytest.approx(8.0)
    other = np.ones_like(amp, dtype=bool)
    other[0, 0] = other[0, 1] = other[0, 3] = other[2, 0] = False
    assert np.allclose(amp[other], 0.0, atol=1e-12)
    # per channel
    amp3, _ = amplitude_spectrum(np.stack([HAND, 2 * HAND]))
    assert amp3.shape == (2, 4, 4) and np.allclose(amp3[1], 2 * amp)


def test_low_freq_style_hand_values():
    style = low_freq_style(HAND, 0.25)
    expected = np.zeros((3, 3))
    expected[1, 1], expected[1, 0], expected[1, 2] = 16.0, 8.0, 8.0
    assert np.allclose(style, expected, atol=1e-12)  # the Nyquist row (frequency -2) is outside the window
    assert low_freq_style(np.stack([HAND, HAND]), 0.25).shape == (2, 3, 3)


# ---------------------------------------------------------------- transfer, hand values

def test_transfer_lam1_hand_values():
    # window amplitudes DC 16 -> 32, (0, +-1) 8 -> 4; phase kept; Nyquist row untouched
    out = transfer(HAND, HAND_STYLE, 0.25, lam=1.0)
    assert out.dtype == np.float32 and out.shape == HAND.shape
    expected = 2.0 + 0.5 * np.sin(np.pi * ww / 2) + 0.5 * (-1.0) ** hh
    assert np.allclose(out, expected, atol=1e-6)


def test_transfer_lam_half_hand_values():
    # DC 0.5 * 16 + 0.5 * 32 = 24 -> mean 1.5; (0, +-1): 0.5 * 8 + 0.5 * 4 = 6 -> 0.75 sin
    out = transfer(HAND, HAND_STYLE, 0.25, lam=0.5)
    expected = 1.5 + 0.75 * np.sin(np.pi * ww / 2) + 0.5 * (-1.0) ** hh
    assert np.allclose(out, expected, atol=1e-6)


def test_transfer_lam_quarter_hand_values():
    # asymmetric weights: DC 0.75 * 16 + 0.25 * 32 = 20 -> mean 1.25; (0, +-1): 0.75 * 8 + 0.25 * 4 = 7 -> 0.875 sin
    out = transfer(HAND, HAND_STYLE, 0.25, lam=0.25)
    expected = 1.25 + 0.875 * np.sin(np.pi * ww / 2) + 0.5 * (-1.0) ** hh
    assert np.allclose(out, expected, atol=1e-6)


def test_transfer_lam0_is_identity_and_no_clipping_by_default():
    assert np.array_equal(transfer(HAND, HAND_STYLE, 0.25, lam=0.0), HAND.astype(np.float32))
    out = transfer(HAND, HAND_STYLE, 0.25)
    assert out.max() == pytest.approx(3.0) and HAND.max() == 2.5  # no clipping: leaves the input's range
    clipped = transfer(HAND, HAND_STYLE, 0.25, clip=True)
    assert clipped.min() >= np.float32(HAND.min()) and clipped.max() <= np.float32(HAND.max())
    assert np.allclose(clipped, np.clip(out, HAND.min(), HAND.max()), atol=1e-6)


# ---------------------------------------------------------------- transfer, spectral properties on random images

@pytest.mark.parametrize("lam", [1.0, 0.5])
@pytest.mark.parametrize("shape,beta", [((3, 16, 16), 0.1), ((1, 15, 20), 0.2), ((12, 12), 0.5), ((9, 14), 0.05)])
def test_transfer_keeps_phase_sets_window_keeps_high_frequencies(shape, beta, lam):
    rng = np.random.default_rng(0)
    img = rng.normal(size=shape)
    other = 3.0 * rng.normal(size=shape) + 2.0
    style = low_freq_style(other, beta)
    out = transfer(img, style, beta, lam=lam)
    assert out.dtype == np.float32 and out.shape == img.shape

    f_in = np.fft.fft2(img, axes=(-2, -1))
    f_out = np.fft.fft2(out.astype(np.float64), axes=(-2, -1))
    amp_in, amp_out = np.abs(f_in), np.abs(f_out)
    scale = amp_in.max()
    tol = 1e-5 * scale  # float32 output rounding

    # phase kept exactly (up to rounding) wherever the coefficient is not ~0: wrapped angle difference
    significant = (amp_in > 1e-3 * scale) & (amp_out > 1e-3 * scale)
    dphase = np.angle(f_out * np.conj(f_in))
    assert significant.sum() > 0.9 * significant.size
    assert np.abs(dphase[significant]).max() < 1e-3

    win = np.broadcast_to(window_mask(shape[-2:], beta), f_in.shape)
    # window amplitude = (1 - lam) A_local + lam A_style (style in shifted order)
    b = window_half_size(shape[-2:], beta)
    h0, w0 = max(shape[-2] // 2 - b, 0), max(shape[-1] // 2 - b, 0)
    shifted = np.zeros(f_in.shape)
    shifted[..., h0:h0 + style.shape[-2], w0:w0 + style.shape[-1]] = style
    style_full = np.fft.ifftshift(shifted, axes=(-2, -1))  # the style placed at its frequencies, unshifted order
    expected_amp = (1 - lam) * amp_in + lam * style_full
    assert np.allclose(amp_out[win], expected_amp[win], atol=tol)
    # high frequencies: the complex coefficients themselves are unchanged
    assert np.allclose(f_out[~win], f_in[~win], atol=tol)
    # the window really changed something
    assert not np.allclose(amp_out[win], amp_in[win], atol=100 * tol)


def test_transfer_to_own_style_returns_image():
    rng = np.random.default_rng(1)
    for shape, beta in [((2, 16, 16), 0.1), ((11, 13), 0.3), ((8, 8), 0.5)]:
        img = rng.uniform(0, 1, size=shape)
        for lam in (1.0, 0.5):
            out = transfer(img, low_freq_style(img, beta), beta, lam=lam)
            assert np.allclose(out, img, atol=1e-6)


def test_transfer_is_real_for_styles_of_real_images():
    # the imaginary part dropped is rounding only: the modified spectrum is Hermitian
    rng = np.random.default_rng(2)
    img, other = rng.normal(size=(10, 10)), rng.normal(size=(10, 10))
    beta = 0.3
    out = transfer(img, low_freq_style(other, beta), beta)
    f = np.fft.fft2(out.astype(np.float64))
    assert np.allclose(f[1:, 1:], np.conj(f[1:, 1:][::-1, ::-1]), atol=1e-4)


# ---------------------------------------------------------------- style bank

def test_site_style_is_mean_of_styles():
    rng = np.random.default_rng(3)
    imgs = [rng.normal(size=(2, 12, 12)) for _ in range(3)]
    style = site_style(imgs, 0.25)
    assert np.allclose(style, np.mean([low_freq_style(i, 0.25) for i in imgs], axis=0))


def test_style_bank_round_trip_and_transfer():
    rng = np.random.default_rng(4)
    bank = StyleBank(0.2)
    a = bank.add_images("site-a", [rng.normal(size=(1, 10, 10)) for _ in range(2)])
    bank.add_images("site-b", [rng.normal(size=(1, 10, 10)) + 1 for _ in range(3)])
    assert bank.sites == ["site-a", "site-b"] and len(bank) == 2 and "site-a" in bank
    assert bank.others("site-a") == ["site-b"]
    assert np.array_equal(bank["site-a"], a) and a.shape == (1, 5, 5)
    d = bank.to_dict()
    assert set(d) == {"beta", "image_size", "style/site-a", "style/site-b"}
    assert all(isinstance(v, np.ndarray) for v in d.values())
    assert bank.nbytes == 2 * 25 * 8
    back = StyleBank.from_dict(d)
    assert back.beta == bank.beta and back.image_size == (10, 10) and back.sites == bank.sites
    for s in bank.sites:
        assert np.array_equal(back[s], bank[s])
    img = rng.normal(size=(1, 10, 10))
    assert np.array_equal(back.transfer(img, "site-b", lam=0.5), transfer(img, bank["site-b"], 0.2, lam=0.5))
    # empty bank round trip
    empty = StyleBank.from_dict(StyleBank(0.1).to_dict())
    assert len(empty) == 0 and empty.image_size is None


def test_style_bank_size_checks():
    rng = np.random.default_rng(5)
    bank = StyleBank(0.2)
    bank.add_images("a", [rng.normal(size=(1, 10, 10))])
    with pytest.raises(DataError, match="resize"):
        bank.add_images("b", [rng.normal(size=(1, 12, 12))])
    with pytest.raises(DataError, match="channel"):
        bank.add_images("c", [rng.normal(size=(3, 10, 10))])
    with pytest.raises(DataError, match="shape"):
        bank.add_style("d", np.ones((1, 10, 10)))  # a full-size "style" (an image) is refused
    with pytest.raises(DataError, match="resize"):
        bank.transfer(rng.normal(size=(1, 8, 8)), "a")
    with pytest.raises(DataError, match="no style"):
        bank.style("zzz")
    d = bank.to_dict()
    d["style/a"] = np.ones((1, 10, 10))
    with pytest.raises(DataError):
        StyleBank.from_dict(d)
    d = bank.to_dict()
    d["image"] = np.ones((1, 10, 10))
    with pytest.raises(DataError, match="unknown keys"):
        StyleBank.from_dict(d)
    d = bank.to_dict()
    del d["image_size"]
    with pytest.raises(DataError, match="image_size"):
        StyleBank.from_dict(d)
    d = bank.to_dict()
    d["beta"] = np.array(0.7)
    with pytest.raises(ConfigError):
        StyleBank.from_dict(d)
    with pytest.raises(ConfigError, match="image size"):
        StyleBank(0.1).add_style("a", np.ones((3, 3)))
    with pytest.raises(DataError, match="one size"):
        site_style([np.ones((4, 4)), np.ones((5, 5))], 0.25)
    with pytest.raises(DataError, match="at least one"):
        site_style([], 0.25)


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("beta", [0, 0.0, -0.1, 0.51, 1.0, float("nan"), True, "0.1", None])
def test_bad_beta(beta):
    with pytest.raises(ConfigError, match="beta"):
        low_freq_style(HAND, beta)
    with pytest.raises(ConfigError, match="beta"):
        transfer(HAND, HAND_STYLE, beta)


def test_bad_inputs():
    with pytest.raises(DataError, match="shape"):
        transfer(HAND, np.ones((5, 5)), 0.25)  # wrong window
    with pytest.raises(DataError, match="shape"):
        transfer(np.stack([HAND, HAND]), HAND_STYLE, 0.25)  # channels missing
    with pytest.raises(DataError, match="negative"):
        transfer(HAND, -HAND_STYLE, 0.25)
    with pytest.raises(DataError, match="NaN"):
        transfer(np.full((4, 4), np.nan), HAND_STYLE, 0.25)
    with pytest.raises(DataError, match=r"\(H, W\)"):
        low_freq_style(np.ones((2, 1, 4, 4)), 0.25)
    with pytest.raises(DataError, match="complex"):
        amplitude_spectrum(np.ones((4, 4), dtype=complex))
    for lam in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="lam"):
            transfer(HAND, HAND_STYLE, 0.25, lam=lam)
