"""Stages `teacher` and `distill`: explicit fusion inside a recipe.

`teacher` runs every source (and, with `include_pivot`, the current pivot: FuseLLM's candidates include
the pivot's own distribution) over the SFT rows (the pairs stage's, or the section's `data` file) and
stores their top-K outputs. `distill` trains on the
same rows against those outputs, with one of two strategies (spec sections 1.7, 2.4 and 2.5):

- `unified`: one run with every stored teacher, giving the stage's `model`;
- `pairwise`: one run per source, each with that source alone (plus the pivot's own outputs when they
  are stored, FuseChat's pairwise candidates), giving one model per source under the source's name. A
  `merge` stage then merges them, naming them `distill:<source>`; its base defaults to the pivot the
  copies started from, so the task vectors are taken relative to it.

A pairwise run that finished is kept when the stage resumes after a kill.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from polyfuse.data.io import read_rows
from polyfuse.data.schemas import SFTRow
from polyfuse.models import ModelSpec

if TYPE_CHECKING:
    from polyfuse.pipeline.runner import Context


def teacher_models(ctx: Context) -> list[ModelSpec]:
    sources = [ModelSpec.model_validate(s.model_dump(exclude={"sampling"})) for s in ctx.recipe.sources]
    if not ctx.recipe.teacher.include_pivot:
        return sources
    pivot = ctx.current_pivot("teacher")  # first: MinCE ties go to the first candidate, the pivot itself
    return [ModelSpec.model_validate(pivot.model_dump(exclude={"sampling"})), *sources]


def training_rows(ctx: Context) -> str:
    """The texts of explicit fusion: the teacher section's `data`, else the pairs stage's SFT split."""
    return ctx.recipe.teacher.data or ctx.output("pairs", "sft")


def run_teacher_stage(ctx: Context, folder: Path) -> dict[str, str]:
    from polyfuse.teacher import TeacherSettings, run_teacher

    settings = TeacherSettings.model_validate(ctx.recipe.teacher.model_dump(include=set(TeacherSettings.model_fields)))
    data = training_rows(ctx)
    out = run_teacher(teacher_models(ctx), read_rows(data, SFTRow), settings, folder / "store", quiet=ctx.quiet)
    return {"store": str(out), "sft": data}


def run_distill_stage(ctx: Context, folder: Path) -> dict[str, str]:
    from polyfuse.trainers import train_distill

    section = ctx.recipe.distill
    config = section.train_config()
    rows = read_rows(ctx.output("teacher", "sft"), SFTRow)
    store = ctx.output("teacher", "store")
    pivot = ctx.current_pivot("distill")
    if section.strategy == "unified":
        return {"model": str(train_distill(pivot, rows, store, config, folder / "model"))}
    own = [pivot.label] if ctx.recipe.teacher.include_pivot else []
    outputs = {}
    for source in ctx.recipe.sources:
        out = folder / source.label
        if not (out / "polyfuse_training.json").exists():  # saved atomically: present means finished
            pairwise = config.model_copy(update={"teachers": [*own, source.label]})
            train_distill(pivot, rows, store, pairwise, out)
        outputs[source.label] = str(out)
    return outputs
