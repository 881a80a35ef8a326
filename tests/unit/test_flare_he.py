"""FLARE's TenSEAL HE through fedseg.flare.he: real filters, aggregator and generator with FLContext objects.

Contexts come from ``fedseg he-context`` (HEBuilder); FLARE's SecurityContentService is pointed at the temp startup
folder. Updates travel through FOBS (``fobs.dumps`` / ``fobs.loads``) as they do between processes.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import tenseal as ts
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.model import ModelLearnableKey, make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.decomposers import common_decomposers
from nvflare.fuel.sec.security_content_service import SecurityContentService
from nvflare.fuel.utils import fobs

from fedseg.algorithms.fedgs import WeightedUpdateAccumulator
from fedseg.cli import main
from fedseg.errors import UpdateRejected
from fedseg.flare.he import (
    CLIENT_CONTEXT,
    CONTEXT_META,
    SERVER_CONTEXT,
    HEAggregator,
    HEContextError,
    HEModelDecryptor,
    HEModelEncryptor,
    HEModelSerializeFilter,
    HEModelShareableGenerator,
    context_fingerprint,
    decrypt_model_file,
    read_context,
)

common_decomposers.register()  # numpy arrays over FOBS, as in a FLARE process

SHAPES = {"conv.weight": (4, 1, 3, 3), "conv.bias": (4,), "bn.running_mean": (4,)}
# CKKS at scale 2^40: absolute error ~1e-6 for values of order 1 after one rescale; the sum of a few terms stays below
TOL = 1e-4


class Engine:
    """The part of a FLARE engine the components use: fire_event (``events``: the reasons of system_panic calls)
    and get_component."""

    def __init__(self, components=None):
        self.events = []
        self.components = dict(components or {})

    def fire_event(self, event_type, fl_ctx):
        if event_type == EventType.FATAL_SYSTEM_ERROR:
            self.events.append(fl_ctx.get_prop(FLContextKey.EVENT_DATA))

    def get_component(self, name):
        return self.components.get(name)


def _ctx(site="server", engine=None, secure=False, global_model=None, rnd=0):
    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=True, sticky=False)
    ctx.set_prop(FLContextKey.SECURE_MODE, secure, private=True, sticky=False)
    ctx.set_prop(ReservedKey.ENGINE, engine or Engine(), private=True, sticky=False)
    ctx.set_prop(AppConstants.CURRENT_ROUND, rnd, private=True, sticky=False)
    if global_model is not None:
        ctx.set_prop(AppConstants.GLOBAL_MODEL, global_model, private=True, sticky=False)
    peer = FLContext()
    peer.set_prop(ReservedKey.IDENTITY_NAME, "server" if site != "server" else "site-1", private=True, sticky=False)
    ctx.set_peer_context(peer)
    return ctx


def _startup(monkeypatch, folder):
    """Point FLARE's SecurityContentService (a process-wide singleton) at ``folder`` for this test."""
    monkeypatch.setattr(SecurityContentService, "security_content_manager", None)
    monkeypatch.setattr(SecurityContentService, "content_folder", None)
    SecurityContentService.initialize(content_folder=str(folder))


def _he_context(ws, *extra):
    assert main(["he-context", "--workspace", str(ws), *extra]) == 0
    return ws / "startup"


@pytest.fixture
def startup(tmp_path, monkeypatch, capsys):
    folder = _he_context(tmp_path / "ws")
    capsys.readouterr()
    _startup(monkeypatch, folder)
    return folder


def _global(seed=0):
    rng = np.random.default_rng(seed)
    w = {k: rng.normal(0, 0.5, s).astype(np.float32) for k, s in SHAPES.items()}
    w["bn.num_batches_tracked"] = np.array(7, dtype=np.int64)
    return make_model_learnable(w, None)


def _update(seed):
    rng = np.random.default_rng(100 + seed)
    return {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in SHAPES.items()}


def _started(component, ctx):
    component.handle_event(EventType.START_RUN, ctx)
    return component


def _site_result(site, update, steps, rnd, encryptor=None):
    ctx = _ctx(site, rnd=rnd)
    enc = encryptor or _started(HEModelEncryptor(), ctx)
    out = enc.process(DXO(DataKind.WEIGHT_DIFF, dict(update), meta={MetaKey.NUM_STEPS_CURRENT_ROUND: steps})
                      .to_shareable(), ctx)
    wire = fobs.loads(fobs.dumps(out))  # what the server receives
    wire.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    wire.add_cookie(AppConstants.CONTRIBUTION_ROUND, rnd)
    return wire


