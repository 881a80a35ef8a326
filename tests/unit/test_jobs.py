"""Job folders: exported from one Python definition each; paper jobs carry the paper's settings."""

import json
from pathlib import Path

import pytest

from fedseg.cli import main
from fedseg.jobs.recipes import JOBS, diff_against

REPO = Path(__file__).resolve().parents[2]


def _client_args(job_dir: Path) -> dict:
    cfg = json.loads((job_dir / "app/config/config_fed_client.json").read_text())
    return cfg["executors"][0]["executor"]["args"]


def _server(job_dir: Path) -> dict:
    return json.loads((job_dir / "app/config/config_fed_server.json").read_text())


def test_committed_jobs_match_a_fresh_export():
    problems = diff_against(REPO / "jobs")
    assert not problems, f"run `fedseg jobs export`: {problems}"


def test_check_detects_a_hand_edited_job(tmp_path):
    assert main(["jobs", "export", "--out", str(tmp_path)]) == 0
    assert main(["jobs", "export", "--out", str(tmp_path), "--check"]) == 0
    cfg = tmp_path / "fedgs_lits/app/config/config_fed_client.json"
    cfg.write_text(cfg.read_text().replace('"local_epochs": 1', '"local_epochs": 2'))
    assert main(["jobs", "export", "--out", str(tmp_path), "--check"]) == 1


@pytest.mark.parametrize("name, aggregation", [("fedgs_lits_paper", "fedgs"), ("fedavg_lits_paper", "fedavg")])
def test_paper_jobs_carry_exactly_the_paper_settings(name, aggregation):
    job_dir = REPO / "jobs" / name
    args = _client_args(job_dir)
    assert args["aggregation"] == aggregation
    assert args["lr"] == 1e-4 and args["batch_size"] == 4 and args["local_epochs"] == 5
    assert args["max_steps_per_round"] is None
    assert args["model"] == "utnet" and args["model_args"] == {"base_chan": 32, "attn_drop": 0.0, "proj_drop": 0.0}
    assert args["data_args"] == {"image_size": 512, "min_tumour_pixels": 50}
    sag = _server(job_dir)["workflows"][0]
    assert sag["path"].endswith("ScatterAndGather") and sag["args"]["num_rounds"] == 60
    persistor = next(c for c in _server(job_dir)["components"] if c["id"] == "persistor")
    assert persistor["args"]["model"] == "utnet" and persistor["args"]["model_args"] == args["model_args"]


def test_fedavg_differs_from_fedgs_only_in_aggregation():
    for a, b in (("fedgs_lits", "fedavg_lits"), ("fedgs_lits_paper", "fedavg_lits_paper")):
        ja, jb = JOBS[a], JOBS[b]
        da, db = ja.summary(), jb.summary()
        for key in ("job_name", "description", "aggregation"):
            da.pop(key), db.pop(key)
        assert da == db
        assert (ja.aggregation, jb.aggregation) == ("fedgs", "fedavg")


def test_every_job_is_byoc_marked_and_uses_fedseg_classes():
    for name in JOBS:
        job_dir = REPO / "jobs" / name
        assert (job_dir / "app/custom/README.md").is_file()
        assert not list((job_dir / "app/custom").glob("*.py")), "job folders must not copy package code"
        assert _client_args(job_dir)  # parses
        meta = json.loads((job_dir / "meta.json").read_text())
        assert meta["deploy_map"] == {"app": ["@ALL"]}


@pytest.mark.parametrize("name, aggregation", [("fedgs_polypgen_paper", "fedgs"), ("fedavg_polypgen_paper", "fedavg")])
def test_polypgen_paper_jobs_carry_the_paper_settings(name, aggregation):
    job_dir = REPO / "jobs" / name
    args = _client_args(job_dir)
    assert args["aggregation"] == aggregation and args["dataset"] == "polypgen" and args["in_channels"] == 3
    assert args["lr"] == 1e-4 and args["batch_size"] == 4 and args["local_epochs"] == 5
    assert args["data_args"] == {"image_size": 512, "fold": 0}
    assert args["model_args"]["base_chan"] == 32
    sag = _server(job_dir)["workflows"][0]
    assert sag["args"]["num_rounds"] == 100 and sag["args"]["min_clients"] == 5


def test_job_variants_by_model_and_settings(tmp_path):
    from fedseg.jobs.recipes import override

    job = override(JOBS["fedgs_polypgen"], {"num_rounds": 3, "data_args.fold": 4})
    assert job.num_rounds == 3 and job.data_args == {"image_size": 128, "fold": 4}
    assert JOBS["fedgs_polypgen"].data_args["fold"] == 0  # the recipe itself is untouched
    with pytest.raises(ValueError, match="unknown job setting"):
        override(job, {"no_such_setting": 1})
    with pytest.raises(ValueError, match="no quick preset"):
        job.with_model("no_such_model")
    assert main(["jobs", "export", "fedgs_polypgen", "--out", str(tmp_path), "--set", "data_args.fold=3",
                 "--set", "num_rounds=2"]) == 0
    args = _client_args(tmp_path / "fedgs_polypgen")
    assert args["data_args"]["fold"] == 3
    assert main(["jobs", "export", "fedgs_polypgen", "--set", "num_rounds=2"]) == 2  # never over jobs/


def test_sd_utnet_paper_variant_is_the_fedgs_reference_network():
    from fedseg.models import count_parameters, get_model

    job = JOBS["fedgs_polypgen_paper"].with_model("sd_utnet")
    net = get_model(job.model, in_channels=job.in_channels, num_classes=job.num_classes, **job.model_args)
    assert count_parameters(net) == 18_836_223  # FedGS's SD_UTNet(in_channels=3), counted on its code
