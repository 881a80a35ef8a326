"""RobustAggregator (FLARE adapter over fedseg.algorithms.robust) with real FLARE objects: one attacker among five
sites does not move the aggregate; the rule's choice is logged and put in the meta; checks as in FedGSAggregator."""

import numpy as np
import pytest
from nvflare.apis.dxo import MetaKey, from_shareable

from fedseg.errors import ConfigError
from fedseg.flare.aggregator import FedGSAggregator
from fedseg.flare.robust_aggregator import RobustAggregator

from test_flare_aggregator import _ctx, _result  # tests/unit is on sys.path (rootdir-relative import)

HONEST = {f"site-{i}": (np.full((2, 2), 1.0 + 0.1 * i), [0.1 * i, -0.1 * i], 10 + i) for i in range(1, 5)}
ATTACK = ("site-5", np.full((2, 2), 100.0), [50.0, 50.0], 12)  # a scaled (model-replacement) update


def _round(agg):
    ctx = _ctx()
    for site, (w, bn, steps) in HONEST.items():
        assert agg.accept(_result(site, w, bn, steps), ctx)
    assert agg.accept(_result(*ATTACK), ctx)
    return from_shareable(agg.aggregate(ctx))


def test_the_plain_step_weighted_mean_is_moved_by_one_attacker():
    out = _round(FedGSAggregator())
    assert out.data["w"].min() > 10  # sanity: the attack works against FedGS's mean


@pytest.mark.parametrize("rule, args", [("median", {}), ("trimmed_mean", {"beta": 0.2}), ("krum", {"f": 1}),
                                        ("multi_krum", {"f": 1, "m": 3}), ("norm_screening", {"factor": 3.0})])
def test_robust_rules_keep_the_aggregate_within_the_honest_range(rule, args):
    out = _round(RobustAggregator(rule=rule, rule_args=args))
    honest_w = np.stack([w for w, _, _ in HONEST.values()])
    assert honest_w.min() - 1e-6 <= out.data["w"].min() and out.data["w"].max() <= honest_w.max() + 1e-6
    assert "bn.num_batches_tracked" not in out.data
    kept = out.get_meta_prop("robust_kept")
    if rule in ("krum", "multi_krum", "norm_screening"):
        assert "site-5" not in kept
    if rule == "norm_screening":
        assert set(out.get_meta_prop("robust_rejected")) == {"site-5"}
        steps = sum(s for _, _, s in HONEST.values())
        expected = sum(s * w for w, _, s in HONEST.values()) / steps  # FedGS mean over the kept sites
        np.testing.assert_allclose(out.data["w"], expected, rtol=1e-6)
        assert out.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == steps


def test_too_few_sites_for_the_rule_keep_the_global_model():
    agg, ctx = RobustAggregator(rule="krum", rule_args={"f": 1}), _ctx()
    assert agg.min_accepted == 5  # Krum with f = 1 needs n >= 2f + 3
    for site, (w, bn, steps) in list(HONEST.items())[:3]:
        assert agg.accept(_result(site, w, bn, steps), ctx)
    out = from_shareable(agg.aggregate(ctx))
    assert out.data == {} and out.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == 0


def test_bad_rule_configuration_fails_when_the_job_is_loaded():
    with pytest.raises(ConfigError):
        RobustAggregator(rule="mean_of_whatever")
    with pytest.raises(ConfigError):
        RobustAggregator(rule="trimmed_mean", rule_args={"beta": 0.7})


def test_the_log_names_only_the_aggregated_sites_and_every_sites_score(caplog):
    with caplog.at_level("INFO"):
        _round(RobustAggregator(rule="norm_screening", rule_args={"factor": 3.0}))
    text = caplog.text
    assert "aggregated 4 site(s) ['site-1', 'site-2', 'site-3', 'site-4']" in text  # not the rejected site-5
    scores = next(line for line in text.splitlines() if "norm_screening scores:" in line)
    assert all(f"site-{i} " in scores for i in range(1, 6)) and "median_norm" in scores and "bound" in scores
