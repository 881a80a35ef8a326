"""Server widget that keeps every streamed scalar metric (site, tag, round, value) for the results folder.

It receives the same federated analytics events as FLARE's TensorBoard receiver (``fed.analytix_log_stats``), so
TensorBoard files and the results folder show the same numbers.
"""

from __future__ import annotations

import json
import os
import threading
from typing import List, Optional

from nvflare.apis.analytix import AnalyticsData, AnalyticsDataType
from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.widgets.streaming import AnalyticsReceiver


class MetricsRecorder(AnalyticsReceiver):
    def __init__(self, events: Optional[List[str]] = None, file_name: str = "metrics_history.jsonl"):
        super().__init__(events=events or ["fed.analytix_log_stats"])
        self.file_name = file_name
        self.records: List[dict] = []
        self._lock = threading.Lock()
        self._path = None

    def initialize(self, fl_ctx: FLContext):
        run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
        self._path = os.path.join(run_dir, self.file_name)

    def save(self, fl_ctx: FLContext, shareable: Shareable, record_origin: str):
        data = AnalyticsData.from_dxo(from_shareable(shareable))
        if not data or data.data_type != AnalyticsDataType.SCALAR:
            return
        rec = {"site": record_origin, "tag": data.tag, "step": data.step, "value": float(data.value)}
        with self._lock:
            self.records.append(rec)
            if self._path:  # append as we go: a crashed run still leaves its curves
                with open(self._path, "a") as f:
                    f.write(json.dumps(rec) + "\n")

    def finalize(self, fl_ctx: FLContext):
        pass

    def restore_records(self, records: List[dict]) -> None:
        """Continue a resumed job's history (:mod:`fedseg.flare.resume`): the earlier rounds' records come first,
        in memory and in this run's ``metrics_history.jsonl``."""
        with self._lock:
            self.records = [dict(r) for r in records] + self.records
            if self._path:
                with open(self._path, "w") as f:
                    for rec in self.records:
                        f.write(json.dumps(rec) + "\n")

    def history(self) -> List[dict]:
        with self._lock:
            return list(self.records)
