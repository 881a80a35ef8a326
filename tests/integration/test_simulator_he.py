"""Real `nvflare simulator` runs of fedgs_lits_he (FLARE's TenSEAL HE) on tiny settings.

`fedseg he-context --workspace WS` writes the contexts first; the simulator copies WS/startup to every participant.
"""

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from fedseg.cli import main
from fedseg.flare.he import CLIENT_CONTEXT, ENCRYPTED_MODEL_FORMAT, SERVER_CONTEXT, context_fingerprint, read_context
from fedseg.jobs.recipes import JOBS

pytestmark = pytest.mark.integration

TINY = dict(num_rounds=2, local_epochs=1, max_steps_per_round=3, min_clients=2, num_threads=1,
            data_args={"image_size": 32, "min_tumour_pixels": 4}, model_args={"base_chan": 4})


def _simulate(run_simulator, tmp_path, data_cfg, ws):
    job_dir = replace(JOBS["fedgs_lits_he"], **TINY).export(tmp_path / "jobs")
    res, log = run_simulator(job_dir, ws, 2, data_cfg=data_cfg, check=False)
    assert res.failure is None, res.describe()  # the simulator ended by itself
    return res.returncode, log, res.seconds


def _net():
    from fedseg.models import get_model

    return get_model("utnet", in_channels=1, num_classes=1, base_chan=4)


def test_fedgs_lits_he_stores_ciphertext_and_a_site_decrypts_and_evaluates_it(tiny_data, tmp_path, capsys,
                                                                             run_simulator):
    _, cfg = tiny_data
    ws = tmp_path / "ws"
    assert main(["he-context", "--workspace", str(ws)]) == 0
    capsys.readouterr()
    key_id = context_fingerprint(read_context(ws / "startup" / CLIENT_CONTEXT))["key_id"]
    rc, log, _ = _simulate(run_simulator, tmp_path, cfg, ws)
    assert rc == 0, log[-5000:]
    for rnd in (0, 1):
        assert f"round {rnd}: aggregated 2 site(s)" in log and "(ciphertexts)" in log
    assert "rejected the update" not in log
    for site in ("site-1", "site-2"):  # the simulator copied WS/startup to every participant
        assert (ws / site / "startup" / CLIENT_CONTEXT).is_file()
    assert (ws / "server" / "startup" / SERVER_CONTEXT).is_file()

    job = ws / "server" / "simulate_job"
    res = job / "results"
    metrics = json.loads((res / "metrics.json").read_text())
    assert set(metrics["sites"]) == {"site-1", "site-2"}
    for m in metrics["sites"].values():
        assert 0.0 <= m["dice"] <= 1.0 and m["n"] > 0
    assert metrics["test_centre"] is None and metrics["best"] is None  # the server cannot evaluate ciphertext
    assert any("fedseg he-decrypt" in n for n in metrics["notes"])
    assert "fedseg he-decrypt" in (res / "results.md").read_text()
    assert not (res / "global_model.pt").exists()

    # the stored global model is ciphertext: every float tensor, in the results and in the persistor's checkpoint
    floats = {k for k, v in _net().state_dict().items() if v.is_floating_point()}
    stored = torch.load(res / "global_model_encrypted.pt", weights_only=True)
    assert stored["format"] == ENCRYPTED_MODEL_FORMAT and stored["he_context"]["key_id"] == key_id
    assert {k for k, enc in stored["encrypted"].items() if enc} == floats
    assert all(isinstance(stored["entries"][k], bytes) for k in floats)
    ckpt = torch.load(job / "app_server" / "FL_global_model.pt", weights_only=True)
    assert all(isinstance(ckpt["model"][k], bytes) for k in floats)

    # a site decrypts it with its own context; the plaintext model loads, is finite, and gives the site's numbers
    out = tmp_path / "global_model.pt"
    assert main(["he-decrypt", "--model", str(res / "global_model_encrypted.pt"),
                 "--context", str(ws / "site-2" / "startup" / CLIENT_CONTEXT), "--out", str(out)]) == 0
    state = torch.load(out, weights_only=True)
    net = _net()
    net.load_state_dict(state)
    assert all(torch.isfinite(v.float()).all() for v in state.values())
    initial = _net().state_dict()  # the persistor's seed-0 model differs from the trained one
    assert any(not torch.equal(state[k], initial[k]) for k in floats)
    out2 = tmp_path / "from_checkpoint.pt"
    assert main(["he-decrypt", "--model", str(job / "app_server" / "FL_global_model.pt"),
                 "--context", str(ws / "site-1" / "startup" / CLIENT_CONTEXT), "--out", str(out2)]) == 0
    from_ckpt = torch.load(out2, weights_only=True)
    assert all(torch.equal(from_ckpt[k], state[k]) for k in state)
    env = dict(os.environ, FEDSEG_DATA_CONFIG=str(cfg))
    cli = subprocess.run([sys.executable, "-m", "fedseg.cli", "evaluate", "--model", str(out), "--job", "fedgs_lits_he",
                          "--part", "val", "--site", "site-2", "--out", str(tmp_path / "eval"), "--overlays", "0",
                          "--model-args", json.dumps(TINY["model_args"]), "--data-args", json.dumps(TINY["data_args"])],
                         env=env, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["dice"] == pytest.approx(metrics["sites"]["site-2"]["dice"], abs=1e-6)
    assert np.isfinite(evaluated["dice"])


def test_fedgs_lits_he_without_contexts_stops_at_start_with_the_command_that_makes_them(tiny_data, tmp_path,
                                                                                        run_simulator):
    _, cfg = tiny_data
    ws = tmp_path / "ws_no_contexts"
    rc, log, seconds = _simulate(run_simulator, tmp_path, cfg, ws)
    assert rc != 0
    assert f"TenSEAL context '{SERVER_CONTEXT}'" in log and f"not found in the startup folder {ws / 'startup'}" in log
    assert "fedseg he-context --workspace WS" in log and "nvflare poc prepare -he" in log
    assert "Cannot load tenseal_context" not in log  # FLARE's own message is never reached
    assert "fedseg results" not in log and "round 0: aggregated" not in log
    assert seconds < 120
