"""Stage `eval`: greedy accuracy and gold bits per byte of the recipe's models on held-out prompts, as a table,
JSON, PNG and per-item records (what `polyfuse compare` reads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from polyfuse.config import StrictModel
from polyfuse.data.io import write_rows
from polyfuse.evaluation.evaluate import EVAL_TOKEN_BUDGET
from polyfuse.models import ModelSpec
from polyfuse.pipeline.context import STAGES, Context, Stage, model_stages, paths_in
from polyfuse.pipeline.stages.prompts import PromptSource, seeded_source
from polyfuse.progress import progress_bar
from polyfuse.sampling import BACKENDS
from polyfuse.scorers import ScorerConfig


class EvalSection(StrictModel):
    prompts: PromptSource
    models: list[str] = Field(
        default_factory=lambda: ["sources", "pivot", "sft", "po"],
        description="'sources', 'pivot', a source name, or a model stage name (sft, merge, po: its output model).",
    )
    scorers: list[ScorerConfig] | None = Field(
        default=None, description="Default: the verifiers of the recipe's score section (a reward model gives no accuracy)."
    )
    batch_size: int = Field(default=64, ge=1, description="Prompts per engine call (vLLM, servers); the transformers backend batches by token_budget.")
    token_budget: int = Field(default=EVAL_TOKEN_BUDGET, ge=1, description="transformers: padded tokens per batch over length-sorted prompts (prompt + max_new_tokens per row when generating, prompt + gold answer when scoring).")
    max_new_tokens: int = Field(default=32, ge=1, description="Generation budget per prompt (greedy).")
    bpb: bool = Field(default=True, description="Measure every gold answer's bits per byte (teacher-forced through each model's template).")


def _type_of(scorer: Any) -> Any:
    return scorer.get("type") if isinstance(scorer, dict) else getattr(scorer, "type", None)


def _unknown_model(recipe, name: str) -> bool:
    sources = {s.label for s in recipe.sources}
    return name not in ("sources", "pivot", *sources) and not (name in recipe.stages and name in model_stages())


def eval_models(ctx: Context) -> dict[str, ModelSpec]:
    """Display label -> model, in the order the recipe's `eval.models` lists them."""
    recipe = ctx.recipe
    sources = {s.label: s for s in recipe.sources}
    makers = model_stages()
    chosen: dict[str, ModelSpec] = {}
    for name in recipe.eval.models:
        if name == "sources":
            chosen.update({label: spec for label, spec in sources.items()})
        elif name == "pivot":
            chosen["pivot"] = recipe.pivot
        elif name in sources:
            chosen[name] = sources[name]
        else:
            steps = [s for s in recipe.stages[: recipe.stages.index(name) + 1] if s in makers]
            label = "pivot+" + "+".join(_step_label(ctx, s) for s in steps)
            chosen[label] = recipe.pivot.model_copy(update={"path": ctx.output(name, "model"), "gguf_file": None})
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


@STAGES.register("eval")
class EvalStage(Stage):
    name = "eval"
    position = 110
    section = EvalSection

    def fill(self, section: dict[str, Any], recipe: dict[str, Any]) -> dict[str, Any]:
        if "prompts" in section:
            section["prompts"] = seeded_source(section["prompts"], recipe.get("seed", 0))
        score = recipe.get("score")
        if section.get("scorers") is None and isinstance(score, dict) and isinstance(score.get("scorers"), list):
            section["scorers"] = [c for c in score["scorers"] if _type_of(c) != "reward_model"]
        return section

    def recipe_fills(self) -> dict[str, str | None]:
        return {"scorers": "the verifiers of the recipe's score section"}

    def check(self, recipe) -> None:
        if recipe.eval.scorers is None:
            raise ValueError("eval: no scorers to grade with; give 'eval.scorers' (e.g. [{type: math}]) "
                             "or a 'score' section, whose verifiers eval then uses")
        trained = [name for name in recipe.eval.models if name in model_stages()]
        if trained and not BACKENDS.get(recipe.pivot.backend.type).loads_weights:
            raise ValueError(f"eval.models: {trained[0]!r} is a model this recipe trains, and the pivot's backend "
                             f"{recipe.pivot.backend.type!r} serves a fixed model; use transformers or vllm for the pivot")
        unknown = [name for name in recipe.eval.models if _unknown_model(recipe, name)]
        if unknown:
            raise ValueError(f"eval.models: {', '.join(map(repr, unknown))}: neither 'sources', 'pivot', a source "
                             f"name nor a model stage of this recipe ({', '.join(s for s in recipe.stages if s in model_stages()) or 'none'})")

    def inputs(self, ctx: Context) -> dict[str, str]:
        models = {label: spec.path for label, spec in eval_models(ctx).items()}
        return {**models, **paths_in(ctx.recipe.eval.model_dump())}

    def run(self, ctx: Context, folder: Path) -> dict[str, str]:
        from polyfuse.evaluation import evaluate, write_eval_report
        from polyfuse.scorers import build_scorer

        config = ctx.recipe.eval
        prompts = ctx.recipe.load_prompts(config.prompts)
        write_rows(folder / "prompts.jsonl", prompts)
        scorers = [build_scorer(c) for c in config.scorers]
        with progress_bar(disable=ctx.quiet) as bar:  # one display, two bars per model
            results = {
                label: evaluate(spec, prompts, scorers, batch_size=config.batch_size,
                                max_new_tokens=config.max_new_tokens, label=label, bar=bar,
                                token_budget=config.token_budget, bpb=config.bpb)
                for label, spec in eval_models(ctx).items()
            }
        write_eval_report(results, folder, sources={s.label for s in ctx.recipe.sources})
        return {"results": str(folder / "results.json"), "table": str(folder / "results.md"),
                "chart": str(folder / "accuracy.png")}
