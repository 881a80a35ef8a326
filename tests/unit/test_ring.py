"""CSAHE ring relay (server driver + site member) over in-memory sites: sums, what the server sees, failures, re-runs."""

import hashlib

import numpy as np
import pytest
import tenseal as ts
from fedseg.algorithms.csahe import (
    CSAHEError,
    Initiator,
    PackSpec,
    error_bound,
    member_hop,
    member_prepare,
    message_payload,
    round_tag,
)
from fedseg.algorithms.fedgs import check_update
from fedseg.algorithms.ring import RingAborted, RingMember, SendFailed, ring_weights, secure_aggregate
from fedseg.errors import ConfigError, UpdateRejected

SIGMA = 1e3
SHAPES = {"enc.weight": (40, 50), "enc.bias": (50,), "dec.weight": (3, 3, 8, 8), "bn.running_mean": (2400,)}  # 5,026


def _updates(sites, seed=0, scale=0.01):
    rng = np.random.default_rng(seed)
    return {s: {n: rng.normal(0, scale, shape).astype(np.float32) for n, shape in SHAPES.items()} for s in sites}


def _weighted_sum(updates, counts, sites):
    total = sum(counts[s] for s in sites)
    return {n: sum(counts[s] / total * updates[s][n].astype(np.float64) for s in sites) for n in SHAPES}


def _max_err(result, expected):
    return max(float(np.max(np.abs(result[n].astype(np.float64) - expected[n]))) for n in expected)


def _bound(k, updates, expected):
    max_abs = max(float(np.max(np.abs(v))) for u in updates.values() for v in u.values())
    # float32 result: CKKS error plus the float32 rounding of the returned values
    return error_bound(k, SIGMA, max_abs) + max(float(np.max(np.abs(v))) for v in expected.values()) * 2.0**-23


class Orders:
    """A stand-in for the RNG whose shuffles give fixed ring orders (restricted to the sites still in the ring)."""

    def __init__(self, *orders):
        self.orders = list(orders)

    def shuffle(self, sites):
        order = [s for s in self.orders.pop(0) if s in sites]
        assert sorted(order) == sorted(sites)
        sites[:] = order


class Sites:
    """In-memory sites (fedseg.algorithms.ring.RingMember) behind ``send``; ``faults[site] = fn(kind, payload, reply)``
    may replace a reply (or raise) to inject a failure. Keeps every request for inspection."""

    def __init__(self, updates, round_id=0):
        self.members = {s: RingMember(s, sigma=SIGMA) for s in updates}
        for s, m in self.members.items():
            m.set_update(round_id, updates[s])
        self.faults = {}
        self.requests = []
        self.initiators = []
        self.prepared = []  # (site, attempt, the csahe.Prepared the member kept)

    def send(self, site, kind, payload):
        self.requests.append((site, kind, payload.get("attempt")))
        fault = self.faults.get(site)
        if fault is not None and getattr(fault, "before", False):
            return fault(kind, payload, None)
        reply = self.members[site].handle(kind, payload)
        if kind == "start":
            self.initiators.append(self.members[site]._initiator)
        if kind == "prepare":
            self.prepared.append((site, payload.get("attempt"), self.members[site].prepared))
        if fault is not None:
            reply = fault(kind, payload, reply)
        return reply


def _check_against(updates):
    """The controller's check of a finished aggregate: finite, same keys and shapes as the model (``check_update``)."""
    shapes = {n: v.shape for n, v in next(iter(updates.values())).items()}
    return lambda aggregate, initiator: check_update(aggregate, shapes, f"ring aggregate from {initiator}")


