"""Privacy-filter benchmark: what fedseg's client privacy filters cost one site's round and the server's aggregation.

On demand:  python -m pytest tests/benchmarks/test_privacy_filters.py -m benchmark -s
Smoke test: FEDSEG_BENCH_QUICK=1 python -m pytest tests/benchmarks/test_privacy_filters.py -m benchmark -s
            (4 capped training steps a site, 1 repeat)

One run, one model, one set of real updates for every configuration. The model is the quick job's (``fedgs_lits``:
UTNet base 8, built through ``fedseg.models.get_model`` exactly as ``SegModelPersistor`` builds the initial global
model); every configuration below is a job of ``fedseg.jobs.recipes.JOBS`` with that same model, and its filters,
aggregator and shareable generator are instantiated from that job's exported client / server config (same classes,
same arguments, same filter order), then driven with real nvflare DXO / Shareable / FLContext objects:

* ``plaintext``  job ``fedgs_lits``: the site's WEIGHT_DIFF DXO goes out as it is; server ``FedGSAggregator`` +
  ``FullModelShareableGenerator``.
* ``HE``         job ``fedgs_lits_he``: ``fedseg.flare.he.HEModelEncryptor`` on the result, ``HEAggregator`` +
  ``HEModelShareableGenerator`` on the server, ``HEModelDecryptor`` on the next task's data at the site.
* ``DP``         job ``fedgs_lits_adp``: ``fedseg.flare.dp_filter.AdaptiveDPFilter`` (adaptive L1 clipping, Laplace,
  the job's settings) on the result; server as plaintext.
* ``DP+HE``      job ``fedgs_lits_adp_he``: DP filter, then encryptor (the job's order); server and decryptor as HE.
* ``HE ends N``  job ``fedgs_lits_he`` with ``he_encrypt_layers`` = the tensors of the first N and the last N layers
  in forward order (fedseg's recipe field, passed to the encryptor as FLARE's ``encrypt_layers`` list of names);
  ``HE ends 10%``: the first and last 10% of the layers. A "layer" is a module that owns float tensors of the update
  (weight, bias, BatchNorm statistics together); forward order comes from forward pre-hooks on one dummy image.
  The other tensors travel in plaintext (weighted by the local steps, as FLARE's encryptor does).

TenSEAL contexts are written by ``fedseg he-context`` (FLARE's HEBuilder: CKKS N 8192, moduli [60, 40, 40], scale
2^40) into a temporary startup folder; FLARE's SecurityContentService points at it and every HE component loads its
context at START_RUN, as in a simulator run (not timed: once per job).

The updates: one real local round per site (K = 3: site-1..site-3 of the built-in LiTS data, the quick job's
TrainConfig: 1 epoch, AdamW lr 1e-3, batch 4, FedGS eta, 1 thread), timed; every configuration gets copies of the
same three updates.

One round of a configuration, all timed (CPU seconds of this process; wall in brackets):
  site:   result filter(s) in the job's order -> ``fobs.dumps`` of the result Shareable (what FLARE serializes and
          streams) ... next task: ``fobs.loads`` of the task -> task-data filter(s) (the HE decryptor)
  server: ``fobs.loads`` of each of the K results -> ``aggregator.accept`` x K -> ``aggregator.aggregate`` ->
          ``shareable_to_learnable`` (the new global model) -> ``learnable_to_shareable`` + ``fobs.dumps`` (the task).
Bytes on the wire = ``len(fobs.dumps(shareable))`` (FLARE's FOBS, numpy decomposers registered as in a FLARE process)
of one site's result (upload) and of the next task (download), the same measure for every configuration.
"server aggregation" = accept x K + aggregate + shareable_to_learnable; "server total" adds the FOBS work.
"site round" = that site's local training + its filters + FOBS of its result + FOBS load and filters of the next task.

Every configuration runs REPEATS rounds (fresh components each: round 0 of a fresh run), interleaved with the others;
a per-site number is the median over sites x repeats, a server number the median over repeats.

Nothing asserts a time. Asserted: each aggregate (as the site sees it after the next task's filters) equals the
step-weighted mean of what the sites released (the DP-noised updates for DP configurations), to float32 rounding in
plaintext and within 1e-3 relative (CKKS) under HE; DP really noised and reported its epsilon; HE results hold
ciphertext exactly for the selected tensors; HE bytes > plaintext bytes; selected-layer bytes < full-HE bytes.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import io
import logging
import math
import os
import statistics
import sys
import time
import zlib
from dataclasses import replace

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.benchmark

QUICK = os.environ.get("FEDSEG_BENCH_QUICK", "") not in ("", "0")
REPEATS = 1 if QUICK else 3
SITES = ("site-1", "site-2", "site-3")  # K = 3
ENDS_N = 2  # "HE ends N": the first and last N layers
ENDS_FRACTION = 0.10  # "HE ends 10%": the first and last 10% of the layers
HE_REL_TOL = 1e-3  # CKKS at scale 2^40, relative to the largest value of the mean update
PLAIN_REL_TOL = 1e-4  # float32 rounding of base + mean

PLAIN, HE, DP, DP_HE = "plaintext", "HE", "DP", "DP+HE"
JOB_OF = {PLAIN: "fedgs_lits", HE: "fedgs_lits_he", DP: "fedgs_lits_adp", DP_HE: "fedgs_lits_adp_he"}

# phases
S_DP, S_ENC, S_DUMP, S_LOAD, S_DEC = ("site DP filter", "site HE encryptor", "site FOBS dump (result)",
                                      "site FOBS load (task)", "site HE decryptor (task)")
V_LOAD, V_ACCEPT, V_AGG, V_GLOBAL, V_TASK = ("server FOBS load x K", "server accept x K", "server aggregate",
                                             "server global update (shareable_to_learnable)",
                                             "server task (learnable_to_shareable + FOBS dump)")
SITE_FILTERS = (S_DP, S_ENC)
SITE_PHASES = (S_DP, S_ENC, S_DUMP, S_LOAD, S_DEC)
SERVER_AGG = (V_ACCEPT, V_AGG, V_GLOBAL)
SERVER_PHASES = (V_LOAD, V_ACCEPT, V_AGG, V_GLOBAL, V_TASK)


class _Clock:
    """(CPU s, wall s) per phase: ``with clock(phase): ...`` adds to that phase."""

    def __init__(self):
        self.t: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        c0, w0 = time.process_time(), time.perf_counter()
        try:
            yield
        finally:
            cpu, wall = self.t.setdefault(phase, [0.0, 0.0])
            self.t[phase] = [cpu + time.process_time() - c0, wall + time.perf_counter() - w0]

    def get(self, phase: str) -> tuple[float, float]:
        return tuple(self.t.get(phase, (0.0, 0.0)))

    def total(self, phases) -> tuple[float, float]:
        return tuple(sum(self.get(p)[i] for p in phases) for i in (0, 1))


# ---------------------------------------------------------------------------------------------------------------------
# FLARE plumbing


def _instantiate(spec: dict):
    module, _, name = spec["path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**dict(spec.get("args") or {}))


def _filters(specs: list[dict], task: str) -> list:
    return [_instantiate(f) for group in specs if task in group["tasks"] for f in group["filters"]]


def _site_filters(job) -> tuple[list, list]:
    """(train result filters, train task-data filters) of a job's client config, in the job's order."""
    client = job.client_config()
    return (_filters(client.get("task_result_filters", []), "train"),
            _filters(client.get("task_data_filters", []), "train"))


def _server_components(job):
    """(aggregator, shareable generator) of a job's server config."""
    by_id = {c["id"]: c for c in job.server_config()["components"]}
    return _instantiate(by_id["aggregator"]), _instantiate(by_id["shareable_generator"])


