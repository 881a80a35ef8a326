"""PolypGen augmentation: colour jitter (hand-computed), de-/re-normalisation, p = 0.3, then flips/rotations."""

from __future__ import annotations

import colorsys

import pytest
import torch

from fedseg.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, _hsv_to_rgb, _rgb_to_hsv, augment_batch,
                                    augment_polypgen_batch, colour_jitter)

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
ONE = torch.ones(1)


def _px(*rgb: float) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1)


def test_colour_jitter_hand_computed():
    x = torch.tensor([[0.2, 0.8], [0.6, 0.4]]).view(1, 1, 2, 2).repeat(1, 3, 1, 1)
    x[:, 0] *= 1.0
    x[:, 1] *= 0.5
    x[:, 2] *= 0.25
    zero = torch.zeros(1)
    # brightness 0.5 halves every value; 2.0 doubles and clips at 1
    assert torch.allclose(colour_jitter(x, torch.tensor([0.5]), ONE, ONE, zero), 0.5 * x)
    assert torch.allclose(colour_jitter(x, torch.tensor([2.0]), ONE, ONE, zero), (2 * x).clamp(0, 1))
    # contrast 0: every pixel becomes the image's mean grey (0.299 R + 0.587 G + 0.114 B, averaged)
    grey_mean = float((0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).mean())
    assert torch.allclose(colour_jitter(x, ONE, torch.zeros(1), ONE, zero), torch.full_like(x, grey_mean))
    # saturation 0: every pixel becomes its own grey
    grey = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    assert torch.allclose(colour_jitter(x, ONE, ONE, torch.zeros(1), zero), grey.expand_as(x))
    # hue: a third of a turn maps red to green, green to blue; half a turn: orange (1, .5, 0) -> (0, .5, 1)
    assert torch.allclose(colour_jitter(_px(1, 0, 0), ONE, ONE, ONE, torch.tensor([1 / 3])).view(3),
                          torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)
    assert torch.allclose(colour_jitter(_px(0, 1, 0), ONE, ONE, ONE, torch.tensor([1 / 3])).view(3),
                          torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)
    assert torch.allclose(colour_jitter(_px(1, 0.5, 0), ONE, ONE, ONE, torch.tensor([0.5])).view(3),
                          torch.tensor([0.0, 0.5, 1.0]), atol=1e-6)
    # all factors neutral: identity
    assert torch.allclose(colour_jitter(x, ONE, ONE, ONE, zero), x)


def test_hsv_matches_colorsys_and_round_trips():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 7, 5, generator=g)
    x[0, :, 0, 0] = 0.3  # grey pixel: hue and saturation 0
    x[1, :, 0, 0] = 0.0  # black
    h, s, v = _rgb_to_hsv(x)
    for n, i, j in [(0, 0, 0), (1, 0, 0), (0, 3, 2), (1, 6, 4), (0, 2, 1)]:
        ref = colorsys.rgb_to_hsv(*x[n, :, i, j].tolist())
        assert (h[n, i, j].item(), s[n, i, j].item(), v[n, i, j].item()) == pytest.approx(ref, abs=1e-6)
    assert torch.allclose(_hsv_to_rgb(h, s, v), x, atol=1e-6)


def test_identity_when_nothing_applies_and_inputs_unchanged():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 6, 6, generator=g)
    m = (torch.rand(8, 1, 6, 6, generator=g) > 0.5).float()
    x0, m0 = x.clone(), m.clone()
    xi, mi = augment_polypgen_batch(x, m, torch.Generator().manual_seed(1), p_jitter=0.0, p_flip=0.0, p_rot=0.0)
    assert torch.equal(xi, x0) and torch.equal(mi, m0)
    augment_polypgen_batch(x, m, torch.Generator().manual_seed(1), p_jitter=1.0, p_flip=1.0, p_rot=1.0)
    assert torch.equal(x, x0) and torch.equal(m, m0)


def test_jitter_runs_on_denormalised_colours():
    g = torch.Generator().manual_seed(3)
    rgb = torch.rand(16, 3, 5, 5, generator=g)
    x = (rgb - MEAN) / STD
    m = torch.zeros(16, 1, 5, 5)
    # neutral factors: de-normalise -> jitter -> re-normalise is the identity (up to float rounding)
    xi, mi = augment_polypgen_batch(x, m, torch.Generator().manual_seed(0), p_jitter=1.0, brightness=0, contrast=0,
                                    saturation=0, hue=0, p_flip=0.0, p_rot=0.0)
    assert torch.allclose(xi, x, atol=1e-5) and torch.equal(mi, m)
    # with jitter: each selected sample equals colour_jitter of its colours with the factors drawn from the
    # generator (5 uniform rows: apply?, brightness, contrast, saturation, hue), re-normalised
    seed, n = 11, 16
    u = torch.rand(5, n, generator=torch.Generator().manual_seed(seed))
    xi, mi = augment_polypgen_batch(x, m, torch.Generator().manual_seed(seed), p_jitter=0.3, p_flip=0.0, p_rot=0.0)
    sel = u[0] < 0.3
    assert 0 < int(sel.sum()) < n
    for i in range(n):
        if not sel[i]:
            assert torch.equal(xi[i], x[i])  # not selected: bit-exact
            continue
        b, c, s = (0.8 + 0.4 * u[k, i] for k in (1, 2, 3))
        hue = (u[4, i] * 2 - 1) * 0.2
        expected = (colour_jitter(rgb[i:i + 1], b.view(1), c.view(1), s.view(1), hue.view(1)) - MEAN) / STD
        assert torch.allclose(xi[i:i + 1], expected, atol=1e-5)
        assert not torch.allclose(xi[i], x[i], atol=1e-3)
    assert torch.equal(mi, m)  # the jitter never touches masks


def test_probability_reproducibility_and_geometric_part():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 3, 4, 4, generator=g)
    m = torch.zeros(400, 1, 4, 4)
    xi, _ = augment_polypgen_batch(x, m, torch.Generator().manual_seed(5), p_flip=0.0, p_rot=0.0)
    changed = (xi - x).abs().flatten(1).amax(1) > 1e-4
    assert 0.22 < changed.float().mean().item() < 0.38  # p_jitter = 0.3
    a = augment_polypgen_batch(x, m, torch.Generator().manual_seed(7))
    b = augment_polypgen_batch(x, m, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # no jitter: exactly the flips/rotations of augment_batch with the generator state after the jitter draws
    gen = torch.Generator().manual_seed(9)
    torch.rand(5, 400, generator=gen)
    ref = augment_batch(x, m + 1, gen)
    out = augment_polypgen_batch(x, m + 1, torch.Generator().manual_seed(9), p_jitter=0.0)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_bad_arguments():
    g = torch.Generator()
    with pytest.raises(ValueError, match=r"RGB images \[N, 3, H, W\]"):
        augment_polypgen_batch(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), g)
    with pytest.raises(ValueError, match="p_jitter"):
        augment_polypgen_batch(torch.zeros(2, 3, 4, 4), torch.zeros(2, 1, 4, 4), g, p_jitter=2.0)
    with pytest.raises(ValueError, match="hue"):
        augment_polypgen_batch(torch.zeros(2, 3, 4, 4), torch.zeros(2, 1, 4, 4), g, hue=0.7)