@pytest.mark.parametrize("prepare", [True, False])
def test_ring_sum_equals_weighted_sum_and_the_server_sees_only_public_material(prepare):
    sites = ["site-1", "site-2", "site-3", "site-4"]
    updates = _updates(sites)
    counts = {"site-1": 10, "site-2": 30, "site-3": 40, "site-4": 20}  # steps (FedGS) or samples (Per-FedAvg)
    fake = Sites(updates)
    lines = []
    spec = PackSpec.from_update(updates["site-1"])
    out = secure_aggregate(sites, counts, fake.send, keep_bytes=True, log=lines.append, extra={"round": 0},
                           expected_count=spec.n_ciphertexts, layout_digest=spec.digest(), n_values=spec.size,
                           check_result=_check_against(updates), prepare=prepare)
    assert out.ok and out.reason is None and len(out.attempts) == 1 and out.dropped == {}
    assert sorted(out.sites) == sites
    assert out.weights == pytest.approx({"site-1": 0.1, "site-2": 0.3, "site-3": 0.4, "site-4": 0.2}, abs=1e-15)
    expected = _weighted_sum(updates, counts, sites)
    err, bound = _max_err(out.aggregate, expected), _bound(4, updates, expected)
    print(f"\nring of 4: max error {err:.3g} (bound {bound:.3g})")
    assert err < bound
    assert {n: v.shape for n, v in out.aggregate.items()} == {n: tuple(s) for n, s in SHAPES.items()}

    # what crossed the server: one start reply, [the parallel wave: first hop + prepares,] the hops out and back, the
    # finish, in ring order
    order = out.attempts[0].order
    prepares = [(s, "prepare") for s in order[2:]] if prepare else []
    assert [(s, k) for s, k, _ in fake.requests] == [(order[0], "start"), (order[1], "hop")] + prepares + [
        (s, "hop") for s in order[2:]] + [(order[0], "finish")]
    assert out.attempts[0].prepared == (order[2:] if prepare else [])
    assert out.attempts[0].in_hop == ([order[1]] if prepare else order[1:])  # who encrypted inside its hop
    assert (out.attempts[0].wave_seconds > 0) is prepare
    received = [t for t in out.transfers if t.direction == "received"]
    contexts = [t for t in received if t.item == "public_context"]
    assert len(contexts) == 1 and contexts[0].site == order[0] and contexts[0].is_private is False
    # the server record holds only public contexts, ciphertexts, the prepare echoes (the round tag: a hash of the
    # public context the server relayed) and the finished aggregate
    assert {t.item for t in out.transfers} == {"public_context", "ciphertext", "aggregate"} | (
        {"round_tag"} if prepare else set())
    tag = round_tag(contexts[0].data)
    echoes = [t for t in out.transfers if t.item == "round_tag"]
    assert [(t.site, t.kind) for t in echoes] == prepares and all(t.direction == "received" for t in echoes)
    assert all(t.data == tag for t in echoes)
    sent_contexts = [t for t in out.transfers if t.item == "public_context" and t.direction == "sent"]
    assert [(t.site, t.kind) for t in sent_contexts] == [(order[1], "hop")] + prepares + [(s, "hop") for s in order[2:]]
    assert {t.data for t in sent_contexts} == {contexts[0].data}  # only the initiator's public context is relayed
    assert not out.private_context_received
    ctx = ts.context_from(contexts[0].data)
    assert not ctx.is_private() and not ctx.has_galois_keys() and not ctx.has_relin_keys()
    ciphertexts = [t for t in out.transfers if t.item == "ciphertext"]
    assert len(ciphertexts) == 2 * (1 + 3 + 3 + 1)  # 2 ciphertexts per message set: start, 3 out, 3 back, finish
    for t in ciphertexts:
        vec = ts.ckks_vector_from(ctx, message_payload(t.data))
        with pytest.raises(ValueError, match="secret"):
            vec.decrypt()  # the public context cannot decrypt anything the server relayed
    # the initiator's secret key never reached the server
    secret_ctx = fake.initiators[0].keys.context.serialize(save_secret_key=True)
    assert all(t.data != secret_ctx for t in out.transfers)
    # no site's plaintext: neither packed (float64, weighted or not) nor raw float32 entries appear in any transfer
    w = out.weights
    needles = []
    for s, u in updates.items():
        packed = spec.pack(u)
        needles += [packed[:512].tobytes(), (w[s] * packed)[:512].tobytes()]
        needles += [v.reshape(-1)[:128].tobytes() for v in u.values()]
    for t in out.transfers:
        if t.item != "aggregate":
            assert not any(n in t.data for n in needles)
    # the only plaintext the server gets is the aggregate, from the initiator, at the finish
    assert {(t.kind, t.site) for t in out.transfers if t.item == "aggregate"} == {("finish", order[0])}
    # the record: sizes, hashes, bytes relayed, JSON-able summary
    assert all(t.sha256 == hashlib.sha256(t.data).hexdigest() and t.nbytes == len(t.data) for t in out.transfers)
    assert out.bytes_relayed == sum(t.nbytes for t in out.transfers if t.item != "aggregate")
    summary = out.summary()
    assert summary["ok"] and summary["n_values"] == 5026 and summary["private_context_received"] is False
    assert summary["public_contexts_received"] == 1 and "data" not in summary["transfers"][0]
    assert any("attempt 1 ok" in line for line in lines)


