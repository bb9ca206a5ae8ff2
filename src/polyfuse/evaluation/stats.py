"""Paired statistics for comparing two methods on the same items (the evidence protocol's definitions,
/shared/methods/evidence-protocol.md sections 1-2; docs/design.md, "Evaluation statistics").

Data layout: `runs` holds one mapping per run (seed): domain -> the per-item values of that (seed, domain),
in one item order shared by the two methods (for a paired comparison: the differences a_i - b_i). A *row*
is a domain, or `AVERAGE`: the unweighted mean over domains. Every row's value is the mean over seeds of
that row's per-run value, so

    diff = 100 * mean over seeds of (mean over domains of mean_i d_i)        (points)

- **One-level bootstrap** (`level="items"`): items resampled with replacement within each (seed, domain),
  by `scipy.stats.bootstrap` (each stratum's differences are one sample, resampled on its own; resampling
  the differences keeps each pair together, and with one stratum it is scipy's `paired=True` exactly).
- **Two-level bootstrap** (`level="seeds"`): the seeds resampled with replacement, then the items within
  each drawn seed, each draw on its own (no library does this; numpy, vectorised).
- Percentile intervals, 10,000 resamples, a fixed seed; every row comes from the same resamples.
- **McNemar's exact test** on the discordant counts (statsmodels); over several (seed, domain) strata the
  tables are summed (the stratified matched-pairs test reduces to McNemar on pooled counts).
- **Holm's correction** over the p-values of a table (statsmodels).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

AVERAGE = "average"
RESAMPLES = 10_000
CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0
Level = Literal["items", "seeds"]
Runs = Sequence[Mapping[str, np.ndarray]]

_DRAW_BUDGET = 4_000_000  # item draws held at once (one chunk of resamples)
_FEW_VALUES = 16  # up to this many distinct values, a resampled mean is drawn from multinomial counts


@dataclass(frozen=True)
class Estimate:
    """A row's value and its percentile interval, in the units of the values given (callers scale)."""

    value: float
    low: float
    high: float

    def scaled(self, factor: float) -> Estimate:
        return Estimate(self.value * factor, self.low * factor, self.high * factor)

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def domains_of(runs: Runs) -> list[str]:
    """The domains every run holds (sorted); a run without items in one, or with other domains, is an error."""
    if not runs:
        raise ValueError("no runs to compare")
    domains = sorted(runs[0])
    for index, run in enumerate(runs):
        if sorted(run) != domains:
            raise ValueError(f"run {index} has domains {sorted(run)}, run 0 has {domains}")
        empty = [d for d in domains if len(run[d]) == 0]
        if empty:
            raise ValueError(f"run {index} has no items in domain {empty[0]!r}")
    return domains


def row_means(runs: Runs) -> dict[str, float]:
    """Each domain's mean over seeds of its per-run mean, and `AVERAGE`, the mean of those over domains."""
    domains = domains_of(runs)
    rows = {d: float(np.mean([np.mean(run[d]) for run in runs])) for d in domains}
    return {**rows, AVERAGE: float(np.mean(list(rows.values())))}


def bootstrap(runs: Runs, level: Level = "items", resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
              confidence: float = CONFIDENCE) -> dict[str, Estimate]:
    """Every row's mean (`row_means`) with its percentile bootstrap interval (see the module doc)."""
    domains = domains_of(runs)
    point = row_means(runs)
    rng = np.random.default_rng(seed)
    if level == "items":
        lows, highs = _item_interval(runs, domains, resamples, rng, confidence)
    else:
        draws = _two_level_draws(runs, domains, resamples, rng)
        alpha = (1 - confidence) / 2
        lows, highs = np.quantile(draws, [alpha, 1 - alpha], axis=-1)  # linear, as scipy's percentile method
    rows = [*domains, AVERAGE]
    return {row: Estimate(point[row], float(lows[k]), float(highs[k])) for k, row in enumerate(rows)}


