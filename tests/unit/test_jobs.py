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


@pytest.mark.parametrize("name, aggregation", [("fedgs_lits_paper", "fedgs"), ("fedavg_lits_paper", "fedavg"),
                                               ("fedgs_lits_csahe_paper", "fedgs")])
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


# ---------------------------------------------------------------------------------------------------- CSAHE jobs

PLAIN_JOBS = [n for n, j in JOBS.items() if j.secure_aggregation == "none"]


@pytest.mark.parametrize("name", ["fedgs_lits_csahe", "fedgs_lits_csahe_paper"])
def test_csahe_jobs_use_the_ring_controller_and_keep_updates_at_the_sites(name):
    job_dir = REPO / "jobs" / name
    server = _server(job_dir)
    wf = server["workflows"][0]
    assert wf["path"] == "fedseg.flare.ring_controller.CSAHEScatterAndGather"
    assert wf["args"]["weighting"] == "steps" and wf["args"]["min_ring_sites"] == 3
    assert wf["args"]["min_clients"] >= 3 and wf["args"]["hop_timeout"] == JOBS[name].hop_timeout
    assert server["server"] == {"task_request_interval": 0.5}
    assert "aggregator" not in {c["id"] for c in server["components"]}  # nothing aggregates plaintext updates
    assert server["workflows"][1]["path"].endswith("FinalEvaluation")
    client = json.loads((job_dir / "app/config/config_fed_client.json").read_text())
    assert client["executors"][0]["tasks"] == ["train", "validate", "csahe_start", "csahe_prepare", "csahe_hop",
                                             "csahe_finish"]
    args = _client_args(job_dir)
    assert args["secure_aggregation"] == "csahe" and args["csahe_sigma"] == 1e4
    assert "algorithm" not in args  # Per-FedAvg settings appear only in jobs that use them


def test_csahe_quick_job_is_fedgs_lits_plus_csahe():
    plain, secure = JOBS["fedgs_lits"].summary(), JOBS["fedgs_lits_csahe"].summary()
    extra = {k: secure.pop(k) for k in list(secure) if k not in plain}
    assert extra == {"secure_aggregation": "csahe", "csahe_sigma": 1e4, "hop_timeout": 600, "csahe_weighting": "steps",
                     "csahe_task_request_interval": 0.5}
    for key in ("job_name", "description"):
        plain.pop(key), secure.pop(key)
    assert plain == secure
    paper, secure_paper = JOBS["fedgs_lits_paper"].summary(), JOBS["fedgs_lits_csahe_paper"].summary()
    assert {k: v for k, v in secure_paper.items() if k in paper and k not in ("job_name", "description")} == {
        k: v for k, v in paper.items() if k not in ("job_name", "description")}
    assert secure_paper["hop_timeout"] == 1800


def test_plain_jobs_carry_no_csahe_or_perfedavg_settings():
    for name in PLAIN_JOBS:
        job_dir = REPO / "jobs" / name
        args = _client_args(job_dir)
        assert not {"secure_aggregation", "csahe_sigma", "algorithm", "adaptation_steps"} & set(args), name
        server = _server(job_dir)
        assert "server" not in server and server["workflows"][-2]["path"] in (
            "fedseg.flare.resume.ResumableScatterAndGather",  # plaintext jobs: round checkpoints + resume
            "nvflare.app_common.workflows.scatter_and_gather.ScatterAndGather")  # HE jobs
        assert "secure_aggregation" not in JOBS[name].summary()


def test_settings_groups_are_written_whole_when_used():
    from dataclasses import replace

    pfa = replace(JOBS["fedavg_lits"], algorithm="perfedavg", adaptation_steps=2)
    args = pfa.client_config()["executors"][0]["executor"]["args"]
    assert {k: args[k] for k in ("algorithm", "perfedavg_variant", "alpha", "beta", "adaptation_steps")} == {
        "algorithm": "perfedavg", "perfedavg_variant": "fo", "alpha": 1e-3, "beta": 1e-4, "adaptation_steps": 2}
    assert "secure_aggregation" not in args
    both = replace(pfa, secure_aggregation="csahe", csahe_weighting="samples")
    assert both.server_config()["workflows"][0]["args"]["weighting"] == "samples"
    assert both.summary()["algorithm"] == "perfedavg" and both.summary()["csahe_weighting"] == "samples"