def test_weights_follow_counts_and_are_renormalised_per_attempt():
    counts = {"a": 1, "b": 3, "c": 4, "d": 2}
    assert ring_weights(counts, ["a", "b", "c", "d"]) == pytest.approx({"a": 0.1, "b": 0.3, "c": 0.4, "d": 0.2})
    assert ring_weights(counts, ["a", "b", "c"]) == pytest.approx({"a": 1 / 8, "b": 3 / 8, "c": 4 / 8})
    with pytest.raises(ConfigError, match="site b's count"):
        secure_aggregate(["a", "b", "c"], {"a": 1, "b": 0, "c": 2}, lambda *a: None)
    with pytest.raises(ConfigError, match="no count"):
        secure_aggregate(["a", "b", "c"], {"a": 1, "b": 1}, lambda *a: None)


def test_two_sites_refused_without_contacting_anyone():
    calls = []
    out = secure_aggregate(["a", "b"], {"a": 1, "b": 1}, lambda *a: calls.append(a))
    assert not out.ok and out.aggregate is None and "fewer than 3" in out.reason and calls == []
    with pytest.raises(ConfigError, match=">= 3"):
        secure_aggregate(["a", "b", "c"], {"a": 1, "b": 1, "c": 1}, lambda *a: None, min_sites=2)


# ---------------------------------------------------------------------------------------------------- failures


def _raise(kind, payload, reply):
    raise RuntimeError("site crashed")


def _timeout(kind, payload, reply):
    raise TimeoutError("no reply within hop_timeout=5 s")


def _none(kind, payload, reply):
    return None


def _marker(kind, payload, reply):
    return SendFailed("the site returned EXECUTION_EXCEPTION")


def _garbage(kind, payload, reply):
    """Right header, garbage ciphertext bytes: only deserializing under the public context catches it."""
    return {**reply, "messages": [m[:48] + np.random.default_rng(0).bytes(len(m) - 48) for m in reply["messages"]]}


def _truncated(kind, payload, reply):
    return {**reply, "messages": reply["messages"][:1]}


def _other_round(kind, payload, reply):
    """A well-formed ciphertext set from another round (another initiator's keys)."""
    other = Initiator("old", {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}, 0.5, sigma=SIGMA)
    return {**reply, "messages": other.start()}


for _f in (_raise, _timeout, _none, _marker):
    _f.before = True  # fail instead of doing the work


HOP_FAULTS = {
    "raise": (_raise, "RuntimeError: site crashed"),
    "timeout": (_timeout, "TimeoutError"),
    "no reply": (_none, "no reply"),
    "error marker": (_marker, "EXECUTION_EXCEPTION"),
    "garbage bytes": (_garbage, "does not deserialize"),
    "wrong count": (_truncated, "got 1 ciphertexts"),
    "another round": (_other_round, "another round's context"),
}


