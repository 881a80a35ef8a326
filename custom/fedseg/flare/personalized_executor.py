"""FLARE client executor of partial model sharing: pFL-ResFIM (paper 004) and the FedPer baseline.

A :class:`fedseg.flare.executor.SegmentationTrainer` whose rounds follow
:class:`fedseg.algorithms.personalization.PersonalizedSite` (the protocol and every choice are in that module's
docstring and in ``docs/algorithms/resfim.md``):

- ``resfim_style`` (ResFIM): reply with this site's style, the mean low-frequency amplitude of up to
  ``style_samples`` training images (seeded choice); no image and no phase leave the site.
- ``resfim_style_bank`` (ResFIM): keep the bank the server sends (checked again here; it must hold this site).
- ``train``: the site model = global invariant part + own sensitive part; the mask is (re)computed when the schedule
  says so (ResFIM: Fisher on real vs style-transferred training samples; FedPer: the head); the site model is
  evaluated on the validation split (streamed as ``val_*``: the model this site would use), trained, and the update
  leaves with its sensitive coordinates set to 0 and the packed mask in the meta; the trained model stays here.
- ``validate``: Dice of the final global model and, under ``"personalized"``, of this site's personalized model
  (final global invariant part + own sensitive part) on its held-out part.

Checkpoints at the site (``<site run dir>/personalized/``, rewritten after every round and at the final
evaluation): ``model.pt`` (the site's model: after round r its trained model, after the final evaluation its
personalized model; a state dict like the server's ``global_model.pt``, so ``fedseg evaluate`` / ``fedseg predict``
take it), ``mask.npz`` (bool per parameter, True = kept local) and ``personalization.json`` (method, settings, when
the mask was computed, its share, what ``model.pt`` holds).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal

from fedseg.algorithms.personalization import (
    FISHER_SALT,
    STYLE_SALT,
    PersonalizationConfig,
    PersonalizedSite,
    head_mask,
    resfim_mask,
    sample_rows,
    styled_batches,
)
from fedseg.algorithms.spectral import StyleBank, site_style
from fedseg.errors import ConfigError, FedsegError
from fedseg.flare.executor import SegmentationTrainer
from fedseg.flare.personalized_aggregator import MASK_META
from fedseg.flare.style_exchange import STYLE_BANK_TASK, STYLE_TASK
from fedseg.training import load_state

CHECKPOINT_DIR = "personalized"


class PersonalizedTrainer(SegmentationTrainer):
    start_model_label = "site model (global invariant part + own sensitive part)"

    def __init__(self, personalization: str = "resfim", personalization_args: dict | None = None,
                 style_task_name: str = STYLE_TASK, style_bank_task_name: str = STYLE_BANK_TASK, **kwargs):
        super().__init__(**kwargs)
        if self.secure_aggregation != "none":
            raise ConfigError("PersonalizedTrainer: partial sharing needs the server to see which coordinates a "
                              "site shares; it does not combine with CSAHE secure aggregation")
        try:
            self.pcfg = PersonalizationConfig(method=personalization, **dict(personalization_args or {}))
        except TypeError as e:
            known = sorted(PersonalizationConfig.__dataclass_fields__)
            raise ConfigError(f"PersonalizedTrainer: unknown personalization_args ({e}); known: {known}") from None
        self.state = PersonalizedSite(self.pcfg)
        self.style_task_name = style_task_name
        self.style_bank_task_name = style_bank_task_name
        self.bank: StyleBank | None = None
        self.run_dir = None

    def _setup(self, fl_ctx: FLContext):
        super()._setup(fl_ctx)
        self.train_data = self.trainer.train_data
        self.run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
        self.log_info(fl_ctx, f"site {self.site}: personalization {self.pcfg.method} "
                      f"({json.dumps(self.pcfg.as_dict(), sort_keys=True)})")

    # ------------------------------------------------------------------ tasks
    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if task_name in (self.style_task_name, self.style_bank_task_name):
            if self.trainer is None:
                self.log_error(fl_ctx, f"task {task_name} refused: {self.setup_error or 'the trainer was not set up'}")
                return make_reply(ReturnCode.EXECUTION_EXCEPTION)
            try:
                if task_name == self.style_task_name:
                    return self._style(fl_ctx)
                return self._receive_bank(shareable, fl_ctx)
            except FedsegError as e:
                self.log_error(fl_ctx, f"task {task_name} refused at site {self.site}: {e}")
                return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        return super().execute(task_name, shareable, fl_ctx, abort_signal)

    def _sample(self, k: int, salt: int) -> np.ndarray:
        return sample_rows(len(self.train_data.delta), k, self.pcfg.seed, salt)

    def _images(self, idx: np.ndarray):
        """(x, y) float tensors [B, C, H, W] / [B, 1, H, W] of training rows ``idx``, not augmented, on the CPU."""
        x, y, _ = self.trainer._batch(self.train_data, idx)
        return x, y

    def _style(self, fl_ctx: FLContext) -> Shareable:
        idx = self._sample(self.pcfg.style_samples, STYLE_SALT)
        x, _ = self._images(idx)
        images = x.detach().cpu().numpy()
        style = site_style(list(images), self.pcfg.beta)
        self.log_info(fl_ctx, f"site {self.site}: style of {len(images)} training images, {style.size} "
                      f"low-frequency amplitudes (beta {self.pcfg.beta}); no image or phase is sent")
        return DXO(data_kind=DataKind.APP_DEFINED, data={
            "style": style, "beta": float(self.pcfg.beta), "image_size": np.array(images.shape[-2:], dtype=np.int64),
            "n_images": int(len(images))}).to_shareable()

    def _receive_bank(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        bank = StyleBank.from_dict(dict(from_shareable(shareable).data))
        if self.site not in bank:
            raise ConfigError(f"the style bank lacks this site's own style (it holds {bank.sites}); the server "
                              "refused it: see the server log")
        if not bank.others(self.site):
            raise ConfigError(f"the style bank holds no other site's style ({bank.sites})")
        self.bank = bank
        self.log_info(fl_ctx, f"site {self.site}: style bank of {len(bank)} sites received ({bank.nbytes} bytes)")
        return make_reply(ReturnCode.OK)

    # ------------------------------------------------------------------ rounds
    def _compute_mask(self, start: dict, current_round: int, fl_ctx: FLContext):
        model = self.trainer.model
        load_state(model, start)
        if self.pcfg.method == "fedper":
            shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
            mask = head_mask(shapes, self.pcfg.head)
            return mask, None
        if self.bank is None:
            raise ConfigError("ResFIM has no style bank at this site: the job must run the StyleExchange workflow "
                              "before training (export the job from its recipe)")
        t0 = time.perf_counter()
        idx = self._sample(self.pcfg.fisher_samples, FISHER_SALT + current_round)
        bs = self.pcfg.fisher_batch_size
        device = self.trainer.device
        real = []
        for start_i in range(0, len(idx), bs):
            x, y = self._images(idx[start_i:start_i + bs])
            real.append((x.to(device), y.to(device)))
        styled = styled_batches(real, self.bank, self.site, lam=self.pcfg.lam)
        module, loss_fn = self.trainer.loss_view(model)
        raw, info = resfim_mask(module, loss_fn, real, styled, self.pcfg)
        mask = {name[len("net."):]: m for name, m in raw.items()}
        info = {**info, "fisher_seconds": time.perf_counter() - t0, "fisher_samples": int(len(idx)),
                "styles": self.bank.others(self.site)}
        return mask, info

    def _round_start(self, global_state, current_round: int, fl_ctx: FLContext):
        start = self.state.start_state(global_state)
        if self.state.due(current_round):
            mask, info = self._compute_mask(start, current_round, fl_ctx)
            self.state.set_mask(mask, current_round, info)
            start = self.state.start_state(global_state)
            mi = self.state.mask_info
            extra = ""
            if info is not None:
                extra = (f"; residual median {mi['residual_median']:.3g}, max {mi['residual_max']:.3g}; Fisher on "
                         f"{mi['fisher_samples']} samples x (1 real + {len(mi['styles'])} styles) in "
                         f"{mi['fisher_seconds']:.1f} s")
            self.log_info(fl_ctx, f"round {current_round}: {self.pcfg.method} mask at {self.site}: "
                          f"{mi['local_coords']} of {mi['total_coords']} parameters "
                          f"({100 * mi['local_fraction']:.2f}%) kept local in {mi['tensors_with_local']} tensors"
                          f"{extra}")
            self._stream({"personalization_local_fraction": mi["local_fraction"]}, current_round, "")
        return start

    def _finish_round(self, result, out: DXO, current_round: int, fl_ctx: FLContext) -> None:
        data, packed = self.state.outgoing(out.data)
        out.data = data
        out.set_meta_prop(MASK_META, packed)
        self.state.finish_round(self.trainer.model.state_dict())
        self._save(self.state.local, f"the site's trained model after round {current_round}")

    def _personalized_model(self, global_state, fl_ctx: FLContext):
        model = self.state.start_state(global_state)
        self._save(model, "the personalized model at the final evaluation (final global invariant part + own "
                   "sensitive part)")
        return model

    def _save(self, state: dict, what: str) -> None:
        import torch

        if self.run_dir is None:
            return
        folder = os.path.join(self.run_dir, CHECKPOINT_DIR)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, "model.pt.tmp")
        torch.save({k: torch.as_tensor(np.asarray(v)) for k, v in state.items()}, tmp)
        os.replace(tmp, os.path.join(folder, "model.pt"))
        if self.state.mask is not None:
            np.savez_compressed(os.path.join(folder, "mask.npz"), **self.state.mask)
        info = {**self.state.checkpoint(), "site": self.site, "model": what}
        with open(os.path.join(folder, "personalization.json"), "w") as f:
            json.dump(info, f, indent=2, default=str)
