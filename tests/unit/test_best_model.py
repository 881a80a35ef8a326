"""Best-model keeping: image-weighted validation Dice, ties keep the earlier model."""

import numpy as np
import torch
from nvflare.apis.fl_context import FLContext

from fedseg.flare.best_model import BestModelKeeper, weighted_dice


def test_weighted_dice_is_the_mean_over_all_validation_images():
    m = {"site-1": {"dice": 0.5, "n": 10}, "site-2": {"dice": 0.8, "n": 30}, "site-3": {"dice": None, "n": 5}}
    assert weighted_dice(m) == (0.5 * 10 + 0.8 * 30) / 40
    assert weighted_dice({}) is None


def test_keeper_saves_only_improvements(tmp_path):
    keeper, ctx = BestModelKeeper(), FLContext()
    keeper.path = str(tmp_path / "best.pt")
    w = lambda v: {"w": np.full(2, v, np.float32)}  # noqa: E731
    assert keeper.offer(0, {"a": {"dice": 0.2, "n": 1}}, w(0), ctx)
    assert keeper.offer(1, {"a": {"dice": 0.6, "n": 1}}, w(1), ctx)
    assert not keeper.offer(2, {"a": {"dice": 0.6, "n": 1}}, w(2), ctx)  # a tie keeps the earlier model
    assert not keeper.offer(3, {"a": {"dice": 0.4, "n": 1}}, w(3), ctx)
    assert keeper.best_round == 1 and keeper.by_round == {0: 0.2, 1: 0.6, 2: 0.6, 3: 0.4}
    assert torch.load(keeper.path)["w"].tolist() == [1.0, 1.0]