@pytest.mark.parametrize("fault", sorted(HOP_FAULTS))
def test_failing_hop_reruns_without_the_site_and_returns_no_partial_sum(fault):
    sites = ["s1", "s2", "s3", "s4"]
    updates = _updates(sites, seed=3)
    counts = {"s1": 5, "s2": 7, "s3": 11, "s4": 13}
    fake = Sites(updates)
    fn, why = HOP_FAULTS[fault]
    if getattr(fn, "before", False):  # fail instead of doing the hop
        fake.faults["s3"] = _only_hops(fake, "s3", fn)
    else:  # do the hop, then spoil the reply
        fake.faults["s3"] = lambda kind, payload, reply: fn(kind, payload, reply) if kind == "hop" else reply
    lines = []
    out = secure_aggregate(sites, counts, fake.send, rng=Orders(["s1", "s2", "s3", "s4"], ["s4", "s2", "s1"]),
                           keep_bytes=True, log=lines.append, extra={"round": 0})
    assert out.ok and len(out.attempts) == 2
    first, second = out.attempts
    assert (first.ok, first.failed_site, first.stage) == (False, "s3", "hop") and why in first.reason
    assert second.ok and second.order == ["s4", "s2", "s1"] and second.initiator != first.initiator
    assert out.dropped.keys() == {"s3"} and sorted(out.sites) == ["s1", "s2", "s4"]
    assert second.weights == pytest.approx({"s1": 5 / 25, "s2": 7 / 25, "s4": 13 / 25})
    # the result is the weighted sum over the remaining sites only: no partial sum of attempt 1 leaks into it
    expected = _weighted_sum(updates, counts, ["s1", "s2", "s4"])
    assert _max_err(out.aggregate, expected) < _bound(3, updates, expected)
    # attempt 1 never reached its finish; attempt 2 ran with fresh keys (another public context)
    assert ("s1", "finish", 1) not in fake.requests and ("s4", "finish", 2) in fake.requests
    ctx1 = {t.sha256 for t in out.transfers if t.item == "public_context" and t.attempt == 1}
    ctx2 = {t.sha256 for t in out.transfers if t.item == "public_context" and t.attempt == 2}
    assert ctx1 and ctx2 and not ctx1 & ctx2
    assert [t for t in out.transfers if t.item == "aggregate"] and all(
        t.attempt == 2 for t in out.transfers if t.item == "aggregate")
    line = next(x for x in lines if "failed" in x)
    assert "site s3 (hop)" in line and "discarded" in line and "re-running" in line


def _only_hops(fake, site, fn):
    def fault(kind, payload, reply):
        if kind == "hop":
            return fn(kind, payload, reply)
        return fake.members[site].handle(kind, payload)

    fault.before = True
    return fault


@pytest.mark.parametrize("stage", ["start-private", "start-garbage", "finish-nan", "finish-raise"])
def test_failing_initiator_is_dropped_and_the_round_reruns(stage):
    sites = ["s1", "s2", "s3", "s4"]
    updates = _updates(sites, seed=4)
    counts = {s: 1 for s in sites}
    fake = Sites(updates)

    def fault(kind, payload, reply):
        if stage == "start-private" and kind == "start":
            return {**reply, "public_context": fake.members["s1"]._initiator.keys.context.serialize(save_secret_key=True)}
        if stage == "start-garbage" and kind == "start":
            return {**reply, "public_context": b"not a context"}
        if stage == "finish-nan" and kind == "finish":
            agg = dict(reply["aggregate"])
            agg["enc.bias"] = np.full_like(agg["enc.bias"], np.nan)
            return {"aggregate": agg}
        if stage == "finish-raise" and kind == "finish":
            raise CSAHEError("decryption failed")
        return reply

    fake.faults["s1"] = fault
    out = secure_aggregate(sites, counts, fake.send, rng=Orders(["s1", "s2", "s3", "s4"], ["s2", "s3", "s4"]),
                           check_result=_check_against(updates), keep_bytes=True)
    if stage == "finish-nan":
        # the server holds a (rejected) aggregate over all four: a re-run over the other three would reveal s1's
        # update by subtraction, so the round is skipped instead
        assert not out.ok and len(out.attempts) == 1 and out.attempts[0].failed_site == "s1"
        assert "NaN/Inf" in out.attempts[0].reason and "difference is that site's own update" in out.reason
        return
    assert out.ok and out.attempts[0].failed_site == "s1"
    assert out.attempts[0].stage == stage.split("-")[0]
    expected = _weighted_sum(updates, counts, ["s2", "s3", "s4"])
    assert _max_err(out.aggregate, expected) < _bound(3, updates, expected)
    # a bad context from the initiator (a secret-key one is flagged: the controller writes the flag) is never relayed
    assert out.private_context_received is (stage == "start-private")
    if stage.startswith("start"):
        assert not [t for t in out.transfers if t.attempt == 1 and t.direction == "sent"]
    if stage == "start-private":
        assert "secret key" in out.attempts[0].reason


