"""The round checkpoint behind server-restart resume (fedseg.flare.resume), without a running server."""

import json

import numpy as np

from fedseg.flare.resume import RoundCheckpointStore, config_key


def test_checkpoint_round_trip_replaces_atomically_and_clears(tmp_path):
    store = RoundCheckpointStore(tmp_path / "job-abc")
    assert store.load() is None
    w0 = {"a": np.arange(4, dtype=np.float32).reshape(2, 2), "b": np.ones(3, np.float32)}
    best = tmp_path / "best.pt"
    best.write_bytes(b"best-model")
    store.save(0, w0, {"records": [{"site": "site-1", "tag": "val_dice", "step": 0, "value": 0.5}]}, str(best))
    store.save(1, {k: v + 1 for k, v in w0.items()}, {"records": []})
    finished, weights, state = store.load()
    assert finished == 1 and state["records"] == [] and state["_best_model_file"] is None
    np.testing.assert_array_equal(weights["a"], w0["a"] + 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "job-abc"]  # no .tmp / .old left behind
    # a crash while a save was replacing the folder leaves the previous checkpoint as .old: it is used
    (tmp_path / "job-abc").rename(tmp_path / "job-abc.old")
    (tmp_path / "job-abc").mkdir()  # a half-written new folder without state.json
    assert store.load()[0] == 1
    store.clear()
    assert store.load() is None and not any(tmp_path.glob("job-abc*"))


def test_config_key_follows_the_job_configuration(tmp_path):
    cfg = tmp_path / "config"
    cfg.mkdir()
    (cfg / "config_fed_server.json").write_text(json.dumps({"num_rounds": 5}))
    (cfg / "config_fed_client.json").write_text(json.dumps({"lr": 1e-3}))
    key = config_key(cfg, "fedgs lits/x")
    assert key.startswith("fedgs_lits_x-") and key == config_key(cfg, "fedgs lits/x")
    (cfg / "config_fed_client.json").write_text(json.dumps({"lr": 1e-4}))
    assert config_key(cfg, "fedgs lits/x") != key  # another configuration never resumes this one's checkpoint
