"""`polyfuse run RECIPE.yaml`: the stages of a recipe, in order, in one work directory.

Each stage runs in `<work_dir>/<stage>/` and records a manifest (resolved config, input hashes,
package versions). A finished stage whose config and inputs are unchanged is skipped; a stage whose
fingerprint changed starts over in a clean folder; an unfinished one resumes from its finished shards.
Stages only communicate through files, so a killed run, rerun, gives the same result.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from rich.console import Console

from polyfuse.data.hashing import hash_path
from polyfuse.pipeline.context import Context, stage
from polyfuse.pipeline.manifest import Manifest, fingerprint
from polyfuse.pipeline.recipe import Recipe

console = Console(stderr=True)


def run_recipe(recipe: Recipe, work_dir: str | Path | None = None, quiet: bool = False) -> Context:
    """Run (or resume) every stage of `recipe`; returns the context with every stage's outputs."""
    ctx = Context(recipe=recipe, work_dir=Path(work_dir or recipe.resolved_work_dir), quiet=quiet)
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    if recipe.toyworld is not None:
        recipe.world(quiet)  # built once and cached; every toyworld:// path must exist before hashing inputs
    recipe.save_resolved(ctx.work_dir / "recipe.resolved.yaml")
    for name in recipe.stages:
        step = stage(name)
        folder = ctx.work_dir / name
        manifest = Manifest(folder)
        inputs = {k: hash_path(v) for k, v in step.inputs(ctx).items()}
        config = step.config(recipe)
        print_ = fingerprint(config, inputs)
        if manifest.is_done(print_):
            ctx.outputs[name] = manifest.read()["outputs"]
            console.print(f"[green]✓[/] {name}: finished earlier, skipped")
            continue
        if manifest.read().get("fingerprint") not in (None, print_):
            shutil.rmtree(folder)  # config or inputs changed: partial work is not reusable
        folder.mkdir(parents=True, exist_ok=True)
        manifest.start(name, config, inputs, print_)
        console.print(f"[bold]▶ {name}[/]")
        started = time.perf_counter()
        outputs = step.run(ctx, folder)
        manifest.finish(outputs)
        ctx.outputs[name] = outputs
        console.print(f"[green]✓[/] {name}: done in {time.perf_counter() - started:.1f}s")
    return ctx
