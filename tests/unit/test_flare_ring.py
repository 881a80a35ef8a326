"""CSAHE FLARE adapters with real FLARE objects: the controller's ring over send_and_wait, its checks of train
metadata, and the executor's ring / train / validate tasks (FOBS round trips stand in for the wire)."""

from types import SimpleNamespace

import numpy as np
import pytest
from fedseg.algorithms.csahe import PackSpec, error_bound
from fedseg.algorithms.ring import RingMember
from fedseg.errors import ConfigError
from fedseg.flare import executor as executor_module
from fedseg.flare.executor import SegmentationTrainer, held_out_part
from fedseg.flare.ring_controller import CSAHEScatterAndGather, expected_layout, relay_record
from nvflare.apis.client import Client
from nvflare.apis.controller_spec import ClientTask, TaskCompletionStatus
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants
from nvflare.fuel.utils import fobs

GLOBAL = {"conv.weight": np.zeros((4, 3, 3, 3), np.float32), "bn.running_mean": np.zeros(4, np.float32),
          "bn.num_batches_tracked": np.array(7, np.int64), "head.bias": np.zeros(1, np.float32)}
FLOATS = {k: v for k, v in GLOBAL.items() if v.dtype.kind == "f"}


def _update(seed):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in FLOATS.items()}


def _wire(shareable: Shareable) -> Shareable:
    """What crossing FLARE's wire does to a shareable (FOBS, with the decomposers FLARE registers at run time)."""
    from nvflare.app_common.decomposers import common_decomposers

    common_decomposers.register()
    return fobs.loads(fobs.dumps(shareable))


def _site_executor(site, update, rnd=3):
    ex = SegmentationTrainer(secure_aggregation="csahe", csahe_sigma=1e3)
    ex.site, ex.trainer, ex.ring = site, object(), RingMember(site, sigma=1e3)
    ex.ring.set_update(rnd, update)
    return ex


class FakeFlare:
    """send_and_wait / send (non-blocking in FLARE) replaced by direct calls of the sites' executors;
    faults[site] or faults[(site, task name)] = "timeout" | "error" | "pending" (send only: no reply yet) | fn."""

    def __init__(self, executors):
        self.executors = executors
        self.faults = {}
        self.tasks = []
        self.scheduled = []  # (task name, site) of every non-blocking send

    def send(self, task, fl_ctx, targets, **_):
        self.scheduled.append((task.name, targets[0]))
        if self.faults.get((targets[0], task.name)) == "pending":
            self.tasks.append((task.name, targets[0], task.timeout))
            return  # the site has not answered yet (completion_status stays None)
        self.send_and_wait(task, fl_ctx, targets)

    def send_and_wait(self, task, fl_ctx, targets, abort_signal=None, **_):
        site = targets[0]
        self.tasks.append((task.name, site, task.timeout))
        fault = self.faults.get((site, task.name), self.faults.get(site))
        if fault == "timeout":
            task.completion_status = TaskCompletionStatus.TIMEOUT
            return
        reply = self.executors[site].execute(task.name, _wire(task.data), FLContext(), Signal())
        if fault == "error":
            reply = make_reply(ReturnCode.EXECUTION_EXCEPTION)
        elif callable(fault):
            reply = fault(task.name, reply)
        ct = ClientTask(Client(site, None), task)
        ct.result = _wire(reply)
        task.client_tasks.append(ct)
        task.completion_status = TaskCompletionStatus.OK


def _controller(executors, weighting="steps", meta=None, rnd=3, prepare=True):
    ctrl = CSAHEScatterAndGather(min_clients=3, num_rounds=5, hop_timeout=7, weighting=weighting, prepare=prepare,
                                 task_check_period=0.01)
    fake = FakeFlare(executors)
    ctrl.send_and_wait = fake.send_and_wait
    ctrl.send = fake.send
    ctrl._current_round, ctrl._layout = rnd, expected_layout(GLOBAL)
    ctrl._meta = meta
    return ctrl, fake


def _weighted(updates, counts):
    total = sum(counts.values())
    return {k: sum(counts[s] / total * updates[s][k].astype(np.float64) for s in counts) for k in FLOATS}


