"""`polyfuse compare`: method A against method B from their eval outputs, paired by item id.

A *run* is one model's per-item records in an eval output (`polyfuse eval --out`, or a recipe work dir's
`eval/`), named `PATH[:MODEL]`; several runs of each method are its seeds, paired in the order given. Per
domain and on the average: the accuracy difference in points with its 95% paired bootstrap interval,
McNemar's exact p (and Holm's over the table), and the gold bits-per-byte difference with its interval
(`polyfuse.evaluation.stats`). The same comparisons go to an experiment file (`evidence`), a PNG and a table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

from polyfuse.data.io import atomic_write, read_rows
from polyfuse.errors import DataError, UserError
from polyfuse.evaluation.evaluate import EvalRecord, EvalResult, records_file
from polyfuse.evaluation.evidence import (
    BootstrapSettings,
    Evidence,
    comparison_entries,
    evidence_of_runs,
    read_evidence,
    recompute,
    write_evidence,
)
from polyfuse.evaluation.stats import (
    AVERAGE,
    RESAMPLES,
    ItemScores,
    Level,
    RowComparison,
    compare_methods,
    holm,
)


@dataclass(frozen=True)
class Run:
    """One model's results in one eval output, and how the user named it."""

    name: str  # PATH:MODEL
    result: EvalResult


def eval_folder(path: Path) -> Path:
    """The eval output at `path`: the folder itself, or a recipe work dir's `eval/`."""
    for folder in (path, path / "eval"):
        if (folder / "results.json").is_file():
            return folder
    raise UserError(f"{path}: no eval output here (results.json and records/ of `polyfuse eval --out`, or a "
                    "recipe work dir with an eval stage)")


