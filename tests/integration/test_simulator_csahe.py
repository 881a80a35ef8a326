"""Real `nvflare simulator` runs of fedgs_lits_csahe (CSAHE ring-relay secure aggregation) on tiny settings."""

import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from fedseg.jobs.recipes import JOBS

pytestmark = pytest.mark.integration

N_SITES = 4
TINY = {"num_rounds": 2, "local_epochs": 1, "max_steps_per_round": 2, "min_clients": N_SITES, "num_threads": 1,
            "data_args": {"image_size": 32, "min_tumour_pixels": 4}, "model_args": {"base_chan": 4},
            "test_every_n_rounds": 0, "hop_timeout": 120}



CORRUPT_FILTER = """
from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter


class CorruptHop(Filter):
    \"\"\"Test-only task-result filter: the named site's csahe_start / csahe_hop replies get garbage ciphertext bytes
    (right header, wrong payload), as a faulty or malicious ring member would return.\"\"\"

    def __init__(self, site):
        super().__init__()
        self.site = site

    def process(self, shareable, fl_ctx):
        if fl_ctx.get_identity_name() != self.site:
            return shareable
        dxo = from_shareable(shareable)
        msgs = dxo.data.get("messages")
        if msgs:
            dxo.data["messages"] = [m[:48] + bytes(len(m) - 48) for m in msgs]
            self.log_warning(fl_ctx, f"test filter: corrupted the ring reply of {self.site}")
            return dxo.update_shareable(shareable)
        return shareable


class DumpAggregate(Filter):
    \"\"\"Test-only task-result filter: saves every csahe_finish aggregate (what the server receives) for the test.\"\"\"

    def __init__(self, folder):
        super().__init__()
        self.folder = folder

    def process(self, shareable, fl_ctx):
        import os
        import numpy as np

        dxo = from_shareable(shareable)
        name = f"round{dxo.get_meta_prop('csahe_round')}_attempt{dxo.get_meta_prop('csahe_attempt')}.npz"
        np.savez(os.path.join(self.folder, name), **dxo.data)
        return shareable
"""


def _simulate(run_simulator, tmp_path, data_cfg, corrupt_site=None):
    job = replace(JOBS["fedgs_lits_csahe"], **TINY)
    job_dir = job.export(tmp_path / "jobs")
    if corrupt_site:
        (job_dir / "app/custom/test_filters.py").write_text(CORRUPT_FILTER)
        (tmp_path / "aggregates").mkdir()
        cfg_path = job_dir / "app/config/config_fed_client.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["task_result_filters"] = [
            {"tasks": ["csahe_start", "csahe_hop"],
             "filters": [{"path": "test_filters.CorruptHop", "args": {"site": corrupt_site}}]},
            {"tasks": ["csahe_finish"], "filters": [
                {"path": "test_filters.DumpAggregate", "args": {"folder": str(tmp_path / "aggregates")}}]},
        ]
        cfg_path.write_text(json.dumps(cfg))
    ws = tmp_path / "ws"
    _, log = run_simulator(job_dir, ws, N_SITES, data_cfg=data_cfg)
    run_dir = ws / "server" / "simulate_job"
    records = [json.loads(line) for line in (run_dir / "csahe_rounds.jsonl").read_text().splitlines()]
    return run_dir, log, records


def _global_model_change(run_dir):
    from fedseg.models import get_model

    torch.manual_seed(0)  # the persistor's seed: the initial global model
    net = get_model("utnet", in_channels=1, num_classes=1, **TINY["model_args"])
    initial = {k: v.numpy() for k, v in net.state_dict().items()}
    final = torch.load(run_dir / "results" / "global_model.pt")
    return {k: final[k].numpy().astype(np.float64) - initial[k] for k in initial if initial[k].dtype.kind == "f"}


