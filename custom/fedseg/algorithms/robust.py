"""Robust (Byzantine-resilient) aggregation of site updates (paper 002, sections 3-4; DESIGN.md section 6).

Pure code: numpy only, no nvflare (and no torch) import. The FedGS aggregation (``fedseg.algorithms.fedgs``) is the
steps-weighted mean ``G_A = sum_k s_k G_k / sum_k s_k``: one site that sends a scaled update (model replacement, paper
002 section 3.1: ``w_i <- n_S / n_i (w_i - w) + w``) or noise moves it arbitrarily far. The rules here bound what a
minority of sites can do.

Common interface
----------------
Every rule is a small class with one method::

    rule = CoordinateMedian()                  # or TrimmedMean(beta), Krum(f), MultiKrum(f, m), NormScreening(factor)
    res = rule.aggregate(updates, weights)     # updates: site -> {name: ndarray}; weights: site -> steps, or None
    res.aggregate                              # name -> ndarray (float32 by default), the robust WEIGHT_DIFF
    res.kept, res.rejected, res.scores         # sites used, site -> reason, site -> per-rule diagnostic score

``make_rule(name, **params)`` builds one from configuration (``"median"``, ``"trimmed_mean"``, ``"krum"``,
``"multi_krum"``, ``"norm_screening"``) and :func:`robust_aggregate` does both in one call.

Updates, entries and validation
-------------------------------
The float entries of each update are flattened (sorted by name) and stacked into an ``(n_sites, d)`` float64 matrix
``X``; every rule works on ``X``, vectorised, and the result is split back into the entries' shapes. Integer and
bool entries (``num_batches_tracked``, relative-position index tables) are never aggregated, as in fedgs.py where
they are not part of an update at all: if a site sends them anyway they are left out of the aggregate (their names
are listed in ``RobustResult.skipped``) and the global model keeps its own values. Sites are processed in the
mapping's order, which also breaks ties (Krum scores, equal values) deterministically.

Refusals (:class:`fedseg.errors.UpdateRejected`, the site named): an empty update or one that is not a name->array
mapping, keys that differ from the first site's update (missing / unknown names listed), a shape or a float/integer
kind that differs, a non-numeric dtype, NaN/Inf values (the entry and the count named), a weight that is missing,
not finite or <= 0. Configuration errors (:class:`fedseg.errors.ConfigError`, the numbers and the fix named): bad
rule parameters, and fewer sites than a rule needs to tolerate one faulty site (e.g. Krum's ``n >= 2f + 3``).

Composition with FedGS steps weighting
--------------------------------------
``weights`` are the sites' step counts (FLARE's ``NUM_STEPS_CURRENT_ROUND``), the FedGS weights; ``None`` means equal
weights. Steps are reported by the sites themselves, so no rule lets weights decide *which* sites or values are
trusted, with one documented exception (the weighted median):

* median -- the weighted coordinate-wise median (the minimiser of ``sum_k s_k |x_k - m|``). Robust while the faulty
  sites hold less than half of the total weight; a site that inflates its steps gains weight, so pass weights only
  when the step counts are trusted (or capped), else ``None``.
* trimmed mean -- trimming by count (the same ``k = floor(beta n)`` smallest and largest values whatever the
  weights), then the steps-weighted mean of the kept values: the result stays within the honest range while at most
  ``k`` sites are faulty, whatever weights they claim.
* Krum -- scores are unweighted distances, the output is the selected site's update: weights are not used.
* Multi-Krum -- unweighted scores select ``m`` sites, then the steps-weighted mean of the selected (FedGS equation 1
  over the selected sites).
* norm screening -- the reference is the unweighted median norm; the kept updates are combined by the steps-weighted
  mean (FedGS equation 1 over the accepted sites).

With equal weights every weighted variant equals its plain version.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedseg.errors import ConfigError, UpdateRejected

__all__ = [
    "RULES",
    "CoordinateMedian",
    "Krum",
    "MultiKrum",
    "NormScreening",
    "RobustResult",
    "RobustRule",
    "StackedUpdates",
    "TrimmedMean",
    "make_rule",
    "robust_aggregate",
    "stack_updates",
    "weighted_median",
]

# columns per chunk in the coordinate-wise rules: bounds the argsort / take temporaries to ~_CHUNK elements
_CHUNK = 1 << 22


@dataclass
class RobustResult:
    """What a robust rule produced.

    ``aggregate``: name -> array, the robust combination of the float entries (integer entries left out).
    ``kept``: the sites whose updates entered the aggregate (all sites for the coordinate-wise rules, which drop
    values, not sites). ``rejected``: site -> reason, for the sites left out entirely. ``scores``: site -> the rule's
    diagnostic (documented per rule). ``details``: rule parameters and thresholds actually used. ``skipped``: integer
    entries left out of the aggregate.
    """

    rule: str
    aggregate: dict[str, np.ndarray]
    kept: tuple[str, ...]
    rejected: dict[str, str] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()


@dataclass
class StackedUpdates:
    """Updates as one ``(n_sites, d)`` float64 matrix ``X`` (row k = site ``sites[k]``) plus the entry layout."""

    sites: tuple[str, ...]
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    X: np.ndarray
    weights: np.ndarray | None  # (n_sites,) float64, or None for equal weights
    skipped: tuple[str, ...] = ()

    def unstack(self, vector: np.ndarray, dtype=np.float32) -> dict[str, np.ndarray]:
        """Split a length-``d`` vector back into the entries (name -> array of the entry's shape)."""
        out, start = {}, 0
        for name, shape in zip(self.names, self.shapes):
            size = int(np.prod(shape, dtype=np.int64))
            out[name] = np.asarray(vector[start:start + size]).reshape(shape).astype(dtype)
            start += size
        return out


def _kind(arr: np.ndarray) -> str:
    if np.issubdtype(arr.dtype, np.floating):
        return "float"
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        return "integer"
    return "other"


def _limited(names: Sequence[str]) -> str:
    return f"{list(names[:5])}{'...' if len(names) > 5 else ''}"


def stack_updates(
    updates: Mapping[Hashable, Mapping[str, np.ndarray]], weights: Mapping[Hashable, float] | None = None
) -> StackedUpdates:
    """Validate the updates against each other and stack their float entries into ``X`` (n_sites, d), float64.

    The first site's update defines the layout (names, shapes, float/integer kind); every other update must match it.
    Raises :class:`UpdateRejected` naming the site (see the module docstring for the list).
    """
    if not isinstance(updates, Mapping) or not updates:
        raise UpdateRejected("no site update to aggregate (an empty site -> update mapping)")
    sites = tuple(str(s) for s in updates)
    if len(set(sites)) != len(sites):
        raise UpdateRejected(f"site names are not unique as strings: {sites}")
    first_site = sites[0]
    layout: dict[str, tuple[str, tuple[int, ...]]] = {}
    arrays: list[dict[str, np.ndarray]] = []
    for site, update in zip(sites, updates.values()):
        if not isinstance(update, Mapping) or not update:
            raise UpdateRejected(f"site {site!r}: the update is empty or not a name->array mapping")
        arrs = {str(k): np.asarray(v) for k, v in update.items()}
        if not layout:
            for name, arr in arrs.items():
                kind = _kind(arr)
                if kind == "other":
                    raise UpdateRejected(f"site {site!r}: entry {name!r} has dtype {arr.dtype}, expected a float type")
                layout[name] = (kind, tuple(arr.shape))
        else:
            missing = sorted(set(layout) - set(arrs))
            unknown = sorted(set(arrs) - set(layout))
            if missing or unknown:
                raise UpdateRejected(
                    f"site {site!r}: the update's keys differ from site {first_site!r}'s (missing {_limited(missing)}, "
                    f"unknown {_limited(unknown)}); the sites probably run different model configurations"
                )
            for name, (kind, shape) in layout.items():
                arr = arrs[name]
                if _kind(arr) != kind:
                    raise UpdateRejected(
                        f"site {site!r}: entry {name!r} has dtype {arr.dtype}, site {first_site!r}'s is {kind}"
                    )
                if kind == "float" and tuple(arr.shape) != shape:
                    raise UpdateRejected(
                        f"site {site!r}: entry {name!r} has shape {tuple(arr.shape)}, site {first_site!r}'s has {shape}"
                    )
        for name, (kind, _) in layout.items():
            if kind == "float":
                finite = np.isfinite(arrs[name])
                if not finite.all():
                    raise UpdateRejected(
                        f"site {site!r}: entry {name!r} holds {int(finite.size - finite.sum())} NaN/Inf values"
                    )
        arrays.append(arrs)

    names = tuple(sorted(n for n, (kind, _) in layout.items() if kind == "float"))
    skipped = tuple(sorted(n for n, (kind, _) in layout.items() if kind != "float"))
    if not names:
        raise UpdateRejected(f"site {first_site!r}: the update holds no float entries, nothing to aggregate")
    shapes = tuple(layout[n][1] for n in names)
    d = int(sum(int(np.prod(s, dtype=np.int64)) for s in shapes))
    X = np.empty((len(sites), d), dtype=np.float64)
    for row, arrs in enumerate(arrays):
        start = 0
        for name in names:
            flat = arrs[name].reshape(-1)
            X[row, start:start + flat.size] = flat
            start += flat.size

    w = None
    if weights is not None:
        if not isinstance(weights, Mapping):
            raise ConfigError(f"weights must be a site -> steps mapping or None, got {type(weights).__name__}")
        by_name = {str(k): v for k, v in weights.items()}
        w = np.empty(len(sites), dtype=np.float64)
        for i, site in enumerate(sites):
            if site not in by_name:
                raise UpdateRejected(f"site {site!r}: no aggregation weight (steps) was given for this site")
            try:
                value = float(by_name[site])
            except (TypeError, ValueError):
                value = float("nan")
            if not math.isfinite(value) or value <= 0:
                raise UpdateRejected(f"site {site!r}: aggregation weight must be > 0, got {by_name[site]!r}")
            w[i] = value
    return StackedUpdates(sites, names, shapes, X, w, skipped)


def _column_chunks(n_rows: int, d: int):
    step = max(1, _CHUNK // max(1, n_rows))
    for start in range(0, d, step):
        yield slice(start, min(d, start + step))


def _weighted_mean(X: np.ndarray, w: np.ndarray | None) -> np.ndarray:
    """``sum_k w_k x_k / sum_k w_k`` over the rows (plain mean for ``w=None``): FedGS equation 1."""
    if w is None:
        return X.mean(axis=0)
    return (w @ X) / w.sum()


def weighted_median(X: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """Coordinate-wise (weighted) median of the rows of ``X`` (n, d) with row weights ``w`` > 0 (None: equal).

    Definition. Per coordinate, sort the values ``x_(1) <= ... <= x_(n)`` carrying their weights ``w_(i)``, with
    cumulative weights ``C_i = w_(1) + ... + w_(i)`` and total ``W``. The weighted median is ``x_(i*)`` for the first
    ``i*`` with ``C_i* >= W / 2``; when ``C_i* == W / 2`` exactly (up to 1e-12 relative) every point of
    ``[x_(i*), x_(i*+1)]`` minimises ``sum_k w_k |x_k - m|`` and the midpoint is returned. With equal weights this
    is ``np.median`` (the midpoint of the two middle values for even n). A value set moves the weighted median
    beyond the range of the others only with at least half of the total weight.
    """
    X = np.asarray(X, dtype=np.float64)
    if w is None:
        return np.median(X, axis=0)
    n, d = X.shape
    w = np.asarray(w, dtype=np.float64)
    half = 0.5 * w.sum()
    tol = 1e-12 * w.sum()
    out = np.empty(d, dtype=np.float64)
    for cols in _column_chunks(n, d):
        block = X[:, cols]
        order = np.argsort(block, axis=0, kind="stable")
        values = np.take_along_axis(block, order, axis=0)
        cum = np.cumsum(w[order], axis=0)
        idx = np.argmax(cum >= half - tol, axis=0)  # first index reaching half the weight
        at = np.arange(values.shape[1])
        tie = np.abs(cum[idx, at] - half) <= tol
        upper = np.minimum(idx + 1, n - 1)
        out[cols] = np.where(tie, 0.5 * (values[idx, at] + values[upper, at]), values[idx, at])
    return out


class RobustRule:
    """Common interface: ``aggregate(updates, weights=None, dtype=np.float32) -> RobustResult``.

    Subclasses implement ``_combine(stacked) -> (vector, kept, rejected, scores, details)`` on the stacked matrix and
    ``min_sites()``; validation, the site-count check and unstacking are shared.
    """

    name = "rule"

    def min_sites(self) -> int:
        """The fewest sites with which the rule still tolerates one faulty site."""
        return 3

    def _check_site_count(self, n: int) -> None:
        need = self.min_sites()
        if n < need:
            raise ConfigError(
                f"robust aggregation {self.name!r} needs at least {need} sites to tolerate one faulty site, "
                f"got {n}; add sites or use the plain FedGS (steps-weighted mean) aggregation"
            )

    def aggregate(
        self,
        updates: Mapping[Hashable, Mapping[str, np.ndarray]],
        weights: Mapping[Hashable, float] | None = None,
        dtype=np.float32,
    ) -> RobustResult:
        stacked = stack_updates(updates, weights)
        self._check_site_count(len(stacked.sites))
        vector, kept, rejected, scores, details = self._combine(stacked)
        return RobustResult(
            rule=self.name,
            aggregate=stacked.unstack(vector, dtype=dtype),
            kept=tuple(kept),
            rejected=dict(rejected),
            scores={s: float(v) for s, v in scores.items()},
            details=dict(details),
            skipped=stacked.skipped,
        )

    def _combine(self, st: StackedUpdates):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


class CoordinateMedian(RobustRule):
    """Coordinate-wise median (Yin, Chen, Ramchandran & Bartlett 2018, "Byzantine-robust distributed learning:
    towards optimal statistical rates", ICML): ``agg_j = median_k X[k, j]`` for every coordinate j.

    With weights: the weighted median of :func:`weighted_median`, per coordinate. Robust while the faulty sites are
    fewer than half (hold less than half of the weight). Needs >= 3 sites (with 2 the median is the mean).
    Scores: ``||x_k - agg||_2``, each site's distance to the aggregate. No site is rejected as a whole.
    """

    name = "median"

    def _combine(self, st: StackedUpdates):
        agg = weighted_median(st.X, st.weights)
        dist = np.linalg.norm(st.X - agg, axis=1)
        return agg, st.sites, {}, dict(zip(st.sites, dist)), {"weighted": st.weights is not None}


class TrimmedMean(RobustRule):
    """Coordinate-wise trimmed mean (Yin et al. 2018): per coordinate, drop the ``k = floor(beta n)``
    smallest and the ``k`` largest values and average the remaining ``n - 2k``.

    ``beta`` in [0, 0.5) is the fraction trimmed per side; beta = 0 is the plain mean (no protection). With weights:
    trimming is by count exactly as without weights (reported steps never decide what is trimmed), then the
    steps-weighted mean ``sum_kept s_k x_k / sum_kept s_k`` of the kept values. While at most k sites are faulty,
    every kept value lies between two honest values, so the result (weighted or not) stays within the honest range.
    A beta > 0 that trims nothing at this site count (``floor(beta n) == 0``) is a ConfigError.
    Scores: the fraction of the site's coordinates that were trimmed. No site is rejected as a whole.
    """

    name = "trimmed_mean"

    def __init__(self, beta: float = 0.2):
        try:
            beta = float(beta)
        except (TypeError, ValueError):
            beta = float("nan")
        if not (0.0 <= beta < 0.5):
            raise ConfigError(f"trimmed mean: beta (fraction trimmed per side) must be in [0, 0.5), got {beta}")
        self.beta = beta

    def min_sites(self) -> int:
        # the smallest n with floor(beta n) >= 1 and n - 2 floor(beta n) >= 1
        if self.beta == 0.0:
            return 1
        return max(3, math.ceil(1.0 / self.beta - 1e-9))

    def trim_count(self, n: int) -> int:
        """``k = floor(beta n)`` (a 1e-9 slack absorbs rounding, e.g. 0.2 * 5), at most ``(n - 1) // 2``."""
        return min(math.floor(self.beta * n + 1e-9), (n - 1) // 2)

    def _check_site_count(self, n: int) -> None:
        if self.beta > 0.0 and (n < 3 or self.trim_count(n) < 1):
            raise ConfigError(
                f"trimmed mean with beta={self.beta} trims floor(beta * n) = {self.trim_count(n)} sites per side at "
                f"n={n} sites, i.e. nothing: use beta >= 1/n = {1.0 / max(n, 1):.3g} (and < 0.5) with at least "
                f"3 sites, or beta=0 for the plain mean"
            )

    def _combine(self, st: StackedUpdates):
        n, d = st.X.shape
        k = self.trim_count(n)
        w = st.weights
        out = np.empty(d, dtype=np.float64)
        trimmed = np.zeros(n, dtype=np.int64)
        for cols in _column_chunks(n, d):
            block = st.X[:, cols]
            if k == 0:
                out[cols] = _weighted_mean(block, w)
                continue
            order = np.argsort(block, axis=0, kind="stable")
            keep = order[k:n - k]
            values = np.take_along_axis(block, keep, axis=0)
            if w is None:
                out[cols] = values.mean(axis=0)
            else:
                kw = w[keep]
                out[cols] = (kw * values).sum(axis=0) / kw.sum(axis=0)
            trimmed += np.bincount(order[:k].ravel(), minlength=n) + np.bincount(order[n - k:].ravel(), minlength=n)
        scores = dict(zip(st.sites, trimmed / max(d, 1)))
        return out, st.sites, {}, scores, {"beta": self.beta, "trimmed_per_side": k, "weighted": w is not None}


def _pairwise_sq_distances(X: np.ndarray) -> np.ndarray:
    """``D_ij = ||x_i - x_j||^2`` via the Gram matrix ``G = Xc Xc^T``: ``D_ij = G_ii + G_jj - 2 G_ij``.

    The rows are centred first (``Xc = X - mean``; distances do not change) so that large common offsets do not cancel
    catastrophically; the Gram matrix is accumulated over column chunks; tiny negatives from rounding are clipped.
    """
    n, d = X.shape
    mean = X.mean(axis=0)
    G = np.zeros((n, n), dtype=np.float64)
    for cols in _column_chunks(n, d):
        block = X[:, cols] - mean[cols]
        G += block @ block.T
    sq = np.diag(G)
    D = sq[:, None] + sq[None, :] - 2.0 * G
    np.maximum(D, 0.0, out=D)
    np.fill_diagonal(D, 0.0)
    return D


def _order_with_ties(scores: np.ndarray, rel_tol: float = 1e-9) -> np.ndarray:
    """Indices by increasing score; scores within ``rel_tol`` x the largest |score| of each other (rounding noise of
    the Gram computation) count as ties and keep the sites' order, so equal scores pick the earlier site."""
    order = np.argsort(scores, kind="stable")
    tol = rel_tol * max(float(np.max(np.abs(scores))), np.finfo(np.float64).tiny)
    out, start = [], 0
    for i in range(1, len(order) + 1):
        if i == len(order) or scores[order[i]] - scores[order[i - 1]] > tol:
            out.extend(sorted(order[start:i]))
            start = i
    return np.asarray(out, dtype=np.int64)


class Krum(RobustRule):
    """Krum (Blanchard, El Mhamdi, Guerraoui & Stainer 2017, "Machine learning with adversaries: Byzantine tolerant
    gradient descent", NeurIPS).

    For n sites of which at most f are Byzantine, with ``n >= 2f + 3`` (the paper's ``2f + 2 < n``), the score of
    site i is ``s(i) = sum_{j in N_i} ||x_i - x_j||^2`` over its ``n - f - 2`` nearest other sites ``N_i``; Krum
    returns the update of the site with the lowest score (ties, up to 1e-9 relative: the earlier site). Squared
    distances come from the Gram matrix (:func:`_pairwise_sq_distances`). Weights are not used (an unweighted
    selection of one update). Scores: ``s(i)``. The sites not selected are rejected with their score.
    """

    name = "krum"

    def __init__(self, f: int = 1):
        if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or f < 0:
            raise ConfigError(
                f"{self.name}: f (the number of Byzantine sites tolerated) must be an integer >= 0, got {f!r}"
            )
        self.f = int(f)

    def min_sites(self) -> int:
        return 2 * self.f + 3

    def _check_site_count(self, n: int) -> None:
        need = self.min_sites()
        if n < need:
            max_f = (n - 3) // 2
            fix = f"lower f to {max_f} (at most (n - 3) // 2)" if max_f >= 0 else "Krum needs at least 3 sites"
            raise ConfigError(
                f"{self.name} with f={self.f} Byzantine sites needs n >= 2f + 3 = {need} sites, got n={n}; "
                f"{fix} or add sites"
            )

    def _m(self, n: int) -> int:
        return 1

    def scores(self, X: np.ndarray) -> np.ndarray:
        """The Krum score of every row of ``X``: sum of squared distances to its ``n - f - 2`` nearest other rows."""
        n = X.shape[0]
        D = _pairwise_sq_distances(X)
        np.fill_diagonal(D, np.inf)
        neighbours = n - self.f - 2
        return np.sort(D, axis=1)[:, :neighbours].sum(axis=1)

    def _combine(self, st: StackedUpdates):
        n = len(st.sites)
        m = self._m(n)
        s = self.scores(st.X)
        order = _order_with_ties(s)
        chosen = np.sort(order[:m])
        w = None if st.weights is None else st.weights[chosen]
        agg = st.X[chosen[0]].copy() if m == 1 else _weighted_mean(st.X[chosen], w)
        kept = tuple(st.sites[i] for i in chosen)
        worst_kept = float(s[order[m - 1]])
        rejected = {
            st.sites[i]: f"{self.name} score {s[i]:.6g} is not among the {m} lowest (highest selected {worst_kept:.6g})"
            for i in order[m:]
        }
        details = {"f": self.f, "m": m, "neighbours": n - self.f - 2, "weighted": m > 1 and st.weights is not None}
        return agg, kept, rejected, dict(zip(st.sites, s)), details


class MultiKrum(Krum):
    """Multi-Krum (Blanchard et al. 2017): the Krum scores are computed once, the ``m`` sites with the lowest scores
    are selected and their updates averaged -- here by the steps-weighted mean (FedGS equation 1 over the selected
    sites; plain mean without weights). ``m`` in [1, n - f]; ``None`` means ``n - f`` (drop exactly f). ``m = 1`` is
    Krum.
    """

    name = "multi_krum"

    def __init__(self, f: int = 1, m: int | None = None):
        super().__init__(f)
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1):
            raise ConfigError(
                f"multi_krum: m (the number of selected sites) must be an integer >= 1 or null, got {m!r}"
            )
        self.m = None if m is None else int(m)

    def _m(self, n: int) -> int:
        if self.m is None:
            return n - self.f
        if self.m > n - self.f:
            raise ConfigError(
                f"multi_krum: m={self.m} selected sites exceeds n - f = {n} - {self.f} = {n - self.f}, so a Byzantine "
                f"site could always be selected; set m <= {n - self.f} (or null for n - f)"
            )
        return self.m


class NormScreening(RobustRule):
    """Norm screening (norm-bound defence against scaled / model-replacement updates; Sun, Kairouz, Suresh & McMahan
    2019, "Can you really backdoor federated learning?", with the data-driven bound of the median norm).

    ``norm_k = ||x_k||_2`` over all float entries; the site is rejected when ``norm_k > factor * median_k(norm_k)``
    (unweighted median, so one site claiming many steps cannot move the bound); the kept updates are combined by the
    steps-weighted mean ``sum_kept s_k x_k / sum_kept s_k`` (FedGS equation 1 over the accepted sites). ``factor`` >=
    1 (default 3: honest FedGS updates differ in norm with their steps and eta). Robust while fewer than half of the
    sites send large updates; needs >= 3 sites. If the median norm is 0 every non-zero update is rejected.
    Scores: ``norm_k``.
    """

    name = "norm_screening"

    def __init__(self, factor: float = 3.0):
        try:
            factor = float(factor)
        except (TypeError, ValueError):
            factor = float("nan")
        if not (math.isfinite(factor) and factor >= 1.0):
            raise ConfigError(
                f"norm screening: factor must be a finite number >= 1 (a bound below the median norm rejects most "
                f"honest sites), got {factor}"
            )
        self.factor = factor

    def _combine(self, st: StackedUpdates):
        norms = np.linalg.norm(st.X, axis=1)
        median = float(np.median(norms))
        bound = self.factor * median
        keep = norms <= bound
        idx = np.flatnonzero(keep)
        w = None if st.weights is None else st.weights[idx]
        agg = _weighted_mean(st.X[idx], w)
        kept = tuple(st.sites[i] for i in idx)
        rejected = {
            st.sites[i]: f"update norm {norms[i]:.6g} exceeds {self.factor:g} x the median norm {median:.6g} "
            f"= {bound:.6g}"
            for i in np.flatnonzero(~keep)
        }
        details = {"factor": self.factor, "median_norm": median, "bound": bound, "weighted": st.weights is not None}
        return agg, kept, rejected, dict(zip(st.sites, norms)), details


RULES = {
    CoordinateMedian.name: CoordinateMedian,
    TrimmedMean.name: TrimmedMean,
    Krum.name: Krum,
    MultiKrum.name: MultiKrum,
    NormScreening.name: NormScreening,
}


def make_rule(name: str, **params) -> RobustRule:
    """Build a rule from configuration: ``make_rule("trimmed_mean", beta=0.2)``; ConfigError names the fix."""
    cls = RULES.get(str(name))
    if cls is None:
        raise ConfigError(f"unknown robust aggregation rule {name!r}; choose one of {sorted(RULES)}")
    try:
        return cls(**params)
    except TypeError as e:
        raise ConfigError(f"robust aggregation rule {name!r}: bad parameters {sorted(params)} ({e})") from None


def robust_aggregate(
    rule,
    updates: Mapping[Hashable, Mapping[str, np.ndarray]],
    weights: Mapping[Hashable, float] | None = None,
    dtype=np.float32,
    **params,
) -> RobustResult:
    """One call: ``rule`` is a :class:`RobustRule` or a rule name (then ``params`` build it via :func:`make_rule`)."""
    if not isinstance(rule, RobustRule):
        rule = make_rule(rule, **params)
    elif params:
        raise ConfigError(f"robust_aggregate: parameters {sorted(params)} are only used with a rule name")
    return rule.aggregate(updates, weights, dtype=dtype)


class UpdateCollector:
    """The updates of one round kept until they are combined, behind the interface of
    :class:`fedseg.algorithms.fedgs.WeightedUpdateAccumulator` (``add``, ``len``, ``contributors``, ``total_weight``,
    ``result``): one update per site, with a finite weight > 0. Subclasses define ``result``."""

    def __init__(self):
        self._updates: dict[str, Mapping[str, np.ndarray]] = {}
        self._weights: dict[str, float] = {}
        self.contributors: list = []

    def add(self, update: Mapping[str, np.ndarray], weight: float, contributor: str = "") -> None:
        weight = float(weight)
        if not math.isfinite(weight) or weight <= 0:
            raise UpdateRejected(f"site {contributor!r}: aggregation weight must be > 0, got {weight}")
        if contributor in self._updates:
            raise UpdateRejected(f"site {contributor!r}: a second update for this aggregation")
        self._updates[contributor] = update
        self._weights[contributor] = weight
        self.contributors.append(contributor)

    def __len__(self) -> int:
        return len(self.contributors)

    @property
    def total_weight(self) -> float:
        return float(sum(self._weights.values()))


class RobustCollector(UpdateCollector):
    """A robust rule behind the interface of :class:`fedseg.algorithms.fedgs.WeightedUpdateAccumulator` (``add``,
    ``len``, ``contributors``, ``total_weight``, ``result``), so that an aggregator built for the steps-weighted mean
    can use any rule here. Updates are kept until :meth:`result`, which runs the rule; ``last`` holds its
    :class:`RobustResult`. ``weighted=False`` passes no steps weights to the rule (equal weights; see the module
    docstring for when that is the safer choice)."""

    def __init__(self, rule: RobustRule, weighted: bool = True):
        if not isinstance(rule, RobustRule):
            raise ConfigError(f"RobustCollector needs a RobustRule, got {type(rule).__name__}")
        super().__init__()
        self.rule = rule
        self.weighted = bool(weighted)
        self.last: RobustResult | None = None

    @property
    def aggregated_sites(self) -> list:
        """The sites whose updates entered the last aggregate (the rule's ``kept``; all added sites before it ran)."""
        return list(self.last.kept) if self.last is not None else list(self.contributors)

    @property
    def total_weight(self) -> float:
        """Steps of the sites whose updates entered the last aggregate (all added sites before :meth:`result`)."""
        kept = self.last.kept if self.last is not None else self.contributors
        return float(sum(self._weights[s] for s in kept))

    def result(self, dtype=np.float32) -> dict[str, np.ndarray]:
        if not self.contributors:
            raise ValueError("no update was added")
        self.last = self.rule.aggregate(self._updates, self._weights if self.weighted else None, dtype=dtype)
        return self.last.aggregate