def test_three_sites_one_failing_skips_the_round_with_a_reason():
    sites = ["a", "b", "c"]
    updates = _updates(sites, seed=5)
    fake = Sites(updates)
    fake.faults["b"] = _only_hops(fake, "b", _timeout)
    lines = []
    out = secure_aggregate(sites, {"a": 1, "b": 2, "c": 3}, fake.send, rng=Orders(["a", "b", "c"]), log=lines.append)
    assert not out.ok and out.aggregate is None and out.sites == [] and out.weights == {}
    assert "only 2 site(s)" in out.reason and "fewer than 3" in out.reason and "kept" in out.reason
    assert len(out.attempts) == 1 and out.attempts[0].failed_site == "b"
    assert ("a", "finish", 1) not in fake.requests  # the partial sum was never even finished
    assert any("site b (hop)" in x and "the round is skipped" in x for x in lines)
    assert out.summary()["ok"] is False and out.summary()["dropped"] == {"b": out.dropped["b"]}


def test_two_failures_in_a_row_and_abort():
    sites = ["a", "b", "c", "d", "e"]
    updates = _updates(sites, seed=6)
    fake = Sites(updates)
    fake.faults["b"] = _only_hops(fake, "b", _raise)
    fake.faults["c"] = _only_hops(fake, "c", _timeout)
    counts = {s: i + 1 for i, s in enumerate(sites)}
    out = secure_aggregate(sites, counts, fake.send,
                           rng=Orders(["a", "b", "c", "d", "e"], ["d", "c", "e", "a"], ["e", "a", "d"]))
    assert out.ok and [a.failed_site for a in out.attempts] == ["b", "c", None]
    expected = _weighted_sum(updates, counts, ["a", "d", "e"])
    assert _max_err(out.aggregate, expected) < _bound(3, updates, expected)

    def aborting(site, kind, payload):
        raise RingAborted("run aborted")

    out = secure_aggregate(sites, counts, aborting)
    assert not out.ok and out.reason.startswith("aborted") and out.dropped == {}


# ---------------------------------------------------------------------------------------------------- site side


def test_ring_member_refusals_and_fresh_initiator_per_start():
    upd = _updates(["a", "b"], seed=7)
    m = RingMember("a", sigma=SIGMA)
    with pytest.raises(CSAHEError, match="holds no update"):
        m.handle("start", {"round": 0, "attempt": 1, "weight": 0.5, "ring_size": 3})
    digest = m.set_update(2, upd["a"])
    assert digest == PackSpec.from_update(upd["a"]).digest().hex()
    with pytest.raises(CSAHEError, match="round 2, the server asks for round 3"):
        m.handle("start", {"round": 3, "attempt": 1, "weight": 0.5, "ring_size": 3})
    with pytest.raises(CSAHEError, match="refuses a ring of 2"):
        m.handle("start", {"round": 2, "attempt": 1, "weight": 0.5, "ring_size": 2})
    with pytest.raises(CSAHEError, match="did not start attempt 1"):
        m.handle("finish", {"round": 2, "attempt": 1, "messages": []})
    r1 = m.handle("start", {"round": 2, "attempt": 1, "weight": 0.5, "ring_size": 3})
    r2 = m.handle("start", {"round": 2, "attempt": 2, "weight": 0.5, "ring_size": 3})
    assert r1["public_context"] != r2["public_context"]  # new keys (and mask) for every attempt
    hop = member_hop("b", r2["public_context"], r2["messages"], upd["b"], 0.5)
    with pytest.raises(CSAHEError, match="did not start attempt 1"):
        m.handle("finish", {"round": 2, "attempt": 1, "messages": hop})
    agg = m.handle("finish", {"round": 2, "attempt": 2, "messages": hop})["aggregate"]
    expected = {n: 0.5 * upd["a"][n].astype(np.float64) + 0.5 * upd["b"][n] for n in SHAPES}
    assert _max_err(agg, expected) < _bound(2, upd, expected)
    with pytest.raises(CSAHEError, match="did not start"):
        m.handle("finish", {"round": 2, "attempt": 2, "messages": hop})  # a round finishes once
    with pytest.raises(UpdateRejected, match="NaN"):
        m.set_update(3, {**upd["a"], "enc.bias": np.full(50, np.nan, np.float32)})


# ---------------------------------------------------------------------------------------------------- pre-encryption


def _context_tag(out, attempt):
    return next(round_tag(t.data) for t in out.transfers
                if t.item == "public_context" and t.direction == "received" and t.attempt == attempt)


