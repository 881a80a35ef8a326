"""Baselines of the PPPML-HMI comparison: PooledData, settings from the job, `fedseg baseline local|central`."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from fedseg import baselines
from fedseg.cli import main
from fedseg.data.pooled import PooledData
from fedseg.errors import ConfigError, DataError
from fedseg.jobs.recipes import JOBS, override


# ------------------------------------------------------------------------------------------ PooledData
class _Plain:
    """Array dataset: image i of this part is filled with ``base + i``; mask i with (i % 2)."""

    def __init__(self, n, base, size=4):
        self.images = (base + np.arange(n, dtype=np.float32))[:, None, None] * np.ones((n, size, size), np.float32)
        self.masks = (np.arange(n) % 2)[:, None, None] * np.ones((n, size, size), np.uint8)
        self.delta = np.linspace(0.1, 0.2, n).astype(np.float32) + base
        self.small = np.arange(n) % 3 == 0
        self.nonempty = np.arange(n) % 2 == 1


class _Hooked(_Plain):
    """A part with a ``batch`` hook (as the COVID dataset): records the local indices it is asked for."""

    def __init__(self, n, base, size=4):
        super().__init__(n, base, size)
        self.calls = []
        del self.images  # only the hook can read it

    def batch(self, idx):
        self.calls.append(np.asarray(idx).tolist())
        x = torch.tensor(self.base_values[idx], dtype=torch.float32)[:, None, None, None].expand(-1, 1, 4, 4)
        y = torch.from_numpy(self.masks[idx].astype(np.float32)).unsqueeze(1)
        return x.clone(), y

    @property
    def base_values(self):
        return 1000 + np.arange(len(self.delta), dtype=np.float32)


def test_pooled_arrays_are_concatenated_and_indices_located():
    a, b, c = _Plain(3, 0), _Hooked(2, 50), _Plain(4, 100)
    p = PooledData([a, b, c], names=["site-1", "site-2", "site-3"])
    assert len(p) == 9 and p.sizes == [3, 2, 4] and p.offsets.tolist() == [0, 3, 5, 9]
    assert np.array_equal(p.delta, np.concatenate([a.delta, b.delta, c.delta]))
    assert np.array_equal(p.small, np.concatenate([a.small, b.small, c.small]))
    assert np.array_equal(p.nonempty, np.concatenate([a.nonempty, b.nonempty, c.nonempty]))
    assert p.part_of(0) == ("site-1", 0) and p.part_of(4) == ("site-2", 1) and p.part_of(8) == ("site-3", 3)
    assert p.parts[0] is a and not hasattr(p, "images")  # no copy of the image arrays
    with pytest.raises(DataError, match="out of range"):
        p.batch(np.array([9]))
    with pytest.raises(DataError, match="at least one part"):
        PooledData([])


def test_pooled_batch_returns_rows_in_the_requested_order_and_uses_the_hook():
    a, b, c = _Plain(3, 0), _Hooked(2, 50), _Plain(4, 100)
    p = PooledData([a, b, c])
    idx = np.array([8, 4, 0, 3, 6, 2])  # c3, b1, a0, b0, c1, a2
    x, y = p.batch(idx)
    assert x.dtype == torch.float32 and x.shape == (6, 1, 4, 4) and y.shape == (6, 1, 4, 4)
    assert x[:, 0, 0, 0].tolist() == [103.0, 1001.0, 0.0, 1000.0, 101.0, 2.0]
    assert y[:, 0, 0, 0].tolist() == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    assert b.calls == [[0, 1]]  # the hook got the part's local indices, ascending, in one call


def test_pooled_batch_refuses_parts_of_different_shapes():
    p = PooledData([_Plain(2, 0, size=4), _Plain(2, 0, size=8)], names=["site-1", "site-2"])
    x, _ = p.batch(np.array([0, 1]))  # one part only: fine
    assert x.shape == (2, 1, 4, 4)
    with pytest.raises(DataError, match="different shapes.*site-1.*site-2"):
        p.batch(np.array([0, 2]))


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 1)

    def forward(self, x):
        return self.conv(x)


def test_local_trainer_trains_on_pooled_data():
    from fedseg.training import LocalTrainer, TrainConfig

    b = _Hooked(5, 0)
    p = PooledData([_Plain(3, 0), b])
    cfg = TrainConfig(batch_size=8, local_epochs=1, aggregation="fedavg", augment=False, device="cpu")
    res = LocalTrainer(_Net(), p, cfg).train_round(_Net().state_dict())
    assert res.steps == 1 and res.metrics["n_samples"] == 8
    assert sorted(b.calls[0]) == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------------------------------ settings
def test_epochs_default_to_rounds_times_local_epochs_and_lr_source():
    job = JOBS["fedgs_lits"]
    s = baselines.settings_from_job(job)
    assert s.epochs == job.num_rounds * job.local_epochs == 15
    job2 = override(job, {"num_rounds": 4, "local_epochs": 3})
    assert baselines.default_epochs(job2) == 12 and baselines.settings_from_job(job2).epochs == 12
    assert baselines.settings_from_job(job2, epochs=2).epochs == 2
    assert (s.dataset, s.model, s.lr, s.lr_source, s.held_out_part) == ("lits", "utnet", job.lr, "lr", "val")
    assert s.data_args == job.data_args and s.model_args == job.model_args and s.batch_size == job.batch_size
    pfa = replace(job, algorithm="perfedavg", aggregation="fedavg", beta=5e-3)
    sp = baselines.settings_from_job(pfa)
    assert sp.lr == 5e-3 and sp.lr_source == "beta"  # Per-FedAvg: the local learning rate is beta
    with pytest.raises(ConfigError, match="epochs"):
        baselines.settings_from_job(job, epochs=0)
    assert baselines.default_sites(JOBS["fedgs_polypgen"]) == [f"site-{i}" for i in range(1, 6)]


def test_held_out_part_follows_site_parts(monkeypatch):
    from fedseg import sitedata

    assert baselines.held_out_part("lits") == "val"
    assert baselines.held_out_part("covid") == "test"
    monkeypatch.delattr(sitedata, "site_parts")  # before the COVID data: every site has train / val
    assert baselines.held_out_part("covid") == "val"


def test_training_is_continuous_adamw(monkeypatch):
    """One optimizer state for all epochs: AdamW's step count is the total number of steps, not one epoch's."""
    monkeypatch.setattr(baselines, "build_model", lambda settings: _Net())
    s = baselines.settings_from_job(JOBS["fedgs_lits"], epochs=3)
    s = replace(s, augment=False, device="cpu", batch_size=2, max_steps_per_round=None)
    data = _Plain(6, 0)
    trainer, trained = baselines.train_model(s, data, "x", seed=0, progress=False)
    assert [h["steps"] for h in trained.history] == [3, 3, 3]
    opt = trainer._optimizer
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["lr"] == s.lr
    assert {int(st["step"]) for st in opt.state.values()} == {9}
    assert all(torch.equal(trained.state[k], v.cpu()) for k, v in trainer.model.state_dict().items())


# ------------------------------------------------------------------------------------------ end to end
TINY = ["--set", "data_args.image_size=64", "--set", "data_args.min_tumour_pixels=3", "--set",
        'model_args={"base_chan": 4}', "--set", "max_steps_per_round=1", "--set", "num_threads=1", "--epochs", "1",
        "--no-progress"]


@pytest.fixture
def tiny_lits_builtin(tiny_builtin):
    from fedseg.data import lits as lits_mod
    from fedseg.data.config import ensure_builtin_lits

    return tiny_builtin(lits_mod, ensure_builtin_lits)


def test_local_baseline_end_to_end(tmp_path, tiny_lits_builtin, capsys):
    out = tmp_path / "local"
    assert main(["baseline", "local", "--job", "fedgs_lits", "--out", str(out)] + TINY) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["cross_site_heatmap.png", "dice_bars.png", "metrics.json", "model_site-1.pt", "model_site-2.pt",
                     "model_site-3.pt", "model_site-4.pt", "results.md"]
    m = json.loads((out / "metrics.json").read_text())
    sites = [f"site-{i}" for i in range(1, 5)]
    assert m["method"] == "local" and m["job"] == "fedgs_lits" and list(m["sites"]) == sites
    assert m["config"]["epochs"] == 1 and m["config"]["model_args"] == {"base_chan": 4}
    for s, row in m["sites"].items():
        assert {"dice", "dice_s", "dice_l", "n", "n_small", "n_large"} <= set(row) and row["part"] == "val"
        assert "per_image_dice" not in row
        assert m["training"][s]["history"][0]["steps"] == 1
    assert list(m["cross_site"]) == sites and all(list(r) == sites for r in m["cross_site"].values())
    assert all(m["cross_site"][s][s] == m["sites"][s]["dice"] for s in sites)  # the diagonal is the site's row
    mean = np.mean([m["sites"][s]["dice"] for s in sites])
    assert m["mean_over_sites"]["dice"] == pytest.approx(mean)
    from fedseg.models import get_model

    net = get_model("utnet", in_channels=1, num_classes=1, base_chan=4)
    net.load_state_dict(torch.load(out / "model_site-2.pt", weights_only=True))  # strict: every key, every shape
    md = (out / "results.md").read_text()
    assert "Cross-site Dice" in md and f"| mean over 4 sites | {mean:.4f}" in md
    assert len(tiny_lits_builtin) == 8  # every (site, part) loaded once: 4 train + 4 val, cross-site included


def test_central_baseline_end_to_end(tmp_path, tiny_lits_builtin):
    out = tmp_path / "central"
    args = ["baseline", "central", "--job", "fedgs_lits", "--out", str(out), "--sites", "site-1", "site-3"] + TINY
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["dice_bars.png", "metrics.json", "model_central.pt",
                                                      "results.md"]
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "central" and list(m["sites"]) == ["site-1", "site-3"] and "cross_site" not in m
    assert m["training"]["central"]["n_train"] == sum(r["n_train_site"] for r in m["sites"].values())
    assert all(r["part"] == "val" and r["dice"] is not None for r in m["sites"].values())


def test_baseline_command_errors(tmp_path, capsys):
    assert main(["baseline", "local", "--job", "nope"]) == 2
    assert "unknown job" in capsys.readouterr().err
    assert main(["baseline", "central", "--job", "fedgs_lits", "--no-cross-site"]) == 2
    assert "only applies to the local" in capsys.readouterr().err
    assert main(["baseline", "local", "--job", "fedgs_lits", "--epochs", "0"]) == 2
    assert "--epochs must be >= 1" in capsys.readouterr().err


def test_covid_local_baseline_on_test_parts(tmp_path, tiny_builtin):
    """The COVID data: held-out part "test", the dataset's batch / evaluate hooks (fused 3-D Dice per case)."""
    from fedseg.data import covid as covid_mod
    from fedseg.data.config import ensure_builtin_covid

    tiny_builtin(covid_mod, ensure_builtin_covid)
    job = "pppml_covid" if "pppml_covid" in JOBS else "fedgs_lits"
    out = tmp_path / "covid"
    args = ["baseline", "local", "--job", job, "--out", str(out), "--sites", "site-1", "site-2", "--epochs", "1",
            "--set", "dataset=covid", "--set", "in_channels=5", "--set", "model=unet25d", "--set",
            'model_args={"base_chan": 2}', "--set", 'data_args={"volume_size": 16}', "--set", "max_steps_per_round=1",
            "--no-progress"]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["held_out_part"] == "test"
    for row in m["sites"].values():
        assert row["part"] == "test" and row["n"] == 1 and "n_slices" in row  # the tiny preset: 1 test case each
    assert np.array(list(m["cross_site"]["site-1"].values())).shape == (2,)