@pytest.mark.parametrize("weighting", ["steps", "samples"])
def test_controller_ring_over_flare_tasks_gives_the_weighted_sum(weighting):
    sites = ["site-1", "site-2", "site-3", "site-4"]
    updates = {s: _update(i) for i, s in enumerate(sites)}
    meta = {s: {"steps": 10 * (i + 1), "n_samples": 100 - 7 * i} for i, s in enumerate(sites)}
    ctrl, fake = _controller({s: _site_executor(s, updates[s]) for s in sites}, weighting, meta)
    out = ctrl._ring(3, FLContext(), Signal())
    assert out.ok and len(out.attempts) == 1
    counts = {s: meta[s]["steps" if weighting == "steps" else "n_samples"] for s in sites}
    expected = _weighted(updates, counts)
    err = max(float(np.abs(out.aggregate[k] - expected[k]).max()) for k in FLOATS)
    assert err < error_bound(4, 1e3, 0.05) + 2.0**-23 * 0.05
    assert set(out.aggregate) == set(FLOATS)  # the integer buffer is never part of an update or the aggregate
    # one FLARE task per ring step, each to one site, each with the hop timeout; the parallel wave (the first
    # member's hop + the later members' prepare) is scheduled with non-blocking sends, the rest one at a time
    order = out.attempts[0].order
    assert fake.tasks == ([("csahe_start", order[0], 7), ("csahe_hop", order[1], 7)]
                          + [("csahe_prepare", s, 7) for s in order[2:]]
                          + [("csahe_hop", s, 7) for s in order[2:]] + [("csahe_finish", order[0], 7)])
    assert fake.scheduled == [("csahe_hop", order[1])] + [("csahe_prepare", s) for s in order[2:]]
    assert out.attempts[0].prepared == order[2:] and out.attempts[0].in_hop == [order[1]]
    assert not out.private_context_received
    assert all(t.data is None for t in out.transfers)  # the controller keeps sizes and hashes, not the bytes
    # the JSON relay record groups each message set
    rec = relay_record(out)
    assert [(g["kind"], g["direction"], g["item"]) for g in rec][:2] == [("start", "received", "public_context"),
                                                                        ("start", "received", "ciphertext")]
    assert all(g["count"] == expected_layout(GLOBAL)[0].n_ciphertexts for g in rec if g["item"] == "ciphertext")
    # the prepare transfers are in the record: the public context out, the round-tag echo back
    prep = [(g["direction"], g["site"], g["item"], g["nbytes"]) for g in rec if g["kind"] == "prepare"]
    context_bytes = next(g["nbytes"] for g in rec if g["kind"] == "start" and g["item"] == "public_context")
    assert sorted(prep) == sorted([("sent", s, "public_context", context_bytes) for s in order[2:]]
                                  + [("received", s, "round_tag", 16) for s in order[2:]])
    assert {g["item"] for g in rec} == {"public_context", "ciphertext", "round_tag", "aggregate"}


@pytest.mark.parametrize("fault, why", [("timeout", "no reply to csahe_hop within hop_timeout=7 s"),
                                        ("error", "EXECUTION_EXCEPTION")])
def test_controller_drops_a_site_that_times_out_or_fails(fault, why):
    sites = ["a", "b", "c", "d"]
    updates = {s: _update(10 + i) for i, s in enumerate(sites)}
    meta = {s: {"steps": 1 + i, "n_samples": 5} for i, s in enumerate(sites)}
    executors = {s: _site_executor(s, updates[s]) for s in sites}
    ctrl, fake = _controller(executors, meta=meta)
    ctrl._rng = SimpleNamespace(shuffle=lambda xs: xs.sort())  # initiator "a", then "b", ... (deterministic)
    fake.faults[("c", "csahe_hop")] = fault
    out = ctrl._ring(3, FLContext(), Signal())
    assert out.ok and out.attempts[0].failed_site == "c" and why in out.attempts[0].reason
    assert out.attempts[0].stage == "hop" and out.attempts[0].prepared == ["c", "d"]
    assert sorted(out.sites) == ["a", "b", "d"]
    expected = _weighted(updates, {s: meta[s]["steps"] for s in ("a", "b", "d")})
    assert max(float(np.abs(out.aggregate[k] - expected[k]).max()) for k in FLOATS) < 1e-6
    result = from_shareable(ctrl._aggregation_result(3, out, FLContext()))
    assert result.data_kind == DataKind.WEIGHT_DIFF and result.get_meta_prop("contributors") == ["a", "b", "d"]
    assert result.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == 1 + 2 + 4