def _echo_other_round(kind, payload, reply):
    return {"round_tag": b"\x00" * 16}


def _no_echo(kind, payload, reply):
    return {}


PREPARE_FAULTS = {
    "raise": (_raise, "RuntimeError: site crashed"),
    "timeout": (_timeout, "TimeoutError"),
    "no reply": (_none, "no reply"),
    "error marker": (_marker, "EXECUTION_EXCEPTION"),
    "another round tag": (_echo_other_round, "does not echo this round's tag (000000000000"),
    "no echo": (_no_echo, "does not echo this round's tag (got NoneType"),
}


def _prepare_fault(fake, site, fn):
    """``fn`` replaces (fn.before) or spoils the site's prepare reply; its other requests are answered normally."""
    def fault(kind, payload, reply):
        if kind != "prepare":
            return fake.members[site].handle(kind, payload)
        if getattr(fn, "before", False):
            return fn(kind, payload, None)
        return fn(kind, payload, fake.members[site].handle(kind, payload))

    fault.before = True
    return fault


@pytest.mark.parametrize("fault", sorted(PREPARE_FAULTS))
def test_failing_prepare_drops_the_site_like_a_hop_and_the_rerun_prepares_again(fault):
    """Policy: a prepare that fails counts like a hop failure (drop the site, re-run with a fresh initiator and
    context while >= 3 sites remain); the re-run's members prepare again under the NEW context."""
    sites = ["s1", "s2", "s3", "s4", "s5"]
    updates = _updates(sites, seed=8)
    counts = {"s1": 5, "s2": 7, "s3": 11, "s4": 13, "s5": 3}
    fake = Sites(updates)
    fn, why = PREPARE_FAULTS[fault]
    fake.faults["s3"] = _prepare_fault(fake, "s3", fn)
    lines = []
    out = secure_aggregate(sites, counts, fake.send, rng=Orders(["s1", "s2", "s3", "s4", "s5"], ["s2", "s1", "s4", "s5"]),
                           keep_bytes=True, log=lines.append, extra={"round": 0})
    assert out.ok and len(out.attempts) == 2
    first, second = out.attempts
    assert (first.failed_site, first.stage, first.failed_sites) == ("s3", "prepare", ["s3"]) and why in first.reason
    assert first.prepared == ["s4", "s5"]  # the others of the wave did prepare
    assert out.dropped.keys() == {"s3"} and sorted(out.sites) == ["s1", "s2", "s4", "s5"]
    # no hop after the wave in attempt 1: the failure is caught before the ring goes on (only s2's wave hop ran)
    assert [(s, k) for s, k, a in fake.requests if a == 1 and k == "hop"] == [("s2", "hop")]
    # attempt 2 prepared again, under its own (fresh) context; its hops used those ciphertexts
    tag1, tag2 = _context_tag(out, 1), _context_tag(out, 2)
    assert tag1 != tag2
    others = [(s, a, p) for s, a, p in fake.prepared if s != "s3"]
    assert [(s, a, p.round_tag) for s, a, p in others] == [
        ("s4", 1, tag1), ("s5", 1, tag1), ("s4", 2, tag2), ("s5", 2, tag2)]
    assert all(p.used for _, _, p in others)  # attempt 1's were discarded (replaced), attempt 2's used by the hops
    assert second.prepared == ["s4", "s5"] and second.in_hop == ["s1"]
    expected = _weighted_sum(updates, counts, ["s1", "s2", "s4", "s5"])
    assert _max_err(out.aggregate, expected) < _bound(4, updates, expected)
    assert not [t for t in out.transfers if t.item == "aggregate" and t.attempt == 1]
    line = next(x for x in lines if "failed" in x)
    assert "site s3 (prepare)" in line and "discarded" in line and "re-running with the 4 other sites" in line