def test_bad_csahe_settings_are_refused():
    from dataclasses import replace

    with pytest.raises(ValueError, match=">= 3 sites"):
        replace(JOBS["fedgs_lits_csahe"], min_clients=2)
    with pytest.raises(ValueError, match="secure_aggregation"):
        replace(JOBS["fedgs_lits"], secure_aggregation="he")
    with pytest.raises(ValueError, match="csahe_weighting"):
        replace(JOBS["fedgs_lits_csahe"], csahe_weighting="images")


@pytest.mark.parametrize("name", ["fedgs_lits_csahe", "fedgs_lits", "pppml_covid", "fedavg_covid"])
def test_exported_classes_accept_their_arguments(name):
    """Every class named in the exported job can be built with exactly the exported arguments."""
    import importlib

    job_dir = REPO / "jobs" / name
    client = json.loads((job_dir / "app/config/config_fed_client.json").read_text())
    server = _server(job_dir)
    specs = [client["executors"][0]["executor"], *server["workflows"],
             *[c for c in server["components"] if c["path"].startswith("fedseg.")]]
    for spec in specs:
        module, _, cls = spec["path"].rpartition(".")
        obj = getattr(importlib.import_module(module), cls)(**spec["args"])
        assert obj is not None


@pytest.mark.parametrize("name", ["pppml_covid_paper", "fedavg_covid_paper"])
def test_covid_paper_jobs_carry_the_pppml_paper_settings(name):
    """PPPML-HMI section III-A: K = 20 rounds, tau = 10 local epochs, batch 64, learning rate 1e-4, 5 sites; the
    512^3 standard space, offsets -5, -2, 0, 2, 5 mm and the 2.5D U-Net."""
    args = _client_args(REPO / "jobs" / name)
    wf = _server(REPO / "jobs" / name)["workflows"][0]["args"]
    assert wf["num_rounds"] == 20 and wf["min_clients"] == 5
    assert args["local_epochs"] == 10 and args["batch_size"] == 64
    assert args["dataset"] == "covid" and args["model"] == "unet25d" and args["in_channels"] == 5
    assert args["data_args"] == {"volume_size": 512, "offsets": "paper"}
    if name == "pppml_covid_paper":
        assert args["algorithm"] == "perfedavg" and args["perfedavg_variant"] == "hf" and args["beta"] == 1e-4
        assert 0 < args["adaptation_steps"] < 5 and args["secure_aggregation"] == "csahe"
        assert wf["weighting"] == "samples"  # w_k = n_k / sum n
    else:
        assert args["lr"] == 1e-4 and "algorithm" not in args and "secure_aggregation" not in args


def test_pppml_covid_quick_and_fedavg_covid_share_data_model_and_rounds():
    p, f = JOBS["pppml_covid"], JOBS["fedavg_covid"]
    same = ("dataset", "data_args", "model", "model_args", "in_channels", "num_rounds", "local_epochs", "batch_size",
            "min_clients", "seed")
    assert {k: getattr(p, k) for k in same} == {k: getattr(f, k) for k in same}
    assert (p.algorithm, p.secure_aggregation) == ("perfedavg", "csahe")
    assert (f.algorithm, f.secure_aggregation) == ("sgd", "none")


# ---------------------------------------------------------------------- HE and DP jobs (issue 5)
def _client(job_dir: Path) -> dict:
    return json.loads((job_dir / "app/config/config_fed_client.json").read_text())


def _result_filters(job_dir: Path) -> list[str]:
    return [f["path"] for group in _client(job_dir)["task_result_filters"] for f in group["filters"]]


