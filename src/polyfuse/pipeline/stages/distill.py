"""Stage `distill`: explicit fusion on the SFT rows against the `teacher` stage's stored outputs, with
one of two strategies (InfiFusion's pairwise and unified fusion, FuseLLM / FuseChat):

- `unified`: one run with every stored teacher, giving the stage's `model`;
- `pairwise`: one run per teacher model (the sources, unless the teacher section lists its own), each
  with that teacher alone (plus the pivot's own outputs when they are stored, FuseChat's pairwise
  candidates), giving one model per teacher under its name. A `merge` stage then merges them, naming
  them `distill:<source>`; its base defaults to the pivot the copies started from, so the task vectors
  are taken relative to it.

A pairwise run that finished is kept when the stage resumes after a kill.
"""

from __future__ import annotations

from pathlib import Path

from polyfuse.data.io import read_rows
from polyfuse.data.schemas import SFTRow
from polyfuse.pipeline.context import STAGES, Context, TrainingStage
from polyfuse.trainers import DistillTrainConfig


@STAGES.register("distill")
class DistillStage(TrainingStage):
    name = "distill"
    position = 70
    section = DistillTrainConfig
    default = False  # explicit fusion is opted into by listing it
    needs = ("teacher",)

    def training_data(self, ctx: Context) -> dict[str, str]:
        return {"sft": ctx.output("teacher", "sft"), "store": ctx.output("teacher", "store")}

    def run(self, ctx: Context, folder: Path) -> dict[str, str]:
        from polyfuse.trainers import train_distill

        config = ctx.recipe.distill
        rows = read_rows(ctx.output("teacher", "sft"), SFTRow)
        store = ctx.output("teacher", "store")
        pivot = self.pivot(ctx)
        if config.strategy == "unified":
            return {"model": str(train_distill(pivot, rows, store, config, folder / "model"))}
        own = [pivot.label] if ctx.recipe.teacher.include_pivot else []
        outputs = {}
        for teacher in ctx.recipe.teacher.models:
            out = folder / teacher.label
            if not (out / "polyfuse_training.json").exists():  # saved atomically: present means finished
                pairwise = config.model_copy(update={"teachers": [*own, teacher.label]})
                train_distill(pivot, rows, store, pairwise, out)
            outputs[teacher.label] = str(out)
        return outputs