def _to_site(generator, model, server_ctx, site="site-1", decryptor=None):
    """The global model as a site's trainer receives it: generator -> FOBS -> the site's decryptor."""
    task = fobs.loads(fobs.dumps(generator.learnable_to_shareable(model, server_ctx)))
    ctx = _ctx(site)
    dec = decryptor or _started(HEModelDecryptor(), ctx)
    return from_shareable(dec.process(task, ctx)).data


def _round(agg, gen, model, updates, rnd):
    """One round on the server: accept every (site, update, steps), aggregate, new global model."""
    ctx = _ctx(global_model=model, rnd=rnd)
    accepted = {site: agg.accept(_site_result(site, u, steps, rnd), ctx) for site, u, steps in updates}
    result = agg.aggregate(ctx)
    return accepted, result, gen.shareable_to_learnable(result, ctx)


def _plain_mean(updates):
    acc = WeightedUpdateAccumulator()  # what FedGSAggregator computes
    for site, u, steps in updates:
        acc.add(u, steps, contributor=site)
    return acc.result()


def test_he_aggregation_equals_the_plaintext_step_weighted_mean_over_two_rounds(startup):
    server_ctx = _ctx()
    agg, gen = _started(HEAggregator(), server_ctx), _started(HEModelShareableGenerator(), server_ctx)
    model = _global()
    expected = {k: np.array(v) for k, v in model[ModelLearnableKey.WEIGHTS].items()}
    # round 0 starts from the plaintext model: the site gets it unchanged
    first = _to_site(gen, model, server_ctx)
    assert all(np.array_equal(first[k], expected[k]) for k in expected)
    for rnd in (0, 1):
        updates = [("site-1", _update(2 * rnd), 3), ("site-2", _update(2 * rnd + 1), 5)]
        accepted, result, model = _round(agg, gen, model, updates, rnd)
        assert accepted == {"site-1": True, "site-2": True}
        meta = from_shareable(result).meta
        assert meta[MetaKey.NUM_STEPS_CURRENT_ROUND] == 8 and meta["contributors"] == ["site-1", "site-2"]
        # the server holds ciphertext for every float tensor, the integer buffer stays plaintext
        weights = model[ModelLearnableKey.WEIGHTS]
        assert all(isinstance(weights[k], ts.CKKSVector) for k in SHAPES)
        assert weights["bn.num_batches_tracked"].dtype == np.int64
        assert meta[MetaKey.PROCESSED_KEYS] == {**{k: True for k in SHAPES}, "bn.num_batches_tracked": False}
        for k, v in _plain_mean(updates).items():
            expected[k] = expected[k] + v
        got = _to_site(gen, model, server_ctx, site="site-2")
        for k in SHAPES:
            assert got[k].shape == SHAPES[k] and got[k].dtype == np.float32
            np.testing.assert_allclose(got[k], expected[k], atol=TOL)
        assert got["bn.num_batches_tracked"] == 7 and got["bn.num_batches_tracked"].dtype == np.int64


def test_the_server_context_holds_no_secret_key_and_cannot_decrypt(startup):
    server = read_context(startup / SERVER_CONTEXT)
    client = read_context(startup / CLIENT_CONTEXT, role="client")
    assert not server.has_secret_key() and client.has_secret_key()
    ct = ts.ckks_vector(client, [1.0, 2.0, 3.0])
    at_server = ts.ckks_vector_from(server, ct.serialize())
    with pytest.raises(ValueError, match="doesn't hold a secret_key"):
        at_server.decrypt()
    with pytest.raises(ValueError, match="doesn't hold a Secret key"):
        server.secret_key()
    with pytest.raises(HEContextError, match="holds a secret key"):
        read_context(startup / CLIENT_CONTEXT, role="server")
    with pytest.raises(HEContextError, match="holds no secret key"):
        read_context(startup / SERVER_CONTEXT, role="client")


