"""Residual Fisher information (DESIGN.md section 5, paper 004): Fisher, residual, masks, masked aggregation."""

import numpy as np
import pytest
import torch
from fedseg.algorithms.resfim import (
    diagonal_fisher,
    masked_aggregate,
    personalize,
    residual_fisher,
    sensitive_mask,
)
from fedseg.errors import ConfigError, DataError, UpdateRejected
from torch import nn


def mse(pred, y):
    return ((pred - y) ** 2).mean()


def linear():
    """nn.Linear(2, 1), w = [1, -1], c = 0.5, float64."""
    m = nn.Linear(2, 1).double()
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[1.0, -1.0]]))
        m.bias.fill_(0.5)
    return m


# x1 = [1, 2], y1 = 0: pred -0.5, r1 = -0.5;  x2 = [3, 1], y2 = 1: pred 2.5, r2 = 1.5
X = torch.tensor([[1.0, 2.0], [3.0, 1.0]], dtype=torch.float64)
Y = torch.tensor([[0.0], [1.0]], dtype=torch.float64)


# ---------------------------------------------------------------- diagonal Fisher, by hand

def test_fisher_per_batch_by_hand():
    # L = mean(r^2): dL/dw = mean(2 r x) = ([-1, -2] + [9, 3]) / 2 = [4, 0.5], dL/dc = mean(2 r) = (-1 + 3) / 2 = 1
    f = diagonal_fisher(linear(), [(X, Y)], mse)
    assert list(f) == ["weight", "bias"]
    assert torch.allclose(f["weight"], torch.tensor([[16.0, 0.25]], dtype=torch.float64))
    assert torch.allclose(f["bias"], torch.tensor([1.0], dtype=torch.float64))
    # two batches: mean over batches of the squared batch gradient
    f2 = diagonal_fisher(linear(), [(X, Y), (X[:1], Y[:1])], mse)  # batch 2 grads: [-1, -2], -1
    assert torch.allclose(f2["weight"], torch.tensor([[(16.0 + 1.0) / 2, (0.25 + 4.0) / 2]], dtype=torch.float64))
    assert torch.allclose(f2["bias"], torch.tensor([(1.0 + 1.0) / 2], dtype=torch.float64))


def test_fisher_per_sample_by_hand():
    # sample grads: 2 r1 x1 = [-1, -2], 2 r1 = -1;  2 r2 x2 = [9, 3], 2 r2 = 3
    expected_w = torch.tensor([[(1.0 + 81.0) / 2, (4.0 + 9.0) / 2]], dtype=torch.float64)
    expected_b = torch.tensor([(1.0 + 9.0) / 2], dtype=torch.float64)
    f = diagonal_fisher(linear(), [(X, Y)], mse, per_sample=True)
    assert torch.allclose(f["weight"], expected_w) and torch.allclose(f["bias"], expected_b)
    # batches of one sample: per batch == per sample
    g = diagonal_fisher(linear(), [(X[:1], Y[:1]), (X[1:], Y[1:])], mse)
    assert torch.allclose(g["weight"], expected_w) and torch.allclose(g["bias"], expected_b)


def test_fisher_frozen_unused_and_mode():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(2).double()
            self.lin = linear()
            self.unused = nn.Parameter(torch.ones(3, dtype=torch.float64))
            self.frozen = nn.Parameter(torch.ones(1, dtype=torch.float64), requires_grad=False)

        def forward(self, x):
            return self.lin(self.bn(x)) * self.frozen

    net = Net()
    net.train()
    net.bn.eval()  # one module in a different mode: every flag is restored individually
    before = {k: v.clone() for k, v in net.state_dict().items()}
    f = diagonal_fisher(net, [(X, Y)], mse)
    assert "frozen" not in f and torch.equal(f["unused"], torch.zeros(3, dtype=torch.float64))
    assert net.training and net.lin.training and not net.bn.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k  # BN running stats untouched (eval mode), parameters unchanged
    # eval BN with default stats (mean 0, var 1, eps 1e-5) ~ identity: same Fisher as the bare linear model
    assert torch.allclose(f["lin.weight"], torch.tensor([[16.0, 0.25]], dtype=torch.float64), rtol=1e-4)
    assert all(p.grad is None for p in net.parameters())
    # eval_mode=False: the caller's train mode is used, BN updates its running mean
    diagonal_fisher(net.train(), [(X, Y)], mse, eval_mode=False)
    assert not torch.equal(net.bn.running_mean, before["bn.running_mean"])


