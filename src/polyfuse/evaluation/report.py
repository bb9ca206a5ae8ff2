"""Accuracy reports: rich tables for the terminal, and results.json / results.md / accuracy.png plus
per-example records on disk. Rows are models; columns are domains, then the average over domains; the chart
draws each accuracy's 95% bootstrap interval over the items. A run's report (`run_report`) adds findings in
words: what changed and by how much, with its 95% paired bootstrap interval (`polyfuse.evaluation.stats`),
and why a domain did not improve when its training data says why."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
from rich.table import Table

from polyfuse.data.io import atomic_write, atomic_write_text, read_rows, write_json, write_rows
from polyfuse.evaluation.compare import Comparison, Run, compare_results
from polyfuse.evaluation.evaluate import EvalRecord, EvalResult, records_file
from polyfuse.evaluation.stats import AVERAGE, Estimate, bootstrap


def _domains(results: dict[str, EvalResult]) -> list[str]:
    return sorted({d for result in results.values() for d in result.per_domain})


def _cells(result: EvalResult, domains: list[str]) -> list[str]:
    scores = result.per_domain
    cells = [f"{100 * scores[d].accuracy:.1f}" if d in scores else "-" for d in domains]
    return cells + [f"{100 * result.average:.1f}"]


def _bpb_cells(result: EvalResult, domains: list[str]) -> list[str]:
    scores = result.per_domain
    cells = [f"{scores[d].bpb:.3f}" if d in scores and scores[d].bpb is not None else "-" for d in domains]
    return cells + ["-" if result.average_bpb is None else f"{result.average_bpb:.3f}"]


def _has_bpb(results: dict[str, EvalResult]) -> bool:
    return any(s.bpb is not None for result in results.values() for s in result.per_domain.values())


def _table(results: dict[str, EvalResult], title: str, cells) -> Table:
    domains = _domains(results)
    table = Table(title=title)
    table.add_column("model")
    for column in [*domains, "average"]:
        table.add_column(column, justify="right")
    for label, result in results.items():
        table.add_row(label, *cells(result, domains))
    return table


def accuracy_table(results: dict[str, EvalResult]) -> Table:
    return _table(results, "Accuracy (%)", _cells)


def bpb_table(results: dict[str, EvalResult]) -> Table | None:
    """Mean gold bits per byte per domain (lower is better); None when no model has any."""
    return _table(results, "Gold bits per byte (lower is better)", _bpb_cells) if _has_bpb(results) else None


def _markdown(results: dict[str, EvalResult], cells) -> str:
    domains = _domains(results)
    return "\n".join([
        "| model | " + " | ".join([*domains, "average"]) + " |",
        "|---|" + "---:|" * (len(domains) + 1),
        *(f"| {label} | " + " | ".join(cells(result, domains)) + " |" for label, result in results.items()),
    ]) + "\n"


def markdown_table(results: dict[str, EvalResult]) -> str:
    """Rows = models, columns = domains then the average, in percent; then gold bits per byte, when measured."""
    text = "Accuracy (%), greedy decoding.\n\n" + _markdown(results, _cells)
    if _has_bpb(results):
        text += "\nGold bits per byte (teacher-forced gold answer; lower is better).\n\n" + _markdown(results, _bpb_cells)
    return text


def accuracy_intervals(result: EvalResult) -> dict[str, Estimate]:
    """Each domain's accuracy and the average's, in points, with 95% bootstrap intervals over the items."""
    by_domain: dict[str, list[bool]] = {}
    for record in result.records:
        by_domain.setdefault(record.domain, []).append(record.correct)
    found = bootstrap([{d: np.array(v, dtype=float) for d, v in by_domain.items()}])
    return {row: estimate.scaled(100) for row, estimate in found.items()}


def _colours(labels: list[str], sources: set[str]) -> list:
    """Sources in shades of grey-blue, everything else (the pivot and its stages) in warm shades, darker for later."""
    from matplotlib import colormaps

    others = [label for label in labels if label not in sources]
    cold, warm = colormaps["Blues"], colormaps["Oranges"]
    shade = {label: cold(0.35 + 0.45 * i / max(len(sources) - 1, 1)) for i, label in enumerate(sorted(sources))}
    shade.update({label: warm(0.35 + 0.55 * i / max(len(others) - 1, 1)) for i, label in enumerate(others)})
    return [shade[label] for label in labels]


def _chart(results: dict[str, EvalResult], path: Path, sources: set[str], title: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    groups = [*_domains(results), "average"]
    width = 0.8 / max(len(results), 1)
    figure = Figure(figsize=(max(6.0, len(groups) * (0.6 + 0.4 * len(results))), 4.4))
    axes = figure.subplots()
    for (label, result), colour in zip(results.items(), _colours(list(results), sources & set(results)), strict=True):
        k = list(results).index(label)
        intervals = accuracy_intervals(result)
        found = [intervals.get(group) for group in groups]  # a domain this model was not evaluated on: no bar
        values = [e.value if e else 0.0 for e in found]
        errors = [[e.value - e.low if e else 0.0 for e in found], [e.high - e.value if e else 0.0 for e in found]]
        bars = axes.bar([g + k * width - 0.4 + width / 2 for g in range(len(groups))], values, width, label=label,
                        color=colour, edgecolor="black", linewidth=0.4, yerr=errors, capsize=2,
                        error_kw={"elinewidth": 0.6, "ecolor": "black"})
        axes.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    axes.set_xticks(range(len(groups)), groups)
    axes.set_ylabel("accuracy (%), 95% interval")
    axes.set_ylim(0, 108)
    axes.set_title(title)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # outside the bars
    figure.tight_layout()
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=120))


def load_eval_report(out_dir: str | Path) -> dict[str, EvalResult]:
    """The results written by `write_eval_report`, back as `EvalResult`s (from the per-example records)."""
    out_dir = Path(out_dir)
    labels = json.loads((out_dir / "results.json").read_text())
    return {
        label: EvalResult(model=label, records=read_rows(records_file(out_dir, label), EvalRecord))
        for label in labels
    }


def write_eval_report(
    results: dict[str, EvalResult], out_dir: str | Path, sources: set[str] | None = None,
    title: str = "Held-out accuracy per domain",
) -> Path:
    """Write results.json, results.md, accuracy.png and records/<model>.jsonl; returns `out_dir`.
    `sources` names the source models, drawn in cold colours apart from the pivot and its stages."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "results.json", {label: result.summary() for label, result in results.items()})
    atomic_write_text(out_dir / "results.md", markdown_table(results))
    _chart(results, out_dir / "accuracy.png", sources or set(), title)
    for label, result in results.items():
        write_rows(records_file(out_dir, label), result.records)
    return out_dir


