"""Base of fedseg's one-shot broadcast workflows (:class:`fedseg.flare.final_evaluation.FinalEvaluation`,
:class:`fedseg.flare.style_exchange.StyleExchange`): late results are logged and dropped, and :meth:`reply_dxo` turns
a site's reply into its DXO or logs, by site name, why there is none (a failed task or an unreadable reply), so one
bad site never stops the others."""

from __future__ import annotations

from nvflare.apis.client import Client
from nvflare.apis.controller_spec import ClientTask
from nvflare.apis.dxo import DXO, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.controller import Controller
from nvflare.apis.shareable import Shareable


class BroadcastWorkflow(Controller):
    def stop_controller(self, fl_ctx: FLContext):
        pass

    def process_result_of_unknown_task(self, client: Client, task_name: str, client_task_id: str,
                                       result: Shareable, fl_ctx: FLContext):
        self.log_warning(fl_ctx, f"late result of task {task_name} from {client.name} ignored")

    def reply_dxo(self, client_task: ClientTask, what: str, fl_ctx: FLContext) -> DXO | None:
        """The DXO of a site's reply, or None after a log line "<what> failed at site S: RC" / "is unreadable"."""
        site = client_task.client.name
        result = client_task.result
        rc = result.get_return_code() if result is not None else None
        if rc and rc != ReturnCode.OK:
            self.log_error(fl_ctx, f"{what} failed at site {site}: {rc}")
            return None
        try:
            return from_shareable(result)
        except Exception as e:  # noqa: BLE001  (any malformed reply: log it, keep the other sites' results)
            self.log_error(fl_ctx, f"{what} result of site {site} is unreadable: {e}")
            return None
