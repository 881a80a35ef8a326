"""Unit-test fixtures shared by the data tests."""

import pytest

from fedseg.cli import main

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


@pytest.fixture
def synth_cli(tmp_path, capsys):
    """Run ``fedseg data synth <dataset> --preset tiny --seed 0`` into ``tmp_path / "tiny"``: (root, stdout, stderr)."""
    def run(dataset):
        root = tmp_path / "tiny"
        assert main(["data", "synth", dataset, "--out", str(root), "--preset", "tiny", "--seed", "0"]) == 0
        out, err = capsys.readouterr()
        return root, out, err

    return run


@pytest.fixture
def tiny_builtin(monkeypatch):
    """Make ``module``'s built-in data generator (``ensure``, e.g. ensure_builtin_lits) write the 'tiny' preset.

    ``tiny_builtin(module, ensure)`` returns the list of calls (one ``1`` per generator call).
    """
    def patch(module, ensure):
        calls = []

        def tiny(progress=False):
            calls.append(1)
            return ensure(progress, preset="tiny")

        monkeypatch.setattr(module, ensure.__name__, tiny)
        return calls

    return patch