def test_dp_runs_before_he_in_the_exported_jobs():
    """Noise must be added to the plaintext update, then encrypted: DP filter first, HE encryptor last."""
    assert _result_filters(REPO / "jobs/fedgs_lits_adp_he") == ["fedseg.flare.dp_filter.AdaptiveDPFilter",
                                                                 "fedseg.flare.he.HEModelEncryptor"]
    assert _result_filters(REPO / "jobs/fedgs_lits_adp") == ["fedseg.flare.dp_filter.AdaptiveDPFilter"]
    assert _result_filters(REPO / "jobs/fedgs_lits_he") == ["fedseg.flare.he.HEModelEncryptor"]
    for name in ("fedgs_lits_adp_he", "fedgs_lits_he"):
        group = _client(REPO / "jobs" / name)["task_data_filters"]
        assert group == [{"tasks": ["train", "validate"], "filters": [
            {"path": "fedseg.flare.he.HEModelDecryptor", "args": {"tenseal_context_file": "client_context.tenseal"}}]}]
        assert next(g for g in _client(REPO / "jobs" / name)["task_result_filters"])["tasks"] == ["train"]


def test_plain_jobs_have_no_privacy_filters_or_settings():
    for name in ("fedgs_lits", "fedavg_lits", "fedgs_lits_csahe", "pppml_covid"):
        client = _client(REPO / "jobs" / name)
        assert client["task_result_filters"] == [] and client["task_data_filters"] == []
        assert not {"he", "dp", "dp_epsilon"} & set(JOBS[name].summary()), name


def test_he_job_is_fedgs_lits_with_flare_he_on_the_server():
    server = _server(REPO / "jobs/fedgs_lits_he")
    comps = {c["id"]: c for c in server["components"]}
    assert comps["aggregator"]["path"] == "fedseg.flare.he.HEAggregator"
    assert comps["aggregator"]["args"]["weigh_by_local_iter"] is False  # the encryptor weighs by steps
    assert comps["shareable_generator"]["path"] == "fedseg.flare.he.HEModelShareableGenerator"
    assert comps["persistor"]["args"]["filter_id"] == "serialize_filter"
    assert comps["serialize_filter"]["path"] == "fedseg.flare.he.HEModelSerializeFilter"
    assert "test_evaluator" not in comps and "best_model" not in comps  # the server holds no secret key
    final = server["workflows"][1]["args"]
    assert final["encrypted_model"] is True and final["test_evaluator_id"] == "" and final["best_model_id"] == ""
    enc = next(f for g in _client(REPO / "jobs/fedgs_lits_he")["task_result_filters"] for f in g["filters"])
    assert enc["args"]["weigh_by_local_iter"] is True
    he, plain = JOBS["fedgs_lits_he"].summary(), JOBS["fedgs_lits"].summary()
    changed = {k for k in he if he[k] != plain.get(k)}  # he_encrypt_layers None: every tensor, as FLARE's default
    assert changed == {"job_name", "description", "he", "test_every_n_rounds"}


def test_dp_jobs_differ_only_in_clipping_and_he():
    adp, fixed, both = (JOBS[n].summary() for n in ("fedgs_lits_adp", "fedgs_lits_dp_fixed", "fedgs_lits_adp_he"))
    assert adp["dp"] == "adaptive" and fixed["dp"] == "fixed" and both["dp"] == "adaptive"
    assert {k for k in adp if adp[k] != fixed[k]} == {"job_name", "description", "dp"}
    assert {k for k in adp if adp.get(k) != both.get(k)} | {k for k in both if k not in adp} == {
        "job_name", "description", "he", "he_encrypt_layers", "test_every_n_rounds"}
    server = _server(REPO / "jobs/fedgs_lits_adp")
    assert any(c["id"] == "privacy_recorder" for c in server["components"])
    assert server["workflows"][1]["args"]["privacy_recorder_id"] == "privacy_recorder"


def test_bad_privacy_settings_are_refused():
    from dataclasses import replace

    with pytest.raises(ValueError, match="dp must be one of"):
        replace(JOBS["fedgs_lits"], dp="laplace")
    with pytest.raises(ValueError, match="dp_budget_action"):
        replace(JOBS["fedgs_lits_adp"], dp_budget_action="abort")
    with pytest.raises(ValueError, match="choose one"):
        replace(JOBS["fedgs_lits_csahe"], he=True)