def test_fingerprints_are_deterministic_and_shared_by_server_and_sites(startup, tmp_path, capsys):
    a, b = (context_fingerprint(read_context(startup / CLIENT_CONTEXT)) for _ in range(2))
    server = context_fingerprint(read_context(startup / SERVER_CONTEXT))
    assert a == b and a["params"] == server["params"] and server["key_id"] is None and len(a["key_id"]) == 64
    other = context_fingerprint(read_context(_he_context(tmp_path / "other") / CLIENT_CONTEXT))
    assert other["params"] == a["params"] and other["key_id"] != a["key_id"]
    scaled = context_fingerprint(read_context(_he_context(tmp_path / "s30", "--scale-bits", "30") / CLIENT_CONTEXT))
    assert scaled["params"] != a["params"]


def _foreign_encryptor(tmp_path, monkeypatch, name, *extra):
    """An encryptor of a site whose startup folder holds the contexts of another he-context run."""
    folder = _he_context(tmp_path / name, *extra)
    own = SecurityContentService.content_folder
    _startup(monkeypatch, folder)
    enc = _started(HEModelEncryptor(), _ctx("site-3"))
    dec = _started(HEModelDecryptor(), _ctx("site-3"))
    _startup(monkeypatch, own)
    return enc, dec


def test_a_site_with_another_key_or_other_parameters_is_rejected_by_name(startup, tmp_path, monkeypatch, caplog):
    foreign_key, foreign_dec = _foreign_encryptor(tmp_path, monkeypatch, "foreign")
    foreign_params, _ = _foreign_encryptor(tmp_path, monkeypatch, "scale30", "--scale-bits", "30")
    server_ctx = _ctx()
    agg, gen = _started(HEAggregator(), server_ctx), _started(HEModelShareableGenerator(), server_ctx)
    model = _global()
    ctx = _ctx(global_model=model, rnd=0)
    assert agg.accept(_site_result("site-1", _update(0), 3, 0), ctx)
    assert not agg.accept(_site_result("site-3", _update(1), 4, 0, encryptor=foreign_key), ctx)
    reason = agg.rejected["site-3"]
    assert "key id" in reason and "site 'site-1'" in reason and CLIENT_CONTEXT in reason
    assert "fedseg he-context" in reason
    assert not agg.accept(_site_result("site-4", _update(2), 4, 0, encryptor=foreign_params), ctx)
    assert "other encryption parameters" in agg.rejected["site-4"] and SERVER_CONTEXT in agg.rejected["site-4"]
    assert "rejected the update of site 'site-3'" in caplog.text
    model = gen.shareable_to_learnable(agg.aggregate(ctx), ctx)
    # later rounds: the key is the encrypted global model's, and the foreign site cannot decrypt it
    assert model[ModelLearnableKey.META][CONTEXT_META]["key_id"] == context_fingerprint(
        read_context(startup / CLIENT_CONTEXT))["key_id"]
    with pytest.raises(HEContextError, match="cannot decrypt the model"):
        _to_site(gen, model, server_ctx, site="site-3", decryptor=foreign_dec)
    ctx = _ctx(global_model=model, rnd=1)
    assert not agg.accept(_site_result("site-3", _update(3), 4, 1, encryptor=foreign_key), ctx)
    assert "the encrypted global model" in agg.rejected["site-3"]


def test_unencrypted_wrongly_weighted_failed_or_mismatched_updates_are_rejected(startup):
    server_ctx = _ctx()
    agg = _started(HEAggregator(), server_ctx)
    ctx = _ctx(global_model=_global(), rnd=0)
    plain = DXO(DataKind.WEIGHT_DIFF, _update(0), meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 3}).to_shareable()
    plain.set_peer_props({ReservedKey.IDENTITY_NAME: "site-1"})
    plain.add_cookie(AppConstants.CONTRIBUTION_ROUND, 0)
    assert not agg.accept(plain, ctx) and "not encrypted by fedseg.flare.he.HEModelEncryptor" in agg.rejected["site-1"]
    unweighted = _started(HEModelEncryptor(weigh_by_local_iter=False), _ctx("site-2"))
    assert not agg.accept(_site_result("site-2", _update(1), 3, 0, encryptor=unweighted), ctx)
    assert "weigh_by_local_iter" in agg.rejected["site-2"]
    short = {k: v for k, v in _update(2).items() if k != "conv.bias"}
    assert not agg.accept(_site_result("site-3", short, 3, 0), ctx)
    assert "missing ['conv.bias']" in agg.rejected["site-3"]
    failed = Shareable()
    failed.set_return_code(ReturnCode.TASK_RESULT_FILTER_ERROR)
    failed.set_peer_props({ReservedKey.IDENTITY_NAME: "site-4"})
    assert not agg.accept(failed, ctx) and "TASK_RESULT_FILTER_ERROR" in agg.rejected["site-4"]


