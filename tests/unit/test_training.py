"""LocalTrainer on in-memory arrays: step counts, update convention, FedGS vs FedAvg, evaluation."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fedseg.errors import ConfigError
from fedseg.training import LocalTrainer, TrainConfig, evaluate_model, load_state, resolve_device
from torch import nn


def _data(n=10, size=16, seed=0, small_every=3):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        r = 2 if i % small_every == 0 else 5
        c = rng.integers(r, size - r, 2)
        yy, xx = np.ogrid[:size, :size]
        masks[i] = ((yy - c[0]) ** 2 + (xx - c[1]) ** 2 <= r * r)
    images = (masks * 2.0 - 1.0 + 0.1 * rng.standard_normal(masks.shape)).astype(np.float16)
    small = np.array([i % small_every == 0 for i in range(n)])
    delta = np.where(small, 0.5, 0.0).astype(np.float32)
    return SimpleNamespace(images=images, masks=masks, delta=delta, small=small, nonempty=masks.any((1, 2)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 1, 1))

    def forward(self, x):
        return self.body(x)


def _trainer(aggregation="fedgs", epochs=2, bs=4, data=None, **kw):
    torch.manual_seed(0)
    cfg = TrainConfig(lr=1e-2, batch_size=bs, local_epochs=epochs, aggregation=aggregation, augment=False,
                      device="cpu", **kw)
    return LocalTrainer(Net(), data or _data(), cfg)


def test_round_counts_steps_and_sends_weight_diff_of_float_entries():
    tr = _trainer()
    state = {k: v.clone() for k, v in tr.model.state_dict().items()}
    res = tr.train_round(state)
    assert res.steps == 2 * math.ceil(10 / 4)
    floats = {k for k, v in state.items() if v.is_floating_point()}
    assert set(res.update) == floats  # num_batches_tracked is never sent
    assert 1.0 < res.metrics["eta_mean"] and 0 < res.metrics["scaled_step_fraction"] <= 1
    assert res.metrics["n_samples"] == 10  # training samples (the CSAHE ring weights n_k / sum n)


def test_fedavg_update_is_minus_the_parameter_change():
    tr = _trainer("fedavg")
    state = {k: v.clone() for k, v in tr.model.state_dict().items()}
    res = tr.train_round(state)
    assert res.metrics["eta_mean"] == 1.0
    for name, p in tr.model.named_parameters():
        np.testing.assert_allclose(res.update[name], (p.detach() - state[name]).numpy(), rtol=1e-5, atol=1e-7)


def test_fedgs_update_is_larger_than_fedavg_when_small_lesions_present():
    a, b = _trainer("fedavg"), _trainer("fedgs")
    state = {k: v.clone() for k, v in a.model.state_dict().items()}
    ua, ub = a.train_round(state).update, b.train_round(state).update
    # identical local trajectory (same seed), FedGS only rescales what is accumulated
    for (na, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        torch.testing.assert_close(pa, pb)
    norm = lambda u: sum(float(np.sum(v.astype(np.float64) ** 2)) for k, v in u.items() if "running" not in k)
    assert norm(ub) > norm(ua)


def test_max_steps_caps_a_round_and_optimizer_resets():
    tr = _trainer(epochs=5, max_steps_per_round=3)
    state = {k: v.clone() for k, v in tr.model.state_dict().items()}
    assert tr.train_round(state).steps == 3
    first_opt = tr._optimizer
    tr.train_round(state)
    assert tr._optimizer is not first_opt


def test_training_learns_and_evaluation_reports_dice_groups():
    data = _data(n=24)
    tr = _trainer(epochs=15, data=data)
    state = {k: v.clone() for k, v in tr.model.state_dict().items()}
    before = tr.evaluate(data, state)["dice"]
    res = tr.train_round(state)
    new = {k: state[k] + torch.from_numpy(res.update[k]) if k in res.update else state[k] for k in state}
    after = tr.evaluate(data, new)
    assert after["dice"] > before + 0.2
    assert after["n_small"] == int(data.small.sum()) and after["n_large"] == int((~data.small).sum())
    assert after["per_image_dice"].shape == (24,)


def test_abort_stops_training():
    tr = _trainer()
    with pytest.raises(InterruptedError):
        tr.train_round(tr.model.state_dict(), should_stop=lambda: True)


def test_bad_config_and_state_are_explained():
    with pytest.raises(ConfigError, match="aggregation"):
        TrainConfig(aggregation="fedprox")
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="lacks"):
        load_state(Net(), {})
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            resolve_device("cuda")
    assert resolve_device("auto").type in ("cpu", "cuda")


def test_evaluate_model_empty_prediction_on_empty_truth_scores_one():
    data = _data(n=4)
    data.masks[:] = 0
    data.nonempty = np.zeros(4, bool)
    net = Net()
    with torch.no_grad():
        net.body[-1].bias.fill_(-100.0)  # predicts background everywhere
    out = evaluate_model(net, data, torch.device("cpu"))
    assert out["dice"] == 1.0 and out["dice_s"] is None and out["dice_l"] is None


def test_load_state_clamps_negative_batchnorm_variances_from_noised_aggregates():
    """A DP-noised aggregate can make a small running_var negative; BatchNorm would then output NaN."""
    from fedseg.training import load_state

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.BatchNorm2d(2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["1.running_var"] = torch.tensor([-0.3, 0.7])
    state["1.running_mean"] = torch.tensor([-0.3, 0.7])  # a mean may be negative: untouched
    load_state(model, state)
    assert model[1].running_var.tolist() == [0.0, pytest.approx(0.7)]
    assert model[1].running_mean.tolist() == [pytest.approx(-0.3), pytest.approx(0.7)]
    model.eval()
    assert torch.isfinite(model(torch.randn(1, 1, 4, 4))).all()
