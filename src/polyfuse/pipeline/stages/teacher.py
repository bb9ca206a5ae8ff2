"""Stage `teacher`: every teacher (the recipe's sources, unless the section lists its own `models`, and with
`include_pivot` the current pivot: FuseLLM's candidates include the pivot's own distribution) runs over
the SFT rows (the pairs stage's, or the section's `data` file) and its top-K outputs are stored for the
`distill` stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from polyfuse.data.io import read_rows
from polyfuse.data.schemas import SFTRow
from polyfuse.models import ModelSpec
from polyfuse.pipeline.context import STAGES, Context, Stage, model_specs
from polyfuse.teacher import TeacherConfig


def teacher_models(ctx: Context) -> list[ModelSpec]:
    config = ctx.recipe.teacher
    if not config.include_pivot:
        return config.models
    pivot = ctx.current_pivot("teacher")  # first: MinCE ties go to the first candidate, the pivot itself
    return [ModelSpec.model_validate(model_specs([pivot])[0]), *config.models]


def training_rows(ctx: Context) -> str:
    """The texts of explicit fusion: the teacher section's `data`, else the pairs stage's SFT split."""
    return ctx.recipe.teacher.data or ctx.output("pairs", "sft")


@STAGES.register("teacher")
class TeacherStage(Stage):
    name = "teacher"
    position = 60
    section = TeacherConfig
    every_process = True
    default = False  # explicit fusion is opted into by listing it

    def fill(self, section: dict[str, Any], recipe: dict[str, Any]) -> dict[str, Any]:
        if "models" not in section and isinstance(recipe.get("sources"), list):
            section["models"] = model_specs(recipe["sources"])
        return section

    def recipe_fills(self) -> dict[str, str | None]:
        return {"models": "the recipe's sources"}

    def requires(self, recipe) -> tuple[str, ...]:
        return () if recipe.teacher is not None and recipe.teacher.data else ("pairs",)

    def inputs(self, ctx: Context) -> dict[str, str]:
        return {"sft": training_rows(ctx), **{f"models[{i}]": m.path for i, m in enumerate(teacher_models(ctx))}}

    def run(self, ctx: Context, folder: Path) -> dict[str, str]:
        from polyfuse.teacher import run_teacher

        data = training_rows(ctx)
        config = ctx.recipe.teacher.model_copy(update={"models": teacher_models(ctx)})
        out = run_teacher(read_rows(data, SFTRow), config, folder / "store", quiet=ctx.quiet)
        return {"store": str(out), "sft": data}
