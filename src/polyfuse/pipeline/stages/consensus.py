"""Stage `consensus`: CGPO's aligned source consensus as columns of the unpaired rows that `logprobs` scored, through
`polyfuse.logprobs.run_consensus` (calibration on a held-out split or a calibration file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from polyfuse.data.schemas import UnpairedRow
from polyfuse.logprobs import ConsensusConfig, run_consensus
from polyfuse.pipeline.context import STAGES, CommandInput, Context, Stage


@STAGES.register("consensus")
class ConsensusStage(Stage):
    """CGPO's source consensus: entropy calibration on prompts held out of training (or a calibration file),
    per-completion source weights, the weighted consensus of the sources' scores and its shift to M0's mean per
    prompt, written as columns of the training rows."""

    name = "consensus"
    position = 95
    section = ConsensusConfig
    section_default = True  # every key has a default: the reference release's settings
    default = False  # CGPO's, opted into by listing it
    needs = ("logprobs",)
    command = "consensus"
    config_help = "the calibration split (or file), temperature, weight floor, clip and baseline alignment"
    command_inputs = (CommandInput("data", "Unpaired rows scored by M0 and every source (`polyfuse logprobs`).",
                                   schema=UnpairedRow),)

    def check(self, recipe: Any) -> None:
        if "upo" not in recipe.stages:
            raise ValueError("consensus: builds CGPO's reference from unpaired rows, and the recipe trains on none; "
                             "add the `upo` stage (objective cgpo)")
        if not recipe.logprobs.sources:
            raise ValueError("consensus: needs every source's scores of the rows; set logprobs.sources: true")

    def input_paths(self, ctx: Context) -> dict[str, str]:
        return {"data": ctx.output("logprobs", "unpaired")}

    def inputs(self, ctx: Context) -> dict[str, str]:
        calibration = ctx.recipe.consensus.calibration
        return {**self.input_paths(ctx), **({"calibration": calibration} if calibration else {})}

    def execute(self, config: ConsensusConfig, inputs: dict[str, Any], out: Path, quiet: bool = False,
                resume: bool | None = None) -> dict[str, str]:
        from polyfuse.pipeline.sources import read_input

        data = inputs["data"]
        calibration = None if config.calibration is None else read_input(config.calibration, UnpairedRow)
        return {k: str(v) for k, v in run_consensus(config, data.rows, data.path, out, calibration).items()}
