"""Stage `sft`: supervised fine-tuning of the current pivot on the pairs stage's SFT rows, through
`polyfuse.trainers.train_sft`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from polyfuse.data.schemas import SFTRow
from polyfuse.pipeline.context import MODEL, STAGES, CommandInput, Context, TrainingStage
from polyfuse.trainers import SFTTrainConfig


@STAGES.register("sft")
class SFTStage(TrainingStage):
    """Supervised fine-tuning of the pivot on the response tokens of the SFT rows."""

    name = "sft"
    position = 50
    section = SFTTrainConfig
    needs = ("pairs",)
    command = "train sft"
    config_help = "learning rate, epochs, batch size, LoRA, checkpoints, trackers"
    command_inputs = (
        CommandInput("data", "SFT rows (TRL prompt/completion), e.g. from `polyfuse pairs`.", schema=SFTRow),
        CommandInput(MODEL, "Pivot: hub id, folder or .gguf file.", kind="model"),
    )

    def input_paths(self, ctx: Context) -> dict[str, str]:
        return {"data": ctx.output("pairs", "sft")}

    def execute(self, config: SFTTrainConfig, inputs: dict[str, Any], out: Path, quiet: bool = False,
                resume: bool | None = None) -> dict[str, str]:
        from polyfuse.trainers import train_sft

        return {"model": str(train_sft(inputs[MODEL], inputs["data"].rows, config, out, resume=resume))}
