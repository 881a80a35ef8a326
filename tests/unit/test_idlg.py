"""iDLG leakage evaluation (fedseg.attacks.idlg, `fedseg attack idlg`): metrics against hand-computed values, the
victim's update, the label-extraction sign rule, and the privacy claims themselves: a FedAvg update of one image
leaks it (PSNR > 25 dB), a CSAHE ring member's (key-leaked) view does not (PSNR near a random guess), and a DP-noised
update leaks less than FedAvg."""

from __future__ import annotations

import json
import math
import sys
import types

import numpy as np
import pytest
import torch
from fedseg.attacks import idlg
from fedseg.cli import main
from fedseg.data.config import DataSource
from fedseg.data.lits import LiTSPreprocessing, load_lits_site
from fedseg.errors import ConfigError, UpdateRejected

SIZE = 16
LR = 0.1
ITERATIONS = 150


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Single-threaded torch: faster for these tiny double-backward problems on a shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def sample(tiny_lits, tmp_path_factory):
    """The largest-tumour 16x16 slice of site-1's training data in the tiny synthetic LiTS: image [1, 1, 16, 16]
    in [-1, 1] and mask [1, 1, 16, 16]."""
    cache = tmp_path_factory.mktemp("idlg_cache")
    source = DataSource("lits", tiny_lits, None, None, cache, "test")
    ds = load_lits_site(source, "site-1", "train", LiTSPreprocessing(image_size=SIZE))
    masks = np.asarray(ds.masks)
    i = int(np.argmax(masks.reshape(len(ds), -1).sum(axis=1)))
    x = torch.from_numpy(np.asarray(ds.images[i], np.float32))[None, None]
    y = torch.from_numpy(masks[i].astype(np.float32))[None, None]
    assert y.sum() >= 3 and float(x.min()) >= -1 and float(x.max()) <= 1
    return x, y


@pytest.fixture(scope="module")
def setting(sample):
    x, y = sample
    model = idlg.build_attack_model("small_cnn", image_size=SIZE, seed=0)
    loss_fn = idlg.make_loss("dice")
    update = idlg.local_sgd_update(model, x, y, loss_fn, LR)
    return model, loss_fn, update


def _attack(model, loss_fn, sample, view, weight=1.0, **cfg):
    x, y = sample
    grads = idlg.gradient_from_view(model, view, LR, weight)
    config = idlg.AttackConfig(iterations=cfg.pop("iterations", ITERATIONS), seed=0, **cfg)
    result = idlg.idlg_attack(model, grads, x.shape[1:], loss_fn, config)
    return result, idlg.reconstruction_metrics(x[0].numpy(), y[0, 0].numpy(), result)


@pytest.fixture(scope="module")
def fedavg_attack(setting, sample):
    model, loss_fn, update = setting
    return _attack(model, loss_fn, sample, idlg.fedavg_view(update))


# ---------------------------------------------------------------------------------------------------------- metrics
def test_psnr_against_hand_computed_values():
    true = np.zeros((8, 8))
    recon = np.full((8, 8), 0.5)  # MSE = 0.25
    assert idlg.psnr(true, recon, 2.0) == pytest.approx(10 * math.log10(4 / 0.25))  # 12.0412 dB
    assert idlg.psnr(true, recon, 2.0) == pytest.approx(12.041199826559248)
    assert idlg.psnr(true, recon, 1.0) == pytest.approx(6.020599913279624)
    recon[0, 0] = 2.5  # one pixel off by 2.5: MSE = (63 * 0.25 + 6.25) / 64
    assert idlg.psnr(true, recon, 2.0) == pytest.approx(10 * math.log10(4 / ((63 * 0.25 + 6.25) / 64)))
    assert idlg.psnr(true, true, 2.0) == math.inf
    with pytest.raises(ConfigError):
        idlg.psnr(true, np.zeros((4, 4)), 2.0)


