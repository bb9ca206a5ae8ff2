"""Stage `po`: preference optimisation of the current pivot with one registered objective, on the pairs
(with the `logprobs` stage's reference and source columns when it ran)."""

from __future__ import annotations

from pathlib import Path

from polyfuse.data.io import read_rows
from polyfuse.data.schemas import PreferenceRow
from polyfuse.pipeline.context import STAGES, Context, TrainingStage
from polyfuse.trainers import PreferenceTrainConfig


@STAGES.register("po")
class POStage(TrainingStage):
    name = "po"
    position = 100
    section = PreferenceTrainConfig
    needs = ("pairs",)

    def training_data(self, ctx: Context) -> dict[str, str]:
        return {"preference": ctx.outputs.get("logprobs", {}).get("preference") or ctx.output("pairs", "preference")}

    def run(self, ctx: Context, folder: Path) -> dict[str, str]:
        from polyfuse.logprobs import fusion_sources
        from polyfuse.trainers import train_preference

        data = self.training_data(ctx)["preference"]
        rows = read_rows(data, PreferenceRow)
        model = train_preference(self.pivot(ctx), rows, ctx.recipe.po, folder / "model",
                                 source_names=fusion_sources(data, rows))
        return {"model": str(model)}
