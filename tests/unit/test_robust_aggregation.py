"""Robust aggregation rules (fedseg.algorithms.robust) against hand-computed / brute-force numpy references."""

import itertools

import numpy as np
import pytest
from fedseg.algorithms import robust
from fedseg.algorithms.robust import (
    CoordinateMedian,
    Krum,
    MultiKrum,
    NormScreening,
    TrimmedMean,
    make_rule,
    robust_aggregate,
    stack_updates,
    weighted_median,
)
from fedseg.errors import ConfigError, UpdateRejected
from scipy import stats

SITES = ["site-1", "site-2", "site-3", "site-4", "site-5"]


def _updates_from_rows(rows, sites=SITES):
    """Site -> {"w": (2, 2), "b": (3,)} from rows of 7 values (b first: the stacked layout sorts names)."""
    rows = np.asarray(rows, dtype=np.float64)
    return {
        s: {"w": r[3:].reshape(2, 2).astype(np.float32), "b": r[:3].astype(np.float32)} for s, r in zip(sites, rows)
    }


def _honest(seed=0, n=4, d=7):
    return np.random.default_rng(seed).normal(size=(n, d))


def _all_rules():
    return [CoordinateMedian(), TrimmedMean(0.2), Krum(f=1), MultiKrum(f=1, m=3), MultiKrum(f=1), NormScreening(3.0)]


# ----------------------------------------------------------------------------------------------------- stacking


def test_stack_layout_sorted_names_and_integer_entries_skipped():
    ups = {
        "a": {"w": np.arange(4, dtype=np.float32).reshape(2, 2), "b": np.array([9.0, 8.0]), "idx": np.arange(3)},
        "b": {"w": np.ones((2, 2), np.float32), "b": np.zeros(2), "idx": np.arange(3)},
    }
    st = stack_updates(ups)
    assert st.sites == ("a", "b") and st.names == ("b", "w") and st.skipped == ("idx",)
    assert st.X.dtype == np.float64 and st.X.shape == (2, 6)
    np.testing.assert_array_equal(st.X[0], [9, 8, 0, 1, 2, 3])
    back = st.unstack(st.X[0])
    assert set(back) == {"b", "w"} and back["w"].shape == (2, 2) and back["w"].dtype == np.float32
    np.testing.assert_array_equal(back["w"], ups["a"]["w"])


def test_integer_entries_never_enter_the_aggregate():
    rows = _honest(1, n=5)
    ups = _updates_from_rows(rows)
    for s in ups:
        ups[s]["bn.num_batches_tracked"] = np.array(7, dtype=np.int64)
    for rule in _all_rules():
        res = rule.aggregate(ups)
        assert set(res.aggregate) == {"w", "b"} and res.skipped == ("bn.num_batches_tracked",)


# ----------------------------------------------------------------------------------------------------- median


def test_weighted_median_hand_computed():
    x = np.array([[1.0], [2.0], [3.0], [4.0], [5.0]])
    assert weighted_median(x)[0] == 3.0
    assert weighted_median(x, np.ones(5))[0] == 3.0
    # W = 14, half 7: cumulative 1, 2, 3, 4, 14 -> the fifth value
    assert weighted_median(x, np.array([1.0, 1, 1, 1, 10]))[0] == 5.0
    # W = 7, half 3.5: cumulative 3, 4 -> the second value
    assert weighted_median(x, np.array([3.0, 1, 1, 1, 1]))[0] == 2.0
    # exact tie at half the weight: W = 6, cumulative 1, 3 -> midpoint of 2 and 3
    y = np.array([[4.0], [1.0], [3.0], [2.0]])  # unsorted on purpose; weights follow the rows
    assert weighted_median(y, np.array([1.0, 1.0, 2.0, 2.0]))[0] == 2.5
    # even n, equal weights: np.median's midpoint
    assert weighted_median(y, np.full(4, 0.1))[0] == 2.5