def test_fisher_errors():
    with pytest.raises(DataError, match="NaN"):
        diagonal_fisher(linear(), [(X, torch.full_like(Y, float("nan")))], mse)
    with pytest.raises(DataError, match="at least one"):
        diagonal_fisher(linear(), [], mse)
    with pytest.raises(DataError, match="pair"):
        diagonal_fisher(linear(), [X], mse)
    with pytest.raises(ConfigError, match="scalar"):
        diagonal_fisher(linear(), [(X, Y)], lambda p, y: (p - y) ** 2)
    frozen = linear().requires_grad_(False)
    with pytest.raises(ConfigError, match="trainable"):
        diagonal_fisher(frozen, [(X, Y)], mse)


# ---------------------------------------------------------------- residual

def test_residual_modes_by_hand():
    real = {"a": torch.tensor([4.0, 1.0, 0.0]), "b": np.array([[2.0]])}
    styled = {"a": np.array([1.0, 1.0, 0.0]), "b": torch.tensor([[6.0]])}
    r = residual_fisher(real, styled, "abs")
    assert np.allclose(r["a"], [3.0, 0.0, 0.0]) and np.allclose(r["b"], [[4.0]])
    assert r["a"].dtype == np.float64
    rel = residual_fisher(real, styled, "relative")
    assert np.allclose(rel["a"], [3.0 / 5.0, 0.0, 0.0]) and np.allclose(rel["b"], [[4.0 / 8.0]])
    assert np.isfinite(rel["a"]).all()  # 0 / (0 + 0 + eps) = 0
    rel_eps = residual_fisher({"a": np.array([1.0])}, {"a": np.array([0.0])}, "relative", eps=1.0)
    assert np.allclose(rel_eps["a"], [0.5])  # 1 / (1 + 0 + 1)


def test_residual_errors():
    ok = {"a": np.ones(3)}
    with pytest.raises(DataError, match="NaN"):
        residual_fisher({"a": np.array([1.0, np.nan, 0.0])}, ok)
    with pytest.raises(DataError, match="NaN"):
        residual_fisher(ok, {"a": torch.tensor([1.0, float("inf"), 0.0])})
    with pytest.raises(DataError, match="shape"):
        residual_fisher(ok, {"a": np.ones(4)})
    with pytest.raises(DataError, match="different parameters"):
        residual_fisher(ok, {"b": np.ones(3)})
    with pytest.raises(DataError, match="negative"):
        residual_fisher(ok, {"a": -np.ones(3)})
    with pytest.raises(ConfigError, match="mode"):
        residual_fisher(ok, ok, "squared")


# ---------------------------------------------------------------- sensitive mask

RES = {"b": np.array([[0.7, 0.2], [0.9, 0.0]]), "a": np.array([0.1, 0.9, 0.5])}  # N = 7, tie at 0.9


def test_mask_fraction_global_ranking_and_ties():
    m = sensitive_mask(RES, fraction=3 / 7)  # k = 3: a[1] = 0.9, b[1, 0] = 0.9, b[0, 0] = 0.7
    assert m["a"].tolist() == [False, True, False]
    assert m["b"].tolist() == [[True, False], [True, False]]
    assert m["a"].dtype == np.bool_ and m["b"].shape == (2, 2)
    # k = 1: the tie at 0.9 goes to the earlier unit by name order ("a" < "b"), whatever the mapping's order
    for res in (RES, dict(reversed(list(RES.items())))):
        m1 = sensitive_mask(res, fraction=1 / 7)
        assert m1["a"].tolist() == [False, True, False] and not m1["b"].any()
    # ties inside one tensor: earlier flat index wins
    m2 = sensitive_mask({"t": np.array([1.0, 2.0, 2.0, 2.0])}, fraction=0.5)
    assert m2["t"].tolist() == [False, True, True, False]
    # floor: 0.29 * 100 = 28.999... still gives 29; 0.5 of 7 gives 3
    assert sensitive_mask({"t": np.arange(100.0)}, fraction=0.29)["t"].sum() == 29
    assert sum(v.sum() for v in sensitive_mask(RES, fraction=0.5).values()) == 3
    assert not any(v.any() for v in sensitive_mask(RES, fraction=0.0).values())
    assert all(v.all() for v in sensitive_mask(RES, fraction=1.0).values())


