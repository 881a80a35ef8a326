"""Per-FedAvg in LocalTrainer: meta-steps against closed forms, batches, update convention, personalization, hooks."""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fedseg.errors import ConfigError
from fedseg.training import LocalTrainer, TrainConfig
from torch import nn

SEED = 3
W0, B0 = 0.5, -0.2


def mse(pred, y):
    return ((pred - y) ** 2).mean()


def _data(n=6, size=2, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n, size, size)).astype(np.float32)
    masks = (rng.random((n, size, size)) < 0.5).astype(np.uint8)
    masks[:, 0, 0] = 1  # every image non-empty
    small = np.arange(n) % 2 == 0
    return SimpleNamespace(images=images, masks=masks, delta=np.where(small, 0.5, 0.0).astype(np.float32),
                           small=small, nonempty=masks.any((1, 2)))


def _linear():
    """pred = w * x + b per pixel (1x1 convolution): f = mean((w x + b - y)^2) is quadratic in (w, b)."""
    net = nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        net.weight.fill_(W0)
        net.bias.fill_(B0)
    return net


def _trainer(variant="fo", model=None, data=None, bs=2, epochs=1, alpha=0.3, beta=0.2, **kw):
    cfg = TrainConfig(algorithm="perfedavg", aggregation="fedavg", perfedavg_variant=variant, alpha=alpha, beta=beta,
                      batch_size=bs, local_epochs=epochs, augment=False, device="cpu", seed=SEED, **kw)
    return LocalTrainer(model if model is not None else _linear(), data if data is not None else _data(), cfg,
                        loss_fn=mse)


def _state(tr):
    return {k: v.detach().clone() for k, v in tr.model.state_dict().items()}


# ---------------------------------------------------------------- closed form on the linear model

def _xy(data, idx):
    return data.images[idx].astype(np.float64).ravel(), data.masks[idx].astype(np.float64).ravel()


def _grad(theta, batch):
    x, y = batch
    r = theta[0] * x + theta[1] - y
    return np.array([2 * np.mean(r * x), 2 * np.mean(r)])


def _hess(batch):
    x, _ = batch
    return 2 * np.array([[np.mean(x * x), np.mean(x)], [np.mean(x), 1.0]])


def _loss(theta, batch):
    x, y = batch
    return float(np.mean((theta[0] * x + theta[1] - y) ** 2))


def _batches(data, n, bs, k):
    """The documented rule: D, D', D'' are consecutive chunks of the epoch's permutation (seeded by cfg.seed)."""
    order = np.random.default_rng(SEED).permutation(n)
    return [_xy(data, np.sort(order[j * bs:(j + 1) * bs])) for j in range(k)]


@pytest.mark.parametrize("variant", ["fo", "hf"])
def test_one_meta_step_matches_closed_form(variant):
    data = _data(n=6)
    alpha, beta = 0.3, 0.2
    # HF: 6 samples = one group of 3 batches of 2 -> exactly one meta-step; FO: cap the round at one step
    tr = _trainer(variant, data=data, alpha=alpha, beta=beta, max_steps_per_round=1)
    res = tr.train_round(_state(tr))
    k = 3 if variant == "hf" else 2
    batches = _batches(data, 6, 2, k)
    theta0 = np.array([W0, B0])
    theta_tmp = theta0 - alpha * _grad(theta0, batches[0])
    g_out = _grad(theta_tmp, batches[1])
    direction = g_out if variant == "fo" else (np.eye(2) - alpha * _hess(batches[2])) @ g_out
    expected = theta0 - beta * direction
    got = np.array([tr.model.weight.item(), tr.model.bias.item()])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # the update is w_T - w_0 (WEIGHT_DIFF: new = old + diff)
    np.testing.assert_allclose([res.update["weight"].item(), res.update["bias"].item()], expected - theta0,
                               rtol=1e-4, atol=1e-6)
    assert res.steps == 1
    assert res.metrics["train_loss"] == pytest.approx(_loss(theta0, batches[0]), rel=1e-5)
    assert res.metrics["meta_loss"] == pytest.approx(_loss(theta_tmp, batches[1]), rel=1e-5)
    assert res.metrics["n_samples"] == 6 and res.metrics["train_seconds"] > 0