def test_weighted_median_minimises_weighted_absolute_deviation():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(6, 40))
    w = rng.uniform(0.5, 3.0, size=6)
    m = weighted_median(X, w)

    def cost(col, v):
        return float(np.sum(w * np.abs(col - v)))

    for j in range(X.shape[1]):
        best = min(cost(X[:, j], v) for v in X[:, j])  # the minimum is attained at a data point
        assert cost(X[:, j], m[j]) == pytest.approx(best, rel=1e-12, abs=1e-12)


def test_coordinate_median_matches_numpy_and_scores_are_distances():
    rows = _honest(2, n=5)
    res = CoordinateMedian().aggregate(_updates_from_rows(rows), dtype=np.float64)
    X = stack_updates(_updates_from_rows(rows)).X
    ref = np.median(X, axis=0)
    np.testing.assert_allclose(res.aggregate["b"], ref[:3], rtol=0, atol=0)
    np.testing.assert_allclose(res.aggregate["w"], ref[3:].reshape(2, 2), rtol=0, atol=0)
    assert res.kept == tuple(SITES) and res.rejected == {}
    for k, s in enumerate(SITES):
        assert res.scores[s] == pytest.approx(np.linalg.norm(X[k] - ref))


def test_weighted_coordinate_median_hand_computed():
    # coordinate 0 of b: values 5, 1, 4, 2, 3 with steps 1, 1, 1, 1, 6 -> W 10, sorted 1(1) 2(1) 3(6): cum 1, 2, 8 -> 3
    rows = np.zeros((5, 7))
    rows[:, 0] = [5, 1, 4, 2, 3]
    rows[:, 1] = [5, 1, 4, 2, 3]
    steps = dict(zip(SITES, [1, 1, 1, 1, 6]))
    res = CoordinateMedian().aggregate(_updates_from_rows(rows), steps)
    assert res.aggregate["b"][0] == 3.0
    steps = dict(zip(SITES, [6, 1, 1, 1, 1]))  # now the value 5 holds more than half -> 5
    res = CoordinateMedian().aggregate(_updates_from_rows(rows), steps)
    assert res.aggregate["b"][1] == 5.0


# ----------------------------------------------------------------------------------------------------- trimmed mean


def test_trimmed_mean_matches_scipy_and_hand_computed():
    rows = _honest(4, n=5)
    ups = _updates_from_rows(rows)
    X = stack_updates(ups).X
    res = TrimmedMean(0.2).aggregate(ups, dtype=np.float64)
    ref = stats.trim_mean(X, 0.2, axis=0)
    np.testing.assert_allclose(np.concatenate([res.aggregate["b"], res.aggregate["w"].ravel()]), ref, rtol=1e-12)
    # hand-computed: one coordinate 10, 1, 3, 2, -5 -> drop -5 and 10 -> mean(1, 3, 2) = 2
    rows = np.zeros((5, 7))
    rows[:, 0] = [10, 1, 3, 2, -5]
    res = TrimmedMean(0.2).aggregate(_updates_from_rows(rows))
    assert res.aggregate["b"][0] == pytest.approx(2.0)
    assert res.details["trimmed_per_side"] == 1
    # site-1 (10) and site-5 (-5) were trimmed at coordinate 0; ties among zeros elsewhere trim by site order
    assert res.scores["site-1"] > 0 and res.scores["site-5"] > 0


def test_weighted_trimmed_mean_trims_by_count_then_steps_weighted_mean():
    rows = np.zeros((5, 7))
    rows[:, 0] = [10, 1, 3, 2, -5]
    steps = dict(zip(SITES, [1, 2, 3, 4, 5]))
    res = TrimmedMean(0.2).aggregate(_updates_from_rows(rows), steps)
    # kept: 1 (w 2), 3 (w 3), 2 (w 4) -> (2 + 9 + 8) / 9
    assert res.aggregate["b"][0] == pytest.approx(19.0 / 9.0)
    # a trimmed site claiming huge steps changes nothing: it is trimmed by count
    steps["site-1"] = 1e9
    res2 = TrimmedMean(0.2).aggregate(_updates_from_rows(rows), steps)
    assert res2.aggregate["b"][0] == pytest.approx(19.0 / 9.0)


