"""Accuracy reports: a rich table for the terminal, and results.json / results.md / accuracy.png plus
per-example records on disk. Rows are models; columns are domains, then the average over domains. A run's
report (`run_report`) adds findings in words: what changed and by how much, with the noise, and why a
domain did not improve when its training data says why."""

from __future__ import annotations

import itertools
import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from polyfuse.data.io import atomic_write, atomic_write_text, read_rows, write_json, write_rows
from polyfuse.evaluation.evaluate import EvalRecord, EvalResult


def _file_name(label: str) -> str:
    return re.sub(r"[^\w.-]+", "_", label)


def _domains(results: dict[str, EvalResult]) -> list[str]:
    return sorted({d for result in results.values() for d in result.per_domain})


def _cells(result: EvalResult, domains: list[str]) -> list[str]:
    scores = result.per_domain
    cells = [f"{100 * scores[d].accuracy:.1f}" if d in scores else "-" for d in domains]
    return cells + [f"{100 * result.average:.1f}"]


def accuracy_table(results: dict[str, EvalResult]) -> Table:
    domains = _domains(results)
    table = Table(title="Accuracy (%)")
    table.add_column("model")
    for column in [*domains, "average"]:
        table.add_column(column, justify="right")
    for label, result in results.items():
        table.add_row(label, *_cells(result, domains))
    return table


def markdown_table(results: dict[str, EvalResult]) -> str:
    """Rows = models, columns = domains then the average, in percent."""
    domains = _domains(results)
    lines = [
        "| model | " + " | ".join([*domains, "average"]) + " |",
        "|---|" + "---:|" * (len(domains) + 1),
        *(f"| {label} | " + " | ".join(_cells(result, domains)) + " |" for label, result in results.items()),
    ]
    return "Accuracy (%), greedy decoding.\n\n" + "\n".join(lines) + "\n"


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
        scores = result.per_domain
        values = [100 * scores[d].accuracy if d in scores else 0.0 for d in groups[:-1]] + [100 * result.average]
        bars = axes.bar([g + k * width - 0.4 + width / 2 for g in range(len(groups))], values, width, label=label,
                        color=colour, edgecolor="black", linewidth=0.4)
        axes.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    axes.set_xticks(range(len(groups)), groups)
    axes.set_ylabel("accuracy (%)")
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
        label: EvalResult(model=label, records=read_rows(out_dir / "records" / f"{_file_name(label)}.jsonl", EvalRecord))
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
        write_rows(out_dir / "records" / f"{_file_name(label)}.jsonl", result.records)
    return out_dir


Z95 = 1.96  # two-sided 95% normal quantile


@dataclass
class Gain:
    """A change in accuracy, in points, with its noise: the half-width of a 95% interval over the held-out
    prompts (one run) or the standard deviation over seeds (several)."""

    points: float
    noise: float

    @property
    def clear(self) -> bool:
        return self.points - self.noise > 0

    def __str__(self) -> str:
        return f"{self.points:+.1f} ± {self.noise:.1f}"


def _paired(before: EvalResult, after: EvalResult, domain: str) -> tuple[float, float]:
    """Mean and variance of the mean of `after - before` per prompt of `domain` (the same prompts)."""
    base = {r.prompt_id: r.correct for r in before.records if r.domain == domain}
    diffs = [int(r.correct) - int(base[r.prompt_id]) for r in after.records if r.domain == domain and r.prompt_id in base]
    if not diffs:
        return 0.0, 0.0
    mean = sum(diffs) / len(diffs)
    spread = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) if len(diffs) > 1 else 0.0
    return mean, spread / len(diffs)


def gains(runs: list[dict[str, EvalResult]], before: str, after: str) -> dict[str, Gain]:
    """`after - before` per domain and on the average over domains ("average"). One run: paired 95% normal
    intervals over the prompts; several runs (seeds): mean and standard deviation over the runs."""
    domains = _domains({k: v for run in runs for k, v in run.items() if k in (before, after)})
    per_run = []
    for run in runs:
        paired = {d: _paired(run[before], run[after], d) for d in domains}
        average = sum(m for m, _ in paired.values()) / len(domains)
        per_run.append({**paired, "average": (average, sum(v for _, v in paired.values()) / len(domains) ** 2)})
    if len(runs) == 1:
        return {k: Gain(100 * m, 100 * Z95 * math.sqrt(v)) for k, (m, v) in per_run[0].items()}
    return {k: Gain(100 * statistics.mean(r[k][0] for r in per_run), 100 * statistics.stdev(r[k][0] for r in per_run))
            for k in per_run[0]}


def _mean_accuracy(runs: list[dict[str, EvalResult]], label: str, domain: str | None = None) -> float:
    values = [r[label].average if domain is None else r[label].per_domain[domain].accuracy for r in runs]
    return 100 * statistics.mean(values)


def describe_gains(
    runs: list[dict[str, EvalResult]], sources: set[str], domain_data: dict[str, dict[str, int]] | None = None,
) -> list[str]:
    """Markdown lines that say what fusion changed and by how much, with the noise, and why a domain did not
    improve when the training data says why. `runs`: the results of one run, or of one run per seed (the
    same models); the comparison is the pivot before fusion against the last trained model, step by step
    through the stages between. `domain_data`: per domain, counts of its training data (`SFT rows`, `pairs`,
    `correct samples`, `samples`)."""
    labels = [label for label in runs[0] if label not in sources]
    if len(labels) < 2:
        return []
    before, after = labels[0], labels[-1]
    total = gains(runs, before, after)
    prompts = sum(s.total for s in runs[0][after].per_domain.values())
    noise = (f"95% interval over {prompts} held-out prompts, paired" if len(runs) == 1
             else f"mean ± standard deviation over {len(runs)} seeds")
    lines = [f"**{after}** averages {_mean_accuracy(runs, after):.1f}% against {_mean_accuracy(runs, before):.1f}% "
             f"for **{before}**: {total['average']} points ({noise})."]
    if sources & set(runs[0]):
        best = max(sources & set(runs[0]), key=lambda s: _mean_accuracy(runs, s))
        lines.append(f"The best source on average, {best}, has {_mean_accuracy(runs, best):.1f}%.")
    if len(labels) > 2:
        steps = [f"{before} {_mean_accuracy(runs, before):.1f}"]
        steps += [f"{b} {_mean_accuracy(runs, b):.1f} ({gains(runs, a, b)['average']})" for a, b in itertools.pairwise(labels)]
        lines.append("Step by step: " + " → ".join(steps) + ".")
    lines.append("")
    for domain in _domains({before: runs[0][before], after: runs[0][after]}):
        gain = total[domain]
        line = (f"- {domain}: {_mean_accuracy(runs, before, domain):.1f} → {_mean_accuracy(runs, after, domain):.1f} "
                f"({gain})")
        if not gain.clear:
            line += ": no clear gain" + _why(domain, domain_data)
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