@contextlib.contextmanager
def _quiet_stdout(path):
    """TenSEAL's C++ code prints a two-line warning to stdout for every vector longer than one ciphertext (hundreds
    per round); send file descriptor 1 to ``path`` meanwhile."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def _payload(data: dict) -> dict:
    """What one result's DXO carries: serialized ciphertexts (count, bytes) and plaintext arrays (bytes, dtypes)."""
    cts = [v for v in data.values() if isinstance(v, bytes)]
    plain = [np.asarray(v) for v in data.values() if not isinstance(v, bytes)]
    return {"ct": len(cts), "ct_bytes": sum(len(v) for v in cts), "plain": len(plain),
            "plain_values": sum(a.size for a in plain), "plain_bytes": sum(a.nbytes for a in plain),
            "plain_dtypes": sorted({str(a.dtype) for a in plain})}


def _fl_ctx(identity: str, rnd: int, global_model=None):
    from nvflare.apis.fl_constant import FLContextKey, ReservedKey
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_common.app_constant import AppConstants

    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, identity, private=True, sticky=False)
    ctx.set_prop(FLContextKey.SECURE_MODE, False, private=True, sticky=False)  # simulator: unsigned contexts
    ctx.set_prop(AppConstants.CURRENT_ROUND, rnd, private=True, sticky=False)
    if global_model is not None:
        ctx.set_prop(AppConstants.GLOBAL_MODEL, global_model, private=True, sticky=False)
    peer = FLContext()
    peer.set_prop(ReservedKey.IDENTITY_NAME, "server" if identity != "server" else SITES[0], private=True,
                  sticky=False)
    ctx.set_peer_context(peer)
    return ctx


