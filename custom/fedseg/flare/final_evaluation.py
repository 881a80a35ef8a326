"""Last workflow of a training job: cross-site evaluation of the final global model and the results folder.

Sends ``validate`` with the final global model to every site (each reports Dice / DiceS / DiceL on its own
held-out part: the validation split, or its own test part when the dataset has one, named by ``"part"`` in the
metrics), evaluates the test centre where the server may see it (:class:`TestCentreEvaluator`), then writes
``<run dir>/results/``: ``global_model.pt``, ``metrics.json``, ``results.md``, ``training_curves.png``,
``dice_bars.png``, ``test_overlays.png`` (and TensorBoard files under ``<run dir>/tb_events``). The path is logged
and printed.

A site that runs the final local adaptation (Per-FedAvg, ``adaptation_steps`` > 0) adds ``"personalized"`` (the same
metric keys for the adapted model) to its metrics; they are passed through unchanged and the results gain the
personalized columns, a mean row and ``personalized_bars.png`` (:mod:`fedseg.results`). Runs in which no site sends
them are unchanged. When the final metrics are on a site's *test* part, the final model is not offered to the
best-model keeper (its choice stays a choice by validation Dice, never by test Dice).

HE jobs (``encrypted_model=True``, FLARE's TenSEAL HE through :mod:`fedseg.flare.he`): the global model is
ciphertext and the server holds no secret key, so it can neither evaluate a test centre nor pick a best model
(configure ``test_evaluator_id=""`` and ``best_model_id=""``). The ``validate`` task data is made by the job's HE
shareable generator (``shareable_generator_id``: ``learnable_to_shareable`` on a copy of the global model, which
keeps ``PROCESSED_KEYS``) so every site decrypts it with its task-data decryptor and evaluates it on its own data;
the results folder gets ``global_model_encrypted.pt`` (:func:`fedseg.flare.he.save_encrypted_model`: serialized
ciphertexts, tensor shapes, which entries are encrypted) instead of ``global_model.pt``, and results.md a note with
the command that decrypts it at a site.

With ``privacy_recorder_id`` naming a :class:`fedseg.flare.privacy_recorder.PrivacyRecorder` (DP jobs) its
``summary()`` goes to :func:`fedseg.results.write_results` (``privacy=``); without it the output is unchanged.
"""

from __future__ import annotations

import os

import numpy as np
from nvflare.apis.controller_spec import ClientTask, Task
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants

from fedseg.flare.broadcast import BroadcastWorkflow
from fedseg.results import PERSONALIZED, site_means, site_parts, write_results


