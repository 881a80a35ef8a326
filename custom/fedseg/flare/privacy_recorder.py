"""Server widget that keeps every site's differential-privacy report, round by round, for the results folder.

Each site's :class:`fedseg.flare.dp_filter.AdaptiveDPFilter` puts its report in the result DXO's meta under ``"dp"``
(plaintext even when the update itself is encrypted). On ``AFTER_CONTRIBUTION_ACCEPT`` this component reads it and
appends one line to ``<run dir>/privacy.jsonl``: ``{"round": server round, "site", "accepted", "dp": report}``. An
update is counted whether the aggregator accepted it or not: the server received it, so the site spent the privacy.
A result without the ``"dp"`` meta (a site that runs without the DP filter) is recorded with ``"dp": null`` and a
warning: that site's updates are not protected, and the summary says so.

:meth:`PrivacyRecorder.summary` is what :class:`fedseg.flare.final_evaluation.FinalEvaluation` hands to
:func:`fedseg.results.write_results` (``privacy.json``, the "Privacy" section of results.md, ``privacy.png``).
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

from nvflare.apis.dxo import from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType

META_KEY = "dp"  # fedseg.flare.dp_filter.META_KEY (not imported: the server needs no DP mechanism)

ADJACENCY_TEXT = {
    "replace": "replace-one adjacency: the site's update may be replaced by any other update (after clipping both "
               "are within the threshold C, so they differ by at most 2C)",
    "add_remove": "add/remove adjacency: the site's update may be present or absent (compared with a zero update; "
                  "sensitivity C)",
}


def _fmt(v: Any, spec: str = ".6g") -> str:
    return "n/a" if v is None else format(v, spec)


def guarantee_text(per_site: dict[str, dict]) -> str:
    """Plain-language statement of what the recorded reports guarantee (and what they do not)."""
    protected = {s: r for s, r in per_site.items() if r.get("protected")}
    unprotected = sorted(s for s, r in per_site.items() if not r.get("protected"))
    if not protected:
        return ("No site sent a differential-privacy report: no update of this run is protected by differential "
                "privacy.")
    lines = []
    adjacencies = sorted({str(r.get("adjacency")) for r in protected.values()})
    what = "; ".join(ADJACENCY_TEXT.get(a, f"{a} adjacency") for a in adjacencies)
    lines.append(
        "What is protected: one site's model update in one round, the unit being the whole update tensor set (" + what
        + "). Everything a site's update depends on (any of its patients, images or labels) is covered, because "
        "changing any of it changes at most that one update. The rounds of one site compose: the totals below "
        "bound what the server (or anyone who sees the released updates) can learn about a site over the whole run.")
    for site, r in sorted(protected.items()):
        mech = r.get("mechanism")
        delta_part = (f", delta {_fmt(r.get('delta_round'), '.3g')} per round and {_fmt(r.get('delta_total'), '.3g')} "
                      "in total") if mech == "gaussian" or (r.get("delta_total") or 0) > 0 else ""
        lines.append(
            f"Site {site}: {r.get('rounds')} released update(s), {mech} mechanism with {r.get('clipping')} "
            f"{'per-layer ' if r.get('per_layer') else ''}clipping; epsilon {_fmt(r.get('epsilon_round'))} per round "
            f"(noise {_fmt(r.get('epsilon'))} + noisy quantile {_fmt(r.get('quantile_epsilon'))}) and "
            f"{_fmt(r.get('epsilon_total'))} in total{delta_part} ({r.get('accountant')} accountant)"
            + (f"; over its budget of {_fmt(r.get('budget_epsilon'), 'g')}" if r.get("over_budget") else "")
            + ".")
    lines.append(
        "Not covered: what a site sends in the clear next to its update (the number of local steps, its validation "
        "and training metrics) and the metrics it streams; the final evaluation results. The guarantee assumes the "
        "noise is drawn from fresh randomness (seed null) and counts only the rounds listed here.")
    if unprotected:
        lines.append(f"Sites whose updates arrived WITHOUT a differential-privacy report (not protected): "
                     f"{unprotected}.")
    return "\n\n".join(lines)


class PrivacyRecorder(FLComponent):
    def __init__(self, file_name: str = "privacy.jsonl"):
        super().__init__()
        self.file_name = file_name
        self.records: list[dict] = []
        self._path: str | None = None
        self._lock = threading.Lock()

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
            self._path = os.path.join(run_dir, self.file_name)
            with self._lock:
                self.records = []
        elif event_type == AppEventType.AFTER_CONTRIBUTION_ACCEPT:
            result = fl_ctx.get_prop(AppConstants.TRAINING_RESULT)
            if result is None:
                return
            site = result.get_peer_prop(ReservedKey.IDENTITY_NAME, "?")
            rnd = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
            try:
                report = from_shareable(result).get_meta_prop(META_KEY)
            except Exception:  # noqa: BLE001  (an unreadable result carries no report)
                report = None
            if report is None:
                self.log_warning(fl_ctx, f"round {rnd}: the update of site {site} has no differential-privacy "
                                 "report: that site does not run the DP filter, so its update is not protected")
            self.record(site, rnd, report, bool(fl_ctx.get_prop(AppConstants.AGGREGATION_ACCEPTED, False)))

    def record(self, site: str, rnd: int | None, report: dict | None, accepted: bool) -> dict:
        """Keep one site's report of one round (and append it to privacy.jsonl)."""
        rec = {"round": None if rnd is None else int(rnd), "site": str(site), "accepted": bool(accepted),
               META_KEY: dict(report) if isinstance(report, dict) else None}
        with self._lock:
            self.records.append(rec)
            if self._path:  # append as we go: a crashed run still leaves its privacy record
                with open(self._path, "a") as f:
                    f.write(json.dumps(rec, default=float) + "\n")
        return rec

    def summary(self) -> dict:
        """{"per_site": {site: {...last report, rounds, epsilon_round, epsilon_total, ...}}, "by_round": [records],
        "guarantee": text}."""
        with self._lock:
            records = list(self.records)
        per_site: dict[str, dict] = {}
        for rec in sorted(records, key=lambda r: (r["site"], r["round"] if r["round"] is not None else -1)):
            report = rec.get(META_KEY)
            entry = per_site.setdefault(rec["site"], {"rounds": 0, "unprotected_rounds": 0, "protected": False})
            if report is None:
                entry["unprotected_rounds"] += 1
                continue
            entry.update(report)
            entry["site_round"] = report.get("round")
            entry["round"] = rec["round"]
            entry["rounds"] += 1
            if report.get("epsilon_round") is None:  # a report without the accountant's round cost: compose it here
                quantile = report.get("quantile_epsilon") if report.get("clipping") == "adaptive" else 0.0
                entry["epsilon_round"] = float(report.get("epsilon") or 0.0) + float(quantile or 0.0)
                entry["delta_round"] = report.get("delta") if report.get("mechanism") == "gaussian" else 0.0
        for entry in per_site.values():
            entry["protected"] = entry["rounds"] > 0 and entry["unprotected_rounds"] == 0
        return {"per_site": per_site, "by_round": records, "guarantee": guarantee_text(per_site)}