def test_controller_rejects_a_bad_aggregate_and_skips_the_round_without_a_rerun():
    """Three sites would remain, but a re-run would let the server subtract two aggregates (see ring.py)."""
    sites = ["a", "b", "c", "d"]
    updates = {s: _update(20 + i) for i, s in enumerate(sites)}
    meta = {s: {"steps": 1, "n_samples": 1} for s in sites}
    ctrl, fake = _controller({s: _site_executor(s, updates[s]) for s in sites}, meta=meta)
    ctrl._rng = SimpleNamespace(shuffle=lambda xs: xs.sort())

    def nan_aggregate(task_name, reply):
        dxo = from_shareable(reply)
        dxo.data["head.bias"] = np.full(1, np.nan, np.float32)
        return dxo.to_shareable()

    fake.faults["a"] = lambda name, reply: nan_aggregate(name, reply) if name == "csahe_finish" else reply
    out = ctrl._ring(3, FLContext(), Signal())
    assert not out.ok and out.attempts[0].failed_site == "a" and out.attempts[0].stage == "finish"
    assert "NaN/Inf" in out.attempts[0].reason and "skipped" in out.reason and len(out.attempts) == 1
    result = from_shareable(ctrl._aggregation_result(3, out, FLContext()))
    assert result.data_kind == DataKind.WEIGHT_DIFF and result.data == {}  # the global model is kept


def _train_reply(site, digest, steps=4, n=10, rnd=3, kind=DataKind.APP_DEFINED, rc=None):
    if rc:
        return make_reply(rc)
    data = {"steps": steps, "n_samples": n, "layout_digest": digest, "n_values": 1}
    if kind != DataKind.APP_DEFINED:
        data = dict(FLOATS)
    s = DXO(data_kind=kind, data=data, meta={"val_metrics": {"dice": 0.5, "n": 3}}).to_shareable()
    s.add_cookie(AppConstants.CONTRIBUTION_ROUND, rnd)
    return s


def _with_array(reply):
    dxo = from_shareable(reply)
    dxo.data["conv.weight"] = FLOATS["conv.weight"]  # an update smuggled into the metadata
    return dxo.update_shareable(reply)


def test_controller_accepts_metadata_only_train_replies():
    ctrl, _ = _controller({}, meta={})
    digest = expected_layout(GLOBAL)[0].digest().hex()
    assert ctrl._check_meta("s", _train_reply("s", digest), 3)["steps"] == 4
    for reply, why in [
        (_train_reply("s", digest, kind=DataKind.WEIGHT_DIFF), "plaintext"),
        (_train_reply("s", "00" * 16), "layout"),
        (_train_reply("s", digest, steps=0), "'steps'"),
        (_train_reply("s", digest, n=float("nan")), "'n_samples'"),
        (_train_reply("s", digest, rnd=2), "round 2"),
        (_train_reply("s", digest, rc=ReturnCode.EXECUTION_EXCEPTION), "EXECUTION_EXCEPTION"),
        (_with_array(_train_reply("s", digest)), "non-scalar entries \\['conv.weight'\\]"),
    ]:
        with pytest.raises(ConfigError, match=why):
            ctrl._check_meta("s", reply, 3)


def test_controller_settings_are_checked():
    with pytest.raises(ConfigError, match="min_ring_sites"):
        CSAHEScatterAndGather(min_ring_sites=2)
    with pytest.raises(ConfigError, match="weighting"):
        CSAHEScatterAndGather(weighting="images")
    with pytest.raises(ConfigError, match="hop_timeout"):
        CSAHEScatterAndGather(hop_timeout=0)


def test_expected_layout_matches_what_a_site_sends():
    spec, shapes, integer_keys = expected_layout(GLOBAL)
    assert spec.digest() == PackSpec.from_update(_update(0)).digest()
    assert shapes == {k: v.shape for k, v in FLOATS.items()} and integer_keys == ["bn.num_batches_tracked"]


# ---------------------------------------------------------------------------------------------------- executor