def test_a_round_without_valid_update_keeps_the_encrypted_global_model(startup):
    server_ctx = _ctx()
    agg, gen = _started(HEAggregator(), server_ctx), _started(HEModelShareableGenerator(), server_ctx)
    _, _, model = _round(agg, gen, _global(), [("site-1", _update(0), 3)], 0)
    before = _to_site(gen, model, server_ctx)
    ctx = _ctx(global_model=model, rnd=1)
    failed = Shareable()
    failed.set_return_code(ReturnCode.EXECUTION_EXCEPTION)
    failed.set_peer_props({ReservedKey.IDENTITY_NAME: "site-1"})
    assert not agg.accept(failed, ctx)
    model = gen.shareable_to_learnable(agg.aggregate(ctx), ctx)
    after = _to_site(gen, model, server_ctx)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])


def test_the_encryptor_refuses_nan_and_names_tensor_and_site(startup):
    ctx = _ctx("site-2")
    enc = _started(HEModelEncryptor(), ctx)
    update = _update(0)
    update["conv.bias"][1] = np.nan
    dxo = DXO(DataKind.WEIGHT_DIFF, update, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 3})
    with pytest.raises(UpdateRejected, match=r"site 'site-2': entry 'conv.bias' .* 1 NaN/Inf"):
        enc.process_dxo(dxo, dxo.to_shareable(), ctx)


def test_the_decryptor_keeps_integer_buffers_missing_from_processed_keys_plaintext(startup):
    ctx = _ctx("site-1")
    client = read_context(startup / CLIENT_CONTEXT)
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    data = {"w": ts.ckks_vector(client, w.ravel()).serialize(), "idx": np.arange(4, dtype=np.int64)}
    dxo = DXO(DataKind.WEIGHTS, data, meta={MetaKey.PROCESSED_KEYS: {"w": True},  # "idx" missing, as FLARE's
                                            MetaKey.PROCESSED_ALGORITHM: "CKKS", "he_shapes": {"w": [2, 3]}})
    out = from_shareable(_started(HEModelDecryptor(), ctx).process(dxo.to_shareable(), ctx)).data
    np.testing.assert_allclose(out["w"], w, atol=TOL)
    assert out["w"].shape == (2, 3) and out["idx"].dtype == np.int64 and list(out["idx"]) == [0, 1, 2, 3]


@pytest.mark.parametrize("component, file_name", [
    (HEModelEncryptor, CLIENT_CONTEXT), (HEModelDecryptor, CLIENT_CONTEXT), (HEAggregator, SERVER_CONTEXT),
    (HEModelShareableGenerator, SERVER_CONTEXT), (HEModelSerializeFilter, SERVER_CONTEXT)])
def test_a_missing_context_stops_the_run_at_start_with_file_folder_and_command(component, file_name, tmp_path,
                                                                              monkeypatch):
    empty = tmp_path / "startup"
    empty.mkdir()
    _startup(monkeypatch, empty)
    engine = Engine()
    c = component()
    c.handle_event(EventType.START_RUN, _ctx("site-1", engine=engine))
    reason, = engine.events
    for text in (file_name, str(empty), "fedseg he-context --workspace WS", "nvflare poc prepare -he", "HEBuilder"):
        assert text in reason
    with pytest.raises(HEContextError, match="not found in the startup folder"):
        c._context(_ctx("site-1"))


def test_unsigned_unreadable_and_wrong_kind_contexts_are_named(startup, tmp_path, monkeypatch):
    engine = Engine()
    _started(HEModelEncryptor(), _ctx("site-1", engine=engine, secure=True))  # secure mode: must be signed
    assert "is not signed" in engine.events[0] and "project.yml" in engine.events[0]
    engine = Engine()
    _started(HEModelShareableGenerator(tenseal_context_file=CLIENT_CONTEXT), _ctx(engine=engine))
    assert "holds a secret key" in engine.events[0]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / CLIENT_CONTEXT).write_bytes(b"not a context")
    _startup(monkeypatch, bad)
    engine = Engine()
    _started(HEModelDecryptor(), _ctx("site-1", engine=engine))
    assert "not a readable TenSEAL context" in engine.events[0] and str(bad) in engine.events[0]


