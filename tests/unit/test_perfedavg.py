"""Per-FedAvg local meta-steps (DESIGN.md section 3) against hand-computed closed forms and explicit Hessians."""

import copy

import pytest
import torch
from fedseg.algorithms.perfedavg import hessian_vector_product, local_adaptation, perfedavg_step
from fedseg.errors import ConfigError, DataError
from torch import nn
from torch.func import functional_call

TOL = 1e-6


def mse(pred, y):
    return ((pred - y) ** 2).mean()


class Scalar(nn.Module):
    """pred = w * x: f(w; (x, y)) = mean((w x - y)^2), grad = 2 mean(x (w x - y)), H = 2 mean(x^2)."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(float(w), dtype=torch.float64))

    def forward(self, x):
        return self.w * x


class Square(nn.Module):
    """pred = w^2 x: grad = 4 w mean(x (w^2 x - y)), H(w) = 12 w^2 mean(x^2) - 4 mean(x y) (depends on w)."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(float(w), dtype=torch.float64))

    def forward(self, x):
        return self.w ** 2 * x


def b(xs, ys):
    return torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)


D = b([1.0, 2.0], [1.0, 1.0])
D1 = b([1.0, 3.0], [2.0, 0.0])
D2 = b([2.0, 4.0], [0.0, 1.0])


def w_of(model):
    return model.w.item()


# ---------------------------------------------------------------- hand-computed 1-parameter linear model

def test_fo_step_scalar_by_hand():
    # w=0.5: grad f(w;D) = 2*mean([1*(-0.5), 2*0]) = -0.5 -> w_tmp = 0.5 + 0.1*0.5 = 0.55
    # grad f(w_tmp;D') = 2*mean([1*(0.55-2), 3*(1.65-0)]) = 2*1.75 = 3.5 -> w = 0.5 - 0.2*3.5 = -0.2
    m = Scalar(0.5)
    out = perfedavg_step(m, mse, D, D1, alpha=0.1, beta=0.2, variant="fo")
    assert w_of(m) == pytest.approx(-0.2, abs=TOL)
    assert out["loss"] == pytest.approx(0.125, abs=TOL)  # mean([0.25, 0])
    assert out["meta_loss"] == pytest.approx((1.45 ** 2 + 1.65 ** 2) / 2, abs=TOL)
    assert out["variant"] == "fo"


def test_hf_step_scalar_by_hand():
    # H(w;D'') = 2*mean([4, 16]) = 20; (1 - 0.1*20) * 3.5 = -3.5 -> w = 0.5 + 0.2*3.5 = 1.2
    m = Scalar(0.5)
    perfedavg_step(m, mse, D, D1, alpha=0.1, beta=0.2, variant="hf", batch_d2=D2)
    assert w_of(m) == pytest.approx(1.2, abs=TOL)


# ---------------------------------------------------------------- 2-parameter linear model, closed form

def test_fo_and_hf_two_parameter_closed_form():
    torch.manual_seed(0)
    X, Y = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    X1, Y1 = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    X2 = torch.randn(6, 2, dtype=torch.float64)
    Y2 = torch.randn(6, dtype=torch.float64)
    w0 = torch.tensor([0.3, -0.7], dtype=torch.float64)
    alpha, beta = 0.05, 0.3

    def grad(w, X, Y):
        return 2.0 / len(Y) * X.T @ (X @ w - Y)

    H2 = 2.0 / len(Y2) * X2.T @ X2
    g_out = grad(w0 - alpha * grad(w0, X, Y), X1, Y1)
    expected = {"fo": w0 - beta * g_out, "hf": w0 - beta * (torch.eye(2, dtype=torch.float64) - alpha * H2) @ g_out}

    for variant in ("fo", "hf"):
        lin = nn.Linear(2, 1, bias=False).double()
        with torch.no_grad():
            lin.weight.copy_(w0.view(1, 2))
        model = nn.Sequential(lin, nn.Flatten(0))
        perfedavg_step(model, mse, (X, Y), (X1, Y1), alpha, beta, variant=variant, batch_d2=(X2, Y2))
        assert torch.allclose(lin.weight.detach().view(2), expected[variant], atol=TOL), variant