def test_executor_train_keeps_the_update_and_sends_metadata_only():
    ex = _site_executor("site-1", _update(0))
    ex.n_samples = 12
    update = _update(1)
    result = SimpleNamespace(update=update, steps=5, metrics={"train_loss": 0.3})
    reply = _wire(ex._keep_update(result, {"dice": 0.4}, 4, FLContext()))
    dxo = from_shareable(reply)
    assert dxo.data_kind == DataKind.APP_DEFINED
    assert dxo.data == {"steps": 5, "n_samples": 12, "layout_digest": expected_layout(GLOBAL)[0].digest().hex(),
                        "n_values": PackSpec.from_update(update).size, "round": 4}
    assert dxo.get_meta_prop("val_metrics") == {"dice": 0.4}
    assert not any(isinstance(v, np.ndarray) for v in dxo.data.values())
    assert ex.ring.round == 4
    bad = SimpleNamespace(update={**update, "head.bias": np.full(1, np.inf, np.float32)}, steps=5, metrics={})
    assert ex._keep_update(bad, {}, 5, FLContext()).get_return_code() == ReturnCode.EXECUTION_EXCEPTION


def test_executor_ring_tasks_refuse_wrong_rounds_and_plain_jobs():
    ex = _site_executor("site-1", _update(0), rnd=3)
    task = DXO(data_kind=DataKind.APP_DEFINED, data={"round": 4, "attempt": 1, "weight": 0.5, "ring_size": 3})
    reply = ex.execute("csahe_start", task.to_shareable(), FLContext(), Signal())
    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    plain = SegmentationTrainer()
    plain.trainer = object()
    assert plain.execute("csahe_hop", task.to_shareable(), FLContext(), Signal()).get_return_code() == \
        ReturnCode.TASK_UNKNOWN
    with pytest.raises(ConfigError, match="secure_aggregation"):
        SegmentationTrainer(secure_aggregation="he")
    with pytest.raises(ConfigError, match="sigma"):
        SegmentationTrainer(secure_aggregation="csahe", csahe_sigma=10)


def test_executor_passes_perfedavg_settings_to_the_trainer_config():
    ex = SegmentationTrainer(algorithm="perfedavg", aggregation="fedavg", perfedavg_variant="hf", alpha=0.01,
                             beta=0.002, adaptation_steps=3)
    assert (ex.cfg.algorithm, ex.cfg.perfedavg_variant, ex.cfg.alpha, ex.cfg.beta, ex.cfg.adaptation_steps) == (
        "perfedavg", "hf", 0.01, 0.002, 3)


class _FakeTrainer:
    def __init__(self):
        self.calls = []

    def evaluate(self, data, state):
        self.calls.append(("evaluate", data, float(state["w"][0])))
        return {"dice": float(state["w"][0]), "n": 2, "per_image_dice": np.array([0.1, 0.2])}

    def personalize(self, state):
        self.calls.append(("personalize", float(state["w"][0])))
        return {"w": state["w"] + 0.25}


def test_executor_validate_uses_the_held_out_part_and_adds_personalized_metrics(monkeypatch):
    assert held_out_part("lits") == "val"
    ex = SegmentationTrainer(adaptation_steps=2)
    ex.trainer, ex.site, ex.val_data, ex.data_origin = _FakeTrainer(), "site-1", "VAL", "builtin"
    model = DXO(data_kind=DataKind.WEIGHTS, data={"w": np.array([0.5])})
    out = from_shareable(ex._validate(model, FLContext())).data
    assert out["dice"] == 0.5 and out["part"] == "val" and "per_image_dice" not in out
    assert out["personalized"] == {"dice": 0.75, "n": 2}  # per-image arrays never leave the site
    assert ex.trainer.calls == [("evaluate", "VAL", 0.5), ("personalize", 0.5), ("evaluate", "VAL", 0.75)]

    # a dataset whose sites hold their own test part: the final evaluation uses it
    monkeypatch.setattr(executor_module.sitedata, "site_parts", lambda d: ("train", "val", "test"), raising=False)
    loads = []
    monkeypatch.setattr(executor_module, "load_site_data",
                        lambda dataset, site, part, args, root: (loads.append(part) or SimpleNamespace(delta=[0]), None))
    assert held_out_part("covid") == "test"
    ex2 = SegmentationTrainer()
    ex2.trainer, ex2.site, ex2.val_data = _FakeTrainer(), "site-2", "VAL"
    out = from_shareable(ex2._validate(model, FLContext())).data
    assert out["part"] == "test" and loads == ["test"] and "personalized" not in out
    assert ex2.trainer.calls[0][1] != "VAL"  # evaluated on the test part, not on the validation data


