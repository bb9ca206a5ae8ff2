"""What the multi-seed toy-world benches share: cached steps, timing, and the mean ± sd table and chart.

`runs` are per-seed result dicts holding `seed` and `accuracy[label]` in the layout of
`polyfuse.evaluation` results (`average`, `per_domain[domain]["accuracy"]`).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from polyfuse.data.io import write_json

# `--smoke`: the tiny world with a few prompts, one epoch and a small eval set: every step runs, in seconds.
SMOKE_DATA = ["prompts.toyworld.per_domain=8", "eval.prompts.toyworld.per_domain=4", "sample.chunk_size=8"]


def timed(times: dict[str, float], key: str, fn: Callable[[], Any]) -> Any:
    """Run `fn`; record its wall time under `key` unless an earlier (uncached) run recorded it already."""
    started = time.perf_counter()
    result = fn()
    times.setdefault(key, round(time.perf_counter() - started, 1))
    return result


def cached_json(path: Path, compute: Callable[[], dict]) -> dict:
    """The JSON at `path`, computed and written (atomically) only when it is not there: reruns skip work."""
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    write_json(path, value)
    return value


def cell_values(runs: list[dict], label: str, column: str) -> list[float]:
    """Accuracy in percent of `label` on `column` (a domain or "average"), one value per seed."""
    return [100 * (run["accuracy"][label]["average"] if column == "average"
                   else run["accuracy"][label]["per_domain"][column]["accuracy"]) for run in runs]


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def markdown(runs: list[dict], labels: list[str], columns: list[str]) -> str:
    """Rows = labels, columns = domains and the average, cells mean ± sd over seeds."""
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for label in labels:
        cells = ["{:.1f} ± {:.1f}".format(*mean_sd(cell_values(runs, label, c))) for c in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(runs: list[dict], labels: list[str], columns: list[str], path: Path, title: str,
          hatched: Callable[[str], bool]) -> None:
    """Grouped bars with error bars (sd over seeds); `hatched` marks reference rows (sources, the pivot)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    width = 0.85 / len(labels)
    figure, axes = plt.subplots(figsize=(4 + 3.3 * len(columns), 5))
    colors = plt.get_cmap("tab20").colors
    for k, label in enumerate(labels):
        stats = [mean_sd(cell_values(runs, label, c)) for c in columns]
        xs = [g - 0.425 + width * (k + 0.5) for g in range(len(columns))]
        axes.bar(xs, [m for m, _ in stats], width, yerr=[s for _, s in stats], capsize=1.5, label=label,
                 color=colors[k % len(colors)], hatch="//" if hatched(label) else None, edgecolor="white")
    axes.set_xticks(range(len(columns)), columns)
    axes.set_ylabel("held-out accuracy (%)")
    axes.set_ylim(0, 105)
    axes.set_title(f"{title} (mean ± sd over seeds {[r['seed'] for r in runs]})")
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def evaluate_cached(spec: Any, label: str, recipe: Any, path: Path) -> dict:
    """Greedy held-out accuracy of `spec` on the recipe's eval prompts and verifiers, cached at `path`."""
    from polyfuse.evaluation import evaluate
    from polyfuse.evaluation.run import DEFAULT_NEW_TOKENS
    from polyfuse.pipeline.sources import load_prompts
    from polyfuse.scorers import build_scorer

    def compute() -> dict:
        prompts = load_prompts(recipe.eval.prompts)
        configs = recipe.eval.scorers or [c for c in recipe.score.scorers if c.type != "reward_model"]
        settings = recipe.eval.settings()
        result = evaluate(spec, prompts, [build_scorer(c) for c in configs], batch_size=settings.batch_size,
                          max_new_tokens=settings.max_new_tokens or DEFAULT_NEW_TOKENS, label=label, quiet=True)
        return result.summary()

    return cached_json(path, compute)
