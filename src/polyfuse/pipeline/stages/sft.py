"""Stage `sft`: supervised fine-tuning of the current pivot on the pairs stage's SFT rows."""

from __future__ import annotations

from pathlib import Path

from polyfuse.data.io import read_rows
from polyfuse.data.schemas import SFTRow
from polyfuse.pipeline.context import STAGES, Context, TrainingStage
from polyfuse.trainers import SFTTrainConfig


@STAGES.register("sft")
class SFTStage(TrainingStage):
    name = "sft"
    position = 50
    section = SFTTrainConfig
    needs = ("pairs",)

    def training_data(self, ctx: Context) -> dict[str, str]:
        return {"sft": ctx.output("pairs", "sft")}

    def run(self, ctx: Context, folder: Path) -> dict[str, str]:
        from polyfuse.trainers import train_sft

        rows = read_rows(ctx.output("pairs", "sft"), SFTRow)
        return {"model": str(train_sft(self.pivot(ctx), rows, ctx.recipe.sft, folder / "model"))}
