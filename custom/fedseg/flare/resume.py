"""Resuming a job after the FLARE server restarts: a round checkpoint outside the job's run folder.

NVFlare 2.9 no longer persists component snapshots (``ServerEngine.persist_components`` is a no-op, checked in
2.9.0): a server that restarts mid-job loses the job's process and the job stays ``RUNNING`` with nothing behind
it. fedseg therefore keeps its own checkpoint. :class:`ResumableScatterAndGather` is FLARE's ScatterAndGather (same
arguments) that, after every finished round, writes

- the global model (plaintext weights), the number of the finished round, and
- the state that the job's results are made from: the metrics recorder's history (curves, per-round Dice) and the
  best-model keeper's record (best round, its validation Dice, per-round Dice, the best model itself)

to ``<resume_dir>/<job name>-<config hash>/`` (written to a temporary name, then renamed: a crash mid-write leaves
the previous round's checkpoint). When a job with the **same name and the same configuration** (the hash of its
``config_fed_server.json`` and ``config_fed_client.json``) starts and such a checkpoint exists, it continues with the
round after the checkpointed one, from that model and that history, so the completed job has every round exactly
once. A job whose configuration differs starts from round 0. The checkpoint is removed when training finishes.

``resume_dir``: the argument, else ``"resume_dir"`` in the server's ``local/fedseg_server.json``, else
``<server workspace>/fedseg_resume``. After a server restart the platform operator resubmits the same job folder
(``fedseg submit JOB --kit ADMIN --abort-running`` also aborts the orphaned ``RUNNING`` copy of it). Not covered: HE
jobs (the global model is ciphertext: they run without a checkpoint and say so), and a crash during the final
evaluation after the last round (the resubmitted job finds no checkpoint and trains again).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnableKey, make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather

SERVER_LOCAL_CONFIG = "fedseg_server.json"
STATE = "state.json"
WEIGHTS = "global_model.pt"
BEST = "best_global_model.pt"


class RoundCheckpointStore:
    """One job's round checkpoint in a folder: ``state.json`` + ``global_model.pt`` (+ the best model)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def save(self, finished_round: int, weights: dict[str, np.ndarray], state: dict[str, Any],
             best_model: str | None = None) -> None:
        import torch

        tmp = self.folder.with_name(self.folder.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        torch.save({k: torch.as_tensor(np.asarray(v)) for k, v in weights.items()}, tmp / WEIGHTS)
        if best_model and os.path.isfile(best_model):
            shutil.copyfile(best_model, tmp / BEST)
        (tmp / STATE).write_text(json.dumps({"finished_round": int(finished_round), "saved": time.time(), **state}))
        old = self.folder.with_name(self.folder.name + ".old")
        if self.folder.exists():
            if old.exists():
                shutil.rmtree(old)
            self.folder.rename(old)
        tmp.rename(self.folder)
        if old.exists():
            shutil.rmtree(old)

    def load(self) -> tuple[int, dict[str, np.ndarray], dict[str, Any]] | None:
        """(finished round, weights, state) or None. A half-written folder is ignored; ``.old`` is the fallback
        while a save was replacing the folder."""
        import torch

        for folder in (self.folder, self.folder.with_name(self.folder.name + ".old")):
            if (folder / STATE).is_file() and (folder / WEIGHTS).is_file():
                state = json.loads((folder / STATE).read_text())
                tensors = torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True)
                state["_best_model_file"] = str(folder / BEST) if (folder / BEST).is_file() else None
                return int(state["finished_round"]), {k: v.numpy() for k, v in tensors.items()}, state
        return None

    def clear(self) -> None:
        for suffix in ("", ".tmp", ".old"):
            p = self.folder.with_name(self.folder.name + suffix)
            if p.exists():
                shutil.rmtree(p)


def config_key(app_config_dir: str | Path, job_name: str) -> str:
    """``<job name>-<12 hex>``: the sha256 of the app's server and client configuration files."""
    h = hashlib.sha256()
    for name in ("config_fed_server.json", "config_fed_client.json"):
        p = Path(app_config_dir) / name
        h.update(name.encode())
        h.update(p.read_bytes() if p.is_file() else b"")
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in job_name) or "job"
    return f"{safe}-{h.hexdigest()[:12]}"