def test_trimmed_mean_beta_zero_is_the_plain_mean():
    rows = _honest(5, n=3)
    ups = _updates_from_rows(rows, SITES[:3])
    res = TrimmedMean(0.0).aggregate(ups, dtype=np.float64)
    X = stack_updates(ups).X
    np.testing.assert_allclose(res.aggregate["b"], X.mean(axis=0)[:3], rtol=1e-12)


# ----------------------------------------------------------------------------------------------------- Krum


def _scalar_updates(values, sites=None):
    sites = sites or [f"s{i}" for i in range(len(values))]
    return {s: {"v": np.array([float(x)])} for s, x in zip(sites, values)}


def test_krum_scores_hand_computed():
    # n = 5, f = 1: n - f - 2 = 2 nearest neighbours
    ups = _scalar_updates([0, 1, 2, 3, 100])
    res = Krum(f=1).aggregate(ups, dtype=np.float64)
    expected = {"s0": 1 + 4, "s1": 1 + 1, "s2": 1 + 1, "s3": 1 + 4, "s4": 97**2 + 98**2}
    for s, v in expected.items():
        assert res.scores[s] == pytest.approx(v)
    # s1 and s2 tie at 2: the earlier site wins
    assert res.kept == ("s1",) and res.aggregate["v"][0] == 1.0
    assert set(res.rejected) == {"s0", "s2", "s3", "s4"} and "score" in res.rejected["s4"]


def test_multi_krum_hand_computed_plain_and_steps_weighted():
    ups = _scalar_updates([0, 1, 2, 3, 100])
    res = MultiKrum(f=1, m=3).aggregate(ups, dtype=np.float64)
    # scores s1 = s2 = 2, s0 = s3 = 5 -> s1, s2 and (stable tie-break) s0
    assert res.kept == ("s0", "s1", "s2")
    assert res.aggregate["v"][0] == pytest.approx(1.0)
    steps = {"s0": 1, "s1": 1, "s2": 2, "s3": 1, "s4": 1000}
    res = MultiKrum(f=1, m=3).aggregate(ups, steps, dtype=np.float64)
    assert res.aggregate["v"][0] == pytest.approx((0 * 1 + 1 * 1 + 2 * 2) / 4)
    # default m = n - f = 4: everything but the outlier
    res = MultiKrum(f=1).aggregate(ups, dtype=np.float64)
    assert res.kept == ("s0", "s1", "s2", "s3") and list(res.rejected) == ["s4"]
    assert res.aggregate["v"][0] == pytest.approx(1.5)


def test_krum_scores_match_brute_force_even_with_a_large_common_offset():
    rng = np.random.default_rng(6)
    X = rng.normal(size=(7, 50)) + 1e4  # the centring keeps the Gram trick accurate
    rule = Krum(f=2)
    got = rule.scores(X)
    n, f = X.shape[0], 2
    for i in range(n):
        d = sorted(float(np.sum((X[i] - X[j]) ** 2)) for j in range(n) if j != i)
        assert got[i] == pytest.approx(sum(d[: n - f - 2]), rel=1e-9)


def test_krum_needs_n_at_least_2f_plus_3():
    ups = _updates_from_rows(_honest(7, n=5))
    with pytest.raises(ConfigError) as e:
        Krum(f=2).aggregate(ups)
    msg = str(e.value)
    assert "f=2" in msg and "2f + 3 = 7" in msg and "n=5" in msg and "lower f to 1" in msg
    Krum(f=1).aggregate(ups)  # 5 >= 5 is fine
    with pytest.raises(ConfigError, match="n - f"):
        MultiKrum(f=1, m=5).aggregate(ups)
    with pytest.raises(ConfigError):
        Krum(f=-1)
    with pytest.raises(ConfigError):
        MultiKrum(f=1, m=0)