class FinalEvaluation(BroadcastWorkflow):
    def __init__(self, persistor_id: str = "persistor", validate_task_name: str = AppConstants.TASK_VALIDATION,
                 test_evaluator_id: str = "test_evaluator", recorder_id: str = "metrics_recorder",
                 best_model_id: str = "best_model", results_folder: str = "results", timeout: int = 0,
                 job_config: dict | None = None, encrypted_model: bool = False,
                 shareable_generator_id: str = "", privacy_recorder_id: str = ""):
        super().__init__()
        if encrypted_model and not shareable_generator_id:
            raise ValueError("FinalEvaluation: encrypted_model=True needs shareable_generator_id (the job's "
                             "fedseg.flare.he.HEModelShareableGenerator component), which makes the task data the "
                             "sites can decrypt")
        self.encrypted_model = bool(encrypted_model)
        self.shareable_generator_id = shareable_generator_id
        self.privacy_recorder_id = privacy_recorder_id
        self.persistor_id = persistor_id
        self.validate_task_name = validate_task_name
        self.test_evaluator_id = test_evaluator_id
        self.recorder_id = recorder_id
        self.best_model_id = best_model_id
        self.results_folder = results_folder
        self.timeout = timeout
        self.job_config = dict(job_config or {})
        self._site_metrics: dict[str, dict] = {}
        self._notes: list = []

    def start_controller(self, fl_ctx: FLContext):
        self._site_metrics = {}
        self._notes = []

    def _on_result(self, client_task: ClientTask, fl_ctx: FLContext):
        site = client_task.client.name
        dxo = self.reply_dxo(client_task, "final validation", fl_ctx)
        if dxo is None:
            return
        metrics = dict(dxo.data)
        pers = metrics.get(PERSONALIZED)
        if pers is not None and not isinstance(pers, dict):
            self.log_error(fl_ctx, f"site {site} sent personalized metrics that are not a dict "
                           f"({type(pers).__name__}); they are left out of the results")
            self._notes.append(f"Site {site} sent unreadable personalized metrics ({type(pers).__name__}); "
                               "left out.")
            metrics.pop(PERSONALIZED)
        self._site_metrics[site] = metrics
        client_task.result = None

    def _global_model(self, fl_ctx: FLContext):
        model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        if model is None:
            persistor = self._engine.get_component(self.persistor_id)
            model = persistor.load(fl_ctx)
        return model

    def _global_weights(self, fl_ctx: FLContext):
        return self._global_model(fl_ctx)[ModelLearnableKey.WEIGHTS]

    def _encrypted_task_data(self, engine, model, fl_ctx: FLContext):
        """The HE generator's task data for a copy of the global model (FLARE's generator serializes the
        ciphertexts of the learnable it is given in place; the copy keeps the global model usable)."""
        generator = engine.get_component(self.shareable_generator_id)
        if generator is None:
            raise ValueError(f"FinalEvaluation: no component {self.shareable_generator_id!r} "
                             "(shareable_generator_id) in the server config")
        copy = ModelLearnable()
        copy[ModelLearnableKey.WEIGHTS] = dict(model[ModelLearnableKey.WEIGHTS])
        copy[ModelLearnableKey.META] = dict(model.get(ModelLearnableKey.META) or {})
        return generator.learnable_to_shareable(copy, fl_ctx)

    def _save_encrypted(self, engine, task_data: Shareable, out_dir: str) -> str:
        from fedseg.flare.he import save_encrypted_model

        dxo = from_shareable(task_data)
        persistor = engine.get_component(self.persistor_id) if self.persistor_id else None
        shapes = getattr(persistor, "tensor_shapes", None)
        path = os.path.join(out_dir, "global_model_encrypted.pt")
        save_encrypted_model(path, dxo.data, dxo.meta, shapes)
        return path

    def _privacy(self, engine, notes: list):
        if not self.privacy_recorder_id:
            return None
        recorder = engine.get_component(self.privacy_recorder_id)
        if recorder is None:
            notes.append(f"No privacy section: the server config has no component {self.privacy_recorder_id!r}.")
            return None
        return recorder.summary()

    def _best_model(self, engine, weights, evaluator, fl_ctx: FLContext, out_dir: str):
        """The best global model by validation Dice (final model included), copied to the results, with its test
        Dice."""
        keeper = engine.get_component(self.best_model_id) if self.best_model_id else None
        if keeper is None:
            return None
        last_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)  # ScatterAndGather's last round (sticky)
        if last_round is not None:
            final_round = int(last_round) + 1
        else:
            final_round = max(keeper.by_round) + 1 if keeper.by_round else 0
        test_parts = sorted(site for site, part in site_parts(self._site_metrics).items() if part != "val")
        if test_parts:  # the final metrics are test metrics: choosing by them would select on test data
            self._notes.append(f"The final model (round {final_round}) is not a best-model candidate: its final "
                               f"metrics are on the test part of {test_parts}, not on validation data.")
        else:
            keeper.offer(final_round, self._site_metrics, weights, fl_ctx)  # the final model, validated just now
        if keeper.best_round is None or not keeper.path or not os.path.exists(keeper.path):
            return None
        import shutil

        import torch

        target = os.path.join(out_dir, "best_global_model.pt")
        shutil.copyfile(keeper.path, target)
        best = {"round": keeper.best_round, "val_dice": keeper.best_val_dice,
                "val_dice_by_round": dict(keeper.by_round), "file": "best_global_model.pt"}
        if evaluator is not None:
            state = torch.load(target, map_location="cpu", weights_only=True)
            best["test_centre"] = evaluator.evaluate({k: v.numpy() for k, v in state.items()}, fl_ctx)
        return best

    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext):
        engine = fl_ctx.get_engine()
        model = self._global_model(fl_ctx)
        weights = model[ModelLearnableKey.WEIGHTS]
        if self.encrypted_model:
            task_data = self._encrypted_task_data(engine, model, fl_ctx)
        else:
            task_data = DXO(data_kind=DataKind.WEIGHTS, data=weights).to_shareable()
        task = Task(
            name=self.validate_task_name,
            data=task_data,
            timeout=self.timeout,
            result_received_cb=self._on_result,
        )
        n_clients = len(engine.get_clients())
        self.broadcast_and_wait(task=task, fl_ctx=fl_ctx, min_responses=n_clients, abort_signal=abort_signal)
        if abort_signal.triggered:
            return

        run_dir = engine.get_workspace().get_run_dir(fl_ctx.get_job_id())
        out_dir = os.path.join(run_dir, self.results_folder)
        os.makedirs(out_dir, exist_ok=True)
        notes = self._notes
        evaluator = engine.get_component(self.test_evaluator_id) if self.test_evaluator_id else None
        test_metrics = initial = None
        curve = {}
        if evaluator is not None:
            test_metrics = evaluator.evaluate(weights, fl_ctx, overlays_png=os.path.join(out_dir, "test_overlays.png"))
            initial = evaluator.initial
            curve = dict(evaluator.by_round)
            if test_metrics is None and evaluator.unavailable_reason:
                notes.append(f"No test-centre row: {evaluator.unavailable_reason}")
        best = self._best_model(engine, weights, evaluator, fl_ctx, out_dir)
        recorder = engine.get_component(self.recorder_id) if self.recorder_id else None
        history = recorder.history() if recorder is not None else []
        missing = sorted({c.name for c in engine.get_clients()} - set(self._site_metrics))
        if missing:
            notes.append(f"Sites without a final validation result: {missing}")

        method = self.job_config.get("personalization", "none")
        if method not in (None, "none"):
            notes.append(
                f"Personalized FL ({method}): each site's own model stays at the site, in its run folder under "
                "`personalized/` (`model.pt`, `mask.npz` with True = kept local, `personalization.json`); the "
                "\"personalized\" columns score those models. global_model.pt holds the shared parameters; where a "
                "site keeps a parameter local, the global value is not what that site uses.")
        if self.encrypted_model:
            path = self._save_encrypted(engine, task_data, out_dir)
            notes.append(
                "The global model is stored encrypted (FLARE HE: the server holds no secret key, so it neither "
                f"evaluates a test centre nor keeps a best model): {os.path.basename(path)}. A site decrypts it "
                "with its own context: `fedseg he-decrypt --model global_model_encrypted.pt --context <site "
                "workspace>/startup/client_context.tenseal --out global_model.pt`; `fedseg evaluate` and "
                "`fedseg predict` then take global_model.pt.")
        else:
            import torch

            torch.save({k: torch.as_tensor(np.asarray(v)) for k, v in weights.items()},
                       os.path.join(out_dir, "global_model.pt"))
        config = dict(self.job_config)
        config["job_name"] = config.get("job_name") or fl_ctx.get_job_id()
        privacy = self._privacy(engine, notes)
        extra = {"privacy": privacy} if privacy is not None else {}
        write_results(out_dir, job_name=str(config["job_name"]), site_metrics=self._site_metrics,
                      test_metrics=test_metrics, initial_test_metrics=initial, test_curve=curve,
                      history=history, config=config, notes=notes, best=best, **extra)
        summary = ""
        if test_metrics:
            summary = f" test centre Dice {test_metrics['dice']:.4f}"
            if initial:
                summary += f" (untrained {initial['dice']:.4f})"
        if any(isinstance(m.get(PERSONALIZED), dict) for m in self._site_metrics.values()):
            means = site_means(self._site_metrics)
            g, p = means["global"]["dice"], means[PERSONALIZED]["dice"]
            if g is not None and p is not None:
                summary += ("; " if summary else " ") + f"site mean Dice {g:.4f} global, {p:.4f} personalized"
        self.log_info(fl_ctx, f"fedseg results:{summary} -> {out_dir}")
        print(f"\nfedseg results:{summary}\n  {out_dir}\n", flush=True)