def _start(component, ctx):
    from nvflare.apis.event_type import EventType

    if hasattr(component, "handle_event"):
        component.handle_event(EventType.START_RUN, ctx)
    return component


# ---------------------------------------------------------------------------------------------------------------------
# inputs


def _layers_in_forward_order(model: torch.nn.Module, update_keys, in_channels: int, image_size: int) -> list[list[str]]:
    """The update's tensors grouped by the module that owns them, modules in the order a forward pass reaches them
    (modules that own update tensors but are not reached come last, in state-dict order)."""
    owner = {k: k.rsplit(".", 1)[0] if "." in k else "" for k in update_keys}
    owners = set(owner.values())
    order: list[str] = []
    hooks = []
    for name, module in model.named_modules():
        if name in owners:
            hooks.append(module.register_forward_pre_hook(
                lambda mod, inp, name=name: order.append(name) if name not in order else None))
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, in_channels, image_size, image_size))
    for h in hooks:
        h.remove()
    order += [o for o in dict.fromkeys(owner.values()) if o not in order]
    return [[k for k in update_keys if owner[k] == o] for o in order]


def _train_updates(job):
    """One real local round per site with the quick job's settings: (base state, {site: update}, {site: steps},
    {site: (CPU s, wall s)}, model)."""
    from fedseg.models import get_model
    from fedseg.sitedata import augmenter, load_site_data
    from fedseg.training import LocalTrainer, TrainConfig

    torch.set_num_threads(int(job.num_threads or 1))
    torch.manual_seed(int(job.seed))  # as SegModelPersistor builds the initial global model
    init_model = get_model(job.model, in_channels=job.in_channels, num_classes=job.num_classes, **job.model_args)
    base = {k: v.detach().cpu().numpy().copy() for k, v in init_model.state_dict().items()}
    updates, steps, train_s = {}, {}, {}
    for site in SITES:
        train, _ = load_site_data(job.dataset, site, "train", job.data_args)
        cfg = TrainConfig(lr=job.lr, weight_decay=job.weight_decay, batch_size=job.batch_size,
                          local_epochs=job.local_epochs, max_steps_per_round=4 if QUICK else job.max_steps_per_round,
                          aggregation=job.aggregation, augment=job.augment, device="cpu",
                          seed=int(job.seed) + zlib.crc32(site.encode()) % 100_000)  # the executor's per-site seed
        model = get_model(job.model, in_channels=job.in_channels, num_classes=job.num_classes, **job.model_args)
        trainer = LocalTrainer(model, train, cfg, augment_fn=augmenter(job.dataset) if cfg.augment else None)
        clock = _Clock()
        with clock("train"):
            res = trainer.train_round({k: torch.from_numpy(v.copy()) for k, v in base.items()})
        updates[site], steps[site], train_s[site] = res.update, int(res.steps), clock.get("train")
    return base, updates, steps, train_s, init_model


