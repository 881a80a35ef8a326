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