def test_public_metrics_keep_per_image_and_per_case_detail_at_the_site():
    from fedseg.flare.executor import public_metrics

    summary = {"dice": 0.5, "dice_s": None, "n": 2, "per_image_dice": [0.4, 0.6],
               "per_case_dice": {"A000069": 0.4, "A000075": 0.6}}
    assert public_metrics(summary) == {"dice": 0.5, "dice_s": None, "n": 2}


# ---------------------------------------------------------------------------------------------------- pre-encryption


@pytest.mark.parametrize("fault, why", [("timeout", "no reply to csahe_prepare within hop_timeout=7 s"),
                                        ("error", "EXECUTION_EXCEPTION for csahe_prepare")])
def test_controller_drops_a_site_whose_prepare_fails_and_reprepares_in_the_rerun(fault, why, tmp_path):
    sites = ["a", "b", "c", "d", "e"]
    updates = {s: _update(30 + i) for i, s in enumerate(sites)}
    meta = {s: {"steps": 2 + i, "n_samples": 5} for i, s in enumerate(sites)}
    executors = {s: _site_executor(s, updates[s]) for s in sites}
    ctrl, fake = _controller(executors, meta=meta)
    ctrl._rng = SimpleNamespace(shuffle=lambda xs: xs.sort())  # a, b, c, ... then a, b, d, e
    fake.faults[("c", "csahe_prepare")] = fault
    out = ctrl._ring(3, FLContext(), Signal())
    first, second = out.attempts
    assert out.ok and (first.failed_site, first.stage) == ("c", "prepare") and why in first.reason
    assert first.prepared == ["d", "e"] and sorted(out.sites) == ["a", "b", "d", "e"]
    # attempt 1 never went past its wave; attempt 2 prepared d and e again (under its own context) and used them
    assert [t[:2] for t in fake.tasks if t[0] != "csahe_start"] == [
        ("csahe_hop", "b"), ("csahe_prepare", "c"), ("csahe_prepare", "d"), ("csahe_prepare", "e"),
        ("csahe_hop", "b"), ("csahe_prepare", "d"), ("csahe_prepare", "e"), ("csahe_hop", "d"), ("csahe_hop", "e"),
        ("csahe_finish", "a")]
    assert second.prepared == ["d", "e"] and second.in_hop == ["b"]
    assert all(executors[s].ring.prepared is None for s in ("d", "e"))  # used up by the hops
    expected = _weighted(updates, {s: meta[s]["steps"] for s in ("a", "b", "d", "e")})
    assert max(float(np.abs(out.aggregate[k] - expected[k]).max()) for k in FLOATS) < 1e-6
    # the round record: the failed prepare, who prepared, who encrypted in its hop -- sizes and hashes only
    ctrl._record_path = str(tmp_path / "csahe_rounds.jsonl")
    ctrl._rejected = {}
    ctrl._write_record(3, out, FLContext())
    import json

    rec = json.loads((tmp_path / "csahe_rounds.jsonl").read_text())
    assert rec["prepare"] is True and rec["dropped"].keys() == {"c"}
    assert [(a["failed_site"], a["stage"], a["prepared"], a["in_hop"]) for a in rec["attempts"]] == [
        ("c", "prepare", ["d", "e"], ["b"]), (None, None, ["d", "e"], ["b"])]
    assert {(g["attempt"], g["site"]) for g in rec["relay"] if g["kind"] == "prepare" and g["direction"] == "sent"} == {
        (1, "c"), (1, "d"), (1, "e"), (2, "d"), (2, "e")}
    assert {g["item"] for g in rec["relay"]} == {"public_context", "ciphertext", "round_tag", "aggregate"}
    assert rec["bytes_relayed"] == sum(g["nbytes"] for g in rec["relay"] if g["item"] != "aggregate")