def test_ssim_against_hand_computed_values():
    a, b = np.full((16, 16), 0.5), np.full((16, 16), -0.5)
    # constant images: variances and covariance are 0, so SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1),
    # C1 = (0.01 * data_range)^2 = 4e-4
    c1 = (0.01 * 2.0) ** 2
    assert idlg.ssim(a, b, 2.0) == pytest.approx((2 * 0.5 * -0.5 + c1) / (0.25 + 0.25 + c1))  # -0.99840
    assert idlg.ssim(a, b, 2.0) == pytest.approx(-0.9984012789768185)
    rng = np.random.default_rng(0)
    img = rng.uniform(-1, 1, (3, 16, 16))
    assert idlg.ssim(img, img, 2.0) == pytest.approx(1.0)  # [C, H, W] with channels
    assert idlg.ssim(img[:1], img[:1], 2.0) == pytest.approx(1.0)  # [1, H, W] as grey
    # a 7x7 image is one 7x7 window: SSIM = (2 mx my + C1)(2 cov + C2) / ((mx^2 + my^2 + C1)(vx + vy + C2)) with
    # sample (ddof 1) variances / covariance, C2 = (0.03 * data_range)^2
    x7 = rng.uniform(-1, 1, (7, 7))
    y7 = 0.5 * x7 + rng.normal(0, 0.2, (7, 7)) + 0.1
    mx, my = x7.mean(), y7.mean()
    vx, vy = x7.var(ddof=1), y7.var(ddof=1)
    cov = ((x7 - mx) * (y7 - my)).sum() / 48
    c2 = (0.03 * 2.0) ** 2
    expected = (2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert idlg.ssim(x7, y7, 2.0) == pytest.approx(expected, rel=1e-9)
    assert idlg.ssim(np.full((5, 5), 0.2), np.full((5, 5), 0.2), 2.0) == pytest.approx(1.0)  # window shrinks to 5


def test_dice_and_total_variation_against_hand_computed_values():
    p = np.array([[1, 1, 0], [0, 0, 0]], bool)
    t = np.array([[1, 0, 0], [1, 1, 0]], bool)
    assert idlg.dice_binary(p, t) == pytest.approx(2 * 1 / (2 + 3))
    assert idlg.dice_binary(np.zeros(4), np.zeros(4)) == 1.0
    assert idlg.dice_binary(np.ones(4), np.zeros(4)) == 0.0
    x = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    assert float(idlg.total_variation(x)) == pytest.approx(2.0 + 1.0)  # vertical |2|,|2| mean 2; horizontal 1


def test_gradient_match_losses_against_hand_computed_values():
    d = [torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0, 3.0])]
    t = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 4.0, 3.0])]
    assert float(idlg.gradient_match_loss(d, t, "l2")) == pytest.approx((4 + 16) / (1 + 16 + 9))
    assert float(idlg.gradient_match_loss(d, t, "l2-layer")) == pytest.approx((4 / 1 + 16 / 25) / 2)
    assert float(idlg.gradient_match_loss(d, t, "cosine")) == pytest.approx(1 - 10 / math.sqrt(14 * 26))
    t0 = [torch.tensor([1.0, 0.0]), torch.zeros(3)]  # a layer rounded away: divided by the total norm instead
    assert float(idlg.gradient_match_loss(d, t0, "l2-layer")) == pytest.approx((4 / 1 + 9 / 1) / 2)
    with pytest.raises(ConfigError):
        idlg.gradient_match_loss(d, t, "l1")


# ---------------------------------------------------------------------------------------------------------- victim
def test_local_sgd_update_is_minus_lr_times_the_gradient(setting, sample):
    model, loss_fn, update = setting
    x, y = sample
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = idlg.build_attack_model("small_cnn", image_size=SIZE, seed=0)
    loss = loss_fn(ref(x), y)
    grads = dict(zip([n for n, _ in ref.named_parameters()], torch.autograd.grad(loss, list(ref.parameters()))))
    assert set(update) == set(grads)
    for name, g in grads.items():
        assert update[name].dtype == np.float32
        np.testing.assert_allclose(update[name], -LR * g.numpy(), rtol=1e-3, atol=1e-8)
    recovered = idlg.gradient_from_view(model, update, LR)
    for name, g in grads.items():
        np.testing.assert_allclose(recovered[name].numpy(), g.numpy(), rtol=1e-3, atol=1e-7)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the global model is untouched
    with pytest.raises(ConfigError):
        idlg.local_sgd_update(model, x, y, loss_fn, 0.0)
    with pytest.raises(ConfigError):
        idlg.gradient_from_view(model, {k: v for k, v in update.items() if k != "head.bias"}, LR)


