"""Real `nvflare simulator` runs of resfim_polypgen and fedper_polypgen on tiny settings: the style bank is exchanged
(styles only), masks are computed after the warm-up and sent packed, the server aggregates only shared coordinates,
every site stores its personalized model, and that checkpoint reproduces the personalized Dice the site reported."""

import json
import re
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from fedseg.algorithms.spectral import StyleBank
from fedseg.jobs.recipes import JOBS
from fedseg.models import get_model

pytestmark = pytest.mark.integration

SITES = ["site-1", "site-2", "site-3"]  # 3 of the 5 centres: fewer simulator workers, same protocol


@pytest.fixture(scope="module")
def polyp_cfg(tiny_polypgen):
    return tiny_polypgen


def _run(run_simulator, job, tmp_path, cfg):
    job_dir = job.export(tmp_path / "jobs")
    ws = tmp_path / "ws"
    _, log = run_simulator(job_dir, ws, len(SITES), data_cfg=cfg)
    for problem in ("rejected the update", "refused at site", "cannot start the round", "cannot train"):
        assert problem not in log, log[log.index(problem) - 2000:][:5000]
    return ws, log


def _tiny(name, **args):
    return replace(JOBS[name], num_rounds=3, max_steps_per_round=3, test_every_n_rounds=0, num_threads=1,
                   min_clients=len(SITES),
                   data_args={"image_size": 32, "fold": 0}, model_args={"base_chan": 4},
                   personalization_args={**JOBS[name].personalization_args, **args})


def _personalized_dice_of_checkpoint(ws, site, cfg, job):
    """The site's saved personalized model, evaluated again on the same held-out part through the public CLI."""
    out = ws / f"eval_{site}"
    proc = subprocess.run([sys.executable, "-m", "fedseg.cli", "evaluate", "--model",
                           str(ws / site / "simulate_job" / "personalized" / "model.pt"), "--job", job.name,
                           "--part", "val", "--site", site, "--data-config", str(cfg), "--out", str(out),
                           "--model-args", json.dumps(job.model_args), "--data-args", json.dumps(job.data_args),
                           "--overlays", "0", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return json.loads((out / "metrics.json").read_text())


def test_resfim_exchanges_styles_keeps_sensitive_parameters_local_and_stores_personalized_models(polyp_cfg, tmp_path,
                                                                                                 run_simulator):
    job = _tiny("resfim_polypgen", fraction=0.2, warmup_rounds=1, every=1, beta=0.1, fisher_samples=4)
    ws, log = _run(run_simulator, job, tmp_path, polyp_cfg)
    # the bank: styles only (C x (2b+1)^2 amplitudes per site), held by every site
    assert f"style exchange: {len(SITES)} site(s) hold the bank" in log
    bank = StyleBank.from_dict(dict(np.load(ws / "server" / "simulate_job" / "style_bank.npz")))
    assert bank.sites == SITES and bank.style("site-1").shape == (3, 7, 7)
    # warm-up round 0 shares everything; from round 1 every site keeps 20% local (recomputed every round)
    assert "round 0: masked aggregation of 249703 of 249703 coordinates" in log
    for r in (1, 2):
        for site in SITES:
            assert re.search(rf"round {r}: resfim mask at {site}: \d+ of \d+ parameters \(20\.00%\)", log), (r, site)
        assert re.search(rf"round {r}: masked aggregation of \d+ of 249703 coordinates", log)
    metrics = json.loads((ws / "server" / "simulate_job" / "results" / "metrics.json").read_text())
    assert set(metrics["sites"]) == set(SITES)
    glob = torch.load(ws / "server" / "simulate_job" / "results" / "global_model.pt")
    for site in SITES:
        folder = ws / site / "simulate_job" / "personalized"
        info = json.loads((folder / "personalization.json").read_text())
        assert info["method"] == "resfim" and info["mask_round"] == 2 and "personalized model" in info["model"]
        mask = dict(np.load(folder / "mask.npz"))
        model = torch.load(folder / "model.pt")
        assert info["mask"]["local_fraction"] == pytest.approx(0.2, abs=1e-4)
        # the personalized model is the final global model exactly where the site shares, its own values elsewhere
        for name, m in mask.items():
            np.testing.assert_array_equal(model[name].numpy()[~m], glob[name].numpy()[~m])
        assert sum(int((model[n].numpy()[m] != glob[n].numpy()[m]).sum()) for n, m in mask.items()) > 0
        reported = metrics["sites"][site]["personalized"]["dice"]
        again = _personalized_dice_of_checkpoint(ws, site, polyp_cfg, job)
        assert again["dice"] == pytest.approx(reported, abs=1e-6), site


def test_fedper_keeps_the_head_local_from_round_zero(polyp_cfg, tmp_path, run_simulator):
    job = _tiny("fedper_polypgen")
    ws, log = _run(run_simulator, job, tmp_path, polyp_cfg)
    assert "style exchange" not in log and "resfim_style" not in log
    assert re.search(r"round 0: fedper mask at site-1: \d+ of \d+ parameters", log)
    glob = torch.load(ws / "server" / "simulate_job" / "results" / "global_model.pt")
    heads = [torch.load(ws / s / "simulate_job" / "personalized" / "model.pt")["outc.weight"] for s in SITES]
    # no aggregate of the heads was ever formed: the global head (and its last decoder stage) is still the
    # persistor's initial model, bit for bit, while every site's head is its own
    torch.manual_seed(job.seed)
    init = get_model(job.model, in_channels=job.in_channels, num_classes=job.num_classes, **job.model_args).state_dict()
    for name in ("outc.weight", "up4.conv_ch.weight"):
        assert torch.equal(glob[name], init[name]), name
    assert not torch.equal(glob["inc.0.conv1.weight"], init["inc.0.conv1.weight"])  # the shared trunk trained
    assert all(not torch.equal(h, init["outc.weight"]) for h in heads)
    assert not torch.equal(heads[0], heads[1])
    trunk = [torch.load(ws / s / "simulate_job" / "personalized" / "model.pt")["inc.0.conv1.weight"] for s in SITES]
    assert all(torch.equal(t, glob["inc.0.conv1.weight"]) for t in trunk)
    metrics = json.loads((ws / "server" / "simulate_job" / "results" / "metrics.json").read_text())
    assert all("personalized" in metrics["sites"][s] for s in SITES)