def _item_interval(runs: Runs, domains: list[str], resamples: int, rng: np.random.Generator,
                   confidence: float) -> tuple[np.ndarray, np.ndarray]:
    from scipy.stats import bootstrap as scipy_bootstrap

    # A one-item stratum resamples to itself; scipy wants two observations, and [x, x] resamples the same.
    samples = [np.repeat(run[d], 2) if len(run[d]) == 1 else np.asarray(run[d], dtype=float)
               for run in runs for d in domains]

    def statistic(*resampled: np.ndarray, axis: int = -1) -> np.ndarray:
        means = np.stack([sample.mean(axis=axis) for sample in resampled])  # (strata, ...)
        per_domain = means.reshape(len(runs), len(domains), *means.shape[1:]).mean(0)
        return np.concatenate([per_domain, per_domain.mean(0, keepdims=True)])

    batch = max(1, _DRAW_BUDGET // sum(len(s) for s in samples))
    result = scipy_bootstrap(samples, statistic, n_resamples=resamples, batch=batch, vectorized=True,
                             paired=False, method="percentile", confidence_level=confidence, rng=rng)
    return np.atleast_1d(result.confidence_interval.low), np.atleast_1d(result.confidence_interval.high)


def _two_level_draws(runs: Runs, domains: list[str], resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(rows, resamples): per resample, seeds drawn with replacement, then items within each drawn seed."""
    picks = rng.integers(0, len(runs), size=(resamples, len(runs)))
    per_domain = np.empty((len(domains), resamples))
    for k, domain in enumerate(domains):
        means = np.empty((resamples, len(runs)))
        for s, run in enumerate(runs):
            drawn = picks == s
            means[drawn] = resampled_means(np.asarray(run[domain], dtype=float), int(drawn.sum()), rng)
        per_domain[k] = means.mean(1)
    return np.vstack([per_domain, per_domain.mean(0, keepdims=True)])


def resampled_means(values: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` means of `values` resampled with replacement. With few distinct values (0/1 verdicts, their
    differences) the counts of each value in a resample are multinomial: the same distribution, drawn in
    O(distinct values) instead of O(items)."""
    n = len(values)
    distinct, freq = np.unique(values, return_counts=True)
    if len(distinct) <= _FEW_VALUES:
        return rng.multinomial(n, freq / n, size=count) @ distinct / n
    out = np.empty(count)
    step = max(1, _DRAW_BUDGET // n)
    for start in range(0, count, step):
        rows = min(step, count - start)
        out[start : start + rows] = values[rng.integers(0, n, size=(rows, n))].mean(1)
    return out


def discordant(a_correct: np.ndarray, b_correct: np.ndarray) -> tuple[int, int]:
    """(n10, n01): items A got right and B wrong, and the reverse."""
    a, b = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    return int((a & ~b).sum()), int((~a & b).sum())


def mcnemar_p(n10: int, n01: int) -> float:
    """McNemar's exact two-sided p-value (a binomial test of n10 out of n10 + n01 at 1/2); 1 with no
    discordant pair. Concordant counts do not enter the exact test."""
    if n10 + n01 == 0:
        return 1.0
    from statsmodels.stats.contingency_tables import mcnemar

    return float(mcnemar([[0, n10], [n01, 0]], exact=True).pvalue)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (family-wise error over the tests of one table)."""
    if not p_values:
        return []
    from statsmodels.stats.multitest import multipletests

    return [float(p) for p in multipletests(list(p_values), method="holm")[1]]


@dataclass(frozen=True)
class ItemScores:
    """One method's results on the items of one (seed, domain), in an item order the methods share."""

    correct: np.ndarray  # bool per item
    bpb: np.ndarray | None = None  # gold bits per byte per item; None unless every item has one


@dataclass(frozen=True)
class RowComparison:
    """A against B on one row (a domain or `AVERAGE`): accuracies and their difference in points, McNemar's
    p, and the gold bits-per-byte difference (lower is better; None where a run lacks bpb)."""

    row: str
    items: tuple[int, ...]  # paired items per run (seed)
    a: float
    b: float
    diff: Estimate
    p: float
    bpb_a: float | None = None
    bpb_b: float | None = None
    bpb_diff: Estimate | None = None


MethodRuns = Sequence[Mapping[str, ItemScores]]


def compare_methods(a: MethodRuns, b: MethodRuns, level: Level | None = None, resamples: int = RESAMPLES,
                    seed: int = BOOTSTRAP_SEED) -> list[RowComparison]:
    """A vs B per domain and on the average: run i of A is paired with run i of B (the same seed), item k of
    a (seed, domain) with item k. `level`: None picks the two-level bootstrap when there are several runs."""
    if len(a) != len(b) or not a:
        raise ValueError(f"A has {len(a)} runs and B {len(b)}: give one of each per seed")
    domains = domains_of([{d: s.correct for d, s in run.items()} for run in a])
    for index, (run_a, run_b) in enumerate(zip(a, b, strict=True)):
        if sorted(run_b) != domains:
            raise ValueError(f"run {index}: A has domains {domains}, B has {sorted(run_b)}")
        for d in domains:
            if len(run_a[d].correct) != len(run_b[d].correct):
                raise ValueError(f"run {index}, domain {d!r}: A has {len(run_a[d].correct)} items, B {len(run_b[d].correct)}")
    level = level or ("seeds" if len(a) > 1 else "items")

    def per_run(scores: MethodRuns, field: str, only: list[str]) -> list[dict[str, np.ndarray]]:
        return [{d: np.asarray(getattr(run[d], field), dtype=float) for d in only} for run in scores]

    accuracy = bootstrap([{d: x[d] - y[d] for d in domains} for x, y in
                          zip(per_run(a, "correct", domains), per_run(b, "correct", domains), strict=True)],
                         level, resamples, seed)
    means_a, means_b = row_means(per_run(a, "correct", domains)), row_means(per_run(b, "correct", domains))
    with_bpb = [d for d in domains if all(run[d].bpb is not None for run in [*a, *b])]
    bpb_diff: dict[str, Estimate] = {}
    bpb_a: dict[str, float] = {}
    bpb_b: dict[str, float] = {}
    if with_bpb:
        bpb_diff = bootstrap([{d: x[d] - y[d] for d in with_bpb} for x, y in
                              zip(per_run(a, "bpb", with_bpb), per_run(b, "bpb", with_bpb), strict=True)],
                             level, resamples, seed)
        bpb_a, bpb_b = row_means(per_run(a, "bpb", with_bpb)), row_means(per_run(b, "bpb", with_bpb))
        if len(with_bpb) < len(domains):  # an average over some domains is not the average
            for found in (bpb_diff, bpb_a, bpb_b):
                found.pop(AVERAGE)

    def tables(only: list[str]) -> tuple[int, int]:
        counts = [discordant(x[d].correct, y[d].correct) for x, y in zip(a, b, strict=True) for d in only]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    rows = []
    for row in [*domains, AVERAGE]:
        only = domains if row == AVERAGE else [row]
        rows.append(RowComparison(
            row=row, items=tuple(sum(len(run[d].correct) for d in only) for run in a),
            a=100 * means_a[row], b=100 * means_b[row], diff=accuracy[row].scaled(100), p=mcnemar_p(*tables(only)),
            bpb_a=bpb_a.get(row), bpb_b=bpb_b.get(row), bpb_diff=bpb_diff.get(row),
        ))
    return rows
