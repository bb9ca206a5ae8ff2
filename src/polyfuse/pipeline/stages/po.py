"""Stage `po`: preference optimisation of the current pivot with one registered objective, on the pairs
(with the `logprobs` stage's reference and source columns when it ran)."""

from __future__ import annotations

from pathlib import Path

from polyfuse.data.io import read_rows
from polyfuse.data.schemas import PreferenceRow
from polyfuse.pipeline.context import STAGES, Context, Stage
from polyfuse.trainers import PreferenceTrainConfig


def preference_data(ctx: Context) -> str:
    return ctx.outputs.get("logprobs", {}).get("preference") or ctx.output("pairs", "preference")


@STAGES.register("po")
class POStage(Stage):
    name = "po"
    position = 100
    section = PreferenceTrainConfig
    makes_model = True
    seeded = True
    needs = ("pairs",)

    def inputs(self, ctx: Context) -> dict[str, str]:
        return {"preference": preference_data(ctx), "pivot": ctx.current_pivot("po").path}

    def run(self, ctx: Context, folder: Path) -> dict[str, str]:
        from polyfuse.logprobs import fusion_sources
        from polyfuse.trainers import train_preference

        data = preference_data(ctx)
        rows = read_rows(data, PreferenceRow)
        model = train_preference(ctx.current_pivot("po"), rows, ctx.recipe.po, folder / "model",
                                 source_names=fusion_sources(data, rows))
        return {"model": str(model)}
