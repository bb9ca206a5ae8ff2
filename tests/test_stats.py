"""Paired statistics (`polyfuse.evaluation.stats`): the difference in points as the evidence protocol defines
it, the one-level bootstrap against scipy's paired bootstrap, the two-level bootstrap on examples whose
answer follows from reasoning, McNemar's exact test and Holm's correction against hand computations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.stats

from polyfuse.evaluation.stats import (
    AVERAGE,
    ItemScores,
    bootstrap,
    compare_methods,
    holm,
    mcnemar_p,
    resampled_means,
    row_means,
)


def scipy_paired(a: np.ndarray, b: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """scipy's own paired percentile bootstrap of mean(a) - mean(b)."""
    found = scipy.stats.bootstrap((a, b), lambda x, y, axis=-1: x.mean(axis=axis) - y.mean(axis=axis), paired=True,
                                  vectorized=True, n_resamples=10_000, method="percentile",
                                  rng=np.random.default_rng(seed))
    return float(found.confidence_interval.low), float(found.confidence_interval.high)


@pytest.mark.parametrize("kind", ["verdicts", "bits per byte"])
def test_one_level_bootstrap_is_scipys_paired_bootstrap(kind):
    rng = np.random.default_rng(7)
    if kind == "verdicts":
        a, b = (rng.random(300) < 0.6).astype(float), (rng.random(300) < 0.5).astype(float)
    else:
        a, b = rng.gamma(2.0, 0.5, 300), rng.gamma(2.0, 0.55, 300)
    ours = bootstrap([{"d": a - b}], "items")
    # one (seed, domain): scipy's paired=True resamples the same indices, so the intervals are the same numbers
    assert (ours["d"].low, ours["d"].high) == pytest.approx(scipy_paired(a, b), abs=1e-12)
    assert ours["d"].value == pytest.approx(a.mean() - b.mean()) and ours[AVERAGE] == ours["d"]


def test_one_level_average_over_domains_resamples_each_stratum_on_its_own():
    """Several domains of different sizes: the average row's interval against a plain loop that resamples
    every (seed, domain) independently (Monte Carlo agreement)."""
    rng = np.random.default_rng(3)
    runs = [{"x": rng.integers(-1, 2, 120).astype(float), "y": rng.integers(-1, 2, 45).astype(float)} for _ in range(2)]
    ours = bootstrap(runs, "items")
    loop = np.random.default_rng(11)
    draws = [np.mean([np.mean([loop.choice(run[d], len(run[d])).mean() for d in ("x", "y")]) for run in runs])
             for _ in range(4000)]
    low, high = np.quantile(draws, [0.025, 0.975])
    assert ours[AVERAGE].low == pytest.approx(low, abs=0.02) and ours[AVERAGE].high == pytest.approx(high, abs=0.02)
    # the point: the mean over seeds of the unweighted mean over domains
    assert ours[AVERAGE].value == pytest.approx(np.mean([(r["x"].mean() + r["y"].mean()) / 2 for r in runs]))


def test_two_level_with_one_seed_is_the_item_bootstrap():
    rng = np.random.default_rng(5)
    a, b = (rng.random(400) < 0.7).astype(float), (rng.random(400) < 0.6).astype(float)
    two = bootstrap([{"d": a - b}], "seeds")
    low, high = scipy_paired(a, b)
    assert two["d"].low == pytest.approx(low, abs=0.01) and two["d"].high == pytest.approx(high, abs=0.01)


def exact_quantiles(values: list[float], q: tuple[float, float]) -> tuple[float, float]:
    """Quantiles of the mean of len(values) draws with replacement, by enumerating every draw."""
    means = sorted(np.mean(draw) for draw in itertools.product(values, repeat=len(values)))
    return tuple(float(np.quantile(means, x)) for x in q)


def test_two_level_without_item_variance_is_the_bootstrap_over_seeds():
    """Every item of a seed has the same difference: resampling items changes nothing, so the interval is that
    of the mean of the seed values drawn with replacement, which enumeration gives exactly."""
    seeds = [0.1, 0.2, 0.3, 0.4, 0.8]
    runs = [{"m": np.full(50, c), "n": np.full(20, c)} for c in seeds]
    found = bootstrap(runs, "seeds")
    low, high = exact_quantiles(seeds, (0.025, 0.975))  # 0.18 and 0.6 for these values
    for row in ("m", "n", AVERAGE):
        assert found[row].value == pytest.approx(np.mean(seeds))
        assert found[row].low == pytest.approx(low, abs=0.02) and found[row].high == pytest.approx(high, abs=0.02)
    # the item bootstrap sees no variance at all: its interval is the point
    items = bootstrap(runs, "items")[AVERAGE]
    assert items.low == pytest.approx(items.value) == pytest.approx(items.high)


def test_two_level_on_verdicts_by_reasoning():
    """0/1 differences constant per seed (two seeds +1, three 0): the mean over 5 drawn seeds is K/5 with K
    binomial(5, 0.4); P(K=0) = 7.8% > 2.5% and P(K=5) = 1% < 2.5% < P(K>=4) = 8.7%, so [0, 0.8]."""
    runs = [{"d": np.full(30, c)} for c in (1.0, 1.0, 0.0, 0.0, 0.0)]
    found = bootstrap(runs, "seeds")["d"]
    assert (found.value, found.low, found.high) == pytest.approx((0.4, 0.0, 0.8))