def test_hop_failure_rerun_reprepares_and_never_reuses_the_old_ciphertexts():
    sites = ["s1", "s2", "s3", "s4"]
    updates = _updates(sites, seed=9)
    counts = {"s1": 2, "s2": 3, "s3": 5, "s4": 7}
    fake = Sites(updates)
    fake.faults["s3"] = _only_hops(fake, "s3", _raise)  # s3 prepares fine, then its hop fails
    out = secure_aggregate(sites, counts, fake.send, rng=Orders(["s1", "s2", "s3", "s4"], ["s2", "s1", "s4"]))
    assert out.ok and out.attempts[0].failed_site == "s3" and out.attempts[0].stage == "hop"
    # s4 prepared in attempt 1 (never used: the ring broke before its hop) and again in attempt 2 (a fresh context)
    s4 = [(a, p) for s, a, p in fake.prepared if s == "s4"]
    assert [a for a, _ in s4] == [1, 2] and s4[0][1].round_tag != s4[1][1].round_tag
    assert s4[0][1].used and s4[1][1].used and out.attempts[1].in_hop == ["s1"]
    assert fake.members["s4"].last_hop_note == "added the prepared ciphertexts"
    expected = _weighted_sum(updates, counts, ["s1", "s2", "s4"])
    assert _max_err(out.aggregate, expected) < _bound(3, updates, expected)


def test_two_prepare_failures_in_one_wave_drop_both_sites_at_once():
    sites = ["a", "b", "c", "d", "e", "f"]
    updates = _updates(sites, seed=10)
    fake = Sites(updates)
    fake.faults["c"] = _prepare_fault(fake, "c", _raise)
    fake.faults["e"] = _prepare_fault(fake, "e", _timeout)
    counts = {s: i + 1 for i, s in enumerate(sites)}
    lines = []
    out = secure_aggregate(sites, counts, fake.send, log=lines.append,
                           rng=Orders(["a", "b", "c", "d", "e", "f"], ["f", "d", "b", "a"]))
    first = out.attempts[0]
    assert out.ok and first.failed_sites == ["c", "e"] and first.failed_site == "c" and first.stage == "prepare"
    assert "c (prepare): RuntimeError" in first.reason and "e (prepare): TimeoutError" in first.reason
    assert out.dropped.keys() == {"c", "e"} and sorted(out.sites) == ["a", "b", "d", "f"]
    assert any("sites ['c', 'e']" in x and "re-running with the 4 other sites" in x for x in lines)
    expected = _weighted_sum(updates, counts, ["a", "b", "d", "f"])
    assert _max_err(out.aggregate, expected) < _bound(4, updates, expected)


def test_prepare_failure_with_three_sites_skips_the_round():
    sites = ["a", "b", "c"]
    fake = Sites(_updates(sites, seed=11))
    fake.faults["c"] = _prepare_fault(fake, "c", _marker)
    out = secure_aggregate(sites, {"a": 1, "b": 1, "c": 1}, fake.send, rng=Orders(["a", "b", "c"]))
    assert not out.ok and out.attempts[0].failed_site == "c" and out.attempts[0].stage == "prepare"
    assert "only 2 site(s)" in out.reason and ("a", "finish", 1) not in fake.requests


def test_member_whose_preparation_was_lost_encrypts_in_its_hop():
    sites = ["s1", "s2", "s3", "s4"]
    updates = _updates(sites, seed=12)
    counts = {"s1": 4, "s2": 1, "s3": 2, "s4": 3}
    fake = Sites(updates)

    def lost(kind, payload, reply):  # e.g. the site's process restarted between its prepare and its hop
        if kind == "hop":
            fake.members["s4"]._discard_prepared()
        return fake.members["s4"].handle(kind, payload)

    lost.before = True
    fake.faults["s4"] = lost
    out = secure_aggregate(sites, counts, fake.send, rng=Orders(["s1", "s2", "s3", "s4"]))
    assert out.ok and len(out.attempts) == 1
    assert out.attempts[0].prepared == ["s3", "s4"] and out.attempts[0].in_hop == ["s2", "s4"]
    assert fake.members["s4"].last_hop_note == "nothing prepared: encrypted in the hop"
    expected = _weighted_sum(updates, counts, sites)
    assert _max_err(out.aggregate, expected) < _bound(4, updates, expected)