def _weighted_mean(released: dict, steps: dict) -> dict[str, np.ndarray]:
    total = float(sum(steps[s] for s in released))
    names = next(iter(released.values())).keys()
    return {k: sum(np.asarray(u[k], dtype=np.float64) * (steps[s] / total) for s, u in released.items())
            for k in names}


# ---------------------------------------------------------------------------------------------------------------------
# one round of one configuration


def run_round(job, base: dict, updates: dict, steps: dict, rnd: int = 0) -> dict:
    """One FLARE round of ``job`` over the K sites' updates, timed per phase; returns the site clocks, the server
    clock, bytes, what each site released (plaintext, after DP) and the global model the first site decrypted."""
    import tenseal as ts
    from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
    from nvflare.apis.fl_constant import ReservedKey
    from nvflare.app_common.abstract.model import ModelLearnableKey, make_model_learnable
    from nvflare.app_common.app_constant import AppConstants
    from nvflare.fuel.utils import fobs

    from fedseg.flare.dp_filter import AdaptiveDPFilter
    from fedseg.flare.he import HEModelDecryptor, HEModelEncryptor

    server_fl = _fl_ctx("server", rnd, make_model_learnable({k: v.copy() for k, v in base.items()}, {}))
    aggregator, generator = _server_components(job)
    _start(aggregator, server_fl), _start(generator, server_fl)
    site_clocks, up_bytes, wires, released, dp_meta = {}, {}, {}, {}, {}
    for site in SITES:
        result_filters, _ = _site_filters(job)
        site_fl = _fl_ctx(site, rnd)
        for f in result_filters:
            _start(f, site_fl)
        clock = site_clocks[site] = _Clock()
        # the executor's train result (fedseg.flare.executor.SegmentationTrainer._train)
        result = DXO(data_kind=DataKind.WEIGHT_DIFF, data={k: v.copy() for k, v in updates[site].items()},
                     meta={MetaKey.NUM_STEPS_CURRENT_ROUND: steps[site]}).to_shareable()
        released[site] = {k: v.copy() for k, v in updates[site].items()}
        for f in result_filters:
            phase = S_DP if isinstance(f, AdaptiveDPFilter) else S_ENC if isinstance(f, HEModelEncryptor) else None
            assert phase, f"unexpected result filter {type(f).__name__}"
            with clock(phase):
                result = f.process(result, site_fl)
            if isinstance(f, AdaptiveDPFilter):  # what leaves the site in plaintext terms (untimed copy)
                dxo = from_shareable(result)
                released[site] = {k: np.array(v, copy=True) for k, v in dxo.data.items()}
                dp_meta[site] = dxo.get_meta_prop("dp")
        if site == SITES[0]:
            payload = _payload(from_shareable(result).data)  # untimed look at what is about to be sent
        with clock(S_DUMP):
            wire = fobs.dumps(result)
        up_bytes[site], wires[site] = len(wire), wire
        del result
    # server
    sclock, server_dp = _Clock(), {}
    for site in SITES:
        with sclock(V_LOAD):
            received = fobs.loads(wires.pop(site))
        server_dp[site] = from_shareable(received).get_meta_prop("dp")  # the PrivacyRecorder's input (untimed)
        received.set_peer_props({ReservedKey.IDENTITY_NAME: site})  # what the cell adds on arrival
        received.add_cookie(AppConstants.CONTRIBUTION_ROUND, rnd)  # ScatterAndGather's task cookie, echoed back
        with sclock(V_ACCEPT):
            accepted = aggregator.accept(received, server_fl)
        assert accepted, f"{job.name}: the aggregator refused {site}'s result: {getattr(aggregator, 'rejected', {})}"
        del received
    with sclock(V_AGG):
        aggregated = aggregator.aggregate(server_fl)
    with sclock(V_GLOBAL):
        learnable = generator.shareable_to_learnable(aggregated, server_fl)
    # which tensors the server's global model holds encrypted (before learnable_to_shareable serializes them)
    encrypted = {k for k, v in learnable[ModelLearnableKey.WEIGHTS].items() if isinstance(v, ts.CKKSVector)}
    with sclock(V_TASK):
        task_wire = fobs.dumps(generator.learnable_to_shareable(learnable, server_fl))
    del learnable, aggregated
    # every site: the next task's data through its task-data filters
    got = None
    for site in SITES:
        _, data_filters = _site_filters(job)
        site_fl = _fl_ctx(site, rnd + 1)
        for f in data_filters:
            _start(f, site_fl)
        clock = site_clocks[site]
        with clock(S_LOAD):
            task = fobs.loads(task_wire)
        for f in data_filters:
            assert isinstance(f, HEModelDecryptor), f"unexpected task-data filter {type(f).__name__}"
            with clock(S_DEC):
                task = f.process(task, site_fl)
        if got is None:
            got = {k: np.asarray(v) for k, v in from_shareable(task).data.items()}
        del task
    out = {"site": site_clocks, "server": sclock, "up": up_bytes, "down": len(task_wire), "released": released,
           "global": got, "encrypted": encrypted, "dp_meta": dp_meta, "server_dp": server_dp,
           "payload": payload}
    del task_wire
    gc.collect()
    return out