def compare_labels(runs: list[dict[str, EvalResult]], a: str, b: str) -> Comparison:
    """Model `a` against model `b` of the same runs (one per seed): the paired comparison of
    `polyfuse.evaluation.compare`, two-level over seeds when there are several."""
    return compare_results([Run(a, run[a]) for run in runs], [Run(b, run[b]) for run in runs], names=(a, b))


def _gain(row) -> str:
    return f"{row.diff.value:+.1f} [{row.diff.low:+.1f}, {row.diff.high:+.1f}]"


def describe_gains(
    runs: list[dict[str, EvalResult]], sources: set[str], domain_data: dict[str, dict[str, int]] | None = None,
) -> list[str]:
    """Markdown lines that say what fusion changed and by how much, with 95% paired bootstrap intervals, and
    why a domain did not improve when the training data says why. `runs`: the results of one run, or of one
    run per seed (the same models); the comparison is the pivot before fusion against the last trained model
    (and against SFT, when a later stage followed it), step by step through the stages between.
    `domain_data`: per domain, counts of its training data (`SFT rows`, `pairs`, `correct samples`, `samples`)."""
    labels = [label for label in runs[0] if label not in sources]
    if len(labels) < 2:
        return []
    before, after = labels[0], labels[-1]
    total = compare_labels(runs, after, before)
    rows = {row.row: row for row in total.rows}
    average = rows[AVERAGE]
    how = (f"95% interval, paired bootstrap over {average.items[0]} held-out prompts; McNemar p = {average.p:.2g}"
           if len(runs) == 1 else f"95% interval, paired bootstrap over {len(runs)} seeds and their held-out prompts")
    lines = [f"**{after}** averages {average.a:.1f}% against {average.b:.1f}% for **{before}**: "
             f"{average.diff.value:+.1f} points [{average.diff.low:+.1f}, {average.diff.high:+.1f}] ({how})."]
    sft = next((label for label in labels[1:-1] if label.endswith("+SFT")), None)
    if sft is not None:
        against = next(r for r in compare_labels(runs, after, sft).rows if r.row == AVERAGE)
        lines.append(f"Against **{sft}** ({against.b:.1f}%): {_gain(against)} points.")
    if average.bpb_diff is not None:
        lines.append(f"Gold bits per byte (lower is better): {average.bpb_b:.3f} → {average.bpb_a:.3f} "
                     f"({average.bpb_diff.value:+.3f} [{average.bpb_diff.low:+.3f}, {average.bpb_diff.high:+.3f}]).")
    if sources & set(runs[0]):
        best = max(sources & set(runs[0]), key=lambda s: np.mean([run[s].average for run in runs]))
        lines.append(f"The best source on average, {best}, has {100 * np.mean([run[best].average for run in runs]):.1f}%.")
    if len(labels) > 2:
        steps = [f"{before} {average.b:.1f}"]
        for a, b in itertools.pairwise(labels):
            step = next(r for r in compare_labels(runs, b, a).rows if r.row == AVERAGE)
            steps.append(f"{b} {step.a:.1f} ({_gain(step)})")
        lines.append("Step by step: " + " → ".join(steps) + ".")
    lines.append("")
    for row in total.rows:
        if row.row == AVERAGE:
            continue
        line = f"- {row.row}: {row.b:.1f} → {row.a:.1f} ({_gain(row)})"
        if row.diff.low <= 0:
            line += ": no clear gain" + _why(row.row, domain_data)
        lines.append(line + ".")
    return lines


