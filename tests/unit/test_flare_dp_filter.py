"""AdaptiveDPFilter and PrivacyRecorder driven with real FLARE DXO / Shareable / FLContext objects, and the results
folder's privacy section."""

import json
import logging

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import make_reply
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType

from fedseg.errors import ConfigError
from fedseg.flare.dp_filter import BUDGET_EXHAUSTED, AdaptiveDPFilter
from fedseg.flare.privacy_recorder import PrivacyRecorder
from fedseg.results import write_results


class Sender:
    """Stands in for the TBWriter analytic sender: keeps (tag, value, step)."""

    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, global_step=None):
        self.scalars.append((tag, value, global_step))


class Workspace:
    def __init__(self, root):
        self.root = root

    def get_run_dir(self, job_id):
        return str(self.root)


class Engine:
    """The parts of a FLARE engine a filter / server widget touches: components, events, workspace."""

    def __init__(self, components=None, root=None):
        self.components = components or {}
        self.root = root

    def get_component(self, cid):
        return self.components.get(cid)

    def fire_event(self, event_type, fl_ctx):
        pass

    def get_workspace(self):
        return Workspace(self.root)


def _ctx(site="site-1", engine=None):
    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    ctx.set_prop(ReservedKey.ENGINE, engine if engine is not None else Engine({"analytic_sender": Sender()}),
                 private=True, sticky=False)
    return ctx


