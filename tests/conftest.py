"""Test-wide isolation: HOME, FEDSEG_DATA_HOME and NVFlare state live under a per-session temp folder."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    old = {k: os.environ.get(k) for k in ("HOME", "FEDSEG_DATA_HOME", "FEDSEG_DATA_CONFIG")}
    os.environ["HOME"] = str(home)
    os.environ["FEDSEG_DATA_HOME"] = str(home / "fedseg_data")
    os.environ.pop("FEDSEG_DATA_CONFIG", None)
    yield home
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _tiny(tmp_path_factory, dataset: str):
    """Tiny synthetic data of ``dataset`` in its real on-disk format (seed 1) and a data-config JSON naming it."""
    import json

    from fedseg.data.synthetic import synth_lits
    from fedseg.data.synthetic_polypgen import synth_polypgen

    root = tmp_path_factory.mktemp(f"tiny_{dataset}")
    {"lits": synth_lits, "polypgen": synth_polypgen}[dataset](root, preset="tiny", seed=1, progress=False)
    cfg = root.parent / f"{root.name}.json"
    cfg.write_text(json.dumps({dataset: {"root": str(root)}}))
    return root, cfg


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Tiny synthetic LiTS data (NIfTI volumes) and a data-config JSON naming it: (root, config path)."""
    return _tiny(tmp_path_factory, "lits")


@pytest.fixture(scope="session")
def tiny_polypgen(tmp_path_factory):
    """Tiny synthetic PolypGen-format data (JPEG frames, PNG masks): the data-config JSON naming it."""
    return _tiny(tmp_path_factory, "polypgen")[1]


SIM_TIMEOUT = 480  # s, all attempts of one tiny simulator run together (they take 20-150 s on 2 cores)
SIM_STALL = 180  # s without output or log growth: a hung run, stopped and retried


@pytest.fixture
def run_simulator():
    """The tests' one simulator runner: ``run(job_dir, ws, n_sites, data_cfg=..., env=..., check=True)`` runs the job
    folder through fedseg's runner (the port fix, the watchdog and its retries, bounded in time) and returns
    (SimulationResult, the run's output). ``check`` asserts that it finished with exit code 0."""
    from pathlib import Path

    from fedseg.simulation import simulate

    def run(job_dir, ws, n_sites, *, threads=None, data_cfg=None, env=None, timeout=SIM_TIMEOUT, check=True):
        run_env = dict(os.environ if env is None else env)
        if data_cfg is not None:
            run_env["FEDSEG_DATA_CONFIG"] = str(data_cfg)
        ws = Path(ws)
        log = ws.with_name(ws.name + ".log")
        res = simulate(job_dir, ws, n_clients=n_sites, threads=threads or n_sites, env=run_env, log_path=log,
                       timeout=timeout, stall_timeout=SIM_STALL, retries=2)
        text = log.read_text(errors="replace")
        if check:
            assert res.ok, f"{res.describe()}\n{text[-5000:]}"
        return res, text

    return run
