"""Stage `eval`: greedy accuracy and gold bits per byte of the recipe's models on held-out prompts, as a table,
JSON, PNG and per-item records (what `polyfuse compare` reads), through `polyfuse.evaluation.run_eval`;
`polyfuse eval` runs the same `execute` on the models it is given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from polyfuse.evaluation import EvalSettings, run_eval
from polyfuse.models import ModelSpec
from polyfuse.pipeline.context import STAGES, Context, Stage, model_stages, paths_in, stage
from polyfuse.pipeline.sources import PromptSource, load_prompts, recipe_source
from polyfuse.sampling import BACKENDS

# Generation budget per prompt when `max_new_tokens` is not given: toy answers are a few tokens, HumanEval
# bodies need room; anything else gets the engine's default (256, GSM8K reasoning).
NEW_TOKENS = {"toyworld": 32, "humaneval": 512}
MODELS = "models"  # the input of `execute`: row label -> model


class EvalSection(EvalSettings):
    """A recipe's `eval` section and what `polyfuse eval` runs with: the prompts, the models (in a recipe, by
    name) and the evaluation settings."""

    prompts: PromptSource
    models: list[str] = Field(
        default_factory=lambda: ["sources", "pivot", "sft", "po"],
        description="'sources', 'pivot', a source name, or a model stage name (sft, merge, po: its output model).",
    )

    def settings(self) -> EvalSettings:
        """The evaluation settings, the generation budget resolved by the prompt source."""
        kind = "toyworld" if self.prompts.toyworld is not None else self.prompts.path
        budget = self.max_new_tokens or NEW_TOKENS.get(kind)
        return EvalSettings.model_validate({**self.model_dump(include=set(EvalSettings.model_fields)),
                                            "max_new_tokens": budget})


def _type_of(scorer: Any) -> Any:
    return scorer.get("type") if isinstance(scorer, dict) else getattr(scorer, "type", None)


def _unknown_model(recipe, name: str) -> bool:
    sources = {s.label for s in recipe.sources}
    return name not in ("sources", "pivot", *sources) and not (name in recipe.stages and name in model_stages())


def eval_models(ctx: Context) -> dict[str, ModelSpec]:
    """Display label -> model, in the order the recipe's `eval.models` lists them; a model a stage made is
    labelled by the stages that made it (`pivot+SFT+DPO`, each stage's `label`)."""
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
            label = "pivot+" + "+".join(stage(s).label(recipe) for s in steps)
            chosen[label] = recipe.pivot.model_copy(update={"path": ctx.output(name, "model"), "gguf_file": None})
    return chosen


@STAGES.register("eval")
class EvalStage(Stage):
    """Greedy accuracy and gold bits per byte per domain on held-out prompts: tables, results.json, results.md, a
    PNG bar chart and per-item records."""

    name = "eval"
    position = 110
    section = EvalSection

    def fill(self, section: dict[str, Any], recipe: dict[str, Any]) -> dict[str, Any]:
        if "prompts" in section:
            section["prompts"] = recipe_source(section["prompts"], recipe)
        score = recipe.get("score")
        if section.get("scorers") is None and isinstance(score, dict) and isinstance(score.get("scorers"), list):
            section["scorers"] = [c for c in score["scorers"] if _type_of(c) != "reward_model"]
        return section

    def recipe_fills(self) -> dict[str, str | None]:
        return {"scorers": "the verifiers of the recipe's score section"}

    def check(self, recipe) -> None:
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

    def read_inputs(self, ctx: Context) -> dict[str, Any]:
        return {MODELS: eval_models(ctx), "sources": {s.label for s in ctx.recipe.sources}}

    def execute(self, config: EvalSection, inputs: dict[str, Any], out: Path, quiet: bool = False,
                resume: bool | None = None) -> dict[str, str]:
        """`inputs`: the models (row label -> model) and, optionally, which of them are sources (drawn apart)."""
        run_eval(inputs[MODELS], load_prompts(config.prompts, quiet), config.settings(), out, quiet,
                 sources=inputs.get("sources"))
        return {"results": str(out / "results.json"), "table": str(out / "results.md"),
                "chart": str(out / "accuracy.png")}
