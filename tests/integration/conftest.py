"""Fixtures shared by the simulator integration tests."""

import json

import pytest
from fedseg.data.synthetic import synth_lits


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Tiny synthetic LiTS data (seed 1) and a data-config JSON naming it: (root, config path)."""
    root = tmp_path_factory.mktemp("tiny_lits")
    synth_lits(root, preset="tiny", seed=1, progress=False)
    cfg = root.parent / "fedseg_data.json"
    cfg.write_text(json.dumps({"lits": {"root": str(root)}}))
    return root, cfg
