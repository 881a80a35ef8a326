"""Batched augmentation: exact flips, rotations, binary masks, identity at p = 0, reproducibility."""

from __future__ import annotations

import pytest
import torch

from fedseg.data.transforms import augment_batch, rotate_batch


def _batch(n=6, h=8, w=8):
    x = torch.arange(n * h * w, dtype=torch.float32).view(n, 1, h, w)
    m = (x.remainder(3) == 0).float()
    return x, m


def test_flips_of_a_known_image():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2).repeat(3, 1, 1, 1)
    m = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 1, 2, 2).repeat(3, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    xi, mi = augment_batch(x, m, g, p_flip=1.0, p_rot=0.0)  # both flips on every sample = 180 degrees
    assert torch.equal(xi[0, 0], torch.tensor([[4.0, 3.0], [2.0, 1.0]]))
    assert torch.equal(mi[0, 0], torch.tensor([[0.0, 0.0], [0.0, 1.0]]))


def test_p_zero_is_identity_and_inputs_are_not_modified():
    x, m = _batch()
    x0, m0 = x.clone(), m.clone()
    xi, mi = augment_batch(x, m, torch.Generator().manual_seed(1), p_flip=0.0, p_rot=0.0)
    assert torch.equal(xi, x0) and torch.equal(mi, m0)
    augment_batch(x, m, torch.Generator().manual_seed(1), p_flip=1.0, p_rot=1.0)
    assert torch.equal(x, x0) and torch.equal(m, m0)


def test_rotation_by_multiples_of_90_is_exact():
    x, m = _batch(n=3)
    r, rm = rotate_batch(x, m, torch.tensor([90.0, 180.0, -90.0]))
    for i, k in enumerate((1, 2, -1)):
        assert torch.equal(r[i], torch.rot90(x[i], k, (-2, -1)))
        assert torch.equal(rm[i], torch.rot90(m[i], k, (-2, -1)))


def test_masks_stay_binary_and_aligned_with_images():
    g = torch.Generator().manual_seed(3)
    x = torch.zeros(32, 1, 33, 33)
    x[:, :, 10:20, 5:12] = 1.0  # the image is its own mask: a block
    m = x.clone()
    xi, mi = augment_batch(x, m, g, p_flip=0.5, p_rot=1.0, max_degrees=90.0)
    assert set(mi.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(mi, m)
    # nearest vs bilinear differ only along edges: where the image is clearly inside/outside, the mask agrees
    assert torch.all(mi[xi > 0.99] == 1) and torch.all(mi[xi < 0.01] == 0)


def test_per_sample_randomness_and_reproducibility():
    x, m = _batch(n=64)
    a = augment_batch(x, m, torch.Generator().manual_seed(5))
    b = augment_batch(x, m, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    changed = [(not torch.equal(a[0][i], x[i])) for i in range(64)]
    assert 20 < sum(changed) < 64  # p = 0.5 flips and rotations: most but not all samples change


def test_bad_shapes():
    g = torch.Generator()
    with pytest.raises(ValueError, match="N, C, H, W"):
        augment_batch(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4), g)
    with pytest.raises(ValueError, match="differ"):
        augment_batch(torch.zeros(2, 1, 4, 4), torch.zeros(3, 1, 4, 4), g)
    with pytest.raises(ValueError, match="p_rot"):
        augment_batch(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), g, p_rot=1.5)
