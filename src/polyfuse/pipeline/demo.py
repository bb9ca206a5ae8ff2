"""`polyfuse demo`: the FuseChat-3.0 recipe on the toy world, with a printed table and a report."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from rich.console import Console

from polyfuse.pipeline.recipe import load_recipe
from polyfuse.pipeline.runner import run_recipe
from polyfuse.pipeline.summary import print_run_summary

DEMO_RECIPE = "fusechat3-toy.yaml"
# The `tiny` world's models are barely trained and almost never correct, so its demo (a smoke test in
# seconds) ranks responses by the reward model alone (FuseChat-3.0's verifier-less rule), on fewer prompts.
TINY_OVERRIDES = [
    "prompts.toyworld.per_domain=6", "eval.prompts.toyworld.per_domain=4", "sample.chunk_size=4",
    "sample.batch_size=8", "score.chunk_size=16", "sft.epochs=1", "sft.batch_size=4", "po.batch_size=4",
    "pairs.gap_window=null", "pairs.sft_fraction=0.5",
    'score.scorers=[{type: reward_model, name: rm, model: {path: "toyworld://reward_model"}}]',
    "eval.scorers=[{type: toyworld}]",
]


def recipe_path(name: str) -> Path:
    """A recipe shipped inside the package (the repository's `recipes/` folder)."""
    return Path(str(resources.files("polyfuse") / "recipes" / name))


def run_demo(work_dir: str | Path, seed: int = 0, preset: str = "default", quiet: bool = False) -> dict:
    """Run the demo recipe, print the accuracy table and the report's path; returns `report.json`'s content."""
    import torch

    # The toy models are tiny: one thread is as fast as two, and it cannot be slowed down by
    # oversubscription when other processes share the cores.
    torch.set_num_threads(1)
    overrides = [f"seed={seed}", f"toyworld.preset={preset}", *(TINY_OVERRIDES if preset == "tiny" else [])]
    recipe = load_recipe(recipe_path(DEMO_RECIPE), overrides)
    ctx = run_recipe(recipe, work_dir, quiet=quiet)
    print_run_summary(ctx, Console())
    return json.loads((Path(work_dir) / "report.json").read_text())
