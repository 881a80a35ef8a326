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


@pytest.fixture(scope="session")
def tiny_polypgen(tmp_path_factory):
    """Tiny synthetic PolypGen-format data (seed 1, JPEG frames and PNG masks) and a data-config JSON naming it."""
    import json

    from fedseg.data.synthetic_polypgen import synth_polypgen

    root = tmp_path_factory.mktemp("tiny_polypgen")
    synth_polypgen(root, preset="tiny", seed=1, progress=False)
    cfg = root.parent / "tiny_polypgen.json"
    cfg.write_text(json.dumps({"polypgen": {"root": str(root)}}))
    return cfg