def test_hf_and_fo_differ_by_the_hessian_term():
    data = _data(n=6)
    fo, hf = _trainer("fo", data=data, max_steps_per_round=1), _trainer("hf", data=data)
    u_fo, u_hf = fo.train_round(_state(fo)).update, hf.train_round(_state(hf)).update
    # same permutation, same D and D': u_hf - u_fo = beta * alpha * H(D'') g_out, not zero here
    diff = np.array([u_hf["weight"].item() - u_fo["weight"].item(), u_hf["bias"].item() - u_fo["bias"].item()])
    batches = _batches(data, 6, 2, 3)
    theta0 = np.array([W0, B0])
    g_out = _grad(theta0 - 0.3 * _grad(theta0, batches[0]), batches[1])
    np.testing.assert_allclose(diff, 0.2 * 0.3 * _hess(batches[2]) @ g_out, rtol=1e-4, atol=1e-6)
    assert np.abs(diff).max() > 1e-3


# ---------------------------------------------------------------- batches, steps, update convention

class Recording(SimpleNamespace):
    """A dataset with the ``batch`` hook that records the rows of every batch."""

    def batch(self, idx):
        self.calls.append(np.array(idx))
        x = torch.from_numpy(self.images[idx].astype(np.float32)).unsqueeze(1)
        y = torch.from_numpy(self.masks[idx].astype(np.float32)).unsqueeze(1)
        return x, y


def _recording(n):
    return Recording(calls=[], **vars(_data(n=n)))


@pytest.mark.parametrize("variant, n, bs, per_epoch, sizes", [
    ("hf", 10, 2, 2, [[2, 2, 2], [2, 1, 1]]),  # 6 + a remainder of 4 >= 3 split near-equally
    ("hf", 7, 2, 1, [[2, 2, 2]]),  # remainder 1 < 3 samples: left out of this epoch
    ("fo", 7, 2, 2, [[2, 2], [2, 1]]),
    ("fo", 3, 4, 1, [[2, 1]]),  # fewer samples than one batch: one step on the split permutation
])
def test_three_batches_disjoint_and_steps_per_epoch(variant, n, bs, per_epoch, sizes):
    data = _recording(n)
    k = 3 if variant == "hf" else 2
    tr = _trainer(variant, data=data, bs=bs, epochs=3)
    res = tr.train_round(_state(tr))
    assert res.steps == 3 * per_epoch
    # the hf meta-step evaluates D'' only inside the HVP; every batch is fetched once, in order D, D', D''
    assert len(data.calls) == 3 * per_epoch * k
    for epoch in range(3):
        calls = data.calls[epoch * per_epoch * k:(epoch + 1) * per_epoch * k]
        seen = np.concatenate(calls)
        assert len(np.unique(seen)) == len(seen)  # disjoint within a step and within an epoch
        assert [[len(c) for c in calls[s * k:(s + 1) * k]] for s in range(per_epoch)] == sizes


def test_update_sign_convention_and_buffers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Conv2d(2, 1, 1))
    tr = _trainer("hf", model=net, data=_data(n=12), epochs=2)
    start = _state(tr)
    res = tr.train_round(start)
    assert res.steps == 4
    after = tr.model.state_dict()
    floats = {k for k, v in start.items() if v.is_floating_point()}
    assert set(res.update) == floats  # num_batches_tracked is never sent
    for name in floats:  # parameters: w_T - w_0; BN running statistics: b_local - b_global
        np.testing.assert_allclose(res.update[name], (after[name] - start[name]).numpy(), rtol=1e-6, atol=1e-7)
    assert np.abs(res.update["0.weight"]).max() > 0 and np.abs(res.update["1.running_mean"]).max() > 0
    assert after["1.num_batches_tracked"].item() == start["1.num_batches_tracked"].item() + 4 * 3  # D, D', D''


