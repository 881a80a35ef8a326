"""First workflow of a pFL-ResFIM job: the style bank exchange (paper 004; DESIGN.md section 5).

1. ``resfim_style`` to every site: each replies with its *style*, the mean low-frequency amplitude spectrum of its
   training images (:func:`fedseg.algorithms.spectral.site_style`: ``(C, 2b+1, 2b+1)`` non-negative numbers; no
   image, no phase), with its image size and beta.
2. The server checks every style (:class:`fedseg.algorithms.spectral.StyleBank`: one beta, one image size, one
   channel layout, exactly a low-frequency window, finite and >= 0) and builds the bank. A site whose style is
   refused is named in the log and left out; with fewer than ``min_sites`` styles the job stops with the reason
   (ResFIM needs at least one other site's style at every site).
3. ``resfim_style_bank`` to every site: the bank (``StyleBank.to_dict()``); each site checks it again and keeps it
   for its Fisher estimates. The bank is also written to ``<run dir>/style_bank.npz`` (styles only).

The bank is the only thing about a site's images that another site sees: a few hundred amplitude values per channel.
"""

from __future__ import annotations

import os

import numpy as np
from nvflare.apis.controller_spec import ClientTask, Task
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal

from fedseg.algorithms.spectral import StyleBank
from fedseg.errors import FedsegError
from fedseg.flare.broadcast import BroadcastWorkflow

STYLE_TASK = "resfim_style"
STYLE_BANK_TASK = "resfim_style_bank"


class StyleExchange(BroadcastWorkflow):
    def __init__(self, min_sites: int = 2, style_task_name: str = STYLE_TASK,
                 style_bank_task_name: str = STYLE_BANK_TASK, timeout: int = 0):
        super().__init__()
        if int(min_sites) < 2:
            raise ValueError(f"StyleExchange: min_sites must be >= 2 (a site needs another site's style), got "
                             f"{min_sites}")
        self.min_sites = int(min_sites)
        self.style_task_name = style_task_name
        self.style_bank_task_name = style_bank_task_name
        self.timeout = int(timeout)
        self._replies: dict[str, dict] = {}
        self.bank: StyleBank | None = None

    def start_controller(self, fl_ctx: FLContext):
        self._replies = {}

    def _on_style(self, client_task: ClientTask, fl_ctx: FLContext):
        site = client_task.client.name
        dxo = self.reply_dxo(client_task, "style exchange (the site is left out of the style bank)", fl_ctx)
        if dxo is None:
            return
        try:
            data = dict(dxo.data)
            self._replies[site] = {"style": np.asarray(data["style"]), "beta": float(data["beta"]),
                                   "image_size": tuple(int(v) for v in np.asarray(data["image_size"]).ravel()),
                                   "n_images": int(data.get("n_images", 0))}
        except Exception as e:  # noqa: BLE001  (a malformed reply: name the site, keep the others)
            self.log_error(fl_ctx, f"style exchange: site {site}'s style is unreadable ({e}); left out")
        client_task.result = None

    def build_bank(self, replies: dict[str, dict], fl_ctx: FLContext | None = None) -> StyleBank:
        """The bank of every acceptable style; the first site (sorted) fixes beta and the image size."""
        bank = None
        for site in sorted(replies):
            r = replies[site]
            try:
                if bank is None:
                    bank = StyleBank(r["beta"], image_size=r["image_size"])
                if abs(r["beta"] - bank.beta) > 1e-12 or tuple(r["image_size"]) != bank.image_size:
                    raise FedsegError(f"beta {r['beta']} / image size {r['image_size']} differ from the bank's "
                                      f"{bank.beta} / {bank.image_size}; every site must use the job's settings")
                bank.add_style(site, r["style"])
            except FedsegError as e:
                if fl_ctx is not None:
                    self.log_error(fl_ctx, f"style exchange: site {site}'s style is refused: {e}")
                if bank is not None and len(bank) == 0:
                    bank = None  # the first site's settings were bad: let the next one fix them
        return bank

    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext):
        engine = fl_ctx.get_engine()
        n_clients = len(engine.get_clients())
        task = Task(name=self.style_task_name, data=Shareable(), timeout=self.timeout,
                    result_received_cb=self._on_style)
        self.broadcast_and_wait(task=task, fl_ctx=fl_ctx, min_responses=n_clients, abort_signal=abort_signal)
        if abort_signal.triggered:
            return
        bank = self.build_bank(self._replies, fl_ctx)
        if bank is None or len(bank) < self.min_sites:
            reason = (f"style exchange: only {0 if bank is None else len(bank)} usable site style(s) "
                      f"({[] if bank is None else bank.sites}), fewer than min_sites={self.min_sites}; ResFIM needs "
                      "other sites' styles at every site. Check the sites' logs for the cause.")
            self.log_error(fl_ctx, reason)
            self.system_panic(reason, fl_ctx)
            return
        self.bank = bank
        payload = bank.to_dict()
        run_dir = engine.get_workspace().get_run_dir(fl_ctx.get_job_id())
        np.savez(os.path.join(run_dir, "style_bank.npz"), **payload)  # StyleBank.from_dict(np.load(...)) reads it
        self.log_info(fl_ctx, f"style exchange: bank of {len(bank)} sites {bank.sites}, beta {bank.beta}, image size "
                      f"{bank.image_size}, {bank.nbytes} bytes of low-frequency amplitudes (no images, no phase)")
        done: list[str] = []

        def on_ack(client_task: ClientTask, fl_ctx: FLContext):  # FLARE passes fl_ctx by keyword
            result = client_task.result
            rc = result.get_return_code() if result is not None else None
            if rc and rc != ReturnCode.OK:
                self.log_error(fl_ctx, f"style exchange: site {client_task.client.name} refused the style bank: {rc}")
            else:
                done.append(client_task.client.name)
            client_task.result = None

        task = Task(name=self.style_bank_task_name,
                    data=DXO(data_kind=DataKind.APP_DEFINED, data=payload).to_shareable(),
                    timeout=self.timeout, result_received_cb=on_ack)
        self.broadcast_and_wait(task=task, fl_ctx=fl_ctx, min_responses=n_clients, abort_signal=abort_signal)
        if abort_signal.triggered:
            return
        self.log_info(fl_ctx, f"style exchange: {len(done)} site(s) hold the bank: {sorted(done)}")
        if len(done) < self.min_sites:
            reason = (f"style exchange: only {len(done)} site(s) accepted the style bank ({sorted(done)}), fewer than "
                      f"min_sites={self.min_sites}; see those sites' logs")
            self.log_error(fl_ctx, reason)
            self.system_panic(reason, fl_ctx)
