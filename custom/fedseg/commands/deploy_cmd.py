"""`fedseg submit`, `fedseg site`, `fedseg system`, `fedseg poc`: running the job folders on real FLARE systems.

- ``fedseg submit JOB --kit ADMIN_KIT``: submit a job folder through the FLARE API, follow it, download the result.
- ``fedseg site configure KIT ...`` / ``fedseg site check KIT``: a kit's ``local/`` settings; a kit's certificate.
- ``fedseg system start|stop|status KITS``: start a provisioned or POC system's participants from their kits and
  stop exactly the processes that were started (by PID).
- ``fedseg poc prepare|run|clean``: a local multi-process system on loopback (server ``localhost``), HE on or off.

See :mod:`fedseg.deploy` and ``provisioning/README.md``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from fedseg.errors import CommandError


def register(subparsers) -> None:
    s = subparsers.add_parser("submit", help="submit a job folder to a running FLARE system with an admin startup "
                              "kit, follow it and download the result")
    s.add_argument("job", type=Path, help="job folder (jobs/<name> or one written by fedseg jobs export)")
    s.add_argument("--kit", required=True, type=Path,
                   help="admin startup kit: <workspace>/<project>/prod_NN/<admin email>")
    s.add_argument("--username", default=None, help="admin user name (default: the kit's)")
    s.add_argument("--no-wait", action="store_true", help="submit and return the job id")
    s.add_argument("--timeout", type=float, default=24 * 3600.0, help="seconds to follow the job (default 1 day)")
    s.add_argument("--poll", type=float, default=5.0, help="seconds between status polls (default 5)")
    s.add_argument("--connect-timeout", type=float, default=20.0, help="seconds to reach the server (default 20)")
    s.add_argument("--abort-running", action="store_true",
                   help="first abort RUNNING jobs of the same name (orphans after a server restart; the new job "
                        "resumes from its round checkpoint)")
    s.add_argument("--json", action="store_true", help="print the outcome as JSON")
    s.set_defaults(func=run_submit)

    site = subparsers.add_parser("site", help="a startup kit's site-local settings and certificate")
    ssub = site.add_subparsers(dest="site_command", metavar="ACTION")
    ssub.required = True
    c = ssub.add_parser("configure", help="write <kit>/local/resources.json (job storage, allow-list, GPUs) and "
                        "fedseg_data.json")
    c.add_argument("kits", nargs="+", type=Path, help="server or site kit folder(s)")
    c.add_argument("--state-dir", type=Path, default=None,
                   help="server: persistent folder for job and snapshot storage (not under /tmp)")
    c.add_argument("--allow-fedseg", action="store_true",
                   help="append 'fedseg.' to class_allow_list (jobs exported with --no-byoc)")
    c.add_argument("--gpus", type=int, default=None, help="site: GPUs FLARE may give to jobs")
    c.add_argument("--gpu-mem", type=float, default=None, help="site: GiB per GPU FLARE may give to jobs")
    c.add_argument("--data-config", type=Path, default=None, help="copy this fedseg data JSON to local/fedseg_data.json")
    c.add_argument("--heartbeat-timeout", type=float, default=None,
                   help="server: seconds of silence before a site is declared gone (FLARE default 600)")
    c.set_defaults(func=run_site_configure)
    k = ssub.add_parser("check", help="check a kit's files and certificate (expiry, signer, project)")
    k.add_argument("kit", type=Path)
    k.add_argument("--system-root", type=Path, default=None,
                   help="the system's rootCA.pem: refuse a kit of another project")
    k.set_defaults(func=run_site_check)

    sy = subparsers.add_parser("system", help="start / stop / show a FLARE system's processes from its kits")
    ysub = sy.add_subparsers(dest="system_command", metavar="ACTION")
    ysub.required = True
    st = ysub.add_parser("start", help="start the server, then the sites; wait until the sites have registered")
    st.add_argument("kits", type=Path, help="provisioning workspace or its prod_NN folder")
    st.add_argument("--only", nargs="+", default=None, help="participants to start (default: server and all sites)")
    st.add_argument("--timeout", type=float, default=180.0)
    st.set_defaults(func=run_system_start)
    sp = ysub.add_parser("stop", help="stop the processes fedseg system start started (sites, then the server)")
    sp.add_argument("kits", type=Path)
    sp.add_argument("--only", nargs="+", default=None)
    sp.set_defaults(func=run_system_stop)
    ss = ysub.add_parser("status", help="the started processes and whether they run")
    ss.add_argument("kits", type=Path)
    ss.set_defaults(func=run_system_status)

    poc = subparsers.add_parser("poc", help="a local POC system on loopback: prepare, run a job end to end, clean")
    psub = poc.add_subparsers(dest="poc_command", metavar="ACTION")
    psub.required = True
    for name, helptext in (("prepare", "nvflare poc prepare with N sites (server 'localhost', HE optional)"),
                           ("run", "prepare (unless prepared), start, submit JOB, download, stop")):
        q = psub.add_parser(name, help=helptext)
        if name == "run":
            q.add_argument("job", type=Path, help="job folder to submit")
            q.add_argument("--timeout", type=float, default=3600.0, help="seconds to follow the job")
            q.add_argument("--keep-running", action="store_true", help="leave the system running afterwards")
        q.add_argument("--workspace", type=Path, required=True, help="POC workspace (NVFLARE_POC_WORKSPACE)")
        q.add_argument("--sites", type=int, default=None, help="number of sites site-1..site-N (default 2)")
        q.add_argument("--he", action="store_true", help="provision TenSEAL contexts (FLARE HE jobs)")
        q.add_argument("--fl-port", type=int, default=8102)
        q.add_argument("--admin-port", type=int, default=8103)
        q.add_argument("--data-config", type=Path, default=None,
                       help="fedseg data JSON copied to every participant's local/ (default: built-in data)")
        q.add_argument("--allow-fedseg", action="store_true", help="add 'fedseg.' to every class_allow_list")
        q.set_defaults(func=run_poc_prepare if name == "prepare" else run_poc_run)
    cl = psub.add_parser("clean", help="stop what runs and delete the POC workspace")
    cl.add_argument("--workspace", type=Path, required=True)
    cl.set_defaults(func=run_poc_clean)


# ------------------------------------------------------------------ submit / site
def _print_result(res, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"job_id": res.job_id, "status": res.status, "seconds": round(res.seconds, 1),
                          "result_dir": str(res.result_dir) if res.result_dir else None,
                          "results": str(res.results) if res.results else None, "reason": res.reason}))
        return
    print(f"job {res.job_id}: {res.status} after {res.seconds:.0f} s")
    if res.result_dir:
        print(f"downloaded to {res.result_dir}")
    if res.results:
        print(f"results: {res.results}")
    if res.reason:
        print(f"reason: {res.reason}")


def run_submit(args) -> int:
    from fedseg.deploy.submit import submit_job

    res = submit_job(args.job, args.kit, username=args.username, wait=not args.no_wait, timeout=args.timeout,
                     poll=args.poll, connect_timeout=args.connect_timeout, abort_running=args.abort_running,
                     progress=(lambda m: None) if args.json else print)
    _print_result(res, args.json)
    return 0 if (args.no_wait or res.ok) else 1


def run_site_configure(args) -> int:
    from fedseg.deploy.kits import read_kit
    from fedseg.deploy.site_config import configure_kit

    for path in args.kits:
        done = configure_kit(read_kit(path), state_dir=args.state_dir, allow_fedseg=args.allow_fedseg,
                             gpus=args.gpus, gpu_mem_gib=args.gpu_mem, data_config=args.data_config,
                             heartbeat_timeout=args.heartbeat_timeout)
        print(json.dumps(done))
    return 0


def run_site_check(args) -> int:
    from fedseg.deploy.kits import check_kit, read_kit

    info = check_kit(read_kit(args.kit), expect_root=args.system_root)
    print(f"{info['kind']} kit '{info['participant']}' OK: certificate valid until {info['not_after']} "
          f"({info['days_left']} days left)")
    return 0


# ------------------------------------------------------------------ system
def run_system_start(args) -> int:
    from fedseg.deploy.system import start_system

    start_system(args.kits, only=args.only, timeout=args.timeout)
    return 0


def run_system_stop(args) -> int:
    from fedseg.deploy.system import stop_system

    if not stop_system(args.kits, only=args.only):
        print("nothing was running")
    return 0


def run_system_status(args) -> int:
    from fedseg.deploy.system import system_status

    status = system_status(args.kits)
    if not status:
        print("no processes recorded (fedseg system start was not run here, or everything was stopped)")
    for name, e in status.items():
        print(f"{name:<24} {e['kind']:<7} pid {e['pid']:<8} {'running' if e['alive'] else 'gone':<8} {e['log']}")
    return 0 if all(e["alive"] for e in status.values()) else 1


# ------------------------------------------------------------------ poc
POC_PROJECT = "fedseg_poc"


def _poc_kits(ws: Path):
    from fedseg.deploy.kits import latest_prod_dir

    return latest_prod_dir(ws / POC_PROJECT)


def run_poc_prepare(args) -> int:
    _poc_prepare(args)
    return 0


def _poc_prepare(args) -> Path:
    from fedseg.deploy.kits import find_kits
    from fedseg.deploy.project import make_project, poc_prepare
    from fedseg.deploy.site_config import configure_kit

    n = args.sites if args.sites is not None else 2
    if n < 1:
        raise CommandError(f"--sites must be >= 1, got {n}")
    ws = args.workspace.expanduser().resolve()
    project = make_project(POC_PROJECT, [f"site-{i}" for i in range(1, n + 1)], server="localhost",
                           server_org="poc", fl_port=args.fl_port, admin_port=args.admin_port,
                           admins=[("admin@poc.org", "poc", "project_admin")], he=args.he,
                           description="fedseg POC system on loopback")
    prod = poc_prepare(project, ws)
    for kit in find_kits(prod):
        if kit.kind == "admin":
            continue
        configure_kit(kit, state_dir=(ws / "state") if kit.kind == "server" else None,
                      allow_fedseg=args.allow_fedseg, data_config=args.data_config, allow_tmp=True)
    print(f"POC system with {n} site(s){' and HE contexts' if args.he else ''} prepared in {prod}")
    print(f"admin kit: {prod / 'admin@poc.org'}")
    return prod


def run_poc_run(args) -> int:
    from fedseg.deploy.kits import KitError
    from fedseg.deploy.submit import submit_job
    from fedseg.deploy.system import start_system, stop_system

    ws = args.workspace.expanduser().resolve()
    try:
        prod = _poc_kits(ws)
        from fedseg.deploy.kits import find_kits

        kits = find_kits(prod)
        n_sites = sum(k.kind == "client" for k in kits)
        has_he = any((k.startup / "server_context.tenseal").is_file() for k in kits if k.kind == "server")
        if (args.sites is not None and args.sites != n_sites) or (args.he and not has_he):
            raise CommandError(f"the POC system in {prod} has {n_sites} site(s){' with HE' if has_he else ''}, not "
                               f"what --sites/--he ask for; run fedseg poc clean --workspace {ws} first")
        print(f"using the POC system prepared in {prod} ({n_sites} site(s){', HE' if has_he else ''})")
    except KitError:
        prod = _poc_prepare(args)
    try:
        start_system(prod)
        res = submit_job(args.job, prod / "admin@poc.org", timeout=args.timeout)
        _print_result(res, False)
        return 0 if res.ok else 1
    finally:
        if not args.keep_running:
            stop_system(prod)


def run_poc_clean(args) -> int:
    from fedseg.deploy.kits import KitError
    from fedseg.deploy.system import stop_system

    ws = args.workspace.expanduser().resolve()
    try:
        stop_system(_poc_kits(ws))
    except KitError:
        pass
    for p in (ws, ws.parent / f"{ws.name}_project.yml"):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    print(f"removed {ws}")
    return 0