def load_run(spec: str) -> Run:
    """`PATH` (an eval output holding one model) or `PATH:MODEL`."""
    path, model = spec, None
    if not Path(spec).exists() and ":" in spec:
        path, model = spec.rsplit(":", 1)
    if not Path(path).exists():
        raise UserError(f"{path}: not found (expected an eval output folder or a recipe work dir)")
    folder = eval_folder(Path(path))
    try:
        labels = list(json.loads((folder / "results.json").read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise DataError(f"{folder / 'results.json'}: not an eval summary ({err})") from None
    if model is None:
        if len(labels) != 1:
            raise UserError(f"{path} holds {len(labels)} models ({', '.join(labels)}): name one as {path}:MODEL")
        model = labels[0]
    elif model not in labels:
        raise UserError(f"{path}: no model {model!r} in its eval output; it holds {', '.join(labels)}")
    records = records_file(folder, model)
    if not records.is_file():
        raise DataError(f"{records}: missing (the per-item records of {model!r})")
    return Run(f"{path}:{model}", EvalResult(model=model, records=read_rows(records, EvalRecord)))


def _by_domain(run: Run) -> dict[str, dict[str, EvalRecord]]:
    found: dict[str, dict[str, EvalRecord]] = {}
    for record in run.result.records:
        items = found.setdefault(record.domain, {})
        if record.prompt_id in items:
            raise DataError(f"{run.name}: item {record.prompt_id!r} appears twice in domain {record.domain!r}")
        items[record.prompt_id] = record
    return found


def _scores(records: list[EvalRecord]) -> ItemScores:
    bits = [r.bpb for r in records]
    return ItemScores(np.array([r.correct for r in records], dtype=bool),
                      None if None in bits else np.array(bits, dtype=float))


def paired_scores(a: Run, b: Run) -> tuple[dict[str, ItemScores], dict[str, ItemScores]]:
    """Both runs' scores per domain on the same items in A's order; other item sets are refused."""
    items_a, items_b = _by_domain(a), _by_domain(b)
    if sorted(items_a) != sorted(items_b):
        raise UserError(f"{a.name} has domains {', '.join(sorted(items_a))} and {b.name} "
                        f"{', '.join(sorted(items_b))}: compare runs of the same items")
    for domain in sorted(items_a):
        only_a = [i for i in items_a[domain] if i not in items_b[domain]]
        only_b = [i for i in items_b[domain] if i not in items_a[domain]]
        if only_a or only_b:
            raise UserError(f"{a.name} and {b.name} hold different items in domain {domain!r}: "
                            f"{len(only_a)} only in the first (e.g. {', '.join(only_a[:3]) or '-'}), "
                            f"{len(only_b)} only in the second (e.g. {', '.join(only_b[:3]) or '-'})")
    return ({d: _scores(list(items.values())) for d, items in items_a.items()},
            {d: _scores([items_b[d][i] for i in items]) for d, items in items_a.items()})


@dataclass(frozen=True)
class Comparison:
    """A against B over their runs (seeds), row by row, and how the intervals were drawn."""

    a: str
    b: str
    runs: int
    level: Level
    resamples: int
    seed: int
    rows: list[RowComparison]
    scores_a: list[dict[str, ItemScores]]
    scores_b: list[dict[str, ItemScores]]

    @property
    def interval(self) -> str:
        over = "seeds, then items within each" if self.level == "seeds" else "items"
        return f"95% paired bootstrap over {over}"


def compare_results(a: Sequence[Run], b: Sequence[Run], names: tuple[str, str] | None = None,
                    level: Level | None = None, resamples: int = RESAMPLES, seed: int = 0) -> Comparison:
    """A vs B: run i of `a` paired with run i of `b` (one pair per seed), items matched by id. `names`: the
    methods' names (default: the models' labels, told apart when equal)."""
    if len(a) != len(b) or not a:
        raise UserError(f"method A has {len(a)} runs and method B {len(b)}: give one run of each per seed")
    pairs = [paired_scores(x, y) for x, y in zip(a, b, strict=True)]
    scores_a, scores_b = [p[0] for p in pairs], [p[1] for p in pairs]
    for run, scores in zip(a, scores_a, strict=True):
        if sorted(scores) != sorted(scores_a[0]):
            raise UserError(f"{run.name} covers domains {', '.join(sorted(scores))} and {a[0].name} "
                            f"{', '.join(sorted(scores_a[0]))}: every seed needs the same domains")
    if names is None:
        names = (a[0].result.model, b[0].result.model)
        if names[0] == names[1]:
            names = (f"{names[0]} (A)", f"{names[1]} (B)")
    level = level or ("seeds" if len(a) > 1 else "items")
    rows = compare_methods(scores_a, scores_b, level, resamples, seed)
    return Comparison(names[0], names[1], len(a), level, resamples, seed, rows, scores_a, scores_b)


def comparison_evidence(comparison: Comparison, experiment: str | None = None) -> Evidence:
    """The comparison as an experiment file: both methods' runs (seeds numbered by position) and its rows."""
    methods = {comparison.a: dict(enumerate(comparison.scores_a)), comparison.b: dict(enumerate(comparison.scores_b))}
    settings = BootstrapSettings(level=comparison.level, resamples=comparison.resamples, seed=comparison.seed)
    evidence = evidence_of_runs(experiment or f"{comparison.a} vs {comparison.b}", methods, settings)
    accuracy, bpb = comparison_entries(comparison.a, comparison.b, comparison.rows)
    return evidence.model_copy(update={"comparisons": accuracy, "bpb_comparisons": bpb})


def _interval(low: float, high: float, digits: int) -> str:
    return f"[{low:+.{digits}f}, {high:+.{digits}f}]"


def _items(row: RowComparison) -> str:
    low, high = min(row.items), max(row.items)
    return str(low) if low == high else f"{low}–{high}"


def comparison_tables(comparison: Comparison) -> list[Table]:
    """Accuracy (rows = domains then the average: items, accuracies, the difference in points with its
    interval, McNemar's p and Holm's over the table), then gold bits per byte where measured (lower is better)."""
    rows = comparison.rows
    runs = f"{comparison.runs} runs" if comparison.runs > 1 else "1 run"
    accuracy = Table(title=f"{comparison.a} (A) vs {comparison.b} (B), {runs}; {comparison.interval}",
                     caption="accuracy in %; diff = A - B in points", box=box.SIMPLE)
    for column in ("row", "n", "A %", "B %", "diff [95% CI]", "McNemar p", "Holm p"):
        accuracy.add_column(column, justify="left" if column == "row" else "right", no_wrap=column.startswith("diff"))
    for row, adjusted in zip(rows, holm([r.p for r in rows]), strict=True):
        accuracy.add_row(row.row, _items(row), f"{row.a:.1f}", f"{row.b:.1f}",
                         f"{row.diff.value:+.1f} {_interval(row.diff.low, row.diff.high, 1)}", f"{row.p:.2g}",
                         f"{adjusted:.2g}", style="bold" if row.row == AVERAGE else None)
    with_bpb = [row for row in rows if row.bpb_diff is not None]
    if not with_bpb:
        return [accuracy]
    bpb = Table(title="Gold bits per byte (lower is better)", caption="diff = A - B, < 0 favours A", box=box.SIMPLE)
    for column in ("row", "A", "B", "diff [95% CI]"):
        bpb.add_column(column, justify="left" if column == "row" else "right", no_wrap=column.startswith("diff"))
    for row in with_bpb:
        bpb.add_row(row.row, f"{row.bpb_a:.3f}", f"{row.bpb_b:.3f}",
                    f"{row.bpb_diff.value:+.3f} {_interval(row.bpb_diff.low, row.bpb_diff.high, 3)}",
                    style="bold" if row.row == AVERAGE else None)
    return [accuracy, bpb]


def comparison_chart(comparison: Comparison, path: Path) -> None:
    """The differences with their intervals as error bars: accuracy (points) and, where measured, gold bits
    per byte; one horizontal bar per row, zero marked."""
    from matplotlib.figure import Figure

    rows = comparison.rows
    panels = [("accuracy difference A - B (points)", [(r.row, r.diff) for r in rows])]
    with_bpb = [(r.row, r.bpb_diff) for r in rows if r.bpb_diff is not None]
    if with_bpb:
        panels.append(("gold bits per byte A - B (lower favours A)", with_bpb))
    figure = Figure(figsize=(5.0 * len(panels), 1.2 + 0.45 * len(rows)))
    for axes, (title, points) in zip(np.atleast_1d(figure.subplots(1, len(panels))), panels, strict=True):
        labels = [label for label, _ in points][::-1]
        estimates = [estimate for _, estimate in points][::-1]
        values = np.array([e.value for e in estimates])
        errors = np.array([[e.value - e.low for e in estimates], [e.high - e.value for e in estimates]])
        axes.errorbar(values, range(len(points)), xerr=errors, fmt="o", color="#c0392b", ecolor="black", capsize=4)
        axes.axvline(0, color="grey", linewidth=0.8, linestyle="--")
        axes.set_yticks(range(len(points)), labels)
        axes.set_xlabel(title)
    figure.suptitle(f"{comparison.a} vs {comparison.b}: {comparison.interval}", fontsize=9)
    figure.tight_layout()
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=120))


