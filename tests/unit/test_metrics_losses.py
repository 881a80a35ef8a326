"""Dice metrics (Dice / DiceS / DiceL) and SoftDiceLoss against hand-counted values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedseg.losses import SoftDiceLoss
from fedseg.metrics import DiceAccumulator, dice_per_image, summarize_dice


def _img(*on: int, size: int = 16) -> torch.Tensor:
    """A [1, 4, 4] mask with the given flat pixel indices set."""
    m = torch.zeros(size, dtype=torch.bool)
    m[list(on)] = True
    return m.reshape(1, 4, 4)


def _batch():
    # image 0: |P| = 4, |T| = 6, overlap 3 -> 2*3/10 = 0.6
    # image 1: both empty -> 1
    # image 2: empty prediction, non-empty truth -> 0
    # image 3: non-empty prediction, empty truth -> 0
    # image 4: identical (5 pixels) -> 1
    preds = [_img(0, 1, 2, 3), _img(), _img(), _img(7, 8), _img(1, 3, 5, 7, 9)]
    targs = [_img(1, 2, 3, 4, 5, 6), _img(), _img(10), _img(), _img(1, 3, 5, 7, 9)]
    return torch.stack(preds), torch.stack(targs)  # [5, 1, 4, 4]


# ------------------------------------------------------------------------------------------ dice_per_image
def test_dice_per_image_hand_counted():
    pred, target = _batch()
    d = dice_per_image(pred, target)
    assert d.shape == (5,) and d.dtype == torch.float64
    torch.testing.assert_close(d, torch.tensor([0.6, 1.0, 0.0, 0.0, 1.0], dtype=torch.float64))


def test_dice_per_image_accepts_0_1_numbers():
    pred, target = _batch()
    d_float = dice_per_image(pred.float(), target.to(torch.uint8))
    torch.testing.assert_close(d_float, dice_per_image(pred, target))


def test_dice_per_image_two_of_three_overlap():
    # P = {0, 1}, T = {1, 2, 3}: 2*1 / (2+3) = 0.4
    assert dice_per_image(_img(0, 1)[None], _img(1, 2, 3)[None]).item() == pytest.approx(0.4)


def test_dice_per_image_rejects_probabilities_and_shape_mismatch():
    pred, target = _batch()
    with pytest.raises(ValueError, match="binary"):
        dice_per_image(pred.float() * 0.7, target)
    with pytest.raises(ValueError, match="shape"):
        dice_per_image(pred[:2], target)


# ------------------------------------------------------------------------------------------ summarize
def test_summarize_dice_hand_values():
    dice = np.array([0.6, 1.0, 0.0, 0.0, 1.0])
    small = np.array([True, False, True, False, False])
    nonempty = np.array([True, False, True, False, True])
    s = summarize_dice(dice, small, nonempty)
    assert s["dice"] == pytest.approx(0.52)  # (0.6 + 1 + 0 + 0 + 1) / 5
    assert s["dice_s"] == pytest.approx(0.3)  # images 0 and 2: (0.6 + 0) / 2
    assert s["dice_l"] == pytest.approx(1.0)  # image 4 only (images 1, 3 have empty truth)
    assert (s["n"], s["n_small"], s["n_large"]) == (5, 2, 1)
    assert all(type(s[k]) is float for k in ("dice", "dice_s", "dice_l"))


def test_summarize_dice_empty_groups_are_none():
    s = summarize_dice(torch.tensor([1.0, 0.5]), torch.tensor([False, False]), torch.tensor([False, True]))
    assert s["dice_s"] is None and s["n_small"] == 0
    assert s["dice_l"] == 0.5 and s["dice"] == 0.75
    e = summarize_dice(np.zeros(0), np.zeros(0, bool), np.zeros(0, bool))
    assert e == {"dice": None, "dice_s": None, "dice_l": None, "n": 0, "n_small": 0, "n_large": 0}


def test_summarize_dice_small_flag_ignored_for_empty_truth():
    # an image marked small but with an empty truth does not enter DiceS
    s = summarize_dice([0.0, 1.0], [True, True], [True, False])
    assert s["dice_s"] == 0.0 and s["n_small"] == 1


def test_summarize_dice_rejects_mismatch_and_nan():
    with pytest.raises(ValueError, match="length"):
        summarize_dice([1.0, 0.5], [True], [True, True])
    with pytest.raises(ValueError, match="finite"):
        summarize_dice([float("nan")], [True], [True])


# ------------------------------------------------------------------------------------------ accumulator
def test_dice_accumulator_over_batches():
    pred, target = _batch()
    nonempty = target.flatten(1).any(1)
    small = torch.tensor([True, False, True, False, False])
    acc = DiceAccumulator()
    acc.update(dice_per_image(pred[:2], target[:2]), small[:2], nonempty[:2])
    acc.update(dice_per_image(pred[2:], target[2:]).numpy(), small[2:].numpy(), nonempty[2:].tolist())
    assert len(acc) == 5
    out = acc.compute()
    assert out["dice"] == pytest.approx(0.52) and out["dice_s"] == pytest.approx(0.3) and out["dice_l"] == 1.0
    acc.reset()
    assert len(acc) == 0 and acc.compute()["dice"] is None
    with pytest.raises(ValueError):
        acc.update([1.0, 1.0], [True], [True])


# ------------------------------------------------------------------------------------------ SoftDiceLoss
def test_soft_dice_loss_probabilities_per_image_mean():
    # image A: p = [1, .5, 0, .5], t = [1, 1, 0, 0]: sum(p*t) = 1.5, sum p = 2, sum t = 2
    #          dice = (3 + 1) / (4 + 1) = 0.8 -> loss 0.2
    # image B: p = 0, t = [1, 0, 0, 0]: dice = (0 + 1) / (1 + 1) = 0.5 -> loss 0.5
    # mean 0.35 (a batch-global Dice would give 1 - 4/6 = 0.3333)
    p = torch.tensor([[1.0, 0.5, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0]]).reshape(2, 1, 2, 2)
    t = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]).reshape(2, 1, 2, 2)
    loss = SoftDiceLoss(smooth=1.0, sigmoid=False)(p, t)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(0.35)
    # smooth = 0: image A 1 - 3/4 = 0.25, image B 1 - 0/1 = 1 -> 0.625
    assert SoftDiceLoss(smooth=0.0, sigmoid=False)(p, t).item() == pytest.approx(0.625)


def test_soft_dice_loss_sigmoid_and_empty():
    # logits 0 -> p = 0.5 everywhere; t = [1, 1, 0, 0]: (2*1 + 1) / (2 + 2 + 1) = 0.6 -> loss 0.4
    logits = torch.zeros(1, 1, 2, 2)
    t = torch.tensor([1.0, 1.0, 0.0, 0.0]).reshape(1, 1, 2, 2)
    assert SoftDiceLoss()(logits, t).item() == pytest.approx(0.4)
    # perfect prediction of an empty mask -> loss 0
    assert SoftDiceLoss(sigmoid=False)(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)).item() == 0.0


def test_soft_dice_loss_backward_and_shape_check():
    torch.manual_seed(0)
    logits = torch.randn(3, 1, 8, 8, requires_grad=True)
    target = (torch.rand(3, 1, 8, 8) > 0.7).float()
    loss = SoftDiceLoss()(logits, target)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # pushing logits towards the target lowers the loss
    better = (logits.detach() + 5.0 * (2 * target - 1)).requires_grad_()
    assert SoftDiceLoss()(better, target).item() < loss.item()
    with pytest.raises(ValueError, match="shape"):
        SoftDiceLoss()(logits, target[:, :, :4])


def test_soft_dice_loss_half_precision_does_not_overflow():
    # 512*512 = 262144 pixels of p ~ 1: a float16 sum would overflow (max 65504) and give NaN
    logits = torch.full((1, 1, 512, 512), 10.0, dtype=torch.float16)
    target = torch.ones(1, 1, 512, 512, dtype=torch.float16)
    loss = SoftDiceLoss()(logits, target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(0.0, abs=1e-4)  # sigmoid(10) = 0.99995