def check_round(name: str, r: dict, base: dict, steps: dict, he_names: set | None, raw: dict) -> float:
    """The aggregate the site received equals the step-weighted mean of what the sites released; returns the max
    error relative to the largest value of that mean."""
    want = _weighted_mean(r["released"], steps)
    peak = max(float(np.max(np.abs(v))) for v in want.values())
    err = max(float(np.max(np.abs(r["global"][k].astype(np.float64).reshape(base[k].shape) - base[k] - want[k])))
              for k in want)
    rel = err / peak
    tol = HE_REL_TOL if he_names is not None else PLAIN_REL_TOL
    assert rel < tol, f"{name}: aggregate off by {err:.3g} ({rel:.3g} of the largest mean value {peak:.3g}) > {tol}"
    float_keys = set(want)
    assert set(r["global"]) == set(base), f"{name}: the task does not hold the whole model"
    for k in set(base) - float_keys:  # integer buffers travel unchanged, in their dtype
        assert np.array_equal(r["global"][k], base[k]) and r["global"][k].dtype == base[k].dtype, k
    if he_names is None:
        assert not r["encrypted"], f"{name}: ciphertext in a plaintext job"
    else:
        assert r["encrypted"] == he_names, (f"{name}: the server's global model holds ciphertext for "
                                            f"{len(r['encrypted'])} tensors, expected {len(he_names)}")
    if r["dp_meta"]:
        for site, meta in r["dp_meta"].items():
            assert meta and meta["epsilon_total"] > 0 and meta["noise_scale"] is not None, (name, site, meta)
            assert r["server_dp"][site] == meta, f"{name}: the server did not get {site}'s DP report in the clear"
            noise = max(float(np.max(np.abs(r["released"][site][k] - raw[site][k]))) for k in raw[site])
            assert noise > 0, f"{name}: {site}'s released update equals its raw update (no DP noise)"
    else:
        for site in raw:
            assert all(np.array_equal(r["released"][site][k], raw[site][k]) for k in raw[site])
    return rel


# ---------------------------------------------------------------------------------------------------------------------
# the benchmark


def _median(values):
    return statistics.median(values)


