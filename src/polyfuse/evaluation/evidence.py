"""Experiment files (`docs/evidence/<experiment>.json`): every run's per-item verdicts and gold bits per
byte, and the comparisons computed from them, so that anyone can recompute every interval (`recompute`).

The shape is issue 21's (item 6) and the evidence protocol's (section 5)::

    {"experiment": str, "items": {domain: n_items},
     "runs": [{"method", "seed", "split": "test", "domain", "correct": "0110...", "bpb": [float, ...]}],
     "comparisons": [{"a", "b", "domain": domain or "average", "diff": points, "ci95": [low, high], "p"}]}

plus three keys of polyfuse's: `bpb_comparisons` (the same rows for gold bits per byte, `diff = bpb_a - bpb_b`,
no test), `bootstrap` (the interval's level, resamples, seed and confidence, so a recomputation draws the
same resamples) and `protocol` (free-form: how the runs were made, for the reader). `correct` has one
character per item, in one item order for every method of a (seed, domain); `bpb` is empty when a run has no gold bits per byte. Comparisons use the `test` runs;
`validation` runs may be included. `p` is McNemar's exact test on the row's discordant counts, pooled over
its (seed, domain) strata, not Holm-corrected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from polyfuse.data.io import write_json
from polyfuse.errors import DataError
from polyfuse.evaluation.stats import (
    BOOTSTRAP_SEED,
    CONFIDENCE,
    RESAMPLES,
    ItemScores,
    Level,
    RowComparison,
    compare_methods,
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EvidenceRun(_Strict):
    method: str
    seed: int
    split: Literal["test", "validation"] = "test"
    domain: str
    correct: str = Field(pattern=r"^[01]*$", description="One character per item: 1 right, 0 wrong.")
    bpb: list[float] = Field(default_factory=list, description="Gold bits per byte per item; empty when absent.")

    def scores(self) -> ItemScores:
        return ItemScores(np.frombuffer(self.correct.encode(), dtype=np.uint8) == ord("1"),
                          np.asarray(self.bpb) if self.bpb else None)


class Comparison(_Strict):
    a: str
    b: str
    domain: str
    diff: float
    ci95: tuple[float, float]
    p: float


class BpbComparison(_Strict):
    a: str
    b: str
    domain: str
    diff: float
    ci95: tuple[float, float]


class BootstrapSettings(_Strict):
    level: Level | None = Field(default=None, description="items, seeds (two-level), or None: seeds when several.")
    resamples: int = Field(default=RESAMPLES, ge=1)
    seed: int = BOOTSTRAP_SEED
    confidence: float = Field(default=CONFIDENCE, gt=0, lt=1)


class Evidence(_Strict):
    experiment: str
    items: dict[str, int]
    runs: list[EvidenceRun]
    comparisons: list[Comparison] = Field(default_factory=list)
    bpb_comparisons: list[BpbComparison] = Field(default_factory=list)
    bootstrap: BootstrapSettings = Field(default_factory=BootstrapSettings)
    protocol: dict[str, Any] = Field(default_factory=dict, description=(
        "How the runs were made (chosen settings, data counts, wall time): a record for the reader, unused by "
        "the statistics."))

    @model_validator(mode="after")
    def _consistent(self) -> Evidence:
        seen = set()
        for index, run in enumerate(self.runs):
            key = (run.method, run.seed, run.split, run.domain)
            if key in seen:
                raise ValueError(f"runs.{index}: a second run of method {run.method!r}, seed {run.seed}, "
                                 f"split {run.split!r}, domain {run.domain!r}")
            seen.add(key)
            if run.split == "test":
                if run.domain not in self.items:
                    raise ValueError(f"runs.{index}: domain {run.domain!r} is not in 'items' ({', '.join(self.items)})")
                if len(run.correct) != self.items[run.domain]:
                    raise ValueError(f"runs.{index}: 'correct' has {len(run.correct)} items, 'items' says "
                                     f"{self.items[run.domain]} for domain {run.domain!r}")
            if run.bpb and len(run.bpb) != len(run.correct):
                raise ValueError(f"runs.{index}: 'bpb' has {len(run.bpb)} values for {len(run.correct)} items")
        return self

    def method_runs(self, method: str, split: str = "test") -> dict[int, dict[str, ItemScores]]:
        """seed -> domain -> scores of one method."""
        found: dict[int, dict[str, ItemScores]] = {}
        for run in self.runs:
            if run.method == method and run.split == split:
                found.setdefault(run.seed, {})[run.domain] = run.scores()
        if not found:
            raise DataError(f"experiment {self.experiment!r}: no {split} runs of method {method!r}")
        return dict(sorted(found.items()))


def evidence_runs(method: str, runs: Mapping[int, Mapping[str, ItemScores]], split: str = "test") -> list[EvidenceRun]:
    """The file's run entries of one method: seed -> domain -> scores."""
    return [
        EvidenceRun(method=method, seed=seed, split=split, domain=domain,
                    correct="".join("1" if ok else "0" for ok in scores.correct),
                    bpb=[] if scores.bpb is None else [float(x) for x in scores.bpb])
        for seed, per_domain in runs.items() for domain, scores in sorted(per_domain.items())
    ]


