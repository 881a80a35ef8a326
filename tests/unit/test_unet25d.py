"""2.5D U-Net (PPPML-HMI): shapes, parameter counts, independent views, fusion rule, 3-D inference, NIfTI, predict CLI."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from fedseg.cli import main
from fedseg.errors import ConfigError
from fedseg.losses import SoftDiceLoss
from fedseg.models import available_models, count_parameters, get_model
from fedseg.models.unet25d import PAPER_BASE_CHAN, QUICK_BASE_CHAN, UNet25D
from fedseg.volume_inference import fuse_views, predict_volume, write_prediction_nifti


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these small convolutions gain nothing from two threads on a shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _unet2d_params(cin: int, base: int) -> int:
    """Hand count of one view's U-Net: 4 encoding double convs, bottleneck, 4 x (transposed conv + double conv), head.

    double conv (cin -> c): 3x3 conv without bias (9 cin c) + BN (2c) + 3x3 conv (9 c c) + BN (2c);
    transposed 2x2 conv (2c -> c): 4 * 2c * c + c; head: c0 + 1.
    """
    def dc(i, o):
        return 9 * i * o + 2 * o + 9 * o * o + 2 * o

    c = [base * 2 ** i for i in range(5)]
    enc = dc(cin, c[0]) + dc(c[0], c[1]) + dc(c[1], c[2]) + dc(c[2], c[3])
    bott = dc(c[3], c[4])
    dec = sum(4 * c[i + 1] * c[i] + c[i] + dc(2 * c[i], c[i]) for i in range(4))
    return enc + bott + dec + c[0] + 1


def test_registry_shapes_and_parameter_counts():
    assert "unet25d" in available_models()
    m = get_model("unet25d", in_channels=5, base_chan=4)
    assert isinstance(m, UNet25D) and len(m.views) == 3
    for s in (24, 32):  # 24 is not a multiple of 16: padded and cropped
        out = m(torch.rand(2, 3, 5, s, s))
        assert out.shape == (2, 3, s, s)
        assert m.forward_view(torch.rand(2, 5, s, s), "yz").shape == (2, 1, s, s)
    assert count_parameters(m) == 3 * _unet2d_params(5, 4)
    assert count_parameters(get_model("unet25d", in_channels=5)) == 3 * _unet2d_params(5, QUICK_BASE_CHAN) == 1_460_091
    assert 3 * _unet2d_params(5, PAPER_BASE_CHAN) == 93_116_355  # the paper width (classic U-Net, 64 channels)
    with pytest.raises(ValueError, match=r"\[B, 3, 5, S, S\]"):
        m(torch.rand(2, 5, 24, 24))
    with pytest.raises(ValueError, match="unknown view"):
        m.forward_view(torch.rand(1, 5, 16, 16), "zz")
    with pytest.raises(ConfigError):
        get_model("unet25d", in_channels=5, num_classes=2)
    with pytest.raises(ConfigError, match="does not accept"):
        get_model("unet25d", in_channels=5, width=3)


def test_views_are_independent_and_the_loss_is_separable():
    torch.manual_seed(0)
    m = get_model("unet25d", in_channels=5, base_chan=4)
    x = torch.rand(3, 3, 5, 16, 16)
    y = (torch.rand(3, 3, 16, 16) > 0.7).float()
    dice = SoftDiceLoss()
    # view 0's loss reaches only view 0's parameters
    loss0 = dice(m.forward_view(x[:, 0], 0), y[:, 0:1])
    loss0.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.views[0].parameters() if p.ndim > 1)
    assert all(p.grad is None for v in (1, 2) for p in m.views[v].parameters())
    # x[:, 1] and x[:, 2] do not influence view 0's output
    x2 = x.clone()
    x2[:, 1:] = torch.rand_like(x2[:, 1:])
    m.eval()
    assert torch.equal(m(x)[:, 0], m(x2)[:, 0])
    m.train()
    # training_loss = mean of the three views' Dice losses; its gradient on view v = (1/3) grad of view v's loss
    m.zero_grad()
    total = m.training_loss(x, y)
    per_view = [dice(m.forward_view(x[:, v], v), y[:, v:v + 1]) for v in range(3)]
    assert total.item() == pytest.approx(sum(p.item() for p in per_view) / 3, rel=1e-6)
    total.backward()
    g_total = [p.grad.clone() for p in m.views[2].parameters()]
    m.zero_grad()
    dice(m.forward_view(x[:, 2], 2), y[:, 2:3]).backward()
    for gt, p in zip(g_total, m.views[2].parameters()):
        torch.testing.assert_close(gt, p.grad / 3, rtol=1e-4, atol=1e-7)


def test_fusion_is_a_majority_vote():
    a = np.array([[[1, 1, 0, 0, 1, 0, 1, 0]]], np.uint8)
    b = np.array([[[1, 0, 1, 0, 1, 1, 0, 0]]], np.uint8)
    c = np.array([[[0, 1, 1, 0, 1, 0, 0, 1]]], np.uint8)
    # sums:        2  2  2  0  3  1  1  1  -> >= 2
    np.testing.assert_array_equal(fuse_views([a, b, c]), [[[1, 1, 1, 0, 1, 0, 0, 0]]])
    with pytest.raises(ValueError):
        fuse_views([a, b])


class _ViewModel(torch.nn.Module):
    """View v predicts sign[v] * 10 where the central slice is > 0.5 and -10 elsewhere; records the slabs it sees."""

    def __init__(self, signs=(1, 1, -1), prob_half: bool = False) -> None:
        super().__init__()
        self.signs, self.prob_half = signs, prob_half
        self.seen: dict[int, list[torch.Tensor]] = {0: [], 1: [], 2: []}
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward_view(self, x, view):
        self.seen[view].append(x.clone())
        if self.prob_half:
            return torch.zeros_like(x[:, 2:3])  # sigmoid(0) = 0.5: not > 0.5
        hit = x[:, 2:3] > 0.5
        return torch.where(hit, torch.full_like(hit, 10.0 * self.signs[view], dtype=torch.float32),
                           torch.full_like(hit, -10.0, dtype=torch.float32))


def test_predict_volume_stacks_views_back_in_place():
    rng = np.random.default_rng(0)
    cube = rng.random((12, 12, 12)).astype(np.float32)
    model = _ViewModel(signs=(1, 1, -1))
    fused, probs = predict_volume(model, cube, (-2, -1, 0, 1, 2), "cpu", batch_size=5)
    assert fused.dtype == np.uint8 and fused.shape == cube.shape
    # views xy and yz agree with the cube, xz says no: majority = cube > 0.5 (only if every view is put back in place)
    np.testing.assert_array_equal(fused, (cube > 0.5).astype(np.uint8))
    np.testing.assert_array_equal(probs["xz"] > 0.5, np.zeros_like(cube, bool))
    np.testing.assert_array_equal(probs["yz"] > 0.5, cube > 0.5)
    model2 = _ViewModel(signs=(1, -1, 1))
    np.testing.assert_array_equal(predict_volume(model2, cube, (-2, -1, 0, 1, 2))[0], cube > 0.5)
    model3 = _ViewModel(signs=(1, -1, -1))
    assert predict_volume(model3, cube, (-2, -1, 0, 1, 2))[0].sum() == 0
    # slabs: slice k of view xy holds cube[:, :, clip(k + offsets)] (edge replication at the border)
    xy = torch.cat(model.seen[0]).numpy()
    assert xy.shape == (12, 5, 12, 12)
    np.testing.assert_array_equal(xy[0], cube[:, :, [0, 0, 0, 1, 2]].transpose(2, 0, 1))
    np.testing.assert_array_equal(xy[11], cube[:, :, [9, 10, 11, 11, 11]].transpose(2, 0, 1))
    yz = torch.cat(model.seen[1]).numpy()
    np.testing.assert_array_equal(yz[4], cube[[2, 3, 4, 5, 6]])
    xz = torch.cat(model.seen[2]).numpy()
    np.testing.assert_array_equal(xz[6], cube[:, [4, 5, 6, 7, 8], :].transpose(1, 0, 2))
    # probability exactly 0.5 is not foreground
    assert predict_volume(_ViewModel(prob_half=True), cube, (-2, -1, 0, 1, 2))[0].sum() == 0


def test_predict_volume_restores_training_mode():
    m = get_model("unet25d", in_channels=5, base_chan=4)
    m.train()
    fused, probs = predict_volume(m, np.zeros((16, 16, 16), np.float32), (-2, -1, 0, 1, 2), "cpu", batch_size=16)
    assert m.training and set(probs) == {"xy", "yz", "xz"} and fused.shape == (16, 16, 16)


def test_write_prediction_nifti_round_trip(tmp_path):
    from fedseg.data.covid import resample_mask

    affine = np.array([[-0.7, 0, 0, 120.0], [0, -0.7, 0, 110.0], [0, 0, 2.5, -80.0], [0, 0, 0, 1]])
    vol = np.zeros((40, 36, 14), np.int16)
    mask = np.zeros(vol.shape, np.uint8)
    mask[8:30, 6:28, 3:11] = 1
    ref = tmp_path / "ref.nii.gz"
    nib.save(nib.Nifti1Image(vol, affine), str(ref))
    cube = resample_mask(mask, (24, 24, 24))
    out = write_prediction_nifti(cube, ref, tmp_path / "sub" / "pred.nii.gz")
    img = nib.load(str(out))
    assert img.shape == vol.shape and np.allclose(img.affine, affine) and img.get_data_dtype() == np.uint8
    pred = np.asarray(img.dataobj)
    assert set(np.unique(pred).tolist()) == {0, 1}
    dice = 2 * int((pred & mask).sum()) / (int(pred.sum()) + int(mask.sum()))
    assert dice > 0.95


@pytest.fixture
def tiny_case(tmp_path):
    from fedseg.data.synthetic_covid import synth_covid

    root = synth_covid(tmp_path / "d", "tiny", seed=1, progress=False, counts=(1, 1, 1, 1, 1))
    return root / "C" / "imagesTr" / "C000001.nii.gz", root / "C" / "labelsTr" / "C000001.nii.gz"


def test_predict_cli_end_to_end(tmp_path, tiny_case, capsys):
    image, label = tiny_case
    model = get_model("unet25d", in_channels=5, base_chan=4)
    # the FLARE jobs save {name: tensor} built from numpy arrays
    state = {k: torch.as_tensor(v.detach().cpu().numpy()) for k, v in model.state_dict().items()}
    model_file = tmp_path / "global_model.pt"
    torch.save(state, model_file)
    out = tmp_path / "pred" / "C000001_pred.nii.gz"
    rc = main(["predict", "--dataset", "covid", "--model-file", str(model_file), "--image", str(image), "--out",
               str(out), "--data-args", '{"volume_size": 24}', "--label", str(label), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "wrote" in text and "volumetric Dice" in text
    ref, pred = nib.load(str(image)), nib.load(str(out))
    assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine)
    assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1}
    # the same fused prediction as predict_volume on the preprocessed cube (base_chan 4 read from the state dict)
    from fedseg.data.covid import CovidPreprocessing, preprocess_volume, read_covid_image, resample_mask

    prep = CovidPreprocessing(volume_size=24)
    cube, _ = preprocess_volume(read_covid_image(image), prep)
    fused, _ = predict_volume(model, cube, prep.offsets)
    np.testing.assert_array_equal(np.asarray(pred.dataobj), resample_mask(fused, ref.shape))


def test_predict_cli_errors(tmp_path, tiny_case, capsys):
    image, _ = tiny_case
    out = tmp_path / "p.nii.gz"
    assert main(["predict", "--model-file", str(tmp_path / "missing.pt"), "--image", str(image), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    other = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(4, 5, 3, 3)}, other)
    assert main(["predict", "--model-file", str(other), "--image", str(image), "--out", str(out)]) == 2
    assert "not a unet25d state dict" in capsys.readouterr().err
    m4 = tmp_path / "m4.pt"
    torch.save(get_model("unet25d", in_channels=5, base_chan=4).state_dict(), m4)
    assert main(["predict", "--model-file", str(m4), "--image", str(image), "--out", str(out),
                 "--model-args", '{"base_chan": 8}', "--no-progress"]) == 2
    assert "shape" in capsys.readouterr().err
    assert main(["predict", "--model-file", str(m4), "--image", str(image), "--out", str(out),
                 "--data-args", '{"volume_size": 4}', "--no-progress"]) == 2
    assert "volume_size" in capsys.readouterr().err
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"garbage")
    assert main(["predict", "--model-file", str(m4), "--image", str(bad), "--out", str(out), "--no-progress"]) == 2
    assert "cannot read the COVID image" in capsys.readouterr().err


def test_training_steps_lower_the_loss():
    torch.manual_seed(0)
    m = get_model("unet25d", in_channels=5, base_chan=4)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    x = torch.rand(2, 3, 5, 16, 16)
    y = (x[:, :, 2] > 0.7).float()
    first = m.training_loss(x, y)
    for _ in range(3):
        opt.zero_grad()
        loss = m.training_loss(x, y)
        loss.backward()
        opt.step()
    assert torch.isfinite(loss) and m.training_loss(x, y).item() < first.item()