def test_csahe_job_runs_secure_rounds_and_writes_results(tiny_data, tmp_path, run_simulator):
    _, cfg = tiny_data
    run_dir, log, records = _simulate(run_simulator, tmp_path, cfg)
    assert "fedseg results:" in log
    metrics = json.loads((run_dir / "results" / "metrics.json").read_text())
    assert metrics["config"]["secure_aggregation"] == "csahe"
    assert set(metrics["sites"]) == {f"site-{i}" for i in range(1, N_SITES + 1)}
    assert metrics["best"] is not None and set(metrics["best"]["val_dice_by_round"]) == {"0", "1", "2"}
    # every round: one successful ring over all 4 sites, no private context received, nothing dropped
    assert [r["round"] for r in records] == [0, 1]
    for r in records:
        assert r["applied"] and r["ok"] and r["dropped"] == {} and len(r["attempts"]) == 1
        assert sorted(r["sites"]) == sorted(metrics["sites"]) and r["not_in_ring"] == {}
        assert r["private_context_received"] is False and r["public_contexts_received"] == 1
        assert sum(r["weights"].values()) == pytest.approx(1.0)
        # pre-encryption: the two members after the first prepared in the parallel wave and hopped with those
        # ciphertexts; the first member encrypted in its hop (it ran in the same wave)
        order = r["attempts"][0]["order"]
        assert r["prepare"] is True and r["attempts"][0]["prepared"] == order[2:]
        assert r["attempts"][0]["in_hop"] == order[1:2] and r["attempts"][0]["wave_seconds"] > 0
        # relay record: 1 context + 1 ciphertext set from the initiator, 3 hops out and back, the finish, and the
        # prepare step (the public context to 2 members, their 16-byte round-tag echoes)
        relay = r["relay"]
        ct = [g for g in relay if g["item"] == "ciphertext"]
        assert len(ct) == 1 + 3 + 3 + 1 and all(g["count"] == r["n_ciphertexts"] for g in ct)
        received = [g for g in relay if g["item"] == "public_context" and g["direction"] == "received"]
        assert len(received) == 1 and received[0]["is_private"] is False  # checked with ts.context_from at the server
        sent = [g for g in relay if g["item"] == "public_context" and g["direction"] == "sent"]
        assert len(sent) == 3 + 2 and {g["sha256"] for g in sent} == {received[0]["sha256"]}  # only that one
        assert sorted(g["site"] for g in sent if g["kind"] == "prepare") == sorted(order[2:])
        echoes = [g for g in relay if g["item"] == "round_tag"]
        assert sorted(g["site"] for g in echoes) == sorted(order[2:]) and all(g["nbytes"] == 16 for g in echoes)
        assert {g["item"] for g in relay} == {"public_context", "ciphertext", "round_tag", "aggregate"}
        assert r["bytes_relayed"] == sum(g["nbytes"] for g in relay if g["item"] != "aggregate")
        assert 31.5 < r["ciphertext_set_bytes"] / (r["n_ciphertexts"] * 4096) < 32.5
        print(f"\nround {r['round']}: ring {r['attempts'][0]['order']}, {r['bytes_relayed'] / 1e6:.1f} MB, "
              f"{r['bytes_per_param_total']:.1f} B/param in all ({r['bytes_per_param_per_hop']:.1f} per hop), "
              f"{r['seconds']:.2f} s (parallel wave {r['attempts'][0]['wave_seconds']:.2f} s)")
    assert len(re.findall(r"round \d: CSAHE ring order .* aggregated 4 site\(s\)", log)) == 2
    # the server never received a plaintext update: train replies were metadata only
    assert "sent its model update in plaintext" not in log
    change = _global_model_change(run_dir)
    assert max(float(np.abs(v).max()) for v in change.values()) > 0  # the aggregates were applied


def test_corrupted_ring_replies_rerun_the_round_without_that_site(tiny_data, tmp_path, run_simulator):
    """site-3's csahe_start / csahe_hop replies carry garbage ciphertexts: the server catches them under the round's
    public context, drops site-3 for the round and re-runs the ring over the other three with a fresh initiator;
    no partial sum is applied."""
    _, cfg = tiny_data
    run_dir, log, records = _simulate(run_simulator, tmp_path, cfg, corrupt_site="site-3")
    assert "fedseg results:" in log
    assert [r["round"] for r in records] == [0, 1]
    for r in records:
        assert r["applied"] and r["private_context_received"] is False
        first, second = r["attempts"]  # site-3 fails wherever it stands in the ring (initiator: start; member: hop)
        assert first["failed_site"] == "site-3" and not first["ok"] and second["ok"]
        assert first["stage"] == ("start" if first["order"][0] == "site-3" else "hop")
        assert "does not deserialize" in first["reason"]
        assert sorted(second["order"]) == sorted(r["sites"]) == ["site-1", "site-2", "site-4"]
        # the re-run prepared again under its own context (its last member), and used it
        assert second["prepared"] == second["order"][2:] and second["in_hop"] == second["order"][1:2]
        tags = {(g["attempt"], g["sha256"]) for g in r["relay"] if g["item"] == "round_tag"}
        assert {a for a, _ in tags} >= {2} and len({h for a, h in tags if a == 2}) == 1
        assert not {h for a, h in tags if a == 1} & {h for a, h in tags if a == 2}  # never the old context
        assert list(r["dropped"]) == ["site-3"] and "site-3" not in r["weights"]
        assert sum(r["weights"].values()) == pytest.approx(1.0)
        # the failed attempt's ciphertexts were never finished: the only finish is the complete ring's
        assert [g["attempt"] for g in r["relay"] if g["kind"] == "finish" and g["direction"] == "sent"] == [2]
    assert len(re.findall(r"attempt 1 failed at site site-3 \((start|hop)\).*re-running with the 3 other sites",
                          log)) == 2
    # the server applied exactly the complete rings' aggregates: one finish per round (failed attempts never reach
    # theirs), and final - initial global model == their sum
    dumps = sorted(p.name for p in (tmp_path / "aggregates").iterdir())
    assert dumps == sorted(f"round{r['round']}_attempt2.npz" for r in records)
    change = _global_model_change(run_dir)
    applied = {k: sum(np.load(tmp_path / "aggregates" / d)[k].astype(np.float64) for d in dumps) for k in change}
    assert max(float(np.abs(change[k] - applied[k]).max()) for k in change) < 1e-6
    assert max(float(np.abs(v).max()) for v in applied.values()) > 1e-4