# ----------------------------------------------------------------------------------------------------- norm screening


def test_norm_screening_hand_computed():
    # norms 1, 2, 3, 4, 50: median 3, factor 3 -> bound 9 -> only the last is rejected
    ups = _scalar_updates([1, -2, 3, 4, 50])
    res = NormScreening(3.0).aggregate(ups, dtype=np.float64)
    assert res.kept == ("s0", "s1", "s2", "s3") and list(res.rejected) == ["s4"]
    assert "exceeds" in res.rejected["s4"] and res.details["bound"] == pytest.approx(9.0)
    assert res.aggregate["v"][0] == pytest.approx((1 - 2 + 3 + 4) / 4)
    assert res.scores["s1"] == pytest.approx(2.0)
    steps = {"s0": 1, "s1": 2, "s2": 3, "s3": 4, "s4": 100}
    res = NormScreening(3.0).aggregate(ups, steps, dtype=np.float64)
    assert res.aggregate["v"][0] == pytest.approx((1 * 1 - 2 * 2 + 3 * 3 + 4 * 4) / 10)
    # a looser factor keeps everyone: the steps-weighted mean of all (FedGS)
    res = NormScreening(20.0).aggregate(ups, steps, dtype=np.float64)
    assert res.rejected == {} and res.aggregate["v"][0] == pytest.approx((1 - 4 + 9 + 16 + 5000) / 110)


# ----------------------------------------------------------------------------------------------------- one outlier


@pytest.mark.parametrize("attack", ["scaled", "noise"])
@pytest.mark.parametrize("weighted", [False, True])
def test_one_outlier_site_is_contained(attack, weighted):
    honest = _honest(8, n=4)
    rng = np.random.default_rng(9)
    outlier = 100.0 * honest[0] if attack == "scaled" else rng.normal(scale=100.0, size=honest.shape[1])
    rows = np.vstack([honest, outlier])
    ups = _updates_from_rows(rows)
    # the attacker also claims many steps in the weighted case
    steps = dict(zip(SITES, [10, 12, 9, 11, 1000])) if weighted else None
    lo, hi = honest.min(axis=0), honest.max(axis=0)
    layout = stack_updates(ups)

    def flat(res):
        return np.concatenate([res.aggregate["b"].astype(np.float64), res.aggregate["w"].astype(np.float64).ravel()])

    # sanity: the plain (steps-weighted) mean IS moved out of the honest range, so the checks below can fail
    mean = robust._weighted_mean(layout.X, None if steps is None else np.array(list(steps.values()), float))
    assert np.any((mean < lo - 1e-6) | (mean > hi + 1e-6))

    eps = 1e-6
    rules = [TrimmedMean(0.2)] + ([] if weighted else [CoordinateMedian()])
    for rule in rules:
        agg = flat(rule.aggregate(ups, steps))
        assert np.all(agg >= lo - eps) and np.all(agg <= hi + eps), rule
    for rule in (Krum(f=1), MultiKrum(f=1, m=3), MultiKrum(f=1)):
        res = rule.aggregate(ups, steps)
        assert "site-5" not in res.kept and "site-5" in res.rejected
        assert res.scores["site-5"] == max(res.scores.values())
    res = NormScreening(3.0).aggregate(ups, steps)
    assert list(res.rejected) == ["site-5"] and res.kept == tuple(SITES[:4])
    w = None if steps is None else np.array([steps[s] for s in SITES[:4]], float)
    np.testing.assert_allclose(flat(res), robust._weighted_mean(honest, w), rtol=1e-5, atol=1e-6)