def evidence_of_runs(experiment: str, methods: Mapping[str, Mapping[int, Mapping[str, ItemScores]]],
                     bootstrap: BootstrapSettings) -> Evidence:
    """An experiment file holding the runs (method -> seed -> domain -> scores) and no comparisons yet."""
    runs = [run for method, per_seed in methods.items() for run in evidence_runs(method, per_seed)]
    items: dict[str, int] = {}
    for run in runs:
        if items.setdefault(run.domain, len(run.correct)) != len(run.correct):
            raise DataError(f"experiment {experiment!r}: domain {run.domain!r} has {items[run.domain]} items in one "
                            f"run and {len(run.correct)} in another ({run.method}, seed {run.seed}); an experiment "
                            "file holds one item count per domain")
    return Evidence(experiment=experiment, items=dict(sorted(items.items())), runs=runs, bootstrap=bootstrap)


def paired_rows(evidence: Evidence, a: str, b: str) -> list[RowComparison]:
    """A vs B on the evidence's test runs, seed by seed, with its bootstrap settings."""
    runs_a, runs_b = evidence.method_runs(a), evidence.method_runs(b)
    if list(runs_a) != list(runs_b):
        raise DataError(f"experiment {evidence.experiment!r}: {a!r} has seeds {list(runs_a)}, {b!r} has {list(runs_b)}")
    settings = evidence.bootstrap
    try:
        return compare_methods(list(runs_a.values()), list(runs_b.values()), settings.level, settings.resamples,
                               settings.seed)
    except ValueError as err:
        raise DataError(f"experiment {evidence.experiment!r}, {a} vs {b}: {err}") from None


def comparison_entries(a: str, b: str, rows: Sequence[RowComparison]) -> tuple[list[Comparison], list[BpbComparison]]:
    accuracy = [Comparison(a=a, b=b, domain=r.row, diff=r.diff.value, ci95=(r.diff.low, r.diff.high), p=r.p)
                for r in rows]
    bpb = [BpbComparison(a=a, b=b, domain=r.row, diff=r.bpb_diff.value, ci95=(r.bpb_diff.low, r.bpb_diff.high))
           for r in rows if r.bpb_diff is not None]
    return accuracy, bpb


def build_evidence(experiment: str, methods: Mapping[str, Mapping[int, Mapping[str, ItemScores]]],
                   pairs: Sequence[tuple[str, str]], level: Level | None = None, resamples: int = RESAMPLES,
                   seed: int = BOOTSTRAP_SEED) -> Evidence:
    """An experiment file from every method's test runs (method -> seed -> domain -> scores) and the (a, b)
    pairs to compare (every domain and the average of each)."""
    evidence = evidence_of_runs(experiment, methods, BootstrapSettings(level=level, resamples=resamples, seed=seed))
    for a, b in pairs:
        accuracy, bpb = comparison_entries(a, b, paired_rows(evidence, a, b))
        evidence.comparisons.extend(accuracy)
        evidence.bpb_comparisons.extend(bpb)
    return evidence


def recompute(evidence: Evidence) -> Evidence:
    """The evidence with every listed comparison recomputed from its runs (same rows, same order)."""
    pairs = list(dict.fromkeys((c.a, c.b) for c in [*evidence.comparisons, *evidence.bpb_comparisons]))
    accuracy: dict[tuple[str, str, str], Comparison] = {}
    bpb: dict[tuple[str, str, str], BpbComparison] = {}
    for a, b in pairs:
        found_accuracy, found_bpb = comparison_entries(a, b, paired_rows(evidence, a, b))
        accuracy.update({(c.a, c.b, c.domain): c for c in found_accuracy})
        bpb.update({(c.a, c.b, c.domain): c for c in found_bpb})

    def again(table: dict, listed: Sequence) -> list:
        missing = [c for c in listed if (c.a, c.b, c.domain) not in table]
        if missing:
            raise DataError(f"experiment {evidence.experiment!r}: no row {missing[0].domain!r} for "
                            f"{missing[0].a} vs {missing[0].b} in the runs")
        return [table[(c.a, c.b, c.domain)] for c in listed]

    return evidence.model_copy(update={"comparisons": again(accuracy, evidence.comparisons),
                                       "bpb_comparisons": again(bpb, evidence.bpb_comparisons)})


def write_evidence(path: str | Path, evidence: Evidence) -> Path:
    write_json(path, evidence.model_dump(mode="json"))
    return Path(path)


def read_evidence(path: str | Path) -> Evidence:
    """An experiment file, validated; a malformed one is a `DataError` naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: experiment file not found")
    try:
        return Evidence.model_validate_json(path.read_bytes())
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the file"
        raise DataError(f"{path}: {where}: {first['msg'].removeprefix('Value error, ')}") from None
