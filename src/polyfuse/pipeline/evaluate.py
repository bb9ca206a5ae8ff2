"""Stage `eval`: greedy accuracy of the recipe's models on held-out prompts, as a table, JSON and PNG."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from polyfuse.data.io import write_rows
from polyfuse.errors import ConfigError
from polyfuse.models import ModelSpec
from polyfuse.pipeline.recipe import MODEL_STAGES

if TYPE_CHECKING:
    from polyfuse.pipeline.runner import Context


def eval_models(ctx: Context) -> dict[str, ModelSpec]:
    """Display label -> model, in the order the recipe's `eval.models` lists them."""
    recipe = ctx.recipe
    sources = {s.label: s for s in recipe.sources}
    chosen: dict[str, ModelSpec] = {}
    for name in recipe.eval.models:
        if name == "sources":
            chosen.update({label: spec for label, spec in sources.items()})
        elif name == "pivot":
            chosen["pivot"] = recipe.pivot
        elif name in sources:
            chosen[name] = sources[name]
        elif name in recipe.stages and name in MODEL_STAGES:
            steps = [s for s in recipe.stages[: recipe.stages.index(name) + 1] if s in MODEL_STAGES]
            label = "pivot+" + "+".join(_step_label(ctx, s) for s in steps)
            chosen[label] = recipe.pivot.model_copy(update={"path": ctx.output(name, "model"), "gguf_file": None})
        else:
            raise ConfigError(f"eval.models: {name!r} is neither 'sources', 'pivot', a source name nor a run model stage")
    return chosen


def _step_label(ctx: Context, stage: str) -> str:
    """How a model stage shows in a label: SFT, the preference objective (DPO, ...), MERGE(method)."""
    if stage == "sft":
        return "SFT"
    if stage == "merge":
        return f"MERGE({ctx.recipe.merge.merge_method})"
    if stage == "distill":
        return ctx.recipe.distill.objective.upper()
    return ctx.recipe.po.objective.upper()


def run_eval_stage(ctx: Context, folder: Path) -> dict[str, str]:
    from polyfuse.evaluation import evaluate, write_eval_report
    from polyfuse.scorers import build_scorer

    config = ctx.recipe.eval
    prompts = ctx.recipe.load_prompts(config.prompts)
    write_rows(folder / "prompts.jsonl", prompts)
    scorer_configs = config.scorers or [c for c in ctx.recipe.score.scorers if c.type != "reward_model"]
    scorers = [build_scorer(c) for c in scorer_configs]
    results = {
        label: evaluate(spec, prompts, scorers, batch_size=config.batch_size, max_new_tokens=config.max_new_tokens,
                        quiet=ctx.quiet)
        for label, spec in eval_models(ctx).items()
    }
    write_eval_report(results, folder)
    return {"results": str(folder / "results.json"), "table": str(folder / "results.md"),
            "chart": str(folder / "accuracy.png")}
