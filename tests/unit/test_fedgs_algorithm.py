"""FedGS accumulator and aggregation math against brute force / hand-computed values."""

import numpy as np
import pytest
import torch
from torch import nn

from fedseg.algorithms.fedgs import (
    FedGSAccumulator,
    WeightedUpdateAccumulator,
    aggregate_updates,
    check_update,
    model_update,
    split_state,
)
from fedseg.errors import UpdateRejected


class TinyNet(nn.Module):
    """Conv + BatchNorm + an integer index buffer, like UTNet's relative-position tables."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Conv2d(3, 1, 1)
        self.register_buffer("index_table", torch.arange(12, dtype=torch.long).reshape(3, 4))

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


def _train(model, etas, seed=0, lr=0.05):
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    acc = FedGSAccumulator(model)
    snapshots = [{n: p.detach().clone() for n, p in model.named_parameters()}]
    for eta in etas:
        x = torch.randn(4, 1, 8, 8)
        y = (torch.rand(4, 1, 8, 8) > 0.7).float()
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        with acc.step(eta):
            opt.step()
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return acc, snapshots


def test_eta_one_equals_plain_parameter_change():
    torch.manual_seed(1)
    model = TinyNet()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    acc, _ = _train(model, [1.0] * 6)
    g = acc.result()
    assert acc.steps == 6 and acc.scaled_steps == 0
    for n, p in model.named_parameters():
        torch.testing.assert_close(g[n], w0[n] - p.detach(), rtol=0, atol=0)


def test_cumulative_update_matches_brute_force_sum():
    torch.manual_seed(2)
    model = TinyNet()
    etas = [1.0, 2.5, 1.0, 1.75, 3.0, 1.0]
    acc, snaps = _train(model, etas)
    g = acc.result()
    for n, _ in model.named_parameters():
        expected = sum(eta * (snaps[t][n] - snaps[t + 1][n]) for t, eta in enumerate(etas))
        torch.testing.assert_close(g[n], expected, rtol=1e-5, atol=1e-7)
    assert acc.scaled_steps == 3
    assert acc.mean_eta == pytest.approx(sum(etas) / len(etas))


def test_eta_never_changes_the_local_training_trajectory():
    torch.manual_seed(3)
    a = TinyNet()
    b = TinyNet()
    b.load_state_dict(a.state_dict())
    _train(a, [1.0] * 5, seed=7)
    _train(b, [3.0, 1.0, 2.0, 2.0, 1.5], seed=7)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_eta_below_one_is_refused():
    acc = FedGSAccumulator(TinyNet())
    with pytest.raises(ValueError):
        with acc.step(0.5):
            pass


def test_split_state_and_model_update_conventions():
    torch.manual_seed(4)
    model = TinyNet()
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    params, float_buffers, other = split_state(model)
    assert set(float_buffers) == {"bn.running_mean", "bn.running_var"}
    assert set(other) == {"bn.num_batches_tracked", "index_table"}
    acc, _ = _train(model, [2.0, 1.0])
    upd = model_update(model, acc.result(), global_state)
    # integer buffers are never part of an update
    assert "index_table" not in upd and "bn.num_batches_tracked" not in upd
    # parameters: WEIGHT_DIFF = -G
    g = acc.result()
    np.testing.assert_allclose(upd["conv.weight"], -g["conv.weight"].numpy())
    # float buffers: plain delta from the global model
    np.testing.assert_allclose(
        upd["bn.running_mean"], (model.bn.running_mean - global_state["bn.running_mean"]).numpy(), rtol=1e-6
    )


def test_aggregation_is_step_weighted_mean_hand_computed():
    u1 = {"w": np.array([1.0, 2.0], np.float32), "b": np.array([0.0], np.float32)}
    u2 = {"w": np.array([3.0, -2.0], np.float32), "b": np.array([4.0], np.float32)}
    u3 = {"w": np.array([0.0, 0.0], np.float32), "b": np.array([1.0], np.float32)}
    # steps 10, 30, 60 -> weights 0.1, 0.3, 0.6
    out = aggregate_updates([u1, u2, u3], [10, 30, 60])
    np.testing.assert_allclose(out["w"], [0.1 * 1 + 0.3 * 3, 0.1 * 2 - 0.3 * 2], rtol=1e-6)
    np.testing.assert_allclose(out["b"], [0.3 * 4 + 0.6 * 1], rtol=1e-6)


def test_server_step_applies_w_minus_GA_and_averages_float_buffers():
    """End to end on two sites: w_new = w - sum p_k G_k; BN stats = sum p_k b_k; integer buffers untouched."""
    torch.manual_seed(5)
    server = TinyNet()
    global_state = {k: v.clone() for k, v in server.state_dict().items()}
    updates, steps, gs, bufs = [], [], [], []
    for seed, etas in ((11, [1.0, 2.0, 1.0]), (12, [1.5] * 5)):
        site = TinyNet()
        site.load_state_dict(global_state)
        acc, _ = _train(site, etas, seed=seed)
        gs.append(acc.result())
        bufs.append(site.bn.running_var.clone())
        updates.append(model_update(site, acc.result(), global_state))
        steps.append(acc.steps)
    agg = aggregate_updates(updates, steps)
    new_state = dict(global_state)
    for k, v in agg.items():  # what FLARE's FullModelShareableGenerator does with a WEIGHT_DIFF
        new_state[k] = global_state[k] + torch.from_numpy(v)
    p = np.array(steps, dtype=np.float64) / sum(steps)
    expected_w = global_state["conv.weight"] - (p[0] * gs[0]["conv.weight"] + p[1] * gs[1]["conv.weight"])
    torch.testing.assert_close(new_state["conv.weight"], expected_w, rtol=1e-5, atol=1e-6)
    expected_var = p[0] * bufs[0] + p[1] * bufs[1]
    torch.testing.assert_close(new_state["bn.running_var"], expected_var.float(), rtol=1e-5, atol=1e-6)
    assert torch.equal(new_state["index_table"], global_state["index_table"])


def _reference():
    return {"w": (2, 2), "b": (3,)}


def test_check_update_accepts_good_update():
    check_update({"w": np.zeros((2, 2), np.float32), "b": np.ones(3, np.float32)}, _reference(), "site-1")


@pytest.mark.parametrize(
    "update, fragment",
    [
        ({"w": np.full((2, 2), np.nan, np.float32), "b": np.ones(3, np.float32)}, "NaN/Inf"),
        ({"w": np.zeros((2, 2), np.float32), "b": np.array([1, np.inf, 0], np.float32)}, "NaN/Inf"),
        ({"w": np.zeros((2, 3), np.float32), "b": np.ones(3, np.float32)}, "shape"),
        ({"w": np.zeros((2, 2), np.float32)}, "missing"),
        ({"w": np.zeros((2, 2), np.float32), "b": np.ones(3, np.float32), "x": np.ones(1)}, "unknown"),
        ({"w": np.zeros((2, 2), np.int64), "b": np.ones(3, np.float32)}, "dtype"),
        ({}, "empty"),
    ],
)
def test_check_update_rejects_bad_updates_naming_the_site(update, fragment):
    with pytest.raises(UpdateRejected) as e:
        check_update(update, _reference(), "site-3")
    assert "site-3" in str(e.value) and fragment in str(e.value)


def test_check_update_rejects_integer_entries():
    upd = {"w": np.zeros((2, 2), np.float32), "b": np.ones(3, np.float32), "idx": np.arange(3)}
    with pytest.raises(UpdateRejected, match="integer"):
        check_update(upd, _reference(), "site-2", integer_keys=["idx"])


def test_weighted_accumulator_refuses_bad_weight_and_key_mismatch():
    acc = WeightedUpdateAccumulator()
    with pytest.raises(UpdateRejected):
        acc.add({"w": np.ones(2)}, 0, "site-1")
    acc.add({"w": np.ones(2)}, 1, "site-1")
    with pytest.raises(UpdateRejected):
        acc.add({"v": np.ones(2)}, 1, "site-2")
    assert len(acc) == 1