def test_ring_member_reencrypts_when_its_preparation_is_for_another_context_or_weight():
    upd = _updates(["a", "b", "c"], seed=13)
    a, b = RingMember("a", sigma=SIGMA), RingMember("b", sigma=SIGMA)
    a.set_update(1, upd["a"])
    b.set_update(1, upd["b"])
    r1 = a.handle("start", {"round": 1, "attempt": 1, "weight": 0.5, "ring_size": 3})
    r2 = a.handle("start", {"round": 1, "attempt": 2, "weight": 0.5, "ring_size": 3})  # a re-run: new keys
    echo = b.handle("prepare", {"round": 1, "attempt": 1, "weight": 0.5, "ring_size": 3,
                                "public_context": r1["public_context"]})
    assert echo == {"round_tag": round_tag(r1["public_context"])} and not b.prepared.used
    old = b.prepared
    hop = b.handle("hop", {"round": 1, "attempt": 2, "weight": 0.5, "ring_size": 3,
                           "public_context": r2["public_context"], "messages": r2["messages"]})
    assert hop["prepared"] is False and "another round tag" in b.last_hop_note
    assert old.used and b.prepared is None  # discarded, never mixed into attempt 2's sum
    agg = a.handle("finish", {"round": 1, "attempt": 2, "messages": hop["messages"]})["aggregate"]
    expected = {n: 0.5 * upd["a"][n].astype(np.float64) + 0.5 * upd["b"][n] for n in SHAPES}
    assert _max_err(agg, expected) < _bound(2, upd, expected)

    # another weight than prepared: re-encrypted with the hop's weight
    r3 = a.handle("start", {"round": 1, "attempt": 3, "weight": 0.5, "ring_size": 3})
    b.handle("prepare", {"round": 1, "attempt": 3, "weight": 0.25, "ring_size": 3,
                         "public_context": r3["public_context"]})
    hop = b.handle("hop", {"round": 1, "attempt": 3, "weight": 0.5, "ring_size": 3,
                           "public_context": r3["public_context"], "messages": r3["messages"]})
    assert hop["prepared"] is False
    agg = a.handle("finish", {"round": 1, "attempt": 3, "messages": hop["messages"]})["aggregate"]
    assert _max_err(agg, expected) < _bound(2, upd, expected)

    # a start (new attempt), set_update and clear discard what was prepared; a prepare for another round is refused
    for reset in (lambda: b.handle("start", {"round": 1, "attempt": 4, "weight": 0.5, "ring_size": 3}),
                  lambda: b.set_update(1, upd["b"]), b.clear):
        b.set_update(1, upd["b"])
        b.handle("prepare", {"round": 1, "attempt": 4, "weight": 0.5, "ring_size": 3,
                             "public_context": r3["public_context"]})
        kept = b.prepared
        reset()
        assert kept.used and b.prepared is None
    b.set_update(1, upd["b"])
    with pytest.raises(CSAHEError, match="round 1, the server asks for round 2"):
        b.handle("prepare", {"round": 2, "attempt": 1, "weight": 0.5, "ring_size": 3,
                             "public_context": r3["public_context"]})
    with pytest.raises(CSAHEError, match="secret key"):
        b.handle("prepare", {"round": 1, "attempt": 5, "weight": 0.5, "ring_size": 3,
                             "public_context": Initiator("a", upd["a"], 0.5, sigma=SIGMA).keys.context.serialize(
                                 save_secret_key=True)})


def test_prepared_member_hop_matches_member_prepare_plus_member_hop():
    """RingMember's prepared hop is csahe.member_prepare + member_hop(prepared=...): decrypted by the initiator,
    the same sum as an in-hop encryption (within CKKS noise)."""
    upd = _updates(["a", "b"], seed=14)
    ini = Initiator("a", upd["a"], 0.5, sigma=SIGMA)
    pub, msgs = ini.public_context_bytes(), ini.start()
    m = RingMember("b", sigma=SIGMA)
    m.set_update(0, upd["b"])
    m.handle("prepare", {"round": 0, "attempt": 1, "weight": 0.5, "ring_size": 3, "public_context": pub})
    hop = m.handle("hop", {"round": 0, "attempt": 1, "weight": 0.5, "ring_size": 3, "public_context": pub,
                           "messages": msgs})
    assert hop["prepared"] is True
    direct = member_hop("b", pub, msgs, upd["b"], 0.5, prepared=member_prepare("b", pub, upd["b"], 0.5))

    def dec(ms):
        return np.concatenate([np.asarray(ts.ckks_vector_from(ini.keys.context, message_payload(x)).decrypt())
                               for x in ms])

    assert float(np.max(np.abs(dec(hop["messages"]) - dec(direct)))) < 2 * error_bound(2, SIGMA, 0.05)