def _summary(rounds: list[dict], train_s: dict) -> dict:
    """Medians: per-site phases over sites x repeats, server phases over repeats, plus totals."""
    s = {}
    for phase in SITE_PHASES:
        s[phase] = tuple(_median([r["site"][site].get(phase)[i] for r in rounds for site in SITES]) for i in (0, 1))
    for phase in SERVER_PHASES:
        s[phase] = tuple(_median([r["server"].get(phase)[i] for r in rounds]) for i in (0, 1))
    s["filters"] = tuple(_median([r["site"][site].total(SITE_FILTERS)[i] for r in rounds for site in SITES])
                         for i in (0, 1))
    s["site round"] = tuple(_median([train_s[site][i] + r["site"][site].total(SITE_PHASES)[i]
                                     for r in rounds for site in SITES]) for i in (0, 1))
    s["site privacy"] = tuple(_median([r["site"][site].total(SITE_PHASES)[i] for r in rounds for site in SITES])
                              for i in (0, 1))
    s["server agg"] = tuple(_median([r["server"].total(SERVER_AGG)[i] for r in rounds]) for i in (0, 1))
    s["server total"] = tuple(_median([r["server"].total(SERVER_PHASES)[i] for r in rounds]) for i in (0, 1))
    ups = {r["up"][site] for r in rounds for site in SITES}
    s["up"] = rounds[0]["up"][SITES[0]]
    s["up_spread"] = (min(ups), max(ups))
    s["down"] = _median([r["down"] for r in rounds])
    return s


def _ratio(a: float, b: float) -> str:
    return f"{a / b:8.1f}x" if b > 0 else "      n/a"


