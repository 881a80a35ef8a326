"""FedGSAggregator (FLARE adapter) with real FLARE objects: step weighting, rejections, too few sites."""

import numpy as np
import pytest

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import make_reply
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants

from fedseg.flare.aggregator import FedGSAggregator

GLOBAL = {"w": np.zeros((2, 2), np.float32), "bn.running_mean": np.zeros(2, np.float32),
          "bn.num_batches_tracked": np.array(5, np.int64)}


def _ctx(round_num=3):
    ctx = FLContext()
    ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(GLOBAL, {}), private=True, sticky=False)
    ctx.set_prop(AppConstants.CURRENT_ROUND, round_num, private=True, sticky=False)
    return ctx


def _result(site, w, bn, steps, round_num=3, kind=DataKind.WEIGHT_DIFF, extra=None):
    data = {"w": np.asarray(w, np.float32), "bn.running_mean": np.asarray(bn, np.float32), **(extra or {})}
    s = DXO(data_kind=kind, data=data, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: steps}).to_shareable()
    s.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    s.add_cookie(AppConstants.CONTRIBUTION_ROUND, round_num)
    return s


def test_step_weighted_mean_hand_computed():
    agg, ctx = FedGSAggregator(), _ctx()
    assert agg.accept(_result("site-1", [[1, 1], [1, 1]], [2, 0], 10), ctx)
    assert agg.accept(_result("site-2", [[4, 0], [0, 4]], [0, 2], 30), ctx)
    out = from_shareable(agg.aggregate(ctx))
    assert out.data_kind == DataKind.WEIGHT_DIFF
    np.testing.assert_allclose(out.data["w"], [[0.25 + 3.0, 0.25], [0.25, 0.25 + 3.0]])
    np.testing.assert_allclose(out.data["bn.running_mean"], [0.5, 1.5])
    assert "bn.num_batches_tracked" not in out.data
    assert out.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == 40


@pytest.mark.parametrize("bad, reason", [
    (lambda: _result("site-2", [[np.nan, 0], [0, 0]], [0, 0], 5), "NaN/Inf"),
    (lambda: _result("site-2", [[1, 2, 3]], [0, 0], 5), "shape"),
    (lambda: _result("site-2", [[0, 0], [0, 0]], [0, 0], 0), "NUM_STEPS"),
    (lambda: _result("site-2", [[0, 0], [0, 0]], [0, 0], 5, round_num=2), "round 2"),
    (lambda: _result("site-2", [[0, 0], [0, 0]], [0, 0], 5, kind=DataKind.WEIGHTS), "WEIGHT_DIFF"),
    (lambda: _result("site-2", [[0, 0], [0, 0]], [0, 0], 5, extra={"bn.num_batches_tracked": np.array(1)}), "integer"),
])
def test_bad_contributions_are_rejected_and_the_round_goes_on(bad, reason):
    agg, ctx = FedGSAggregator(), _ctx()
    assert agg.accept(_result("site-1", [[1, 1], [1, 1]], [0, 0], 10), ctx)
    assert not agg.accept(bad(), ctx)
    assert "site-2" in agg.rejected and reason in agg.rejected["site-2"]
    out = from_shareable(agg.aggregate(ctx))
    np.testing.assert_allclose(out.data["w"], np.ones((2, 2)))  # only site-1 counted
    assert out.get_meta_prop("contributors") == ["site-1"]


def test_a_second_update_from_the_same_site_is_rejected():
    agg, ctx = FedGSAggregator(), _ctx()
    assert agg.accept(_result("site-1", [[1, 1], [1, 1]], [0, 0], 10), ctx)
    assert not agg.accept(_result("site-1", [[9, 9], [9, 9]], [0, 0], 10), ctx)


def test_error_return_code_is_rejected():
    agg, ctx = FedGSAggregator(), _ctx()
    reply = make_reply(ReturnCode.EXECUTION_EXCEPTION)
    reply.set_peer_props({ReservedKey.IDENTITY_NAME: "site-3"})
    assert not agg.accept(reply, ctx)


def test_fewer_valid_sites_than_min_accepted_keeps_the_global_model():
    agg, ctx = FedGSAggregator(min_accepted=2), _ctx()
    assert agg.accept(_result("site-1", [[1, 1], [1, 1]], [0, 0], 10), ctx)
    assert not agg.accept(_result("site-2", [[np.inf, 0], [0, 0]], [0, 0], 10), ctx)
    out = from_shareable(agg.aggregate(ctx))
    assert out.data == {}  # FullModelShareableGenerator adds nothing: the model is unchanged
    with pytest.raises(ValueError):
        FedGSAggregator(min_accepted=0)


def test_state_resets_between_rounds():
    agg = FedGSAggregator()
    assert agg.accept(_result("site-1", [[1, 1], [1, 1]], [0, 0], 10, round_num=3), _ctx(3))
    agg.aggregate(_ctx(3))
    assert agg.accept(_result("site-1", [[2, 2], [2, 2]], [0, 0], 10, round_num=4), _ctx(4))
    out = from_shareable(agg.aggregate(_ctx(4)))
    np.testing.assert_allclose(out.data["w"], 2 * np.ones((2, 2)))