@pytest.mark.parametrize("values", [np.array([0.0, 1.0] * 50 + [1.0] * 20), np.linspace(0, 3, 120) ** 2])
def test_resampled_means_have_the_bootstrap_distribution(values):
    """Multinomial counts (few distinct values) or drawn indices (many): the mean and the variance of a
    resampled mean are the sample's mean and its plug-in variance / n."""
    means = resampled_means(values, 40_000, np.random.default_rng(2))
    assert means.mean() == pytest.approx(values.mean(), abs=4 * values.std() / math.sqrt(len(values) * 40_000))
    assert means.var() == pytest.approx(values.var() / len(values), rel=0.03)


def test_mcnemar_exact_is_the_binomial_test_by_hand():
    # 8 pairs A right / B wrong, 2 the other way: p = 2 * P(X <= 2), X ~ binomial(10, 1/2) = 2 * 56 / 1024
    assert mcnemar_p(8, 2) == pytest.approx(2 * sum(math.comb(10, k) for k in range(3)) / 2**10)
    assert mcnemar_p(2, 8) == mcnemar_p(8, 2)
    assert mcnemar_p(5, 5) == 1.0 and mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(12, 0) == pytest.approx(2 / 2**12)
    assert mcnemar_p(8, 2) == pytest.approx(scipy.stats.binomtest(8, 10, 0.5).pvalue)


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1 = 0.03, 0.06, 0.04, made monotone: 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0]) and holm([]) == []


def scores(correct: list[int], bpb: list[float] | None = None) -> ItemScores:
    return ItemScores(np.array(correct, dtype=bool), None if bpb is None else np.array(bpb))


def test_compare_methods_follows_the_protocol():
    """diff = 100 x mean over seeds of (mean over domains of mean_i d_i); McNemar on the discordant counts,
    pooled over a row's (seed, domain) strata; bpb differences where every run has them."""
    a = [{"p": scores([1, 1, 1, 0], [1.0, 2.0, 1.0, 2.0]), "q": scores([1, 0], [0.5, 0.5])},
         {"p": scores([1, 1, 0, 0], [1.0, 1.0, 1.0, 1.0]), "q": scores([1, 1], [0.5, 1.5])}]
    b = [{"p": scores([0, 1, 0, 0], [2.0, 2.0, 2.0, 2.0]), "q": scores([0, 0], [1.0, 1.0])},
         {"p": scores([0, 1, 0, 1], [1.0, 1.0, 1.0, 1.0]), "q": scores([1, 0], [0.5, 0.5])}]
    rows = {r.row: r for r in compare_methods(a, b, resamples=2000)}
    # p: seed 0 +0.5, seed 1 0.0 -> 25 points; q: seed 0 +0.5, seed 1 +0.5 -> 50; average (0.5 + 0.25) / 2 -> 37.5
    assert (rows["p"].diff.value, rows["q"].diff.value, rows[AVERAGE].diff.value) == pytest.approx((25, 50, 37.5))
    assert (rows["p"].a, rows["p"].b) == pytest.approx((62.5, 37.5)) and rows[AVERAGE].items == (6, 6)
    # discordant: p: seed 0 n10=2, n01=0; seed 1 n10=1, n01=1 -> (3, 1); q: (1, 0) + (1, 0) -> (2, 0)
    assert rows["p"].p == pytest.approx(mcnemar_p(3, 1)) and rows["q"].p == pytest.approx(mcnemar_p(2, 0))
    assert rows[AVERAGE].p == pytest.approx(mcnemar_p(5, 1))
    # bpb: p: seed 0 1.5 - 2 = -0.5, seed 1 0 -> -0.25; q: -0.5, +0.5 -> 0; average -0.125
    assert (rows["p"].bpb_diff.value, rows["q"].bpb_diff.value, rows[AVERAGE].bpb_diff.value) == pytest.approx(
        (-0.25, 0.0, -0.125))
    assert rows["p"].bpb_a == pytest.approx(1.25) and rows["p"].bpb_b == pytest.approx(1.5)
    assert all(r.diff.low <= r.diff.value <= r.diff.high for r in rows.values())
    # a domain without bpb in one run: no bpb for it, and no bpb average
    a[1]["q"] = scores([1, 1])
    rows = {r.row: r for r in compare_methods(a, b, resamples=500)}
    assert rows["q"].bpb_diff is None and rows[AVERAGE].bpb_diff is None and rows["p"].bpb_diff is not None


def test_row_means_and_refusals():
    assert row_means([{"a": np.array([1.0, 0.0]), "b": np.array([1.0])}]) == {"a": 0.5, "b": 1.0, AVERAGE: 0.75}
    with pytest.raises(ValueError, match="run 1 has domains"):
        bootstrap([{"a": np.ones(3)}, {"b": np.ones(3)}])
    with pytest.raises(ValueError, match="A has 1 runs and B 2"):
        compare_methods([{"a": scores([1])}], [{"a": scores([1])}, {"a": scores([0])}])
    with pytest.raises(ValueError, match="A has 2 items, B 1"):
        compare_methods([{"a": scores([1, 0])}], [{"a": scores([1])}])
