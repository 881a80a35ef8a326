"""Unit-test fixtures shared by the data tests."""

import pytest

from fedseg.data.synthetic import synth_lits


@pytest.fixture(autouse=True)
def _data_home(tmp_path, monkeypatch):
    """Built-in data and caches of every unit test go to its own temp folder; no data configuration leaks in."""
    monkeypatch.setenv("FEDSEG_DATA_HOME", str(tmp_path / "data_home"))
    monkeypatch.delenv("FEDSEG_DATA_CONFIG", raising=False)


@pytest.fixture(scope="session")
def tiny_lits(tmp_path_factory):
    """The 'tiny' synthetic LiTS dataset (seed 0), written once per session; copy it before modifying it."""
    return synth_lits(tmp_path_factory.mktemp("tiny") / "lits", preset="tiny", seed=0, progress=False)