def test_weighted_median_with_a_majority_of_weight_follows_it_as_documented():
    honest = _honest(10, n=4)
    rows = np.vstack([honest, 100.0 * honest[0]])
    ups = _updates_from_rows(rows)
    res = CoordinateMedian().aggregate(ups, dict(zip(SITES, [1, 1, 1, 1, 1000])), dtype=np.float64)
    agg = np.concatenate([res.aggregate["b"], res.aggregate["w"].ravel()])
    np.testing.assert_allclose(agg, rows[4], rtol=1e-6)
    # with the steps below half of the total, the median stays in the honest range
    res = CoordinateMedian().aggregate(ups, dict(zip(SITES, [10, 10, 10, 10, 39])))
    agg = np.concatenate([res.aggregate["b"], res.aggregate["w"].ravel()])
    assert np.all(agg >= honest.min(0) - 1e-6) and np.all(agg <= honest.max(0) + 1e-6)


# ----------------------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("rule", _all_rules(), ids=repr)
def test_equal_weights_equal_the_plain_rule(rule):
    for n in (5, 6):
        sites = [f"site-{i}" for i in range(n)]
        ups = _updates_from_rows(_honest(11 + n, n=n), sites)
        plain = rule.aggregate(ups, dtype=np.float64)
        weighted = rule.aggregate(ups, {s: 37.0 for s in sites}, dtype=np.float64)
        assert plain.kept == weighted.kept and set(plain.rejected) == set(weighted.rejected)
        for k in plain.aggregate:
            np.testing.assert_allclose(weighted.aggregate[k], plain.aggregate[k], rtol=1e-12, atol=1e-15)


def test_chunked_computation_equals_unchunked(monkeypatch):
    rows = _honest(12, n=6, d=7)
    sites = [f"site-{i}" for i in range(6)]
    ups = _updates_from_rows(rows, sites)
    steps = dict(zip(sites, [1.0, 2.0, 3.0, 1.5, 2.5, 4.0]))
    rules = [CoordinateMedian(), TrimmedMean(0.2), Krum(f=1), MultiKrum(f=1), NormScreening(2.0)]
    full = [r.aggregate(ups, steps, dtype=np.float64) for r in rules]
    monkeypatch.setattr(robust, "_CHUNK", 6 * 2)  # 2 columns per chunk
    for r, ref in zip(rules, full):
        got = r.aggregate(ups, steps, dtype=np.float64)
        for k in ref.aggregate:
            np.testing.assert_allclose(got.aggregate[k], ref.aggregate[k], rtol=1e-12)
        for s in ref.scores:
            assert got.scores[s] == pytest.approx(ref.scores[s], rel=1e-12)


# ----------------------------------------------------------------------------------------------------- errors


def test_nan_update_is_rejected_naming_the_site_and_entry():
    ups = _updates_from_rows(_honest(13, n=5))
    ups["site-3"]["w"][0, 1] = np.nan
    for rule in _all_rules():
        with pytest.raises(UpdateRejected) as e:
            rule.aggregate(ups)
        assert "site-3" in str(e.value) and "'w'" in str(e.value) and "NaN/Inf" in str(e.value)
    ups["site-3"]["w"][0, 1] = np.inf
    with pytest.raises(UpdateRejected, match="site-3"):
        CoordinateMedian().aggregate(ups)


@pytest.mark.parametrize(
    "mutate, fragments",
    [
        (lambda u: u["site-4"].pop("b"), ["site-4", "missing", "'b'"]),
        (lambda u: u["site-4"].__setitem__("extra", np.ones(2)), ["site-4", "unknown", "'extra'"]),
        (lambda u: u["site-2"].__setitem__("w", np.zeros((2, 3), np.float32)), ["site-2", "shape", "(2, 3)"]),
        (lambda u: u["site-2"].__setitem__("w", np.zeros((2, 2), np.int64)), ["site-2", "dtype"]),
        (lambda u: u.__setitem__("site-5", {}), ["site-5", "empty"]),
        (lambda u: u.__setitem__("site-5", [1, 2]), ["site-5", "mapping"]),
    ],
)
def test_mismatched_updates_are_rejected_naming_the_site(mutate, fragments):
    ups = _updates_from_rows(_honest(14, n=5))
    mutate(ups)
    with pytest.raises(UpdateRejected) as e:
        TrimmedMean(0.2).aggregate(ups)
    for frag in fragments:
        assert frag in str(e.value)


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "many"])
def test_bad_or_missing_weight_is_rejected_naming_the_site(bad):
    ups = _updates_from_rows(_honest(15, n=5))
    steps = dict(zip(SITES, [1, 1, 1, 1, 1]))
    steps["site-2"] = bad
    with pytest.raises(UpdateRejected, match="site-2"):
        MultiKrum(f=1).aggregate(ups, steps)
    del steps["site-2"]
    with pytest.raises(UpdateRejected, match="site-2.*no aggregation weight"):
        NormScreening().aggregate(ups, steps)