@pytest.mark.parametrize("loss", ["dice", "bce"])
def test_mask_extraction_sign_rule_recovers_the_mask_exactly(sample, loss):
    x, y = sample
    for seed in (0, 1):
        model = idlg.build_attack_model("small_cnn", image_size=SIZE, seed=seed)
        update = idlg.local_sgd_update(model, x, y, idlg.make_loss(loss), LR)
        mask = idlg.extract_mask(model, idlg.gradient_from_view(model, update, LR), (SIZE, SIZE))
        np.testing.assert_array_equal(mask, y[0, 0].numpy() > 0)
    conv = idlg.build_attack_model("small_cnn", image_size=SIZE, head="conv")
    update = idlg.local_sgd_update(conv, x, y, idlg.make_loss(loss), LR)
    assert idlg.extract_mask(conv, idlg.gradient_from_view(conv, update, LR), (SIZE, SIZE)) is None


# ---------------------------------------------------------------------------------------------------------- scenarios
def test_fedavg_update_leaks_the_image_and_the_mask(fedavg_attack):
    result, m = fedavg_attack
    assert result.label_init == "extracted" and result.iterations == ITERATIONS and not result.stopped_early
    assert m["psnr"] > 25.0, m
    assert m["ssim"] > 0.8, m
    assert m["mask_dice"] == 1.0
    assert result.final_loss < 1e-2 * result.losses[0]
    assert [it for it, _ in result.snapshots] == [0, ITERATIONS]


def test_csahe_member_view_does_not_leak(setting, sample, fedavg_attack):
    model, loss_fn, update = setting
    x, _ = sample
    weight, sigma = 1 / 3, 100.0
    view, info = idlg.csahe_member_view(update, weight, sigma, method="decrypt")
    assert info["method"] == "decrypt" and info["ciphertexts"] > 0 and info["sigma"] == sigma
    assert info["snr"] < 1e-4  # |w_I Delta| / |R|
    noise = np.concatenate([(view[k] - weight * update[k].astype(np.float64)).ravel() for k in update])
    assert np.std(noise) == pytest.approx(sigma, rel=0.05) and abs(np.mean(noise)) < 0.1 * sigma
    _, m = _attack(model, loss_fn, sample, view, weight)
    random_guess = idlg.baseline_metrics(x[0].numpy())["uniform_random"]["psnr"]
    assert m["psnr"] < 12.0, m
    assert m["psnr"] < random_guess + 3.0
    assert m["psnr"] < fedavg_attack[1]["psnr"] - 15.0
    assert abs(m["ssim"]) < 0.2
    with pytest.raises(ConfigError):  # the paper's mask must be large: sigma >= 100
        idlg.csahe_member_view(update, weight, 10.0)


def test_csahe_plaintext_view_adds_the_same_mask_without_ckks(setting):
    _, _, update = setting
    view, info = idlg.csahe_member_view(update, 0.5, 1000.0, method="plaintext")
    assert info["method"] == "plaintext" and info["ciphertexts"] == 0
    noise = np.concatenate([(view[k] - 0.5 * update[k].astype(np.float64)).ravel() for k in update])
    assert np.std(noise) == pytest.approx(1000.0, rel=0.05)
    assert {k: v.shape for k, v in view.items()} == {k: v.shape for k, v in update.items()}


def _laplace_mechanism(clip_l1: float, epsilon: float, seed: int = 0):
    """Test-local DP mechanism: clip the whole update to L1 norm clip_l1, add Laplace(clip_l1 / epsilon) noise."""
    rng = np.random.default_rng(seed)

    def mechanism(update):
        norm = sum(float(np.abs(v).sum()) for v in update.values())
        factor = min(1.0, clip_l1 / norm) if norm > 0 else 1.0
        return {k: (v * factor + rng.laplace(0.0, clip_l1 / epsilon, v.shape)).astype(v.dtype)
                for k, v in update.items()}

    return mechanism


def test_laplace_test_mechanism_clips_in_l1():
    update = {"a": np.array([3.0, -1.0]), "b": np.array([0.0])}  # L1 norm 4
    clipped = _laplace_mechanism(2.0, 1e12)(update)  # negligible noise: only the clipping shows
    np.testing.assert_allclose(clipped["a"], [1.5, -0.5], atol=1e-9)