class ResumableScatterAndGather(ScatterAndGather):
    """ScatterAndGather that checkpoints every finished round and resumes a restarted job (module docstring)."""

    def __init__(self, *args, resume_dir: str | None = None, job_name: str = "",
                 recorder_id: str = "metrics_recorder", best_model_id: str = "best_model", **kwargs):
        super().__init__(*args, **kwargs)
        self.resume_dir = resume_dir
        self.job_name = job_name
        self.recorder_id = recorder_id
        self.best_model_id = best_model_id
        self._store: RoundCheckpointStore | None = None

    def _resolve_dir(self, fl_ctx: FLContext) -> Path:
        if self.resume_dir:
            return Path(self.resume_dir)
        ws = fl_ctx.get_engine().get_workspace()
        local = Path(ws.get_site_config_dir()) / SERVER_LOCAL_CONFIG
        if local.is_file():
            try:
                value = json.loads(local.read_text()).get("resume_dir")
            except json.JSONDecodeError as e:
                raise ValueError(f"{local} is not valid JSON ({e}); fix or remove it") from None
            if value:
                return Path(value)
        return Path(ws.get_root_dir()) / "fedseg_resume"

    def start_controller(self, fl_ctx: FLContext) -> None:
        super().start_controller(fl_ctx)
        if self._global_weights is None:
            return  # start failed (system_panic already called)
        weights = self._global_weights[ModelLearnableKey.WEIGHTS]
        if not all(isinstance(v, np.ndarray) for v in weights.values()):
            self.log_info(fl_ctx, "global model is not plaintext (HE): no round checkpoint, no resume")
            return
        app_root = fl_ctx.get_prop(FLContextKey.APP_ROOT)
        key = config_key(Path(app_root) / "config", self.job_name or "job")
        self._store = RoundCheckpointStore(self._resolve_dir(fl_ctx) / key)
        found = self._store.load()
        if found is None:
            self.log_info(fl_ctx, f"round checkpoints go to {self._store.folder}")
            return
        finished, ck_weights, state = found
        if set(ck_weights) != set(weights):
            self.log_warning(fl_ctx, f"checkpoint {self._store.folder} does not match this model's tensors: ignored")
            return
        self._global_weights = make_model_learnable(ck_weights, self._global_weights.get(ModelLearnableKey.META))
        fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, self._global_weights, private=True, sticky=True)
        self._current_round = finished + 1
        recorder = self._engine.get_component(self.recorder_id)
        if recorder is not None and hasattr(recorder, "restore_records"):
            recorder.restore_records(state.get("records", []))
        keeper = self._engine.get_component(self.best_model_id)
        if keeper is not None and hasattr(keeper, "restore_state"):
            keeper.restore_state(state.get("best", {}), state.get("_best_model_file"))
        self.log_info(fl_ctx, f"resuming from checkpoint {self._store.folder}: round {finished} was finished, "
                              f"continuing with round {self._current_round} of {self._start_round + self._num_rounds}")

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        super().handle_event(event_type, fl_ctx)
        if event_type == AppEventType.ROUND_DONE and self._store is not None:
            rnd = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
            weights = self._global_weights[ModelLearnableKey.WEIGHTS]
            if not all(isinstance(v, np.ndarray) for v in weights.values()):
                self.log_warning(fl_ctx, "the global model is no longer plaintext (HE?): round checkpoints stop")
                self._store = None
                return
            recorder = self._engine.get_component(self.recorder_id)
            keeper = self._engine.get_component(self.best_model_id)
            state = {"job": self.job_name,
                     "records": recorder.history() if recorder is not None and hasattr(recorder, "history") else [],
                     "best": keeper.resume_state() if keeper is not None and hasattr(keeper, "resume_state") else {}}
            best_file = getattr(keeper, "path", None) if keeper is not None else None
            self._store.save(int(rnd), weights, state, best_file)

    def control_flow(self, abort_signal, fl_ctx: FLContext) -> None:
        super().control_flow(abort_signal, fl_ctx)
        if self._store is not None and self._current_round is not None \
                and self._current_round >= self._start_round + self._num_rounds:
            self._store.clear()  # training finished: a new submission of this job starts from round 0
