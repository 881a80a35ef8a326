"""CSAHE primitives: ring sum accuracy, what the server relays, who can decrypt, masking, and refusals."""

import secrets

import numpy as np
import pytest
import tenseal as ts
from fedseg.algorithms.csahe import (
    SLOTS,
    CSAHEError,
    Initiator,
    PackSpec,
    Prepared,
    error_bound,
    member_hop,
    member_prepare,
    message_payload,
    ring_order,
    round_tag,
    run_ring,
    sample_weights,
)
from fedseg.errors import ConfigError, UpdateRejected


def _updates(k, rng, sizes=((40, 50), (3, 3, 8, 8), (7,), (2000,)), scale=0.01, dtype=np.float64):
    return {
        f"site-{i}": {f"layer{j}.weight": (rng.normal(0, scale, s)).astype(dtype) for j, s in enumerate(sizes)}
        for i in range(k)
    }


def _plain_sum(updates, counts):
    w = sample_weights(counts)
    names = next(iter(updates.values())).keys()
    return {n: sum(w[s] * updates[s][n].astype(np.float64) for s in updates) for n in names}


def _max_err(result, expected):
    return max(float(np.max(np.abs(result[n].astype(np.float64) - expected[n]))) for n in expected)


@pytest.mark.parametrize("k, sigma, prepare", [(3, 1e2, True), (3, 1e4, True), (5, 1e2, True), (5, 1e4, True),
                                               (3, 1e4, False), (5, 1e2, False)])
def test_ring_sum_matches_plain_weighted_sum_within_bound(k, sigma, prepare):
    rng = np.random.default_rng(k)
    updates = _updates(k, rng)  # 4,783 values -> 2 ciphertexts per site
    counts = {s: int(rng.integers(10, 200)) for s in updates}
    result = run_ring(updates, counts, sigma=sigma, prepare=prepare)
    expected = _plain_sum(updates, counts)
    max_abs = max(float(np.max(np.abs(v))) for u in updates.values() for v in u.values())
    err, bound = _max_err(result, expected), error_bound(k, sigma, max_abs)
    print(f"\nCSAHE K={k} sigma={sigma:g} prepare={prepare}: max error {err:.3g} (bound {bound:.3g})")
    assert err < bound
    for n, v in expected.items():
        assert result[n].shape == v.shape and result[n].dtype == np.float64