def test_plaintext_jobs_resume_he_jobs_do_not_and_paper_jobs_ask_for_a_gpu():
    for name, job in JOBS.items():
        server = _server(REPO / "jobs" / name)
        path = server["workflows"][-2]["path"]  # the training workflow (ResFIM jobs exchange styles before it)
        if job.secure_aggregation == "csahe":
            continue
        if job.he or job.personalization != "none":  # personalized: the sites' own models do not survive a restart
            assert path == "nvflare.app_common.workflows.scatter_and_gather.ScatterAndGather", name
        else:
            assert path == "fedseg.flare.resume.ResumableScatterAndGather", name
            assert server["workflows"][-2]["args"]["job_name"] == name
        meta = json.loads((REPO / "jobs" / name / "meta.json").read_text())
        if job.scale == "paper":
            assert meta["resource_spec"]["@default"]["num_of_gpus"] == 1, name
        else:
            assert meta["resource_spec"] == {}, name
    assert json.loads((REPO / "jobs" / "fedgs_lits_paper" / "meta.json").read_text())["resource_spec"] == {
        "@default": {"num_of_gpus": 1, "mem_per_gpu_in_GiB": 8.0}}


@pytest.mark.parametrize("name, method", [("resfim_polypgen", "resfim"), ("fedper_polypgen", "fedper")])
def test_personalized_jobs_use_partial_sharing_and_match_their_fedavg_baseline(name, method):
    server, client = _server(REPO / "jobs" / name), json.loads(
        (REPO / "jobs" / name / "app/config/config_fed_client.json").read_text())
    executor = client["executors"][0]
    assert executor["executor"]["path"] == "fedseg.flare.personalized_executor.PersonalizedTrainer"
    assert executor["executor"]["args"]["personalization"] == method
    agg = next(c for c in server["components"] if c["id"] == "aggregator")
    assert agg["path"] == "fedseg.flare.personalized_aggregator.PersonalizedAggregator"
    ids = [w["id"] for w in server["workflows"]]
    if method == "resfim":
        assert ids == ["style_exchange", "scatter_and_gather", "final_evaluation"]
        assert {"resfim_style", "resfim_style_bank"} <= set(executor["tasks"])
    else:
        assert ids == ["scatter_and_gather", "final_evaluation"] and "resfim_style" not in executor["tasks"]
    # the comparison is fair: everything but the personalization equals the FedAvg baseline job
    base, job = JOBS["fedavg_polypgen"], JOBS[name]
    for f in ("dataset", "data_args", "model", "model_args", "num_rounds", "local_epochs", "lr", "batch_size",
              "aggregation", "min_clients", "seed"):
        assert getattr(job, f) == getattr(base, f), f


@pytest.mark.parametrize("change, match", [({"he": True}, "does not combine"), ({"dp": "adaptive"}, "does not combine"),
                                           ({"robust_rule": "median"}, "does not combine"),
                                           ({"personalization": "fedbn"}, "must be one of"),
                                           ({"personalization_args": {"fraction": 2.0}}, "fraction must be in"),
                                           ({"personalization_args": {"frac": 0.1}}, "unknown personalization_args")])
def test_personalized_job_settings_are_checked_when_the_recipe_is_built(change, match):
    from dataclasses import replace

    from fedseg.errors import ConfigError

    with pytest.raises((ValueError, ConfigError), match=match):
        replace(JOBS["resfim_polypgen"], **change)


def test_robust_args_that_do_not_fit_the_rule_fail_when_the_recipe_is_built():
    from dataclasses import replace

    with pytest.raises(ValueError, match=r"do not fit robust_rule 'median'.*robust_args=\{\}"):
        replace(JOBS["fedgs_lits_robust"], robust_args={"factor": 3.0})  # norm screening's parameter, not median's
    job = replace(JOBS["fedgs_lits_robust"], robust_rule="norm_screening", robust_args={"factor": 3.0})
    assert job.robust_rule == "norm_screening"