def test_final_evaluation_sends_decryptable_task_data_and_saves_the_encrypted_model(startup, tmp_path):
    from fedseg.flare.final_evaluation import FinalEvaluation

    server_ctx = _ctx()
    agg, gen = _started(HEAggregator(), server_ctx), _started(HEModelShareableGenerator(), server_ctx)
    updates = [("site-1", _update(0), 3), ("site-2", _update(1), 5)]
    _, _, model = _round(agg, gen, _global(), updates, 0)
    fe = FinalEvaluation(test_evaluator_id="", best_model_id="", shareable_generator_id="shareable_generator",
                         encrypted_model=True)
    persistor = SimpleNamespace(tensor_shapes={**{k: list(s) for k, s in SHAPES.items()},
                                               "bn.num_batches_tracked": []})
    engine = Engine({"shareable_generator": gen, "persistor": persistor})
    task = fe._encrypted_task_data(engine, model, server_ctx)
    assert all(isinstance(model[ModelLearnableKey.WEIGHTS][k], ts.CKKSVector) for k in SHAPES)  # global untouched
    ctx = _ctx("site-1")
    got = from_shareable(_started(HEModelDecryptor(), ctx).process(fobs.loads(fobs.dumps(task)), ctx)).data
    path = fe._save_encrypted(engine, task, str(tmp_path))
    state = decrypt_model_file(path, read_context(startup / CLIENT_CONTEXT))
    expected = {k: v + _plain_mean(updates)[k] for k, v in _global()[ModelLearnableKey.WEIGHTS].items() if k in SHAPES}
    for k in SHAPES:
        np.testing.assert_allclose(got[k], expected[k], atol=TOL)
        np.testing.assert_allclose(state[k].numpy(), expected[k], atol=TOL)
        assert tuple(state[k].shape) == SHAPES[k]
    assert int(state["bn.num_batches_tracked"]) == 7
    with pytest.raises(ValueError, match="shareable_generator_id"):
        FinalEvaluation(encrypted_model=True)



def test_flare_wire_format_is_accepted_and_serialized_ciphertexts_are_smaller(startup):
    """HEModelEncryptor(serialize_ciphertexts=False) sends FLARE's CKKS objects (each with a context copy); the
    aggregate is the same; the default serialized form is smaller on the wire (one ciphertext is ~0.24 MB, a context
    copy with relin keys ~0.66 MB at the default parameters)."""
    sizes, results = {}, {}
    for serialized in (True, False):
        server_ctx = _ctx()
        agg, gen = _started(HEAggregator(), server_ctx), _started(HEModelShareableGenerator(), server_ctx)
        ctx = _ctx(global_model=_global(), rnd=0)
        enc = _started(HEModelEncryptor(serialize_ciphertexts=serialized), _ctx("site-1"))
        wire = _site_result("site-1", _update(0), 3, 0, encryptor=enc)
        sizes[serialized] = len(fobs.dumps(wire))
        assert agg.accept(wire, ctx)
        results[serialized] = _to_site(gen, gen.shareable_to_learnable(agg.aggregate(ctx), ctx), server_ctx)
    for k in SHAPES:
        np.testing.assert_allclose(results[True][k], results[False][k], atol=TOL)
    assert sizes[False] > 3 * sizes[True]


def test_selected_layer_encryption_keeps_the_plaintext_tensors_float32_and_weighted(startup):
    """encrypt_layers: only the chosen tensors become ciphertexts; the others stay plaintext in their own dtype
    (FLARE multiplies them by np.float64(steps), which would double their bytes) and are weighted by the steps."""
    ctx = _ctx("site-1")
    enc = _started(HEModelEncryptor(encrypt_layers=["conv.weight"]), ctx)
    update = _update(0)
    out = from_shareable(enc.process(DXO(DataKind.WEIGHT_DIFF, dict(update),
                                         meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 3}).to_shareable(), ctx))
    assert isinstance(out.data["conv.weight"], bytes)  # serialized ciphertext
    for k in ("conv.bias", "bn.running_mean"):
        assert out.data[k].dtype == np.float32
        np.testing.assert_allclose(out.data[k], 3 * update[k], rtol=1e-6)