def test_mask_threshold_strict():
    m = sensitive_mask(RES, threshold=0.5)  # 0.5 itself is not sensitive
    assert m["a"].tolist() == [False, True, False]
    assert m["b"].tolist() == [[True, False], [True, False]]
    assert not any(v.any() for v in sensitive_mask(RES, threshold=0.9).values())


def test_mask_tensor_granularity():
    # means: a = 0.5, b = 0.45
    m = sensitive_mask(RES, fraction=0.5, granularity="tensor")  # 1 of 2 tensors
    assert m["a"].all() and m["a"].shape == (3,) and not m["b"].any() and m["b"].shape == (2, 2)
    m = sensitive_mask(RES, threshold=0.46, granularity="tensor")
    assert m["a"].all() and not m["b"].any()
    m = sensitive_mask(RES, threshold=0.4, granularity="tensor")
    assert m["a"].all() and m["b"].all()


def test_mask_errors():
    with pytest.raises(ConfigError, match="exactly one"):
        sensitive_mask(RES)
    with pytest.raises(ConfigError, match="exactly one"):
        sensitive_mask(RES, fraction=0.1, threshold=0.1)
    with pytest.raises(ConfigError, match="fraction"):
        sensitive_mask(RES, fraction=1.5)
    with pytest.raises(ConfigError, match="threshold"):
        sensitive_mask(RES, threshold=float("nan"))
    with pytest.raises(ConfigError, match="granularity"):
        sensitive_mask(RES, fraction=0.1, granularity="layer")
    with pytest.raises(DataError, match="NaN"):
        sensitive_mask({"a": np.array([np.nan, 1.0])}, fraction=0.5)


# ---------------------------------------------------------------- masked aggregation and personalization

def make_sites(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"conv.weight": (4, 3), "conv.bias": (5,)}
    sites = ["s1", "s2", "s3"]
    updates = {s: {n: rng.normal(size=sh).astype(np.float32) for n, sh in shapes.items()} for s in sites}
    masks = {s: {n: rng.random(sh) < 0.4 for n, sh in shapes.items()} for s in sites}
    for s in sites:  # coordinates sensitive everywhere, and nowhere
        masks[s]["conv.bias"][0] = True
        masks[s]["conv.bias"][1] = False
    weights = {"s1": 1.0, "s2": 2.0, "s3": 5.0}
    return updates, masks, weights


def test_masked_aggregate_is_mean_over_non_sensitive_sites():
    updates, masks, weights = make_sites()
    agg, ok = masked_aggregate(updates, masks, weights)
    for name in updates["s1"]:
        assert agg[name].dtype == np.float32
        expected = np.zeros(updates["s1"][name].shape)
        expected_ok = np.zeros(expected.shape, dtype=bool)
        for idx in np.ndindex(expected.shape):
            kept = [s for s in updates if not masks[s][name][idx]]
            if kept:
                w = np.array([weights[s] for s in kept])
                v = np.array([float(updates[s][name][idx]) for s in kept])
                expected[idx] = (w * v).sum() / w.sum()
                expected_ok[idx] = True
        assert np.array_equal(ok[name], expected_ok)
        assert np.allclose(agg[name][expected_ok], expected[expected_ok], rtol=1e-6, atol=1e-7)
        assert np.all(agg[name][~expected_ok] == 0.0)
    assert not ok["conv.bias"][0] and ok["conv.bias"][1]
    assert np.isclose(agg["conv.bias"][1], sum(weights[s] * updates[s]["conv.bias"][1] for s in updates) / 8.0)