def test_max_steps_caps_meta_steps_and_abort():
    tr = _trainer("fo", data=_data(n=20), epochs=5, max_steps_per_round=3)
    assert tr.train_round(_state(tr)).steps == 3
    with pytest.raises(InterruptedError):
        tr.train_round(_state(tr), should_stop=lambda: True)


def test_too_few_samples_refused():
    tr = _trainer("hf", data=_data(n=2))
    with pytest.raises(ConfigError, match="2 training sample"):
        tr.train_round(_state(tr))


# ---------------------------------------------------------------- personalization

def _full_batch_sgd(theta, data, alpha, steps):
    batch = _xy(data, np.arange(len(data.delta)))
    for _ in range(steps):
        theta = theta - alpha * _grad(theta, batch)
    return theta


@pytest.mark.parametrize("steps", [0, 1, 4])
def test_personalize_equals_manual_sgd_and_leaves_the_trainer_alone(steps):
    data = _data(n=6)
    tr = _trainer("fo", data=data, bs=8, alpha=0.1)  # batch >= n: every adaptation batch is the whole site
    twin = copy.deepcopy(tr)
    start = _state(tr)
    glob = {"weight": np.full((1, 1, 1, 1), 0.8, np.float32), "bias": np.array([0.1], np.float32)}
    pers = tr.personalize(glob, steps=steps)
    assert set(pers) == {"weight", "bias"} and all(isinstance(v, np.ndarray) for v in pers.values())
    expected = _full_batch_sgd(np.array([0.8, 0.1]), data, 0.1, steps)
    np.testing.assert_allclose([pers["weight"].item(), pers["bias"].item()], expected, rtol=1e-5, atol=1e-6)
    for k, v in tr.model.state_dict().items():
        assert torch.equal(v, start[k])  # the trainer's model is untouched
    # ... and so is what train_round draws: same update as a trainer that never personalized
    a, b = tr.train_round(start), twin.train_round(start)
    assert all(np.array_equal(a.update[k], b.update[k]) for k in a.update)


def test_personalize_uses_config_gamma_and_fresh_batches():
    data = _recording(9)
    tr = _trainer("fo", data=data, bs=4, alpha=0.1, adaptation_steps=3)
    pers = tr.personalize(_state(tr))
    assert len(data.calls) == 3 and all(len(c) == 4 for c in data.calls)
    assert len(np.intersect1d(data.calls[0], data.calls[1])) == 0  # consecutive chunks of one permutation
    assert not np.isclose(pers["weight"].item(), W0)
    tr.personalize(_state(tr))
    assert len(data.calls) == 6 and not all(np.array_equal(a, b) for a, b in zip(data.calls[:3], data.calls[3:]))


