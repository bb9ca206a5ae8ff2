"""Stage `score`: every sample gets a reward from each reward scorer and a verdict from each verifier that
applies to it, through `polyfuse.scorers.run_score`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from polyfuse.data.schemas import SampleRow
from polyfuse.pipeline.context import STAGES, CommandInput, Context, Stage, paths_in
from polyfuse.scorers import ScoreConfig, run_score


@STAGES.register("score")
class ScoreStage(Stage):
    """Score samples with reward models and verifiers (math, code sandbox, toy world)."""

    name = "score"
    position = 30
    section = ScoreConfig
    every_process = True
    needs = ("sample",)
    command = "score"
    config_help = "the reward models and verifiers that score every sample"
    command_inputs = (CommandInput("samples", "Samples written by `polyfuse sample`.", schema=SampleRow),)
    output_help = "Output folder; a rerun keeps the shards finished here."

    def input_paths(self, ctx: Context) -> dict[str, str]:
        return {"samples": ctx.output("sample", "samples")}

    def inputs(self, ctx: Context) -> dict[str, str]:
        return {**self.input_paths(ctx), **paths_in(ctx.recipe.score.model_dump())}

    def execute(self, config: ScoreConfig, inputs: dict[str, Any], out: Path, quiet: bool = False,
                resume: bool | None = None) -> dict[str, str]:
        return {"scored": str(run_score(inputs["samples"].rows, config, out, quiet=quiet))}
