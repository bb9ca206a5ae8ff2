"""Stage `po`: preference optimisation of the current pivot with one registered objective, on the pairs
(with the `logprobs` stage's reference and source columns when it ran), through
`polyfuse.trainers.train_preference`; its commands are `polyfuse train <objective>`, one per objective."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from polyfuse.data.schemas import PreferenceRow
from polyfuse.pipeline.context import (
    MODEL,
    STAGES,
    Command,
    CommandInput,
    Context,
    TrainingStage,
    objective_commands,
)
from polyfuse.trainers import PreferenceTrainConfig


@STAGES.register("po")
class POStage(TrainingStage):
    """Preference optimisation with one objective of `polyfuse.objectives`; reads precomputed columns, loads no
    reference or source model."""

    name = "po"
    position = 100
    section = PreferenceTrainConfig
    needs = ("pairs",)
    command_inputs = (
        CommandInput("data", "Preference rows (TRL prompt/chosen/rejected), e.g. from `polyfuse logprobs`.",
                     schema=PreferenceRow),
        CommandInput(MODEL, "Initial pivot M0 (the SFT checkpoint): hub id, folder or .gguf.", kind="model"),
    )

    def commands(self) -> list[Command]:
        """One `train <objective>` per registered preference objective (adding an objective file adds a command)."""
        from polyfuse.objectives import OBJECTIVES

        return objective_commands(OBJECTIVES)

    def label(self, recipe: Any) -> str:
        return recipe.po.objective.upper()

    def check(self, recipe: Any) -> None:
        if "upo" in recipe.stages:
            raise ValueError("stages: a recipe trains with pairs (po) or with unpaired rows (upo), not both; run "
                             "two recipes with the same seed to compare them on the same samples")

    def input_paths(self, ctx: Context) -> dict[str, str]:
        return {"data": ctx.outputs.get("logprobs", {}).get("preference") or ctx.output("pairs", "preference")}

    def execute(self, config: PreferenceTrainConfig, inputs: dict[str, Any], out: Path, quiet: bool = False,
                resume: bool | None = None) -> dict[str, str]:
        from polyfuse.trainers import train_preference

        data = inputs["data"]
        model = train_preference(inputs[MODEL], data.rows, config, out, resume=resume, data_path=data.path)
        return {"model": str(model)}
