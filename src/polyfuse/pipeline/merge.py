"""Stage `merge`: the recipe's `merge` section, a mergekit-style config, run by the merge engine.

Recipes fuse in steps (InfiFusion, FuseChat 2.0: distil each source into its own copy of the pivot, then
merge the copies), so a merge must be able to name models that only exist once earlier stages have run.
This module turns those names into paths (see `polyfuse.pipeline.recipe` for what a name may be), defaults
the base to the current pivot and the merge seed to the recipe's, checks the method's needs on the resolved
config and merges into `<stage>/model`, which then is the pivot of the stages after it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from polyfuse.merge import MergeConfig, MergeOptions, run_merge
from polyfuse.merge.config import check_method
from polyfuse.pipeline.recipe import stage_reference

if TYPE_CHECKING:
    from polyfuse.pipeline.runner import Context

SOURCE = "merge"  # how error messages name the recipe section
NOT_MODELS = ("base", "union")  # `tokenizer_source` values that name no model


def model_path(ctx: Context, name: str) -> str:
    """The path a merge model name stands for: a stage's output, the recipe's pivot, a source, or `name`."""
    reference = stage_reference(name)
    if reference is not None:
        return ctx.output(*reference)
    if name == "pivot":
        return ctx.recipe.pivot.path
    return next((s.path for s in ctx.recipe.sources if s.label == name), name)


def resolved_merge_config(ctx: Context) -> MergeConfig:
    """The `merge` section with every name resolved to a path, the base defaulted to the current pivot and
    `parameters.seed` to the recipe's seed; checked like a `polyfuse merge` config."""
    section = ctx.recipe.merge
    tokenizer = section.tokenizer_source
    cfg = section.model_copy(update={
        "base_model": model_path(ctx, section.base_model) if section.base_model else ctx.current_pivot("merge").path,
        "models": [e.model_copy(update={"model": model_path(ctx, e.model)}) for e in section.models],
        "tokenizer_source": tokenizer if tokenizer in (None, *NOT_MODELS) else model_path(ctx, tokenizer),
        "parameters": {"seed": ctx.recipe.seed, **section.parameters},
    })
    check_method(cfg, SOURCE)
    return cfg


def merge_inputs(ctx: Context) -> dict[str, str]:
    """The models the merge reads, for the stage fingerprint."""
    cfg = resolved_merge_config(ctx)
    return {"base_model": cfg.base_model, **{f"models[{i}]": e.model for i, e in enumerate(cfg.models)}}


def run_merge_stage(ctx: Context, folder: Path) -> dict[str, str]:
    """Merge into `<folder>/model` (the engine resumes an interrupted merge from its finished shards)."""
    out = folder / "model"
    run_merge(resolved_merge_config(ctx), out, SOURCE, MergeOptions(quiet=ctx.quiet),
              Console(stderr=True, quiet=ctx.quiet))
    return {"model": str(out)}
