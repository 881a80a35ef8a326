"""`fedseg evaluate` argument errors are explained (the happy path runs in the simulator integration test)."""

from fedseg.cli import main


def test_unknown_job_and_missing_model_are_clear_errors(tmp_path, capsys):
    assert main(["evaluate", "--model", str(tmp_path / "nope.pt"), "--job", "no_such_job"]) == 2
    assert "unknown job 'no_such_job'" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tmp_path / "nope.pt"), "--job", "fedgs_lits"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unreadable_model_file(tmp_path, capsys, tiny_lits, monkeypatch):
    cfg = tmp_path / "cfg.json"
    cfg.write_text('{"lits": {"root": "%s"}}' % tiny_lits)
    bad = tmp_path / "global_model.pt"
    bad.write_bytes(b"not a torch file")
    rc = main(["evaluate", "--model", str(bad), "--job", "fedgs_lits", "--data-config", str(cfg),
               "--data-args", '{"image_size": 32, "min_tumour_pixels": 3}', "--overlays", "0"])
    assert rc == 2 and "cannot read" in capsys.readouterr().err
