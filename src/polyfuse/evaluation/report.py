"""Accuracy reports: a rich table for the terminal, and results.json / results.md / accuracy.png plus
per-example records on disk. Rows are models; columns are domains, then the average over domains."""

from __future__ import annotations

import json
import re
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