def test_ring_100k_values_float32_and_bytes_per_param():
    rng = np.random.default_rng(7)
    sizes = ((64, 32, 3, 3), (64,), (10_000, 8), (1_504,))  # 100,000 values
    updates = _updates(3, rng, sizes=sizes, dtype=np.float32)
    n_values = sum(int(np.prod(s)) for s in sizes)
    assert n_values == 100_000
    counts = {"site-0": 5, "site-1": 7, "site-2": 11}
    log = []
    result = run_ring(updates, counts, sigma=1e4, order=["site-1", "site-0", "site-2"], relay_log=log)
    expected = _plain_sum(updates, counts)
    # float32 result: CKKS error plus the float32 rounding of the returned values
    err = _max_err(result, expected)
    bound = error_bound(3, 1e4, 0.1) + max(float(np.max(np.abs(v))) for v in expected.values()) * 2.0**-23
    print(f"\nCSAHE 100k float32 values: max error {err:.3g} (bound {bound:.3g})")
    assert err < bound
    assert all(result[n].dtype == np.float32 for n in result)
    hop_bytes = sum(len(m.data) for m in log if m.kind == "ciphertext" and m.sender == "site-1" and m.receiver == "site-0")
    per_param = hop_bytes / n_values
    per_slot = hop_bytes / (-(-n_values // SLOTS) * SLOTS)
    print(f"CSAHE wire: {hop_bytes} bytes per hop for {n_values} params = {per_param:.2f} B/param "
          f"({per_slot:.2f} B/slot of full ciphertexts)")
    assert 31.5 < per_slot < 32.5


def test_server_never_sees_a_secret_key_or_plaintext():
    rng = np.random.default_rng(1)
    updates = _updates(4, rng)
    counts = {s: 10 for s in updates}
    log = []
    run_ring(updates, counts, sigma=1e3, relay_log=log)
    kinds = {m.kind for m in log}
    assert kinds == {"public_context", "ciphertext"}
    contexts = [m for m in log if m.kind == "public_context"]
    # 3 hops carry it, and the prepare step sends it to the 2 members after the first (pre-encryption)
    assert len(contexts) == 5 and len({m.data for m in contexts}) == 1
    ctx = ts.context_from(contexts[0].data)
    assert not ctx.is_private() and ctx.is_public()
    plain_bytes = [v.tobytes() for u in updates.values() for v in u.values()]
    for m in log:
        assert isinstance(m.data, bytes)
        for p in plain_bytes:
            assert p[:64] not in m.data
        if m.kind == "ciphertext":
            vec = ts.ckks_vector_from(ctx, message_payload(m.data))
            assert vec.size() == SLOTS
            with pytest.raises(ValueError, match="secret"):
                vec.decrypt()


def test_public_context_has_no_secret_galois_or_relin_keys():
    ini = Initiator("a", {"w": np.zeros(10)}, 1.0, sigma=100)
    ctx = ts.context_from(ini.public_context_bytes())
    assert not ctx.is_private()
    assert not ctx.has_galois_keys() and not ctx.has_relin_keys()
    full = ini.keys.context.serialize(save_secret_key=True)
    assert len(ini.public_context_bytes()) < len(full)


def test_member_cannot_decrypt_running_sum():
    rng = np.random.default_rng(2)
    upd = _updates(3, rng)
    ini = Initiator("site-0", upd["site-0"], 1 / 3, sigma=1e3)
    pub = ini.public_context_bytes()
    msgs = member_hop("site-1", pub, ini.start(), upd["site-1"], 1 / 3)
    member_ctx = ts.context_from(pub)
    for m in msgs:
        vec = ts.ckks_vector_from(member_ctx, message_payload(m))
        with pytest.raises(ValueError):
            vec.decrypt()
    # another round's secret key does not decrypt it either
    other = Initiator("site-1", upd["site-1"], 1 / 3, sigma=1e3)
    vec = ts.ckks_vector_from(other.keys.context, message_payload(msgs[0]))
    wrong = np.asarray(vec.decrypt())
    assert np.abs(wrong).mean() > 1e3


def test_partial_sum_seen_by_member_is_masked():
    rng = np.random.default_rng(3)
    update = {"w": rng.normal(0, 0.01, 10_000)}
    ini = Initiator("site-0", update, 0.5, sigma=1e2)
    msgs = ini.start()
    # someone holding the key (a leak) decrypts what the second site received
    partial = np.concatenate(
        [np.asarray(ts.ckks_vector_from(ini.keys.context, message_payload(m)).decrypt()) for m in msgs]
    )[:10_000]
    corr = float(np.corrcoef(partial, 0.5 * update["w"])[0, 1])
    print(f"\nCSAHE correlation(partial sum, initiator update) = {corr:.4f}; partial std {partial.std():.1f}")
    assert abs(corr) < 0.05
    assert 80 < partial.std() < 120


def test_two_sites_refused_and_ring_order_random_start():
    with pytest.raises(ConfigError, match=">= 3"):
        ring_order(["a", "b"])
    with pytest.raises(ConfigError, match=">= 3"):
        run_ring({"a": {"w": np.zeros(3)}, "b": {"w": np.zeros(3)}}, {"a": 1, "b": 1})
    with pytest.raises(ConfigError, match="duplicate"):
        ring_order(["a", "b", "a"])
    sites = ["a", "b", "c", "d"]
    firsts = {ring_order(sites)[0] for _ in range(200)}
    assert firsts == set(sites)
    order = ring_order(sites, rng=secrets.SystemRandom())
    assert sorted(order) == sites


@pytest.mark.parametrize("sigma", [0, 1, 99.9, float("nan"), 1e6])
def test_bad_sigma_refused(sigma):
    with pytest.raises(ConfigError, match="sigma"):
        Initiator("a", {"w": np.zeros(3)}, 1.0, sigma=sigma)


def test_ciphertext_from_another_round_rejected():
    rng = np.random.default_rng(4)
    upd = _updates(3, rng)
    r1 = Initiator("site-0", upd["site-0"], 1 / 3, sigma=1e2)
    r2 = Initiator("site-0", upd["site-0"], 1 / 3, sigma=1e2)
    old = r1.start()
    new_pub = r2.public_context_bytes()
    with pytest.raises(CSAHEError, match="site-1.*another round's context"):
        member_hop("site-1", new_pub, old, upd["site-1"], 1 / 3)
    r2.start()
    with pytest.raises(CSAHEError, match="final hop at site site-0.*another round"):
        r2.finish(member_hop("site-1", r1.public_context_bytes(), old, upd["site-1"], 1 / 3))


def test_wrong_count_garbage_and_layout_rejected():
    rng = np.random.default_rng(5)
    upd = _updates(3, rng)
    ini = Initiator("site-0", upd["site-0"], 1 / 3, sigma=1e2)
    pub, msgs = ini.public_context_bytes(), ini.start()
    with pytest.raises(CSAHEError, match="site-2: got 1 ciphertexts.*needs 2"):
        member_hop("site-2", pub, msgs[:1], upd["site-2"], 1 / 3, hop="hop site-1 -> site-2")
    broken = [msgs[0][:100] + b"\x00" * 200 + msgs[0][300:], msgs[1]]
    with pytest.raises(CSAHEError, match="site-1.*does not deserialize"):
        member_hop("site-1", pub, broken, upd["site-1"], 1 / 3)
    with pytest.raises(CSAHEError, match="not a CSAHE ring message"):
        member_hop("site-1", pub, [b"x" * 100, msgs[1]], upd["site-1"], 1 / 3)
    other_layout = {k: v.astype(np.float32) for k, v in upd["site-1"].items()}
    with pytest.raises(CSAHEError, match="another parameter layout"):
        member_hop("site-1", pub, msgs, other_layout, 1 / 3)
    with pytest.raises(CSAHEError, match="secret key"):
        member_hop("site-1", ini.keys.context.serialize(save_secret_key=True), msgs, upd["site-1"], 1 / 3)
    ini.finish(msgs)
    with pytest.raises(CSAHEError, match="finishes once"):
        ini.finish(msgs)


def test_pack_unpack_round_trip_shapes_and_dtypes():
    update = {
        "b": np.arange(6, dtype=np.float32).reshape(2, 3),
        "a": np.array(2.5, dtype=np.float64),
        "c": np.linspace(-1, 1, 5000, dtype=np.float16).reshape(50, 100),
        "d": np.zeros((0, 4), dtype=np.float32),
    }
    spec = PackSpec.from_update(update)
    assert spec.names == ("a", "b", "c", "d") and spec.size == 5007 and spec.n_ciphertexts == 2
    vec = spec.pack(update)
    assert vec.shape == (2 * SLOTS,) and np.all(vec[spec.size:] == 0)
    back = spec.unpack(vec)
    for n, v in update.items():
        assert back[n].shape == v.shape and back[n].dtype == v.dtype
        np.testing.assert_array_equal(back[n], v)
    with pytest.raises(UpdateRejected, match="'b'"):
        spec.pack({**update, "b": update["b"].astype(np.float64)})
    with pytest.raises(UpdateRejected, match="missing"):
        spec.pack({k: v for k, v in update.items() if k != "a"})
    with pytest.raises(UpdateRejected, match="only float"):
        PackSpec.from_update({"n": np.zeros(3, dtype=np.int64)})
    with pytest.raises(CSAHEError, match="needs 5007"):
        spec.unpack(np.zeros(10))


def test_weights_and_update_checks():
    w = sample_weights({"a": 1, "b": 3})
    assert w == {"a": 0.25, "b": 0.75}
    for bad in (0, -1, float("nan"), float("inf"), "x"):
        with pytest.raises(UpdateRejected, match="'?b'?|site b"):
            sample_weights({"a": 1, "b": bad})
    with pytest.raises(UpdateRejected, match="NaN"):
        Initiator("a", {"w": np.array([1.0, np.nan])}, 1.0, sigma=100)
    with pytest.raises(UpdateRejected, match="headroom"):
        Initiator("a", {"w": np.array([1e6])}, 1.0, sigma=100)


def test_error_bound_grows_with_sites_and_mask():
    assert error_bound(5, 1e2, 0.1) > error_bound(3, 1e2, 0.1)
    assert error_bound(3, 3e4, 0.1) > error_bound(3, 1e2, 0.1)
    assert 1e-8 < error_bound(3, 1e4, 0.1) < 1e-6


# ---------------------------------------------------------------------------------------------------- pre-encryption


def _decrypt(initiator, messages):
    """What the initiator's secret key reads from a message set (test-only: the mask is still in it)."""
    return np.concatenate([np.asarray(ts.ckks_vector_from(initiator.keys.context, message_payload(m)).decrypt())
                           for m in messages])


def test_prepared_hop_equals_unprepared_hop():
    rng = np.random.default_rng(11)
    upd = _updates(3, rng)
    w = {"site-0": 0.2, "site-1": 0.5}
    ini = Initiator("site-0", upd["site-0"], w["site-0"], sigma=1e3)
    pub, msgs = ini.public_context_bytes(), ini.start()
    prepared = member_prepare("site-1", pub, upd["site-1"], w["site-1"])
    assert isinstance(prepared, Prepared) and prepared.count == 2 and not prepared.used
    assert prepared.round_tag == round_tag(pub) and prepared.weight == 0.5
    assert "site-1" in repr(prepared) and "2 ciphertexts" in repr(prepared)
    with_prep = member_hop("site-1", pub, msgs, upd["site-1"], w["site-1"], prepared=prepared)
    assert prepared.used  # one hop takes it
    without = member_hop("site-1", pub, msgs, upd["site-1"], w["site-1"])
    # same wire format (header: tag, layout, index/count), fresh ciphertexts (each encryption draws its own noise)
    assert [m[:48] for m in with_prep] == [m[:48] for m in without] and with_prep[0] != without[0]
    spec = PackSpec.from_update(upd["site-1"])
    a, b = _decrypt(ini, with_prep)[:spec.size], _decrypt(ini, without)[:spec.size]
    bound = error_bound(2, 1e3, 0.05)
    assert float(np.max(np.abs(a - b))) < 2 * bound  # both are Enc(w0 U0 + R + w1 U1); only CKKS noise differs
    # and the prepared path's sum is right: finish removes R, the result is the weighted sum of the two sites
    out = ini.finish(with_prep)
    expected = {n: w["site-0"] * upd["site-0"][n] + w["site-1"] * upd["site-1"][n] for n in upd["site-0"]}
    assert _max_err(out, expected) < bound


def test_prepared_ciphertexts_of_another_round_weight_or_site_are_refused_never_mixed():
    rng = np.random.default_rng(12)
    upd = _updates(3, rng)
    r1 = Initiator("site-0", upd["site-0"], 1 / 3, sigma=1e2)
    r2 = Initiator("site-0", upd["site-0"], 1 / 3, sigma=1e2)  # a re-run: fresh initiator keys
    pub1, pub2 = r1.public_context_bytes(), r2.public_context_bytes()
    msgs2 = r2.start()
    old = member_prepare("site-1", pub1, upd["site-1"], 1 / 3)
    with pytest.raises(CSAHEError, match="site-1.*another round's context.*never added"):
        member_hop("site-1", pub2, msgs2, upd["site-1"], 1 / 3, prepared=old)
    assert old.used  # the refused ciphertexts are discarded, not kept for later
    with pytest.raises(CSAHEError, match="already used or discarded"):
        old.take()
    # weight, layout, site and reuse
    cases = [
        (member_prepare("site-1", pub2, upd["site-1"], 0.25), "site-1", upd["site-1"], 1 / 3, "weight 0.25"),
        (member_prepare("site-2", pub2, upd["site-2"], 1 / 3), "site-1", upd["site-1"], 1 / 3, "site site-2's"),
        (member_prepare("site-1", pub2, {k: v[..., :1] for k, v in upd["site-1"].items()}, 1 / 3), "site-1",
         upd["site-1"], 1 / 3, "another parameter layout"),
    ]
    for prepared, site, update, weight, why in cases:
        with pytest.raises(CSAHEError, match=why):
            member_hop(site, pub2, msgs2, update, weight, prepared=prepared)
        assert prepared.used
    used = member_prepare("site-1", pub2, upd["site-1"], 1 / 3)
    member_hop("site-1", pub2, msgs2, upd["site-1"], 1 / 3, prepared=used)
    with pytest.raises(CSAHEError, match="already used"):
        member_hop("site-1", pub2, msgs2, upd["site-1"], 1 / 3, prepared=used)
    # the same refusals as a hop when preparing: a context holding a secret key, a NaN update
    with pytest.raises(CSAHEError, match="secret key"):
        member_prepare("site-1", r2.keys.context.serialize(save_secret_key=True), upd["site-1"], 1 / 3)
    with pytest.raises(UpdateRejected, match="NaN"):
        member_prepare("site-1", pub2, {**upd["site-1"], "layer2.weight": np.full(7, np.nan)}, 1 / 3)


def test_prepared_ciphertexts_encrypt_the_weighted_update_under_that_context_only():
    rng = np.random.default_rng(13)
    upd = _updates(3, rng)
    ini = Initiator("site-0", upd["site-0"], 0.5, sigma=1e2)
    prepared = member_prepare("site-1", ini.public_context_bytes(), upd["site-1"], 0.25)
    context, vectors = prepared.take()
    assert not context.is_private()
    with pytest.raises(ValueError):
        vectors[0].decrypt()  # the member cannot read its own ciphertexts back
    got = np.concatenate([np.asarray(ts.ckks_vector_from(ini.keys.context, v.serialize()).decrypt())
                          for v in vectors])
    spec = PackSpec.from_update(upd["site-1"])
    assert float(np.max(np.abs(got - 0.25 * spec.pack(upd["site-1"])))) < error_bound(1, 1e2, 0.05)