def test_privacy_filters_cost_per_round(tmp_path, monkeypatch):
    from nvflare.app_common.decomposers import common_decomposers
    from nvflare.fuel.sec.security_content_service import SecurityContentService

    from fedseg.cli import main
    from fedseg.flare.he import CLIENT_CONTEXT
    from fedseg.jobs.recipes import JOBS

    logging.getLogger("nvflare").setLevel(logging.WARNING)
    logging.getLogger("fedseg").setLevel(logging.WARNING)
    common_decomposers.register()  # numpy arrays over FOBS, as in a FLARE process
    t_start = time.perf_counter()

    jobs = {name: JOBS[j] for name, j in JOB_OF.items()}
    quick = jobs[PLAIN]
    for name, job in jobs.items():  # one model for all configurations
        assert (job.model, job.model_args, job.in_channels, job.num_classes, job.dataset, job.data_args) == (
            quick.model, quick.model_args, quick.in_channels, quick.num_classes, quick.dataset, quick.data_args), name
    assert [f["path"].rsplit(".", 1)[1] for f in jobs[DP_HE].client_config()["task_result_filters"][0]["filters"]] \
        == ["AdaptiveDPFilter", "HEModelEncryptor"]

    # contexts as `fedseg he-context` writes them; FLARE's SecurityContentService points at that startup folder
    with contextlib.redirect_stdout(io.StringIO()):  # its "wrote ..." lines
        assert main(["he-context", "--workspace", str(tmp_path / "ws")]) == 0
    startup = tmp_path / "ws" / "startup"
    monkeypatch.setattr(SecurityContentService, "security_content_manager", None)
    monkeypatch.setattr(SecurityContentService, "content_folder", None)
    SecurityContentService.initialize(content_folder=str(startup))

    base, updates, steps, train_s, model = _train_updates(quick)
    update_keys = list(updates[SITES[0]])
    n_values = sum(int(np.asarray(v).size) for v in updates[SITES[0]].values())
    n_ct = sum(math.ceil(int(np.asarray(v).size) / 4096) for v in updates[SITES[0]].values())
    layers = _layers_in_forward_order(model, update_keys, quick.in_channels, int(quick.data_args["image_size"]))
    assert sorted(k for layer in layers for k in layer) == sorted(update_keys)
    n_frac = max(1, math.ceil(ENDS_FRACTION * len(layers)))
    selections = {}
    for label, n in ((f"HE ends {ENDS_N}", ENDS_N), (f"HE ends {ENDS_FRACTION:.0%}", n_frac)):
        names = [k for layer in layers[:n] + layers[-n:] for k in layer]
        selections[label] = (n, names)
        jobs[label] = replace(jobs[HE], he_encrypt_layers=names)
    he_names = {PLAIN: None, DP: None, HE: set(update_keys), DP_HE: set(update_keys),
                **{label: set(names) for label, (_, names) in selections.items()}}
    print(f"\n[benchmark] privacy filters per round: quick job's UTNet ({quick.model} {quick.model_args}) update = "
          f"{n_values:,} float values in {len(update_keys)} tensors of {len(layers)} layers ({n_ct} CKKS vectors of "
          f"4096 slots when all are encrypted); K = {len(SITES)} sites; {REPEATS} repeat(s)"
          + (" (SMOKE: 4 capped training steps)" if QUICK else ""))
    ctx_sizes = {f.name: f.stat().st_size for f in sorted(startup.iterdir())}
    print("    TenSEAL contexts (fedseg he-context): " + ", ".join(f"{n} {b:,} B" for n, b in ctx_sizes.items())
          + f"; the sites load {CLIENT_CONTEXT}")
    print("    local round (one real round, " + f"{quick.local_epochs} epoch, batch {quick.batch_size}, lr {quick.lr}, "
          f"{quick.aggregation}, {quick.num_threads} thread): " + ", ".join(
              f"{s} {train_s[s][0]:.2f} s CPU ({train_s[s][1]:.2f} wall) / {steps[s]} steps" for s in SITES))
    for label, (n, names) in selections.items():
        vals = sum(int(np.asarray(updates[SITES[0]][k]).size) for k in names)
        print(f"    {label}: first and last {n} layers = {len(names)} tensors, {vals:,} values "
              f"({100 * vals / n_values:.2f}%): {layers[0][0]} ... {layers[-1][-1]}")

    dp_reports = {}
    rounds = {name: [] for name in jobs}
    errors = {name: [] for name in jobs}
    for rep in range(REPEATS):
        names = list(jobs) if rep % 2 == 0 else list(jobs)[::-1]  # interleaved, alternating order
        for name in names:
            with _quiet_stdout(tmp_path / "tenseal_stdout.txt"):
                r = run_round(jobs[name], base, updates, steps)
            errors[name].append(check_round(name, r, base, steps, he_names[name], updates))
            if r["dp_meta"] and name not in dp_reports:
                dp_reports[name] = (r["dp_meta"][SITES[0]], r["released"][SITES[0]])
            for key in ("released", "global"):
                r.pop(key)
            rounds[name].append(r)
        print(f"[benchmark] repeat {rep + 1}/{REPEATS} done [{time.perf_counter() - t_start:.0f} s elapsed]")

    summ = {name: _summary(rs, train_s) for name, rs in rounds.items()}
    p = summ[PLAIN]

    def cw(v):
        return f"{v[0]:7.3f} ({v[1]:7.3f})"

    print(f"\n[benchmark] privacy filters, one site's result and the server's aggregation of K = {len(SITES)}; "
          "seconds = CPU s of this process (wall in brackets), medians; bytes = len(fobs.dumps(Shareable)); "
          "ratios against plaintext of this run")
    print(f"    {'config':14s} {'site filters s':>19s} {'result MB':>10s} {'bytes x':>9s} "
          f"{'server agg s':>19s} {'agg x':>9s} {'site decrypt s':>19s} {'task MB':>8s} {'task x':>8s} "
          f"{'max rel err':>11s}")
    for name, s in summ.items():
        print(f"    {name:14s} {cw(s['filters'])} {s['up'] / 1e6:10.2f} {_ratio(s['up'], p['up'])} "
              f"{cw(s['server agg'])} {_ratio(s['server agg'][0], p['server agg'][0])} {cw(s[S_DEC])} "
              f"{s['down'] / 1e6:8.2f} {_ratio(s['down'], p['down'])} {max(errors[name]):11.2g}")
    print("[benchmark] round-level (CPU s; site round = its local training + every privacy/FOBS step of the round; "
          "server total = FOBS load x K + aggregation + task serialization):")
    print(f"    {'config':14s} {'site round s':>19s} {'x plain':>9s} {'privacy+FOBS s':>19s} "
          f"{'server total s':>19s} {'x plain':>9s} {'B/param up':>10s}")
    for name, s in summ.items():
        print(f"    {name:14s} {cw(s['site round'])} {s['site round'][0] / p['site round'][0]:8.3f}x "
              f"{cw(s['site privacy'])} {cw(s['server total'])} {_ratio(s['server total'][0], p['server total'][0])} "
              f"{s['up'] / n_values:10.2f}")
    print("[benchmark] phases (CPU s, medians):")
    for name, s in summ.items():
        print(f"    {name:14s} " + ", ".join(f"{ph} {s[ph][0]:.3f}" for ph in SITE_PHASES + SERVER_PHASES
                                              if s[ph][1] > 0))
    full = summ[HE]
    print("[benchmark] selected-layer encryption vs full HE (same run):")
    for label in selections:
        s = summ[label]
        print(f"    {label:14s} site filters {s['filters'][0]:.3f} s (saves {full['filters'][0] - s['filters'][0]:.3f}"
              f" s, {s['filters'][0] / full['filters'][0]:.3f} of full), server agg {s['server agg'][0]:.3f} s "
              f"(saves {full['server agg'][0] - s['server agg'][0]:.3f} s), site decrypt {s[S_DEC][0]:.3f} s "
              f"(saves {full[S_DEC][0] - s[S_DEC][0]:.3f} s); result {s['up'] / 1e6:.2f} MB "
              f"(saves {(full['up'] - s['up']) / 1e6:.2f} MB, {s['up'] / full['up']:.3f} of full, "
              f"{s['up'] / p['up']:.2f}x plaintext), task {s['down'] / 1e6:.2f} MB ({s['down'] / full['down']:.3f} "
              f"of full)")
    print("[benchmark] one site's result payload before FOBS (serialized CKKS vectors, one per encrypted tensor; "
          "plaintext arrays):")
    for name in summ:
        pl = rounds[name][0]["payload"]
        print(f"    {name:14s} {pl['ct']:4d} CKKS vectors {pl['ct_bytes'] / 1e6:8.2f} MB; {pl['plain']:3d} plaintext "
              f"tensors, {pl['plain_values']:,} values, {pl['plain_bytes'] / 1e6:.2f} MB"
              + (f" as {'/'.join(pl['plain_dtypes'])}" if pl["plain_dtypes"] else ""))
    raw_l1 = sum(float(np.abs(v.astype(np.float64)).sum()) for v in updates[SITES[0]].values())
    for name, (meta, released) in dp_reports.items():
        noise = np.concatenate([(released[k].astype(np.float64) - updates[SITES[0]][k]).ravel() for k in released])
        print(f"    {name} report of {SITES[0]} (round 0 of a fresh run): {meta['mechanism']}, {meta['clipping']} "
              f"clip {meta['clip']:.6g} (L1 norm of the raw update {raw_l1:.4g}), "
              f"noise scale {meta['noise_scale']:.4g}, "
              f"epsilon this round {meta['epsilon_round']:.6g}; released - raw: mean |.| {np.abs(noise).mean():.3g}, "
              f"max |raw| {max(float(np.abs(v).max()) for v in updates[SITES[0]].values()):.3g}")
    print(f"[benchmark] total benchmark time {time.perf_counter() - t_start:.0f} s")

    # physical expectations (no timing)
    for name in (HE, DP_HE):
        assert summ[name]["up"] > p["up"] and summ[name]["down"] > p["down"], name
    assert abs(summ[DP]["up"] - p["up"]) < 0.01 * p["up"], "DP noise should not change the result's size much"
    for label in selections:
        assert p["up"] < summ[label]["up"] < full["up"], label
        assert summ[label]["down"] < full["down"], label
    for name, s in summ.items():  # one site's result has the same size at every site and repeat, up to the meta
        lo, hi = s["up_spread"]
        assert hi - lo < 0.001 * hi, (name, lo, hi)