def test_personalize_after_sgd_training_too():
    data = _data(n=6)
    cfg = TrainConfig(aggregation="fedavg", batch_size=8, alpha=0.05, adaptation_steps=2, augment=False, device="cpu")
    tr = LocalTrainer(_linear(), data, cfg, loss_fn=mse)
    pers = tr.personalize(_state(tr))
    expected = _full_batch_sgd(np.array([W0, B0]), data, 0.05, 2)
    np.testing.assert_allclose([pers["weight"].item(), pers["bias"].item()], expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- hooks

class LossModel(nn.Module):
    """A model with its own training loss (like SD-UTNet): 3 * mse, so using loss_fn instead would show."""

    def __init__(self):
        super().__init__()
        self.net = _linear()
        self.calls = 0

    def forward(self, x):
        return self.net(x)

    def training_loss(self, x, y):
        self.calls += 1
        return 3.0 * mse(self.net(x), y)


def test_training_loss_hook_in_perfedavg_and_personalize():
    data = _data(n=6)
    model = LossModel()
    tr = _trainer("hf", model=model, data=data, alpha=0.1, beta=0.2)
    res = tr.train_round(_state(tr))
    assert model.calls == 3  # D, D' and the HVP on D''
    batches = _batches(data, 6, 2, 3)
    theta0 = np.array([W0, B0])
    g = lambda th, bt: 3 * _grad(th, bt)
    g_out = g(theta0 - 0.1 * g(theta0, batches[0]), batches[1])
    expected = theta0 - 0.2 * (np.eye(2) - 0.1 * 3 * _hess(batches[2])) @ g_out
    np.testing.assert_allclose([res.update["net.weight"].item(), res.update["net.bias"].item()], expected - theta0,
                               rtol=1e-4, atol=1e-6)
    tr2 = _trainer("fo", model=LossModel(), data=data, bs=8, alpha=0.05)
    pers = tr2.personalize(_state(tr2), steps=2)
    batch = _xy(data, np.arange(6))
    theta = theta0
    for _ in range(2):
        theta = theta - 0.05 * 3 * _grad(theta, batch)
    np.testing.assert_allclose([pers["net.weight"].item(), pers["net.bias"].item()], theta, rtol=1e-5, atol=1e-6)
    assert tr2.model.calls == 0  # personalize trained a copy


def test_training_loss_and_batch_hooks_in_the_adamw_path():
    data = _recording(6)
    model = LossModel()
    cfg = TrainConfig(aggregation="fedavg", batch_size=4, local_epochs=1, augment=False, device="cpu")
    res = LocalTrainer(model, data, cfg, loss_fn=mse).train_round(_state(SimpleNamespace(model=model)))
    assert res.steps == 2 and model.calls == 2 and res.metrics["n_samples"] == 6
    assert sorted(len(c) for c in data.calls) == [2, 4]


def test_evaluate_hook_is_used():
    seen = {}

    class Hooked(SimpleNamespace):
        def evaluate(self, model, device, batch_size):
            seen.update(training=model.training, device=device, bs=batch_size, w=model.weight.item())
            return {"dice": 0.25, "dice_s": None, "dice_l": 0.5, "n": 3, "n_small": 0, "n_large": 3, "extra": 1}

    tr = _trainer("fo")
    out = tr.evaluate(Hooked(**vars(_data())), {"weight": np.full((1, 1, 1, 1), 0.7, np.float32),
                                                "bias": np.zeros(1, np.float32)})
    assert out["dice"] == 0.25 and out["extra"] == 1
    assert seen == {"training": False, "device": torch.device("cpu"), "bs": 16, "w": pytest.approx(0.7)}


# ---------------------------------------------------------------- configuration

def test_config_validation():
    with pytest.raises(ConfigError, match="aggregation='fedavg'") as e:
        TrainConfig(algorithm="perfedavg", aggregation="fedgs")
    assert "neither" in str(e.value)
    with pytest.raises(ConfigError, match="aggregation='fedavg'"):
        TrainConfig(algorithm="perfedavg")  # the default aggregation is fedgs
    for gamma in (5, -1, 2.0, True):
        with pytest.raises(ConfigError, match="gamma"):
            TrainConfig(adaptation_steps=gamma)
    with pytest.raises(ConfigError, match="algorithm"):
        TrainConfig(algorithm="maml")
    with pytest.raises(ConfigError, match="perfedavg_variant"):
        TrainConfig(algorithm="perfedavg", aggregation="fedavg", perfedavg_variant="so")
    for name in ("alpha", "beta"):
        for bad in (0, -1e-3, float("nan"), "0.1"):
            with pytest.raises(ConfigError, match=name):
                TrainConfig(**{name: bad})
    TrainConfig(algorithm="perfedavg", aggregation="fedavg", perfedavg_variant="hf", adaptation_steps=4)
    with pytest.raises(ConfigError, match="gamma"):
        _trainer("fo").personalize({}, steps=5)