# ---------------------------------------------------------------- HVP is at w, not w_tmp

def test_hvp_taken_at_w_not_w_tmp():
    w, alpha, beta = 0.8, 0.1, 0.05

    def grad(w, batch):
        x, y = batch
        return (4 * w * (x * (w * w * x - y)).mean()).item()

    def hess(w, batch):
        x, y = batch
        return (12 * w * w * (x * x).mean() - 4 * (x * y).mean()).item()

    w_tmp = w - alpha * grad(w, D)
    g = grad(w_tmp, D1)
    at_w = w - beta * (1 - alpha * hess(w, D2)) * g
    at_w_tmp = w - beta * (1 - alpha * hess(w_tmp, D2)) * g
    assert abs(at_w - at_w_tmp) > 1e-3  # the case distinguishes the two

    m = Square(w)
    perfedavg_step(m, mse, D, D1, alpha, beta, variant="hf", batch_d2=D2)
    assert w_of(m) == pytest.approx(at_w, abs=TOL)

    m = Square(w)
    perfedavg_step(m, mse, D, D1, alpha, beta, variant="fo")
    assert w_of(m) == pytest.approx(w - beta * g, abs=TOL)


# ---------------------------------------------------------------- MLP: HVP against the explicit Hessian

def _mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1), nn.Flatten(0)).double()


def _flat_hessian(model, batch):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(v):
        parts = torch.split(v, sizes)
        params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        return mse(functional_call(model, params, (batch[0],)), batch[1])

    return torch.autograd.functional.hessian(f, flat)


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def _mlp_batches():
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64))
            for _ in range(3)]


def test_hvp_matches_explicit_hessian_on_mlp():
    model = _mlp()
    batch = _mlp_batches()[0]
    before = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(3)
    v = [torch.randn_like(p) for p in model.parameters()]
    hv = hessian_vector_product(model, mse, batch, v)
    H = _flat_hessian(model, batch)
    assert torch.allclose(_flat(hv), H @ _flat(v), atol=TOL)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_fo_and_hf_differ_by_beta_alpha_hvp():
    base = _mlp()
    d, d1, d2 = _mlp_batches()
    alpha, beta = 0.07, 0.3

    # outer gradient by hand: manual inner SGD step on a copy, gradient on D'
    tmp = copy.deepcopy(base)
    g_in = torch.autograd.grad(mse(tmp(d[0]), d[1]), list(tmp.parameters()))
    with torch.no_grad():
        for p, g in zip(tmp.parameters(), g_in):
            p.sub_(alpha * g)
    g_out = _flat(torch.autograd.grad(mse(tmp(d1[0]), d1[1]), list(tmp.parameters())))
    h = _flat_hessian(base, d2) @ g_out  # Hessian at w (base), not at w_tmp
    w0 = _flat([p.detach() for p in base.parameters()])

    fo, hf = copy.deepcopy(base), copy.deepcopy(base)
    perfedavg_step(fo, mse, d, d1, alpha, beta, variant="fo")
    perfedavg_step(hf, mse, d, d1, alpha, beta, variant="hf", batch_d2=d2)
    w_fo = _flat([p.detach() for p in fo.parameters()])
    w_hf = _flat([p.detach() for p in hf.parameters()])
    assert torch.allclose(w_fo, w0 - beta * g_out, atol=TOL)
    assert torch.allclose(w_hf - w_fo, beta * alpha * h, atol=TOL)
    assert (beta * alpha * h).abs().max() > 1e-4  # the difference is not trivially zero


# ---------------------------------------------------------------- parameters and buffers

def test_frozen_and_unused_parameters():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
            self.frozen = nn.Parameter(torch.tensor(2.0, dtype=torch.float64), requires_grad=False)
            self.unused = nn.Parameter(torch.tensor(3.0, dtype=torch.float64))

        def forward(self, x):
            return self.a * self.frozen * x

    m = M()
    perfedavg_step(m, mse, D, D1, 0.1, 0.2, variant="hf", batch_d2=D2)
    assert m.frozen.item() == 2.0 and m.unused.item() == 3.0
    assert m.a.item() != 0.5