def test_controller_without_prepare_runs_the_plain_ring():
    sites = ["a", "b", "c", "d"]
    updates = {s: _update(40 + i) for i, s in enumerate(sites)}
    meta = {s: {"steps": 1 + i, "n_samples": 5} for i, s in enumerate(sites)}
    ctrl, fake = _controller({s: _site_executor(s, updates[s]) for s in sites}, meta=meta, prepare=False)
    out = ctrl._ring(3, FLContext(), Signal())
    assert out.ok and out.attempts[0].prepared == [] and out.attempts[0].in_hop == out.attempts[0].order[1:]
    assert fake.scheduled == [] and {t[0] for t in fake.tasks} == {"csahe_start", "csahe_hop", "csahe_finish"}
    with pytest.raises(ConfigError, match="prepare"):
        CSAHEScatterAndGather(prepare="yes")


def test_controller_abort_during_the_parallel_wave_cancels_its_tasks():
    sites = ["a", "b", "c", "d"]
    updates = {s: _update(50 + i) for i, s in enumerate(sites)}
    meta = {s: {"steps": 1, "n_samples": 5} for s in sites}
    ctrl, fake = _controller({s: _site_executor(s, updates[s]) for s in sites}, meta=meta)
    ctrl._rng = SimpleNamespace(shuffle=lambda xs: xs.sort())
    fake.faults[("d", "csahe_prepare")] = "pending"  # d's prepare is still running when the run is aborted
    signal, cancelled = Signal(), []

    def cancel_task(task, completion_status=TaskCompletionStatus.CANCELLED, fl_ctx=None):
        cancelled.append(task.name)
        task.completion_status = completion_status

    ctrl.cancel_task = cancel_task
    import threading

    threading.Timer(0.2, signal.trigger, args=(True,)).start()
    out = ctrl._ring(3, FLContext(), signal)
    assert not out.ok and out.reason.startswith("aborted") and out.dropped == {} and cancelled == ["csahe_prepare"]


def test_executor_prepare_task_keeps_the_ciphertexts_and_the_hop_uses_them():
    from fedseg.algorithms.csahe import Initiator, round_tag

    a, b = _update(60), _update(61)
    ini = Initiator("site-1", a, 0.5, sigma=1e3)
    pub, msgs = ini.public_context_bytes(), ini.start()
    ex = _site_executor("site-2", b, rnd=3)
    task = DXO(data_kind=DataKind.APP_DEFINED, data={"round": 3, "attempt": 1, "weight": 0.5, "ring_size": 3,
                                                     "public_context": pub})
    reply = from_shareable(_wire(ex.execute("csahe_prepare", _wire(task.to_shareable()), FLContext(), Signal())))
    assert reply.data_kind == DataKind.APP_DEFINED and reply.data == {"round_tag": round_tag(pub)}  # nothing else
    assert reply.get_meta_prop("csahe_kind") == "prepare" and ex.ring.prepared is not None
    hop = DXO(data_kind=DataKind.APP_DEFINED, data={"round": 3, "attempt": 1, "weight": 0.5, "ring_size": 3,
                                                    "public_context": pub, "messages": msgs})
    out = from_shareable(_wire(ex.execute("csahe_hop", _wire(hop.to_shareable()), FLContext(), Signal())))
    assert out.data["prepared"] is True and ex.ring.prepared is None
    agg = ini.finish(out.data["messages"])
    assert max(float(np.abs(agg[k] - (0.5 * a[k].astype(np.float64) + 0.5 * b[k])).max()) for k in FLOATS) < 1e-6
    # a prepare the site cannot do (another round, a context with a secret key) is an error reply
    bad = DXO(data_kind=DataKind.APP_DEFINED, data={"round": 4, "attempt": 1, "weight": 0.5, "ring_size": 3,
                                                    "public_context": pub})
    assert ex.execute("csahe_prepare", bad.to_shareable(), FLContext(), Signal()).get_return_code() == \
        ReturnCode.EXECUTION_EXCEPTION
    secret = DXO(data_kind=DataKind.APP_DEFINED, data={"round": 3, "attempt": 2, "weight": 0.5, "ring_size": 3,
                                                       "public_context": ini.keys.context.serialize(
                                                           save_secret_key=True)})
    assert ex.execute("csahe_prepare", secret.to_shareable(), FLContext(), Signal()).get_return_code() == \
        ReturnCode.EXECUTION_EXCEPTION
    assert executor_module.CSAHE_TASKS["csahe_prepare"] == "prepare"