def test_dp_view_leaks_less_than_fedavg(setting, sample, fedavg_attack):
    """The real mechanism (fedseg.algorithms.adaptive_dp, one round, L1 clip + Laplace) at epsilon 10, with the
    attacker's best threshold: the update's own L1 norm (nothing clipped away; not a DP choice, an upper bound)."""
    from fedseg.algorithms.adaptive_dp import idlg_mechanism

    model, loss_fn, update = setting
    l1 = sum(float(np.abs(v.astype(np.float64)).sum()) for v in update.values())
    mechanism = idlg_mechanism(epsilon=10.0, seed=0, clip=l1)
    view = idlg.dp_view(update, mechanism)
    assert set(view) == set(update)
    assert mechanism.last_report["noise_scale"] == pytest.approx(2 * l1 / 10.0)
    _, m = _attack(model, loss_fn, sample, view)
    assert m["psnr"] < fedavg_attack[1]["psnr"] - 10.0, m
    assert m["ssim"] < fedavg_attack[1]["ssim"] - 0.3, m
    with pytest.raises(UpdateRejected):
        idlg.dp_view(update, lambda u: {k: v for k, v in u.items() if k != "head.bias"})
    with pytest.raises(UpdateRejected):
        idlg.dp_view(update, lambda u: {k: v * np.nan for k, v in u.items()})


def test_attack_config_is_validated():
    for bad in ({"iterations": 0}, {"optimizer": "sgd"}, {"match": "l1"}, {"label": "guess"}, {"tv_weight": -1.0},
                {"step_size": 0.0}):
        with pytest.raises(ConfigError):
            idlg.AttackConfig(**bad)
    with pytest.raises(ConfigError):
        idlg.build_attack_model("small_cnn", image_size=SIZE, depth=3)


# ---------------------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def tiny_builtin_lits(tiny_builtin):
    import fedseg.data.lits as lits_module
    from fedseg.data.config import ensure_builtin_lits

    return tiny_builtin(lits_module, ensure_builtin_lits)


