"""Stage `distill`: explicit fusion on the SFT rows against the `teacher` stage's stored outputs, through
`polyfuse.trainers.train_distill`, with one of two strategies (InfiFusion's pairwise and unified fusion,
FuseLLM / FuseChat):

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
from typing import Any

from polyfuse.data.schemas import SFTRow
from polyfuse.pipeline.context import MODEL, STAGES, CommandInput, Context, TrainingStage
from polyfuse.pipeline.stages.teacher import teacher_models
from polyfuse.trainers import DistillTrainConfig


@STAGES.register("distill")
class DistillStage(TrainingStage):
    """Explicit fusion: cross-entropy on the gold response plus ULD (InfiFusion) or fused soft targets (FuseLLM)
    against the stored teacher outputs; no teacher model is loaded."""

    name = "distill"
    position = 70
    section = DistillTrainConfig
    default = False  # explicit fusion is opted into by listing it
    needs = ("teacher",)
    command = "train distill"
    config_help = "the objective, alignment and the training settings"
    command_inputs = (
        CommandInput("data", "SFT rows (TRL prompt/completion): the texts the teachers ran on.", schema=SFTRow),
        CommandInput("teachers", "Teacher store written by `polyfuse teacher`.", kind="path"),
        CommandInput(MODEL, "Pivot (student): hub id, folder or .gguf file.", kind="model"),
    )

    def label(self, recipe: Any) -> str:
        return recipe.distill.objective.upper()

    def input_paths(self, ctx: Context) -> dict[str, str]:
        return {"data": ctx.output("teacher", "sft"), "teachers": ctx.output("teacher", "store")}

    def execute(self, config: DistillTrainConfig, inputs: dict[str, Any], out: Path, quiet: bool = False,
                resume: bool | None = None) -> dict[str, str]:
        from polyfuse.trainers import train_distill

        return {"model": str(train_distill(inputs[MODEL], inputs["data"].rows, inputs["teachers"], config, out,
                                           resume=resume))}

    def run(self, ctx: Context, folder: Path) -> dict[str, str]:
        if ctx.recipe.distill.strategy == "unified":
            return super().run(ctx, folder)
        inputs, config = self.read_inputs(ctx), ctx.recipe.distill
        pivot, teachers = teacher_models(ctx)
        own = [pivot.label] if pivot is not None else []
        outputs = {}
        for teacher in teachers:
            out = folder / teacher.label
            if not (out / "polyfuse_training.json").exists():  # saved atomically: present means finished
                self.execute(config.model_copy(update={"teachers": [*own, teacher.label]}), inputs, out, ctx.quiet)
            outputs[teacher.label] = str(out)
        return outputs