def test_too_few_sites_and_bad_parameters_are_config_errors():
    two = _updates_from_rows(_honest(16, n=2), SITES[:2])
    for rule in (CoordinateMedian(), NormScreening(), TrimmedMean(0.2), Krum(f=0)):
        with pytest.raises(ConfigError, match="n=2|got 2"):
            rule.aggregate(two)
    with pytest.raises(ConfigError, match="beta"):
        TrimmedMean(0.1).aggregate(_updates_from_rows(_honest(16, n=5)))  # floor(0.5) = 0 trims nothing
    for make in (lambda: TrimmedMean(0.5), lambda: TrimmedMean(-0.1), lambda: NormScreening(0.5),
                 lambda: NormScreening(float("nan")), lambda: make_rule("mean_of_everything"),
                 lambda: make_rule("krum", beta=0.2)):
        with pytest.raises(ConfigError):
            make()
    with pytest.raises(UpdateRejected):
        CoordinateMedian().aggregate({})


def test_trimmed_mean_min_sites():
    assert TrimmedMean(0.2).min_sites() == 5
    assert TrimmedMean(0.25).min_sites() == 4
    assert TrimmedMean(0.4).min_sites() == 3
    assert TrimmedMean(0.0).min_sites() == 1
    assert Krum(f=2).min_sites() == 7


# ----------------------------------------------------------------------------------------------------- factory


def test_make_rule_and_robust_aggregate():
    ups = _scalar_updates([0, 1, 2, 3, 100])
    for name, params, cls in [
        ("median", {}, CoordinateMedian),
        ("trimmed_mean", {"beta": 0.2}, TrimmedMean),
        ("krum", {"f": 1}, Krum),
        ("multi_krum", {"f": 1, "m": 2}, MultiKrum),
        ("norm_screening", {"factor": 2.0}, NormScreening),
    ]:
        rule = make_rule(name, **params)
        assert isinstance(rule, cls) and rule.name == name
        res = robust_aggregate(name, ups, **params)
        assert res.rule == name and res.aggregate["v"].dtype == np.float32
        assert 0.0 <= float(res.aggregate["v"][0]) <= 3.0
    assert robust_aggregate("median", ups).aggregate["v"][0] == 2.0
    assert robust_aggregate(TrimmedMean(0.2), ups).aggregate["v"][0] == pytest.approx(2.0)
    with pytest.raises(ConfigError):
        robust_aggregate(TrimmedMean(0.2), ups, beta=0.3)


def test_site_order_permutation_does_not_change_the_coordinate_rules():
    rows = _honest(17, n=5)
    base = _updates_from_rows(rows)
    steps = dict(zip(SITES, [3.0, 1.0, 4.0, 1.5, 5.0]))
    for perm in itertools.islice(itertools.permutations(SITES), 0, 120, 17):
        ups = {s: base[s] for s in perm}
        for rule in (CoordinateMedian(), TrimmedMean(0.2), NormScreening(2.0)):
            a = rule.aggregate(base, steps, dtype=np.float64)
            b = rule.aggregate(ups, steps, dtype=np.float64)
            for k in a.aggregate:
                np.testing.assert_allclose(b.aggregate[k], a.aggregate[k], rtol=1e-12, atol=1e-15)
