"""Site-local data configuration: resolution order, relative paths, errors, built-in data (concurrency)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fedseg.data.config import (CONFIG_ENV, DataSource, builtin_data_root, default_cache_dir, ensure_builtin_lits,
                                resolve_data_source)
from fedseg.errors import DataError


def _write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def test_builtin_when_nothing_configured(tmp_path):
    src = resolve_data_source("lits", "site-1", workspace_root=tmp_path / "ws", env={})
    assert src == DataSource("lits", None, None, None, None, src.origin)
    assert src.is_builtin and "built-in" in src.origin


def test_local_file_beats_env_beats_builtin(tmp_path):
    local_root = tmp_path / "local_data"
    env_root = tmp_path / "env_data"
    local_root.mkdir()
    env_root.mkdir()
    ws = tmp_path / "ws"
    local_cfg = _write(ws / "local" / "fedseg_data.json", {"lits": {"root": str(local_root)}})
    env_cfg = _write(tmp_path / "cfg" / "env.json", {"lits": {"root": str(env_root), "split": "paper"}})
    env = {CONFIG_ENV: str(env_cfg)}

    src = resolve_data_source("lits", "site-1", workspace_root=ws, env=env)
    assert src.root == local_root and str(local_cfg) in src.origin and src.split is None
    local_cfg.unlink()
    src = resolve_data_source("lits", "site-1", workspace_root=ws, env=env)
    assert src.root == env_root and src.split == "paper" and "FEDSEG_DATA_CONFIG" in src.origin
    src = resolve_data_source("lits", "site-1", workspace_root=ws, env={})
    assert src.root is None


def test_relative_paths_resolve_against_the_json_folder_and_site_overrides(tmp_path):
    cfg_dir = tmp_path / "somewhere" / "cfg"
    (cfg_dir / "data" / "lits").mkdir(parents=True)
    (cfg_dir / "other").mkdir()
    cfg = _write(cfg_dir / "fedseg_data.json", {
        "lits": {"root": "data/lits", "split": "my_split.json", "cache_dir": "cache", "centre": None},
        "sites": {"site-2": {"lits": {"root": "other", "centre": "centre-9", "split": "paper"}}},
    })
    env = {CONFIG_ENV: str(cfg)}
    s1 = resolve_data_source("lits", "site-1", env=env)
    assert s1.root == cfg_dir / "data" / "lits"
    assert s1.split == str(cfg_dir / "my_split.json")
    assert s1.cache_dir == cfg_dir / "cache"
    assert s1.centre is None
    s2 = resolve_data_source("lits", "site-2", env=env)
    assert (s2.root, s2.centre, s2.split, s2.cache_dir) == (cfg_dir / "other", "centre-9", "paper", cfg_dir / "cache")


def test_builtin_keyword_in_a_config_file(tmp_path):
    cfg = _write(tmp_path / "c.json", {"lits": {"root": "builtin", "split": "auto"}})
    src = resolve_data_source("lits", "site-3", env={CONFIG_ENV: str(cfg)})
    assert src.root is None and src.split == "auto" and str(cfg) in src.origin


@pytest.mark.parametrize("section", [{}, {"root": ""}, {"root": "  "}, {"split": "paper"}])
def test_missing_or_empty_root_names_file_site_and_fix(tmp_path, section):
    cfg = _write(tmp_path / "ws" / "local" / "fedseg_data.json", {"lits": section})
    with pytest.raises(DataError) as e:
        resolve_data_source("lits", "site-7", workspace_root=tmp_path / "ws", env={})
    msg = str(e.value)
    assert str(cfg) in msg and "site-7" in msg and '"root"' in msg


def test_no_section_for_the_dataset_is_an_error_not_a_silent_fallback(tmp_path):
    cfg = _write(tmp_path / "c.json", {"sites": {"site-1": {"lits": {"root": str(tmp_path)}}}})
    assert resolve_data_source("lits", "site-1", env={CONFIG_ENV: str(cfg)}).root == tmp_path
    with pytest.raises(DataError, match="site-2"):
        resolve_data_source("lits", "site-2", env={CONFIG_ENV: str(cfg)})


def test_root_that_does_not_exist(tmp_path):
    cfg = _write(tmp_path / "c.json", {"lits": {"root": "nope"}})
    with pytest.raises(DataError) as e:
        resolve_data_source("lits", "site-1", env={CONFIG_ENV: str(cfg)})
    assert str(tmp_path / "nope") in str(e.value) and "does not exist" in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="FEDSEG_DATA_CONFIG"):
        resolve_data_source("lits", "site-1", env={CONFIG_ENV: str(tmp_path / "missing.json")})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        resolve_data_source("lits", "site-1", env={CONFIG_ENV: str(bad)})
    typo = _write(tmp_path / "typo.json", {"lits": {"roots": "/data"}})
    with pytest.raises(DataError, match="roots"):
        resolve_data_source("lits", "site-1", env={CONFIG_ENV: str(typo)})


def test_data_source_accepts_str_paths(tmp_path):
    src = DataSource("lits", str(tmp_path), None, None, "~/x", "caller")
    assert src.root == tmp_path and src.cache_dir == Path("~/x").expanduser()


def test_builtin_data_root_and_cache_dir(tmp_path, monkeypatch):
    assert builtin_data_root("lits") == tmp_path / "data_home" / "lits_builtin"
    monkeypatch.delenv("FEDSEG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert builtin_data_root("lits") == tmp_path / "home" / ".cache" / "fedseg" / "data" / "lits_builtin"
    root = tmp_path / "r"
    root.mkdir()
    src = DataSource("lits", root, None, None, None, "test")
    assert default_cache_dir(src, root) == root / ".fedseg_cache"
    explicit = DataSource("lits", root, None, None, tmp_path / "c", "test")
    assert default_cache_dir(explicit, root) == tmp_path / "c"


def test_unwritable_root_cache_falls_back_to_home_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    root = tmp_path / "r"
    root.mkdir()
    (root / ".fedseg_cache").write_text("a file where the cache folder would go")  # cannot be created, even as root
    src = DataSource("lits", root, None, None, None, "test")
    assert default_cache_dir(src, root) == tmp_path / "home" / ".cache" / "fedseg" / "cache"
    blocked = DataSource("lits", root, None, None, root / ".fedseg_cache" / "sub", "cfg.json")
    with pytest.raises(DataError, match="cfg.json"):
        default_cache_dir(blocked, root)


_CHILD = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    go = Path(sys.argv[1])
    while not go.exists():
        time.sleep(0.005)
    from fedseg.data.config import ensure_builtin_lits
    root = ensure_builtin_lits(preset="tiny", seed=0)
    marker = json.loads((root / ".fedseg_builtin.json").read_text())
    # then both load the same site at once: one builds the cache, the other waits and reuses it
    from fedseg.data.config import DataSource
    from fedseg.data import lits
    from fedseg.data.lits import LiTSPreprocessing, load_lits_site
    lits.ensure_builtin_lits = lambda progress=False: ensure_builtin_lits(progress, preset="tiny", seed=0)
    ds = load_lits_site(DataSource("lits", None, None, None, None, "builtin"), "site-1", "train",
                        LiTSPreprocessing(image_size=64, min_tumour_pixels=3))
    build_id = json.loads((ds.cache_path / "manifest.json").read_text())["build_id"]
    print(json.dumps({"root": str(root), "generation_id": marker["generation_id"], "pid": os.getpid(),
                      "n": len(ds), "build_id": build_id, "cache": str(ds.cache_path)}))
""")


