"""Submit a job folder to a running FLARE system through the FLARE API and follow it to the end.

``submit_job`` checks the admin kit first (:func:`fedseg.deploy.kits.check_kit`: missing files, an expired
certificate, files of two provisionings), then opens a secure session (``new_secure_session``), submits the folder,
follows it with ``monitor_job`` (one progress line per status change and per new round the server logs), and
downloads the result (``download_job_result``). A job that ends other than ``FINISHED:COMPLETED`` is reported with
the reason FLARE recorded: the first error of the server's ``error_log.txt`` in the downloaded result (e.g. a
component outside a site's class allow-list), or the job's status otherwise.

Errors name the cause and the fix: an unreachable server (host, port, what to check), a kit that is not an admin
kit, a job folder without ``meta.json``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedseg.deploy.kits import KitError, admin_address, admin_username, check_kit, read_kit
from fedseg.errors import FedsegError

DONE_OK = "FINISHED:COMPLETED"


class SubmitError(FedsegError, RuntimeError):
    """The job could not be submitted or followed (names the server, kit or job and the fix)."""


@dataclass
class SubmitResult:
    job_id: str
    status: str
    seconds: float
    result_dir: Path | None = None
    reason: str | None = None
    results: Path | None = None  # <result_dir>/workspace/results, when the job wrote one
    rounds: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == DONE_OK


def _failure_reason(result_dir: Path | None) -> str | None:
    """The first informative error line of the server's logs in a downloaded job result."""
    if result_dir is None:
        return None
    ws = result_dir / "workspace"
    for name in ("error_log.txt", "log.txt"):
        p = ws / name
        if not p.is_file():
            continue
        text = p.read_text(errors="replace")
        for pat in (r"ComponentNotAuthorized: (component not authorized: [^\n]*)", r"(\w+Error: [^\n]{0,400})",
                    r"ERROR - ([^\n]{0,400})"):
            m = re.search(pat, text)
            if m:
                return m.group(1).strip()
    return None


def open_session(kit_path: str | Path, username: str | None = None, timeout: float = 20.0):
    """A FLARE API secure session from an admin kit; SubmitError / KitError with the fix when it cannot connect."""
    from nvflare.fuel.flare_api.api_spec import NoConnection
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    kit = read_kit(kit_path)
    if kit.kind != "admin":
        raise KitError(f"{kit.path} is a {kit.kind} kit; submitting needs an admin's startup kit "
                       "(<workspace>/<project>/prod_NN/<admin email>)")
    check_kit(kit)
    host, port = admin_address(kit)
    user = username or admin_username(kit)
    try:
        return new_secure_session(user, str(kit.path), timeout=timeout)
    except NoConnection:
        raise SubmitError(f"cannot reach the FLARE server at {host}:{port} (from {kit.path / 'startup' / 'fed_admin.json'}) "
                          f"within {timeout:.0f} s: is the server running, does {host} resolve from here and is "
                          f"port {port} open?") from None
    except Exception as e:  # TLS / login failures come as many types
        raise SubmitError(f"the server at {host}:{port} refused admin '{user}' with kit {kit.path}: {e}. The kit "
                          "may belong to another project or have been revoked; ask the project admin for a current "
                          "one") from None


def submit_job(job_dir: str | Path, kit_path: str | Path, *, username: str | None = None, wait: bool = True,
               timeout: float = 3600.0, poll: float = 5.0, download: bool = True, connect_timeout: float = 20.0,
               abort_running: bool = False, progress: Callable[[str], None] = print) -> SubmitResult:
    """Submit ``job_dir`` with the admin kit at ``kit_path``; with ``wait``, follow it and download its result.

    ``abort_running``: first abort the jobs of the same name that the server lists as RUNNING (after a server
    restart they are orphans: NVFlare 2.9 cannot restore them; the resubmitted job resumes from fedseg's round
    checkpoint, :mod:`fedseg.flare.resume`)."""
    job_dir = Path(job_dir).expanduser().resolve()
    if not (job_dir / "meta.json").is_file():
        raise SubmitError(f"{job_dir} is not a FLARE job folder (no meta.json); pass e.g. jobs/fedgs_lits or a "
                          "folder written by fedseg jobs export")
    session = open_session(kit_path, username, connect_timeout)
    start = time.time()
    try:
        if abort_running:
            import json as _json

            name = _json.loads((job_dir / "meta.json").read_text()).get("name", job_dir.name)
            for info in session.list_jobs(name_prefix=name):
                if info.get("job_name", info.get("name")) == name and str(info.get("status")) == "RUNNING":
                    try:
                        session.abort_job(info["job_id"])
                        progress(f"aborted the running job {info['job_id']} of {name}")
                    except Exception as e:  # an orphan after a server restart: nothing runs that could be aborted
                        progress(f"job {info['job_id']} of {name} is listed as RUNNING but has no process on the "
                                 f"server ({e}); left as it is")
        job_id = session.submit_job(str(job_dir))
        progress(f"submitted {job_dir.name} as job {job_id}")
        if not wait:
            return SubmitResult(job_id=job_id, status="SUBMITTED", seconds=0.0)
        seen: dict[str, Any] = {"status": None}

        def cb(sess, jid, meta, *a, **k):
            status = meta.get("status")
            if status != seen["status"]:
                seen["status"] = status
                progress(f"[{time.time() - start:6.0f} s] {jid}: {status}")
            return True

        rc = session.monitor_job(job_id, timeout=timeout, poll_interval=poll, cb=cb)
        status = session.get_job_meta(job_id).get("status", str(rc))
        result_dir = None
        if download and str(status).startswith("FINISHED"):
            result_dir = Path(session.download_job_result(job_id))
        res = SubmitResult(job_id=job_id, status=str(status), seconds=time.time() - start, result_dir=result_dir)
        if result_dir is not None and (result_dir / "workspace" / "results").is_dir():
            res.results = result_dir / "workspace" / "results"
        if not res.ok:
            res.reason = _failure_reason(result_dir) or (f"monitor: {rc.name}" if hasattr(rc, "name") else str(rc))
        return res
    finally:
        session.close()
