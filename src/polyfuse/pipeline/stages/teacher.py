"""Stage `teacher`: every teacher (the recipe's sources, unless the section lists its own `models`, and with
`include_pivot` the current pivot: FuseLLM's candidates include the pivot's own distribution) runs over
the SFT rows (the pairs stage's, or the section's `data` file) through `polyfuse.teacher.run_teacher`, and its
top-K outputs are stored for the `distill` stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from polyfuse.data.schemas import SFTRow
from polyfuse.models import ModelSpec
from polyfuse.pipeline.context import STAGES, CommandInput, Context, Stage, model_specs
from polyfuse.teacher import TeacherConfig, run_teacher


def teacher_models(ctx: Context) -> tuple[ModelSpec | None, list[ModelSpec]]:
    """(the current pivot when the section includes it, else None; the other teachers), as the stage stores
    them: the pivot first (MinCE ties go to the first candidate, the pivot itself)."""
    config = ctx.recipe.teacher
    pivot = ModelSpec.model_validate(model_specs([ctx.current_pivot("teacher")])[0]) if config.include_pivot else None
    return pivot, list(config.models)


@STAGES.register("teacher")
class TeacherStage(Stage):
    """Store every model's top-K next-token logits over the response tokens of the training texts, each model
    through its own tokenizer and chat template; resumable, data parallel under accelerate."""

    name = "teacher"
    position = 60
    section = TeacherConfig
    every_process = True
    default = False  # explicit fusion is opted into by listing it
    command = "teacher"
    config_help = "the teacher models and how many logits to keep per position"
    command_inputs = (CommandInput("data", "SFT rows (TRL prompt/completion): the training texts.", schema=SFTRow),)
    output = "store"
    output_help = "Output folder; a rerun keeps the shards finished here."

    def fill(self, section: dict[str, Any], recipe: dict[str, Any]) -> dict[str, Any]:
        if "models" not in section and isinstance(recipe.get("sources"), list):
            section["models"] = model_specs(recipe["sources"])
        return section

    def recipe_fills(self) -> dict[str, str | None]:
        return {"models": "the recipe's sources"}

    def requires(self, recipe) -> tuple[str, ...]:
        return () if recipe.teacher is not None and recipe.teacher.data else ("pairs",)

    def engine_config(self, ctx: Context) -> TeacherConfig:
        pivot, others = teacher_models(ctx)
        return ctx.recipe.teacher.model_copy(update={"models": [*filter(None, [pivot]), *others]})

    def input_paths(self, ctx: Context) -> dict[str, str]:
        """The texts of explicit fusion: the section's `data`, else the pairs stage's SFT split."""
        return {"data": ctx.recipe.teacher.data or ctx.output("pairs", "sft")}

    def inputs(self, ctx: Context) -> dict[str, str]:
        models = self.engine_config(ctx).models
        return {**self.input_paths(ctx), **{f"models[{i}]": m.path for i, m in enumerate(models)}}

    def execute(self, config: TeacherConfig, inputs: dict[str, Any], out: Path, quiet: bool = False,
                resume: bool | None = None) -> dict[str, str]:
        return {"store": str(run_teacher(inputs["data"].rows, config, out, quiet=quiet))}

    def run(self, ctx: Context, folder: Path) -> dict[str, str]:
        """The store, and the SFT rows it was computed on (what `distill` trains on)."""
        return {**super().run(ctx, folder), "sft": self.input_paths(ctx)["data"]}