def _update(scale=0.01, d=1000, seed=0):
    rng = np.random.default_rng(seed)
    return {"conv.weight": (scale * rng.standard_normal((d // 2, 2))).astype(np.float32),
            "conv.bias": (scale * rng.standard_normal(d // 2)).astype(np.float32)}


def _result(update, rnd=None, kind=DataKind.WEIGHT_DIFF):
    shareable = DXO(data_kind=kind, data={k: v.copy() for k, v in update.items()},
                    meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 7, "val_metrics": {"dice": 0.5}}).to_shareable()
    if rnd is not None:
        shareable.set_header(AppConstants.CURRENT_ROUND, rnd)
    return shareable


def _filter(**kw):
    args = dict(mechanism="laplace", epsilon=2.0, clipping="adaptive", clip_init=1.0, quantile_epsilon=0.5, seed=3)
    args.update(kw)
    return AdaptiveDPFilter(**args)


def test_meta_carries_the_report_and_the_accounting_and_other_meta_is_kept():
    f = _filter()
    update = _update()
    ctx = _ctx()
    out = f.process(_result(update, rnd=4), ctx)
    assert out.get_return_code() == ReturnCode.OK
    dxo = from_shareable(out)
    dp = dxo.get_meta_prop("dp")
    for key in ("mechanism", "clipping", "epsilon", "clip", "sensitivity", "noise_scale", "next_clip",
                "epsilon_total", "delta_total", "round", "accountant", "budget_epsilon", "over_budget"):
        assert key in dp, key
    assert dp["mechanism"] == "laplace" and dp["clipping"] == "adaptive" and dp["accountant"] == "pure"
    assert dp["round"] == 4 and dp["over_budget"] is False and dp["budget_epsilon"] is None
    assert dp["epsilon_total"] == pytest.approx(2.5) and dp["epsilon_round"] == pytest.approx(2.5)
    assert dp["delta_total"] == 0.0
    json.dumps(dp)  # public and JSON-able
    assert dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == 7 and dxo.get_meta_prop("val_metrics")["dice"] == 0.5
    assert dxo.data_kind == DataKind.WEIGHT_DIFF
    assert set(dxo.data) == set(update)
    for k, v in update.items():
        assert dxo.data[k].shape == v.shape and dxo.data[k].dtype == v.dtype
        assert not np.allclose(dxo.data[k], v)
    sender = ctx.get_engine().get_component("analytic_sender")
    tags = {t: (v, s) for t, v, s in sender.scalars}
    assert set(tags) == {"dp_epsilon_total", "dp_clip", "dp_noise_scale"}
    assert tags["dp_epsilon_total"] == (pytest.approx(2.5), 4) and tags["dp_clip"][0] == pytest.approx(1.0)


def test_laplace_noise_matches_its_calibration():
    """Fixed L1 clipping far above the update's norm: the released update is the update plus Laplace noise of scale
    b = 2C / epsilon (replace adjacency); the empirical mean |noise| estimates b."""
    clip, eps = 50.0, 4.0
    f = _filter(clipping="fixed", clip_init=clip, epsilon=eps)
    update = _update(scale=1e-4, d=40_000)
    assert sum(float(np.abs(v).sum()) for v in update.values()) < clip  # nothing is clipped
    dxo = from_shareable(f.process(_result(update), _ctx()))
    dp = dxo.get_meta_prop("dp")
    assert dp["sensitivity"] == pytest.approx(2 * clip) and dp["noise_scale"] == pytest.approx(2 * clip / eps)
    assert dp["epsilon_total"] == pytest.approx(eps)  # fixed clipping spends nothing on a quantile
    noise = np.concatenate([(dxo.data[k].astype(np.float64) - update[k]).ravel() for k in update])
    assert np.mean(np.abs(noise)) == pytest.approx(2 * clip / eps, rel=0.03)
    assert abs(np.mean(noise)) < 0.05 * 2 * clip / eps


def test_accountant_totals_after_k_rounds_equal_basic_composition():
    eps, q, k = 0.7, 0.2, 6
    f = _filter(epsilon=eps, quantile_epsilon=q)
    totals, rounds = [], []
    for r in range(k):
        dp = from_shareable(f.process(_result(_update(seed=r)), _ctx())).get_meta_prop("dp")
        totals.append(dp["epsilon_total"])
        rounds.append(dp["round"])
    assert totals == pytest.approx([(r + 1) * (eps + q) for r in range(k)])
    assert rounds == list(range(k))  # no round in the result or context: the filter counts its results


def test_gaussian_uses_the_rdp_accountant_of_the_whole_run():
    from fedseg.algorithms.adaptive_dp import DPConfig
    from fedseg.algorithms.dp_accountant import get_accountant

    f = _filter(mechanism="gaussian", epsilon=1.0, delta=1e-5)
    totals = [from_shareable(f.process(_result(_update(seed=r)), _ctx())).get_meta_prop("dp") for r in range(4)]
    assert totals[-1]["accountant"] == "rdp"
    config = DPConfig(mechanism="gaussian", epsilon=1.0, delta=1e-5, clipping="adaptive", clip_init=1.0,
                      quantile_epsilon=0.5)
    fresh = get_accountant("rdp", config)
    for r, dp in enumerate(totals):
        assert (dp["epsilon_total"], dp["delta_total"]) == pytest.approx(fresh.spent(rounds=r + 1))
    assert totals[0]["epsilon_total"] < totals[1]["epsilon_total"] < totals[3]["epsilon_total"]


def test_budget_warn_releases_and_flags_the_round_over_budget(caplog):
    f = _filter(epsilon=1.0, quantile_epsilon=0.5, budget_epsilon=3.0, budget_action="warn")
    flags = []
    with caplog.at_level(logging.WARNING):
        for r in range(3):
            out = f.process(_result(_update(seed=r), rnd=r), _ctx())
            assert out.get_return_code() == ReturnCode.OK
            flags.append(from_shareable(out).get_meta_prop("dp")["over_budget"])
    assert flags == [False, False, True]  # 1.5, 3.0 (exactly the budget) and 4.5
    assert "over the privacy budget" in caplog.text and "site-1" in caplog.text


def test_budget_stop_releases_nothing_once_the_next_round_would_exceed_it(caplog):
    f = _filter(epsilon=1.0, quantile_epsilon=0.5, budget_epsilon=3.0, budget_action="stop")
    for r in range(2):
        assert f.process(_result(_update(seed=r), rnd=r), _ctx()).get_return_code() == ReturnCode.OK
    for r in (2, 3):
        with caplog.at_level(logging.ERROR):
            out = f.process(_result(_update(seed=r), rnd=r), _ctx())
        assert out.get_return_code() == BUDGET_EXHAUSTED
        with pytest.raises(ValueError):
            from_shareable(out)  # no update in the reply
    assert f.accountant.rounds == 2 and f.accountant.spent()[0] == pytest.approx(3.0)
    assert "privacy budget exhausted" in caplog.text and "releasing nothing" in caplog.text


def test_an_update_with_nan_is_refused_with_the_site_named_and_costs_nothing(caplog):
    f = _filter()
    bad = _update()
    bad["conv.bias"][3] = np.nan
    with caplog.at_level(logging.ERROR):
        out = f.process(_result(bad, rnd=0), _ctx(site="site-7"))
    assert out.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    with pytest.raises(ValueError):
        from_shareable(out)
    assert "site-7" in caplog.text and "conv.bias" in caplog.text and "nothing released" in caplog.text
    assert f.accountant.rounds == 0
    dp = from_shareable(f.process(_result(_update(), rnd=1), _ctx())).get_meta_prop("dp")
    assert dp["epsilon_total"] == pytest.approx(2.5)


def test_a_train_result_that_is_not_a_weight_diff_is_not_released_unnoised(caplog):
    f = _filter()
    with caplog.at_level(logging.ERROR):
        out = f.process(_result(_update(), kind=DataKind.WEIGHTS), _ctx())
    assert out.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert "not WEIGHT_DIFF" in caplog.text


def test_error_replies_and_missing_sender_pass_through():
    f = _filter(analytic_sender_id="no_such_component")
    reply = make_reply(ReturnCode.EXECUTION_EXCEPTION)
    assert f.process(reply, _ctx()) is reply
    out = f.process(_result(_update()), _ctx())  # no analytic sender: released, nothing streamed
    assert out.get_return_code() == ReturnCode.OK


@pytest.mark.parametrize("kw, setting", [
    ({"epsilon": 0.0}, "epsilon"),
    ({"epsilon": -1.0}, "epsilon"),
    ({"percentile": 0.0}, "percentile"),
    ({"percentile": 100.5}, "percentile"),
    ({"mechanism": "gauss"}, "mechanism"),
    ({"clipping": "sometimes"}, "clipping"),
    ({"quantile_epsilon": 0.0}, "quantile_epsilon"),
    ({"budget_action": "halt"}, "budget_action"),
    ({"budget_epsilon": 0.0}, "budget_epsilon"),
    ({"budget_epsilon": "lots"}, "budget_epsilon"),
    ({"accountant": "moments"}, "accountant"),
    ({"seed": "x"}, "seed"),
])
def test_bad_settings_fail_at_construction(kw, setting):
    with pytest.raises(ConfigError, match=setting) as e:
        _filter(**kw)
    assert "AdaptiveDPFilter" in str(e.value)


def test_percentile_100_is_allowed():
    assert _filter(percentile=100.0).config.percentile == 100.0


# ---------------------------------------------------------------- server side: recorder and results folder

def _contribute(recorder, shareable, site, rnd, accepted=True):
    shareable.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    ctx = _ctx(site="server", engine=Engine())
    ctx.set_prop(AppConstants.TRAINING_RESULT, shareable, private=True, sticky=False)
    ctx.set_prop(AppConstants.CURRENT_ROUND, rnd, private=True, sticky=True)
    ctx.set_prop(AppConstants.AGGREGATION_ACCEPTED, accepted, private=True, sticky=False)
    recorder.handle_event(AppEventType.AFTER_CONTRIBUTION_ACCEPT, ctx)


def _recorded_run(tmp_path, rounds=3, unprotected_site=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    recorder = PrivacyRecorder()
    recorder.handle_event(EventType.START_RUN, _ctx(site="server", engine=Engine(root=tmp_path)))
    filters = {s: _filter(epsilon=1.0, quantile_epsilon=0.25, seed=i) for i, s in enumerate(("site-1", "site-2"))}
    for r in range(rounds):
        for site, f in filters.items():
            out = _result(_update(seed=r), rnd=r)
            if site != unprotected_site:
                out = f.process(out, _ctx(site=site))
            _contribute(recorder, out, site, r, accepted=(site, r) != ("site-2", 1))
    return recorder


def test_recorder_keeps_every_report_and_states_the_guarantee(tmp_path):
    recorder = _recorded_run(tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "privacy.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and {x["site"] for x in lines} == {"site-1", "site-2"}
    rejected = [x for x in lines if not x["accepted"]]
    assert [(x["site"], x["round"]) for x in rejected] == [("site-2", 1)]  # counted all the same
    summary = recorder.summary()
    assert summary["by_round"] == lines
    for site in ("site-1", "site-2"):
        s = summary["per_site"][site]
        assert s["rounds"] == 3 and s["protected"] is True
        assert s["epsilon_total"] == pytest.approx(3 * 1.25) and s["epsilon_round"] == pytest.approx(1.25)
        assert s["round"] == 2 and s["accountant"] == "pure"
    text = summary["guarantee"]
    assert "one site's model update in one round" in text and "replace" in text
    assert "3.75" in text and "1.25" in text and "pure accountant" in text
    assert "Not covered" in text and "WITHOUT" not in text


def test_recorder_flags_a_site_without_the_dp_filter(tmp_path):
    summary = _recorded_run(tmp_path, rounds=2, unprotected_site="site-2").summary()
    assert summary["per_site"]["site-2"]["protected"] is False
    assert summary["per_site"]["site-2"]["unprotected_rounds"] == 2
    assert "WITHOUT a differential-privacy report" in summary["guarantee"] and "site-2" in summary["guarantee"]


def test_results_folder_privacy_section_json_and_plot(tmp_path):
    privacy = _recorded_run(tmp_path / "run").summary()
    m = {"dice": 0.5, "dice_s": 0.4, "dice_l": 0.6, "n": 4, "n_small": 1, "n_large": 2}
    paths = write_results(tmp_path / "res", job_name="fedgs_lits_adp", site_metrics={"site-1": m, "site-2": m},
                          test_metrics=m, privacy=privacy)
    assert json.loads(paths["privacy"].read_text()) == json.loads(json.dumps(privacy))
    assert json.loads(paths["metrics"].read_text())["privacy"]["per_site"]["site-1"]["epsilon_total"] == \
        pytest.approx(3.75)
    md = paths["table"].read_text()
    assert "## Privacy" in md and "| site-1 | laplace | adaptive | 3 | 1.25 | 3.75 | 0 | pure | " in md
    assert "one site's model update in one round" in md
    assert paths["privacy_plot"].read_bytes()[:4] == b"\x89PNG"


def test_results_folder_without_privacy_has_no_privacy_output(tmp_path):
    m = {"dice": 0.5, "dice_s": 0.4, "dice_l": 0.6, "n": 4}
    paths = write_results(tmp_path / "res", job_name="j", site_metrics={"site-1": m})
    assert "privacy" not in paths and not (tmp_path / "res" / "privacy.json").exists()
    assert "privacy" not in json.loads(paths["metrics"].read_text())
    assert "Privacy" not in paths["table"].read_text()