def test_batchnorm_buffers_follow_model_mode():
    torch.manual_seed(4)
    x, y = torch.randn(8, 3), torch.randn(8)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 1), nn.Flatten(0))
    bn = model[1]
    perfedavg_step(model, mse, (x, y), (x, y), 0.01, 0.01, variant="hf", batch_d2=(x, y))
    assert bn.num_batches_tracked.item() == 3  # one train-mode forward each on D, D', D''
    perfedavg_step(model, mse, (x, y), (x, y), 0.01, 0.01, variant="fo")
    assert bn.num_batches_tracked.item() == 5
    model.eval()
    mean = bn.running_mean.clone()
    perfedavg_step(model, mse, (x, y), (x, y), 0.01, 0.01, variant="hf", batch_d2=(x, y))
    assert bn.num_batches_tracked.item() == 5 and torch.equal(bn.running_mean, mean)


# ---------------------------------------------------------------- local adaptation

@pytest.mark.parametrize("steps", [0, 1, 4])
def test_local_adaptation_equals_manual_sgd(steps):
    batches = _mlp_batches()[:2]  # fewer batches than steps: the list restarts
    model, manual = _mlp(), _mlp()
    assert local_adaptation(model, mse, batches, 0.05, steps) is model
    for t in range(steps):
        x, y = batches[t % len(batches)]
        grads = torch.autograd.grad(mse(manual(x), y), list(manual.parameters()))
        with torch.no_grad():
            for p, g in zip(manual.parameters(), grads):
                p.sub_(0.05 * g)
    for p, q in zip(model.parameters(), manual.parameters()):
        assert torch.allclose(p, q, atol=TOL)


def test_local_adaptation_scalar_by_hand():
    m = Scalar(0.5)
    local_adaptation(m, mse, [D], 0.1, 2)
    # step 1: grad -0.5 -> 0.55; step 2: grad = 2*mean([0.55-1, 2*(1.1-1)]) = -0.25 -> 0.575
    assert w_of(m) == pytest.approx(0.575, abs=TOL)


@pytest.mark.parametrize("steps", [5, 10, -1, 2.0, True])
def test_local_adaptation_refuses_bad_gamma(steps):
    with pytest.raises(ConfigError, match="gamma"):
        local_adaptation(Scalar(0.5), mse, [D], 0.1, steps)


def test_local_adaptation_exhausted_generator():
    with pytest.raises(DataError, match="ran out after 1 of 3"):
        local_adaptation(Scalar(0.5), mse, (bt for bt in [D]), 0.1, 3)


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("name", ["alpha", "beta"])
@pytest.mark.parametrize("value", [0, -0.1, float("nan"), float("inf"), "0.1", None, True])
def test_bad_step_sizes_refused(name, value):
    kwargs = {"alpha": 0.1, "beta": 0.2, name: value}
    m = Scalar(0.5)
    with pytest.raises(ConfigError, match=name):
        perfedavg_step(m, mse, D, D1, variant="fo", **kwargs)
    assert w_of(m) == 0.5


@pytest.mark.parametrize("variant", ["sgd", "", None, "second-order"])
def test_bad_variant_refused(variant):
    with pytest.raises(ConfigError, match="variant"):
        perfedavg_step(Scalar(0.5), mse, D, D1, 0.1, 0.2, variant=variant, batch_d2=D2)


def test_hf_without_third_batch_refused():
    m = Scalar(0.5)
    with pytest.raises(ConfigError, match="batch_d2"):
        perfedavg_step(m, mse, D, D1, 0.1, 0.2, variant="hf")
    assert w_of(m) == 0.5


def test_hvp_vector_shape_checked():
    with pytest.raises(ConfigError, match="shape"):
        hessian_vector_product(_mlp(), mse, _mlp_batches()[0], [torch.zeros(2)] * 4)
    with pytest.raises(ConfigError, match="4 trainable"):
        hessian_vector_product(_mlp(), mse, _mlp_batches()[0], [torch.zeros(2)])


def test_failed_outer_loss_restores_w():
    m = Scalar(0.5)
    with pytest.raises(DataError):
        perfedavg_step(m, mse, D, "not a batch", 0.1, 0.2)
    assert w_of(m) == 0.5
