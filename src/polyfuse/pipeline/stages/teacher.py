"""Stage `teacher`: every source (and, with `include_pivot`, the current pivot: FuseLLM's candidates
include the pivot's own distribution) runs over the SFT rows (the pairs stage's, or the section's `data`
file) and its top-K outputs are stored for the `distill` stage."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from polyfuse.data.io import read_rows
from polyfuse.data.schemas import SFTRow
from polyfuse.models import ModelSpec
from polyfuse.pipeline.context import STAGES, Context, Stage
from polyfuse.teacher import TeacherSettings


class TeacherSection(TeacherSettings):
    """Top-K outputs of every source on the SFT rows; `include_pivot` adds the current pivot's own
    (FuseLLM / FuseChat candidates)."""

    include_pivot: bool = False
    data: str | None = Field(default=None, description="SFT rows (TRL prompt/completion); default: the pairs stage's.")


def teacher_models(ctx: Context) -> list[ModelSpec]:
    sources = [s.as_spec() for s in ctx.recipe.sources]
    if not ctx.recipe.teacher.include_pivot:
        return sources
    pivot = ctx.current_pivot("teacher")  # first: MinCE ties go to the first candidate, the pivot itself
    return [pivot.as_spec(), *sources]


def training_rows(ctx: Context) -> str:
    """The texts of explicit fusion: the teacher section's `data`, else the pairs stage's SFT split."""
    return ctx.recipe.teacher.data or ctx.output("pairs", "sft")


@STAGES.register("teacher")
class TeacherStage(Stage):
    name = "teacher"
    position = 60
    section = TeacherSection
    every_process = True
    default = False  # explicit fusion is opted into by listing it

    def requires(self, recipe) -> tuple[str, ...]:
        return () if recipe.teacher is not None and recipe.teacher.data else ("pairs",)

    def inputs(self, ctx: Context) -> dict[str, str]:
        return {"sft": training_rows(ctx), **{f"models[{i}]": m.path for i, m in enumerate(teacher_models(ctx))}}

    def run(self, ctx: Context, folder: Path) -> dict[str, str]:
        from polyfuse.teacher import run_teacher

        settings = TeacherSettings.model_validate(ctx.recipe.teacher.model_dump(include=set(TeacherSettings.model_fields)))
        data = training_rows(ctx)
        out = run_teacher(teacher_models(ctx), read_rows(data, SFTRow), settings, folder / "store", quiet=ctx.quiet)
        return {"store": str(out), "sft": data}