def run_compare(a: Sequence[str], b: Sequence[str], console: Console, json_path: Path | None = None,
                png_path: Path | None = None, experiment: str | None = None, level: Level | None = None,
                resamples: int = RESAMPLES, seed: int = 0) -> Comparison:
    """`polyfuse compare`: load the runs (`PATH[:MODEL]`), compare, print the table, write the files."""
    comparison = compare_results([load_run(spec) for spec in a], [load_run(spec) for spec in b], level=level,
                                 resamples=resamples, seed=seed)
    for table in comparison_tables(comparison):
        console.print(table)
    if json_path is not None:
        write_evidence(json_path, comparison_evidence(comparison, experiment))
        console.print(f"experiment file: {json_path}", soft_wrap=True)
    if png_path is not None:
        comparison_chart(comparison, png_path)
        console.print(f"chart: {png_path}", soft_wrap=True)
    return comparison


def print_recomputed(path: Path, console: Console) -> bool:
    """`polyfuse compare --recompute`: every comparison of an experiment file against its recomputation from
    the file's runs; True when all agree (to 1e-9)."""
    evidence = read_evidence(path)
    again = recompute(evidence)
    table = Table(title=f"{evidence.experiment}: comparisons recomputed from {len(evidence.runs)} runs")
    for column in ("a", "b", "row", "metric", "file", "recomputed", "agrees"):
        table.add_column(column)
    agreed = True
    for metric, listed, found in (("accuracy", evidence.comparisons, again.comparisons),
                                  ("bpb", evidence.bpb_comparisons, again.bpb_comparisons)):
        for old, new in zip(listed, found, strict=True):
            values_old, values_new = [old.diff, *old.ci95], [new.diff, *new.ci95]
            if metric == "accuracy":
                values_old.append(old.p)
                values_new.append(new.p)
            same = bool(np.allclose(values_old, values_new, rtol=0, atol=1e-9))
            agreed &= same
            table.add_row(old.a, old.b, old.domain, metric, _entry(old), _entry(new), "yes" if same else "[red]no[/]")
    console.print(table)
    return agreed


def _entry(entry) -> str:
    text = f"{entry.diff:+.4g} [{entry.ci95[0]:+.4g}, {entry.ci95[1]:+.4g}]"
    return text + (f" p={entry.p:.3g}" if hasattr(entry, "p") else "")
