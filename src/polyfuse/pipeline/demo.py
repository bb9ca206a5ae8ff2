"""`polyfuse demo`: the FuseChat-3.0 recipe on the toy world, with a printed table and a report."""

from __future__ import annotations

import json
import os
import time
from importlib import resources
from pathlib import Path

from rich.console import Console

from polyfuse.data.io import atomic_write_text
from polyfuse.evaluation import EvalResult, accuracy_table, load_eval_report, markdown_table
from polyfuse.pipeline.recipe import load_recipe
from polyfuse.pipeline.runner import run_recipe

DEMO_RECIPE = "fusechat3-toy.yaml"


def recipe_path(name: str) -> Path:
    """A recipe shipped inside the package (the repository's `recipes/` folder)."""
    return Path(str(resources.files("polyfuse") / "recipes" / name))


def run_demo(work_dir: str | Path, seed: int = 0, preset: str = "default", quiet: bool = False) -> dict:
    """Run the demo recipe; returns the summary written to `report.json`."""
    import torch

    # The toy models are tiny: one thread is as fast as two, and it cannot be slowed down by
    # oversubscription when other processes share the cores.
    torch.set_num_threads(1)
    console = Console()
    work_dir = Path(work_dir)
    started = time.perf_counter()
    recipe = load_recipe(recipe_path(DEMO_RECIPE), [f"seed={seed}", f"toyworld.preset={preset}"])
    ctx = run_recipe(recipe, work_dir, quiet=quiet)
    wall = time.perf_counter() - started
    results = load_eval_report(Path(ctx.output("eval", "results")).parent)
    console.print(accuracy_table(results))
    pairs = json.loads(Path(ctx.output("pairs", "report")).read_text())
    summary = {
        "seed": seed, "preset": preset, "wall_s": round(wall, 1),
        "accuracy": {label: r.summary() for label, r in results.items()}, "pairs": pairs,
        "stage_wall_s": {s: json.loads((work_dir / s / "manifest.json").read_text()).get("wall_s") for s in recipe.stages},
    }
    atomic_write_text(work_dir / "report.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(work_dir / "report.md", _markdown(summary, results, ctx.output("eval", "chart"), work_dir))
    console.print(f"report: {work_dir / 'report.md'} (wall time {wall:.0f}s)")
    return summary


def _markdown(summary: dict, results: dict[str, EvalResult], chart: str, work_dir: Path) -> str:
    pairs = ", ".join(f"{k} {v}" for k, v in summary["pairs"].items())
    stages = ", ".join(f"{k} {v}s" for k, v in summary["stage_wall_s"].items())
    return "\n".join([
        f"# polyfuse demo: FuseChat-3.0 on the toy world (seed {summary['seed']})", "",
        f"Wall time {summary['wall_s']}s ({stages}).", "",
        "On held-out prompts. " + markdown_table(results),
        f"![accuracy]({os.path.relpath(chart, work_dir)})", "",
        f"Data: {pairs}.", "",
    ])