def test_masked_aggregate_never_mixes_sensitive_values():
    updates, masks, weights = make_sites(1)
    agg, ok = masked_aggregate(updates, masks, weights)
    poisoned = {s: {n: np.where(masks[s][n], np.float32(1e30), u) for n, u in upd.items()}
                for s, upd in updates.items()}
    agg2, ok2 = masked_aggregate(poisoned, masks, weights)
    for n in agg:
        assert np.array_equal(agg[n], agg2[n]) and np.array_equal(ok[n], ok2[n])
    # equal weights (None) == weights all 1
    a_none, _ = masked_aggregate(updates, masks)
    a_one, _ = masked_aggregate(updates, masks, {s: 1.0 for s in updates})
    for n in a_none:
        assert np.array_equal(a_none[n], a_one[n])
    # fill value where nobody aggregates
    a_fill, _ = masked_aggregate(updates, masks, weights, fill_value=-7.0)
    assert a_fill["conv.bias"][0] == -7.0


def test_personalize_keeps_sensitive_entries_bit_for_bit():
    updates, masks, weights = make_sites(2)
    agg, ok = masked_aggregate(updates, masks, weights)
    glob = {n: a.astype(np.float64) + 0.123456789 for n, a in agg.items()}  # another dtype: cast, never mixed
    for s in updates:
        local = dict(updates[s])
        local["bn.num_batches_tracked"] = np.array(7, dtype=np.int64)  # not federated: passed through
        out = personalize(glob, local, masks[s], aggregated=ok)
        assert np.array_equal(out["bn.num_batches_tracked"], local["bn.num_batches_tracked"])
        for n in glob:
            m = masks[s][n]
            assert out[n].dtype == local[n].dtype
            assert out[n][m].tobytes() == local[n][m].tobytes()  # bit-for-bit
            take = ~m & ok[n]
            assert np.array_equal(out[n][take], glob[n][take].astype(np.float32))
            assert np.array_equal(out[n][~ok[n]], local[n][~ok[n]])  # no aggregate: stays local
        out_no_agg = personalize(glob, updates[s], masks[s])
        for n in glob:
            assert np.array_equal(out_no_agg[n][~masks[s][n]], glob[n][~masks[s][n]].astype(np.float32))
    # torch state dict works too
    t_local = {n: torch.from_numpy(v.copy()) for n, v in updates["s1"].items()}
    out = personalize(glob, t_local, masks["s1"])
    assert np.array_equal(out["conv.bias"][masks["s1"]["conv.bias"]],
                          updates["s1"]["conv.bias"][masks["s1"]["conv.bias"]])


def test_aggregate_and_personalize_errors():
    updates, masks, weights = make_sites(3)
    bad = {s: dict(u) for s, u in updates.items()}
    bad["s2"]["conv.bias"] = np.ones(6, dtype=np.float32)
    with pytest.raises(UpdateRejected, match="s2"):
        masked_aggregate(bad, masks, weights)
    bad = {s: dict(u) for s, u in updates.items()}
    bad["s3"]["conv.bias"] = np.full(5, np.nan, dtype=np.float32)
    with pytest.raises(UpdateRejected, match="NaN"):
        masked_aggregate(bad, masks, weights)
    bad_m = {s: dict(m) for s, m in masks.items()}
    bad_m["s1"]["conv.weight"] = np.zeros((3, 4), dtype=bool)
    with pytest.raises(DataError, match="shape"):
        masked_aggregate(updates, bad_m, weights)
    bad_m = {s: dict(m) for s, m in masks.items()}
    bad_m["s1"]["conv.weight"] = bad_m["s1"]["conv.weight"].astype(np.float32)
    with pytest.raises(DataError, match="bool"):
        masked_aggregate(updates, bad_m, weights)
    with pytest.raises(DataError, match="masks"):
        masked_aggregate(updates, {"s1": masks["s1"]}, weights)
    with pytest.raises(ConfigError, match="weight"):
        masked_aggregate(updates, masks, {"s1": 1.0, "s2": 0.0, "s3": 1.0})
    with pytest.raises(ConfigError, match="weights"):
        masked_aggregate(updates, masks, {"s1": 1.0})
    with pytest.raises(DataError, match="shapes"):
        personalize({"conv.bias": np.zeros(4)}, {"conv.bias": np.zeros(5)}, {"conv.bias": np.zeros(4, bool)})
    with pytest.raises(DataError, match="same names"):
        personalize({"a": np.zeros(2)}, {"a": np.zeros(2)}, {"b": np.zeros(2, bool)})
    with pytest.raises(DataError, match="lacks"):
        personalize({"a": np.zeros(2)}, {"b": np.zeros(2)}, {"a": np.zeros(2, bool)})