def test_two_processes_at_once_make_one_builtin_dataset_and_one_cache(tmp_path):
    home = tmp_path / "data_home"
    go = tmp_path / "go"
    env = dict(os.environ, FEDSEG_DATA_HOME=str(home))
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(go)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(0.3)  # let both import and wait at the barrier
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0]["root"] == results[1]["root"] == str(home / "lits_builtin")
    # both see the same generation (only one process generated), no temporary folders are left behind
    assert results[0]["generation_id"] == results[1]["generation_id"]
    assert results[0]["cache"] == results[1]["cache"] and results[0]["n"] == results[1]["n"] > 0
    assert results[0]["build_id"] == results[1]["build_id"]  # the cache was built once
    cache_dir = Path(results[0]["cache"]).parent
    assert not [p for p in cache_dir.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert sorted(p.name for p in home.iterdir()) == [".lits_builtin.lock", "lits_builtin"]
    root = home / "lits_builtin"
    assert (root / "split.json").is_file() and len(list(root.glob("volume-*.nii.gz"))) == 10
    # a third call is a no-op returning the same data
    before = (root / ".fedseg_builtin.json").read_text()
    assert ensure_builtin_lits(preset="tiny", seed=0) == root
    assert (root / ".fedseg_builtin.json").read_text() == before
