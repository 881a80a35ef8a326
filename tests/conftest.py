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
