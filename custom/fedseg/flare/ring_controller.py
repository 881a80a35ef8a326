"""FLARE workflow for CSAHE secure aggregation: ScatterAndGather's rounds with a ring relay instead of an aggregator.

Thin adapter over :func:`fedseg.algorithms.ring.secure_aggregate` (the pure driver: ring order, per-attempt weights,
server-side validation of every reply under the round's public context, re-runs without a failed site, never a
partial sum). Per round:

1. like ScatterAndGather: ``ROUND_STARTED``, the train task is broadcast with the global model; each site trains,
   keeps its update and returns metadata only (steps, n_samples, layout digest; validation metrics in the meta).
   A reply holding a plaintext update (WEIGHTS / WEIGHT_DIFF) or a layout that differs from the global model's is
   not accepted; ``BEFORE/AFTER_CONTRIBUTION_ACCEPT`` fire for every reply with ``TRAINING_RESULT`` and
   ``AGGREGATION_ACCEPTED`` set, so :class:`~fedseg.flare.best_model.BestModelKeeper` sees the validation metrics.
2. ``BEFORE_AGGREGATION``; the ring runs over the accepted sites: each ``send(site, kind, payload)`` is one FLARE
   task (``csahe_start`` / ``csahe_hop`` / ``csahe_finish``) sent with ``send_and_wait`` to that one site, with
   ``Task(timeout=hop_timeout)``; no reply in time, an error return code, or a reply that fails validation is that
   site's failure. Pre-encryption (``prepare=True``, the default; :mod:`fedseg.algorithms.ring`): right after the
   initiator's ``csahe_start`` reply, one parallel wave of tasks -- the first member's ``csahe_hop`` and a
   ``csahe_prepare`` (the round's public context and that member's own weight) for every later member -- is
   scheduled at once with ``send`` (one Task per site, each with its own payload and ``timeout=hop_timeout``) and
   awaited together; the later members then hop with their prepared ciphertexts. A prepare that fails or times out
   drops that site like a failed hop (re-run without it). Weights ``w_k = n_k / sum n`` over the sites of each
   attempt with ``n_k`` = local steps
   (``weighting="steps"``: FedGS / FedAvg, as :class:`~fedseg.flare.aggregator.FedGSAggregator` weights) or training
   samples (``"samples"``: Per-FedAvg / the PPPML-HMI paper).
3. The initiator's ``csahe_finish`` reply (a WEIGHT_DIFF: ``sum_k w_k Delta_k``) is checked (finite, keys and shapes of
   the global model's float entries: :func:`fedseg.algorithms.fedgs.check_update`) and becomes the
   ``AGGREGATION_RESULT`` (``AFTER_AGGREGATION``), which the shareable generator applies (global + aggregate), as it
   applies FedGSAggregator's result. A failed attempt is logged (which site, at which step, why) and re-run without
   that site while >= ``min_ring_sites`` remain (a rejected *finished* aggregate is not re-run: see
   :mod:`fedseg.algorithms.ring`); when the round cannot be aggregated, one log line says why and that the round is
   skipped; the result is an empty WEIGHT_DIFF, i.e. the global model is kept.
4. ``BEFORE/AFTER_SHAREABLE_TO_LEARNABLE``, persist (``BEFORE/AFTER_LEARNABLE_PERSIST``), ``ROUND_DONE`` with the
   same fl_ctx props as ScatterAndGather (``CURRENT_ROUND``, ``GLOBAL_MODEL``, ...), so the persistor, best-model
   keeper, test-centre evaluator, metrics recorder and final evaluation work unchanged.

Every ring step is one task to one site, so the job sets FLARE's ``server.task_request_interval`` (how soon an idle
site asks again for a task; 2 s by default) to 0.5 s (``SegJob.csahe_task_request_interval``).

One log line per round gives the ring order, attempts, bytes relayed and seconds; ``<run_dir>/csahe_rounds.jsonl``
gets one JSON record per round: participants, counts, attempts (order, weights, failed site, stage, reason, seconds,
bytes, the members that prepared, those that encrypted in their hop, the parallel wave's seconds), dropped sites,
bytes relayed, bytes per parameter, seconds, whether the aggregate was applied, whether any
received public context was private (never, unless a site misbehaves: then it is flagged and never relayed), and the
relay record: one entry per message set (attempt, kind, direction, site, item, count, bytes, sha256 over the items'
sha256 digests) -- sizes and hashes, never the bytes.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from typing import Any

import numpy as np
from nvflare.apis.client import Client
from nvflare.apis.controller_spec import ClientTask, Task
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.controller import Controller
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.learnable_persistor import LearnablePersistor
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey
from nvflare.app_common.abstract.shareable_generator import ShareableGenerator
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType

from fedseg.algorithms.csahe import MIN_SITES, PackSpec
from fedseg.algorithms.fedgs import check_update
from fedseg.algorithms.ring import TASK_NAMES, RingAborted, RingOutcome, SendFailed, secure_aggregate
from fedseg.errors import ConfigError

WEIGHTINGS = ("steps", "samples")


def expected_layout(weights: dict) -> tuple[PackSpec, dict, list]:
    """The layout every site's update must have: the global model's float entries as float32 (what
    ``fedseg.algorithms.fedgs.model_update`` sends), their shapes, and the integer keys (never in an update)."""
    floats, integer_keys = {}, []
    for name, value in weights.items():
        arr = np.asarray(value)
        if np.issubdtype(arr.dtype, np.floating):
            floats[name] = np.broadcast_to(np.float32(0), arr.shape)  # shape and dtype only, no copy
        else:
            integer_keys.append(name)
    return PackSpec.from_update(floats), {k: v.shape for k, v in floats.items()}, integer_keys


def relay_record(outcome: RingOutcome) -> list[dict]:
    """One entry per message set the server sent or received (never the bytes)."""
    import hashlib

    groups: dict[tuple, dict] = {}
    for t in outcome.transfers:
        key = (t.attempt, t.kind, t.direction, t.site, t.item)
        g = groups.setdefault(key, {"attempt": t.attempt, "kind": t.kind, "direction": t.direction, "site": t.site,
                                    "item": t.item, "count": 0, "nbytes": 0, "_h": [], "is_private": None})
        g["count"] += 1
        g["nbytes"] += t.nbytes
        g["_h"].append(t.sha256)
        if t.is_private is not None:
            g["is_private"] = bool(g["is_private"]) or t.is_private
    out = []
    for g in groups.values():
        hashes = g.pop("_h")
        g["sha256"] = hashes[0] if len(hashes) == 1 else hashlib.sha256("".join(hashes).encode()).hexdigest()
        out.append(g)
    return out


class CSAHEScatterAndGather(Controller):
    def __init__(
        self,
        min_clients: int = MIN_SITES,
        num_rounds: int = 5,
        start_round: int = 0,
        wait_time_after_min_received: int = 0,
        persistor_id: str = "persistor",
        shareable_generator_id: str = "shareable_generator",
        train_task_name: str = AppConstants.TASK_TRAIN,
        train_timeout: int = 0,
        hop_timeout: int = 600,
        prepare: bool = True,
        weighting: str = "steps",
        min_ring_sites: int = MIN_SITES,
        record_file: str = "csahe_rounds.jsonl",
        persist_every_n_rounds: int = 1,
        snapshot_every_n_rounds: int = 1,
        task_check_period: float = 0.2,
    ):
        super().__init__(task_check_period=task_check_period)
        for name, value, low in (("min_clients", min_clients, 1), ("num_rounds", num_rounds, 0),
                                 ("start_round", start_round, 0), ("train_timeout", train_timeout, 0),
                                 ("wait_time_after_min_received", wait_time_after_min_received, 0),
                                 ("hop_timeout", hop_timeout, 1), ("persist_every_n_rounds", persist_every_n_rounds, 0),
                                 ("snapshot_every_n_rounds", snapshot_every_n_rounds, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"CSAHEScatterAndGather: {name} must be an integer >= {low}, got {value!r}")
        if not isinstance(prepare, bool):
            raise ConfigError(f"CSAHEScatterAndGather: prepare must be true or false, got {prepare!r}")
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"CSAHEScatterAndGather: weighting must be 'steps' (FedGS / FedAvg: local steps) or "
                              f"'samples' (Per-FedAvg / PPPML-HMI: training samples), got {weighting!r}")
        if isinstance(min_ring_sites, bool) or not isinstance(min_ring_sites, int) or min_ring_sites < MIN_SITES:
            raise ConfigError(f"CSAHEScatterAndGather: min_ring_sites must be >= {MIN_SITES} (with 2 sites the "
                              f"initiator learns the other's update), got {min_ring_sites!r}")
        self._min_clients = min_clients
        self._num_rounds = num_rounds
        self._start_round = start_round
        self._wait_time_after_min_received = wait_time_after_min_received
        self.persistor_id = persistor_id
        self.shareable_generator_id = shareable_generator_id
        self.train_task_name = train_task_name
        self._train_timeout = train_timeout
        self.hop_timeout = hop_timeout
        self.prepare = prepare
        self.weighting = weighting
        self.min_ring_sites = min_ring_sites
        self.record_file = record_file
        self._persist_every_n_rounds = persist_every_n_rounds
        self._snapshot_every_n_rounds = snapshot_every_n_rounds
        self.persistor = None
        self.shareable_gen = None
        self._phase = AppConstants.PHASE_INIT
        self._global_weights = None
        self._current_round = None
        self._meta: dict[str, dict] = {}
        self._rejected: dict[str, str] = {}
        self._layout = None
        self._record_path = None
        self._rng = secrets.SystemRandom()

    # ------------------------------------------------------------------ start
    def start_controller(self, fl_ctx: FLContext) -> None:
        self.log_info(fl_ctx, "Initializing CSAHEScatterAndGather: FedAvg rounds with CSAHE ring-relay secure "
                      f"aggregation (weighting={self.weighting}, hop_timeout={self.hop_timeout} s, "
                      f"pre-encryption={'on' if self.prepare else 'off'}).")
        self._phase = AppConstants.PHASE_INIT
        self.shareable_gen = self._engine.get_component(self.shareable_generator_id)
        if not isinstance(self.shareable_gen, ShareableGenerator):
            self.system_panic(f"shareable generator {self.shareable_generator_id!r} must be a ShareableGenerator, got "
                              f"{type(self.shareable_gen)}", fl_ctx)
            return
        self.persistor = self._engine.get_component(self.persistor_id) if self.persistor_id else None
        if not isinstance(self.persistor, LearnablePersistor):
            self.system_panic(f"model persistor {self.persistor_id!r} must be a LearnablePersistor, got "
                              f"{type(self.persistor)}", fl_ctx)
            return
        fl_ctx.set_prop(AppConstants.START_ROUND, self._start_round, private=True, sticky=True)
        fl_ctx.set_prop(AppConstants.NUM_ROUNDS, self._num_rounds, private=True, sticky=False)
        self._global_weights = self.persistor.load(fl_ctx)
        if not isinstance(self._global_weights, ModelLearnable) or self._global_weights.is_empty():
            self.system_panic(f"the persistor gave no initial model ({type(self._global_weights)})", fl_ctx)
            return
        fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, self._global_weights, private=True, sticky=True)
        self.fire_event(AppEventType.INITIAL_MODEL_LOADED, fl_ctx)
        run_dir = self._engine.get_workspace().get_run_dir(fl_ctx.get_job_id())
        self._record_path = os.path.join(run_dir, self.record_file) if self.record_file else None

    def stop_controller(self, fl_ctx: FLContext):
        self._phase = AppConstants.PHASE_FINISHED

    def process_result_of_unknown_task(self, client: Client, task_name: str, client_task_id: str, result: Shareable,
                                       fl_ctx: FLContext) -> None:
        self.log_warning(fl_ctx, f"late result of task {task_name} from {client.name} ignored (its ring attempt or "
                         "round is over)")

    # ------------------------------------------------------------------ rounds
    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        try:
            self._phase = AppConstants.PHASE_TRAIN
            fl_ctx.set_prop(AppConstants.PHASE, self._phase, private=True, sticky=False)
            fl_ctx.set_prop(AppConstants.NUM_ROUNDS, self._num_rounds, private=True, sticky=False)
            self.fire_event(AppEventType.TRAINING_STARTED, fl_ctx)
            if self._current_round is None:
                self._current_round = self._start_round
            while self._current_round < self._start_round + self._num_rounds:
                if self._aborted(fl_ctx, abort_signal):
                    return
                if not self._run_round(fl_ctx, abort_signal):
                    return
            self._phase = AppConstants.PHASE_FINISHED
            self.log_info(fl_ctx, "Finished CSAHEScatterAndGather training.")
        except Exception as e:  # noqa: BLE001  (as ScatterAndGather: any error ends the run with a panic + trace)
            self.log_exception(fl_ctx, f"Exception in CSAHEScatterAndGather control_flow: {e}")
            self.system_panic(f"Exception in CSAHEScatterAndGather control_flow: {e}", fl_ctx)

    def _aborted(self, fl_ctx: FLContext, abort_signal: Signal) -> bool:
        if abort_signal.triggered:
            self._phase = AppConstants.PHASE_FINISHED
            self.log_info(fl_ctx, f"Abort signal received. Exiting at round {self._current_round}.")
            return True
        return False

    def _run_round(self, fl_ctx: FLContext, abort_signal: Signal) -> bool:
        rnd = self._current_round
        self.log_info(fl_ctx, f"Round {rnd} started.")
        fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, self._global_weights, private=True, sticky=True)
        fl_ctx.set_prop(AppConstants.CURRENT_ROUND, rnd, private=True, sticky=True)
        self.fire_event(AppEventType.ROUND_STARTED, fl_ctx)
        weights = self._global_weights[ModelLearnableKey.WEIGHTS]
        self._layout = expected_layout(weights)

        # 1. train: sites keep their updates, return metadata
        data = self.shareable_gen.learnable_to_shareable(self._global_weights, fl_ctx)
        data.set_header(AppConstants.CURRENT_ROUND, rnd)
        data.set_header(AppConstants.NUM_ROUNDS, self._num_rounds)
        data.add_cookie(AppConstants.CONTRIBUTION_ROUND, rnd)
        self._meta, self._rejected = {}, {}
        task = Task(name=self.train_task_name, data=data, props={}, timeout=self._train_timeout,
                    before_task_sent_cb=self._before_train_sent, result_received_cb=self._process_train_result)
        self.broadcast_and_wait(task=task, min_responses=self._min_clients,
                                wait_time_after_min_received=self._wait_time_after_min_received, fl_ctx=fl_ctx,
                                abort_signal=abort_signal)
        if self._aborted(fl_ctx, abort_signal):
            return False

        # 2. the ring
        self.log_info(fl_ctx, "Start aggregation.")
        self.fire_event(AppEventType.BEFORE_AGGREGATION, fl_ctx)
        outcome = self._ring(rnd, fl_ctx, abort_signal)
        result = self._aggregation_result(rnd, outcome, fl_ctx)
        self.fire_event_with_data(AppEventType.AFTER_AGGREGATION, fl_ctx, AppConstants.AGGREGATION_RESULT, result)
        self.log_info(fl_ctx, "End aggregation.")
        self._write_record(rnd, outcome, fl_ctx)
        if self._aborted(fl_ctx, abort_signal):
            return False

        # 3. apply, persist, done
        self.fire_event(AppEventType.BEFORE_SHAREABLE_TO_LEARNABLE, fl_ctx)
        self._global_weights = self.shareable_gen.shareable_to_learnable(result, fl_ctx)
        fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, self._global_weights, private=True, sticky=True)
        fl_ctx.sync_sticky()
        self.fire_event(AppEventType.AFTER_SHAREABLE_TO_LEARNABLE, fl_ctx)
        if self._aborted(fl_ctx, abort_signal):
            return False
        last = rnd == self._start_round + self._num_rounds - 1
        if (self._persist_every_n_rounds and (rnd + 1) % self._persist_every_n_rounds == 0) or last:
            self.fire_event(AppEventType.BEFORE_LEARNABLE_PERSIST, fl_ctx)
            self.persistor.save(self._global_weights, fl_ctx)
            self.fire_event(AppEventType.AFTER_LEARNABLE_PERSIST, fl_ctx)
        self.fire_event(AppEventType.ROUND_DONE, fl_ctx)
        self.log_info(fl_ctx, f"Round {rnd} finished.")
        self._current_round += 1
        if self._snapshot_every_n_rounds and self._current_round % self._snapshot_every_n_rounds == 0:
            self._engine.persist_components(fl_ctx, completed=False)
        return True

    def _before_train_sent(self, client_task: ClientTask, fl_ctx: FLContext) -> None:
        self.fire_event_with_data(AppEventType.BEFORE_TRAIN_TASK, fl_ctx, AppConstants.TRAIN_SHAREABLE,
                                  client_task.task.data)

    # ------------------------------------------------------------------ train replies (metadata only)
    def _check_meta(self, site: str, result: Shareable, rnd: int) -> dict:
        """The metadata of a site's train reply, or ConfigError saying why it cannot join the ring."""
        rc = result.get_return_code()
        if rc and rc != ReturnCode.OK:
            raise ConfigError(f"the site returned {rc}")
        contribution_round = result.get_cookie(AppConstants.CONTRIBUTION_ROUND)
        if contribution_round is not None and contribution_round != rnd:
            raise ConfigError(f"the reply is for round {contribution_round}, the server is in round {rnd}")
        try:
            dxo = from_shareable(result)
        except Exception as e:  # noqa: BLE001  (malformed reply: the site does not join)
            raise ConfigError(f"the reply holds no DXO ({e})") from None
        if dxo.data_kind in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF):
            raise ConfigError("the site sent its model update in plaintext; with CSAHE the update must stay at the "
                              "site (its executor needs secure_aggregation='csahe'); the update is discarded")
        meta = dict(dxo.data or {})
        bulky = sorted(k for k, v in meta.items() if not isinstance(v, (int, float, str, type(None))))
        if bulky:
            raise ConfigError(f"the metadata holds non-scalar entries {bulky[:5]}; with CSAHE a train reply carries "
                              "only steps, n_samples, the layout digest and counts (the entries are discarded)")
        spec = self._layout[0]
        for key in ("steps", "n_samples"):
            value = meta.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value <= 0:
                raise ConfigError(f"metadata {key!r} must be a number > 0, got {value!r}")
        if meta.get("layout_digest") != spec.digest().hex():
            raise ConfigError(f"its update layout {str(meta.get('layout_digest'))[:12]} differs from the global "
                              f"model's {spec.digest().hex()[:12]} (another model configuration?)")
        return meta

    def _process_train_result(self, client_task: ClientTask, fl_ctx: FLContext) -> None:
        site, result, rnd = client_task.client.name, client_task.result, self._current_round
        try:
            meta = self._check_meta(site, result, rnd)
            accepted = site not in self._meta
            if not accepted:
                self._rejected[site] = "a second train reply this round"
            else:
                self._meta[site] = meta
        except ConfigError as e:
            accepted = False
            self._rejected[site] = str(e)
            self.log_error(fl_ctx, f"round {rnd}: site {site} does not join the CSAHE ring: {e}")
        fl_ctx.set_prop(AppConstants.CURRENT_ROUND, rnd, private=True, sticky=True)
        fl_ctx.set_prop(AppConstants.TRAINING_RESULT, result, private=True, sticky=False)
        self.fire_event(AppEventType.BEFORE_CONTRIBUTION_ACCEPT, fl_ctx)
        fl_ctx.set_prop(AppConstants.AGGREGATION_ACCEPTED, accepted, private=True, sticky=False)
        self.fire_event(AppEventType.AFTER_CONTRIBUTION_ACCEPT, fl_ctx)
        if accepted:
            m = self._meta[site]
            self.log_info(fl_ctx, f"round {rnd}: site {site} trained ({m['steps']} steps, {m['n_samples']} samples); "
                          "its update stays at the site for the ring")
        client_task.result = None

    # ------------------------------------------------------------------ the ring
    def _task(self, kind: str, payload: dict, rnd: int) -> Task:
        shareable = DXO(data_kind=DataKind.APP_DEFINED, data=payload, meta={"csahe_kind": kind}).to_shareable()
        shareable.set_header(AppConstants.CURRENT_ROUND, rnd)
        return Task(name=TASK_NAMES[kind], data=shareable, timeout=self.hop_timeout)

    def _reply(self, task: Task, kind: str) -> Any:
        """The ring reply of a finished task (a dict), a ``SendFailed`` marker, or raises ``TimeoutError``."""
        result = task.client_tasks[0].result if task.client_tasks else None
        if result is None:
            raise TimeoutError(f"no reply to {task.name} within hop_timeout={self.hop_timeout} s "
                               f"(task status {task.completion_status})")
        rc = result.get_return_code()
        if rc and rc != ReturnCode.OK:
            return SendFailed(f"the site returned {rc} for {task.name}")
        dxo = from_shareable(result)
        if kind == "finish":
            if dxo.data_kind != DataKind.WEIGHT_DIFF:
                return SendFailed(f"the finish reply is {dxo.data_kind}, not WEIGHT_DIFF")
            return {"aggregate": dxo.data}
        return dxo.data

    def _send(self, fl_ctx: FLContext, abort_signal: Signal, rnd: int):
        def send(site: str, kind: str, payload: dict) -> Any:
            task = self._task(kind, payload, rnd)
            self.send_and_wait(task=task, fl_ctx=fl_ctx, targets=[site], abort_signal=abort_signal)
            if abort_signal.triggered:
                raise RingAborted("the run was aborted")
            return self._reply(task, kind)

        return send

    def _send_many(self, fl_ctx: FLContext, abort_signal: Signal, rnd: int):
        """The parallel wave: one Task per (site, kind, payload), all scheduled at once (``send``, non-blocking),
        then awaited together; returns one reply (or the exception, e.g. ``TimeoutError``) per call."""

        def send_many(calls: list) -> list:
            tasks = []
            for site, kind, payload in calls:
                task = self._task(kind, payload, rnd)
                self.send(task=task, fl_ctx=fl_ctx, targets=[site])
                tasks.append((task, kind))
            while any(task.completion_status is None for task, _ in tasks):
                if abort_signal.triggered:
                    for task, _ in tasks:
                        if task.completion_status is None:
                            self.cancel_task(task, fl_ctx=fl_ctx)
                    raise RingAborted("the run was aborted")
                time.sleep(self._task_check_period)
            if abort_signal.triggered:
                raise RingAborted("the run was aborted")
            out = []
            for task, kind in tasks:
                try:
                    out.append(self._reply(task, kind))
                except Exception as exc:  # noqa: BLE001  (a timeout or unreadable reply: that site's failure)
                    out.append(exc)
            return out

        return send_many

    def _ring(self, rnd: int, fl_ctx: FLContext, abort_signal: Signal) -> RingOutcome:
        spec, shapes, integer_keys = self._layout
        counts = {s: float(m["steps"] if self.weighting == "steps" else m["n_samples"]) for s, m in self._meta.items()}

        def check(aggregate, initiator):
            check_update(aggregate, shapes, f"ring aggregate (initiator {initiator})", integer_keys=integer_keys)

        def log(line):
            (self.log_info if " ok: " in line else self.log_error)(fl_ctx, f"round {rnd} {line}")

        return secure_aggregate(sorted(self._meta), counts, self._send(fl_ctx, abort_signal, rnd), rng=self._rng,
                                log=log, min_sites=self.min_ring_sites, expected_count=spec.n_ciphertexts,
                                layout_digest=spec.digest(), n_values=spec.size, check_result=check,
                                label="CSAHE", extra={"round": rnd}, prepare=self.prepare,
                                send_many=self._send_many(fl_ctx, abort_signal, rnd))

    def _aggregation_result(self, rnd: int, outcome: RingOutcome, fl_ctx: FLContext) -> Shareable:
        order = outcome.attempts[-1].order if outcome.attempts else []
        line = (f"round {rnd}: CSAHE ring order {order}, {len(outcome.attempts)} attempt(s), "
                f"{outcome.bytes_relayed / 1e6:.1f} MB relayed, {outcome.seconds:.2f} s")
        if self.prepare and outcome.attempts:
            last = outcome.attempts[-1]
            line += (f" (pre-encrypted: {last.prepared}, encrypted in the hop: {last.in_hop}, parallel wave "
                     f"{last.wave_seconds:.2f} s)")
        if outcome.ok:
            total = sum(float(self._meta[s]["steps"]) for s in outcome.sites)
            self.log_info(fl_ctx, f"{line}; aggregated {len(outcome.sites)} site(s) {sorted(outcome.sites)}"
                          + (f" (dropped {sorted(outcome.dropped)})" if outcome.dropped else ""))
            return DXO(data_kind=DataKind.WEIGHT_DIFF, data=outcome.aggregate,
                       meta={MetaKey.NUM_STEPS_CURRENT_ROUND: total, "contributors": sorted(outcome.sites),
                             "secure_aggregation": "csahe"}).to_shareable()
        self.log_error(fl_ctx, f"{line}; no secure aggregation this round: {outcome.reason}"
                       + (f" (not in the ring: {self._rejected})" if self._rejected else "")
                       + "; the global model is kept unchanged")
        return DXO(data_kind=DataKind.WEIGHT_DIFF, data={}, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 0}).to_shareable()

    def _write_record(self, rnd: int, outcome: RingOutcome, fl_ctx: FLContext) -> None:
        if not self._record_path:
            return
        spec = self._layout[0]
        summary = outcome.summary()
        summary.pop("transfers")
        last = outcome.attempts[-1] if outcome.attempts else None
        start_set = sum(t.nbytes for t in outcome.transfers
                        if last and t.attempt == last.index and t.kind == "start" and t.item == "ciphertext")
        record = {
            "round": rnd,
            "time": time.time(),
            "weighting": self.weighting,
            "prepare": self.prepare,
            "participants": sorted(self._meta),
            "counts": {s: float(m["steps"] if self.weighting == "steps" else m["n_samples"])
                       for s, m in self._meta.items()},
            "not_in_ring": dict(self._rejected),
            "applied": outcome.ok,
            **summary,
            "n_ciphertexts": spec.n_ciphertexts,
            "ciphertext_set_bytes": start_set,
            "bytes_per_param_per_hop": start_set / spec.size if spec.size else None,
            "bytes_per_param_total": outcome.bytes_relayed / spec.size if spec.size else None,
            "relay": relay_record(outcome),
        }
        with open(self._record_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ snapshots (as ScatterAndGather)
    def get_persist_state(self, fl_ctx: FLContext) -> dict:
        return {"current_round": self._current_round, "start_round": self._start_round,
                "num_rounds": self._num_rounds, "global_weights": self._global_weights}

    def restore(self, state_data: dict, fl_ctx: FLContext):
        self._current_round = state_data.get("current_round")
        self._start_round = state_data.get("start_round")
        self._num_rounds = state_data.get("num_rounds")
        self._global_weights = state_data.get("global_weights")