def _why(domain: str, domain_data: dict[str, dict[str, int]] | None) -> str:
    """What the training data of `domain` held, against the other domains'."""
    if not domain_data or domain not in domain_data:
        return ""
    mine, others = domain_data[domain], [v for k, v in domain_data.items() if k != domain]
    parts = []
    for key in ("SFT rows", "pairs"):
        if key in mine:
            spread = sorted(o.get(key, 0) for o in others)
            elsewhere = f" (other domains {spread[0]}–{spread[-1]})" if spread else ""
            parts.append(f"{key} {mine[key]}{elsewhere}")
    if mine.get("samples"):
        parts.append(f"{100 * mine['correct samples'] / mine['samples']:.0f}% of its {mine['samples']} sampled "
                     "responses were correct")
    return "; its training data: " + ", ".join(parts) if parts else ""


def run_report(title: str, findings: list[str], results: dict[str, EvalResult], chart: str, data: list[str],
               timings: list[tuple[str, str]]) -> str:
    """The Markdown report of a run: the findings, the accuracy table and chart, the data, the wall times."""
    return "\n".join([
        f"# {title}", "", *findings, "",
        "## Accuracy", "", "On held-out prompts. " + markdown_table(results), f"![accuracy]({chart})", "",
        "## Data", "", *data, "",
        "## Wall time", "", "| step | wall time |", "|---|---:|", *(f"| {step} | {time} |" for step, time in timings), "",
    ])