def test_cli_end_to_end_writes_json_markdown_and_figure(tmp_path, capsys, tiny_builtin_lits):
    out = tmp_path / "idlg"
    rc = main(["attack", "idlg", "--scenario", "fedavg", "csahe-member", "--image-size", "16", "--iterations", "12",
               "--snapshot-every", "4", "--threads", "1", "--out", str(out)])
    assert rc == 0
    assert tiny_builtin_lits == [1]  # the built-in LiTS data was used (the test's tiny preset)
    summary = json.loads((out / "results.json").read_text())
    assert list(summary["scenarios"]) == ["fedavg", "csahe-member"]
    for r in summary["scenarios"].values():
        assert {"psnr", "ssim", "mask_dice", "iterations", "seconds", "label"} <= set(r)
    assert summary["scenarios"]["csahe-member"]["view"]["method"] == "decrypt"
    assert summary["scenarios"]["fedavg"]["psnr"] > summary["scenarios"]["csahe-member"]["psnr"]
    assert summary["data"]["image_shape"] == [1, 16, 16] and summary["model"]["name"] == "small_cnn"
    md = (out / "results.md").read_text()
    assert "| scenario | the attacker inverts | PSNR (dB) | SSIM |" in md and "| fedavg |" in md
    assert (out / "idlg.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    arrays = np.load(out / "reconstructions.npz")
    assert arrays["fedavg_snapshots"].shape == (4, 1, 16, 16)  # iterations 0, 4, 8, 12
    np.testing.assert_array_equal(arrays["fedavg_snapshot_iterations"], [0, 4, 8, 12])
    assert "| fedavg |" in capsys.readouterr().out


def test_cli_dp_scenario_without_the_dp_module_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "fedseg.algorithms.adaptive_dp", None)  # import fails whatever the build holds
    rc = main(["attack", "idlg", "--scenario", "fedavg", "dp", "--data", "synthetic", "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "--scenario dp needs fedseg.algorithms.adaptive_dp" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before any work


def test_cli_dp_scenario_calls_the_adaptive_dp_hook(tmp_path, monkeypatch):
    calls = []

    def idlg_mechanism(epsilon, seed, **options):
        calls.append((epsilon, seed, options))
        return _laplace_mechanism(clip_l1=1.0, epsilon=epsilon, seed=seed)

    fake = types.ModuleType("fedseg.algorithms.adaptive_dp")
    fake.idlg_mechanism = idlg_mechanism
    monkeypatch.setitem(sys.modules, "fedseg.algorithms.adaptive_dp", fake)
    out = tmp_path / "dp"
    rc = main(["attack", "idlg", "--scenario", "dp", "--data", "synthetic", "--image-size", "16", "--iterations", "3",
               "--dp-epsilon", "2", "--seed", "5", "--threads", "1", "--out", str(out)])
    assert rc == 0 and calls == [(2.0, 5, {"mechanism": "laplace", "clip": 1.0, "delta": 1e-5})]
    assert list(json.loads((out / "results.json").read_text())["scenarios"]) == ["dp"]


def test_cli_dp_scenario_with_the_real_mechanism_at_several_epsilons(tmp_path, capsys):
    out = tmp_path / "dp"
    rc = main(["attack", "idlg", "--scenario", "fedavg", "dp", "--data", "synthetic", "--image-size", "16",
               "--iterations", "2", "--dp-epsilon", "1", "1e12", "--dp-clip", "0.5", "--threads", "1",
               "--out", str(out)])
    assert rc == 0
    rows = json.loads((out / "results.json").read_text())["scenarios"]
    assert list(rows) == ["fedavg", "dp-eps-1", "dp-eps-1e+12"]
    for name, eps in (("dp-eps-1", 1.0), ("dp-eps-1e+12", 1e12)):
        view = rows[name]["view"]
        assert view["mechanism"] == "laplace" and view["norm"] == "l1" and view["clip"] == 0.5
        assert view["noise_scale"] == pytest.approx(2 * 0.5 / eps) and view["epsilon"] == eps
        assert view["clip_factor"] == pytest.approx(min(1.0, 0.5 / view["update_l1"]))
    assert rows["dp-eps-1"]["view"]["snr"] < 1e-3 < 1e3 < rows["dp-eps-1e+12"]["view"]["snr"]
    assert "| dp-eps-1 | -DP(Delta) / lr: laplace L1 clip 0.5, b = 1, epsilon = 1;" in (out / "results.md").read_text()
    assert set(np.load(out / "reconstructions.npz").files) >= {"dp-eps-1_image", "dp-eps-1e+12_mask_prob"}
    assert main(["attack", "idlg", "--scenario", "dp", "--data", "synthetic", "--dp-clip", "0",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "--dp-clip must be > 0" in capsys.readouterr().err


def test_cli_reads_png_and_nifti_files_with_masks(tmp_path):
    import nibabel as nib
    from skimage import io

    rng = np.random.default_rng(0)
    img = (rng.uniform(0, 255, (20, 24))).astype(np.uint8)
    mask = np.zeros((20, 24), np.uint8)
    mask[5:12, 6:14] = 255
    io.imsave(tmp_path / "x.png", img, check_contrast=False)
    io.imsave(tmp_path / "m.png", mask, check_contrast=False)
    rc = main(["attack", "idlg", "--scenario", "fedavg", "--data", str(tmp_path / "x.png"), "--mask",
               str(tmp_path / "m.png"), "--image-size", "16", "--iterations", "2", "--threads", "1",
               "--out", str(tmp_path / "png")])
    assert rc == 0
    data = json.loads((tmp_path / "png" / "results.json").read_text())["data"]
    assert data["image_shape"] == [1, 16, 16] and data["lesion_pixels"] > 0

    vol = rng.uniform(-300, 300, (24, 24, 6)).astype(np.float32)
    seg = np.zeros((24, 24, 6), np.uint8)
    seg[8:14, 8:16, 4] = 1  # the largest lesion is on slice 4
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii.gz")
    nib.save(nib.Nifti1Image(seg, np.eye(4)), tmp_path / "s.nii.gz")
    rc = main(["attack", "idlg", "--scenario", "fedavg", "--data", str(tmp_path / "v.nii.gz"), "--mask",
               str(tmp_path / "s.nii.gz"), "--image-size", "16", "--iterations", "2", "--threads", "1",
               "--out", str(tmp_path / "nii")])
    assert rc == 0
    assert json.loads((tmp_path / "nii" / "results.json").read_text())["data"]["slice"] == 4


def test_cli_bad_inputs_are_clear_errors(tmp_path, capsys):
    base = ["attack", "idlg", "--scenario", "fedavg", "--iterations", "1", "--out", str(tmp_path / "o")]
    assert main(base + ["--data", str(tmp_path / "missing.png"), "--mask", str(tmp_path / "m.png")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "x.png").write_bytes(b"")
    assert main(base + ["--data", str(tmp_path / "x.png")]) == 2
    assert "needs --mask" in capsys.readouterr().err
    assert main(base + ["--data", "synthetic", "--lr", "0"]) == 2
    assert "--lr must be > 0" in capsys.readouterr().err
    assert main(base + ["--data", "synthetic", "--ring-weight", "1.5"]) == 2
    assert "--ring-weight" in capsys.readouterr().err
    assert main(base + ["--data", "synthetic", "--model-args", '{"depth": 3}']) == 2
    assert "does not accept" in capsys.readouterr().err
