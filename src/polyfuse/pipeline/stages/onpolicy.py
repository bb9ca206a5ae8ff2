"""Stage `onpolicy`: on-policy distillation of the current pivot from the teachers (the recipe's sources unless the
section lists its own `teachers`), each scoring the pivot's own samples through its own tokenizer, template and
backend, through `polyfuse.trainers.train_onpolicy`. The prompts are the prompts stage's (or the section's
`data`); with `lmbda` < 1 the pairs stage's SFT rows, whose completions the off-policy steps train on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from polyfuse.data.schemas import PromptRow
from polyfuse.pipeline.context import (
    MODEL,
    STAGES,
    CommandInput,
    Context,
    TrainingStage,
    model_specs,
    paths_in,
)
from polyfuse.sampling import EngineModel
from polyfuse.trainers.config import OnPolicyTrainConfig


@STAGES.register("onpolicy")
class OnPolicyStage(TrainingStage):
    """On-policy distillation: the pivot samples, every teacher scores its tokens through its own tokenizer and
    backend (in process, a vLLM engine or a server), and the pivot learns from the teachers' top-K on its own
    tokens (kd: forward / reverse KL, JSD, X-Token P-KL; gold: GOLD's hybrid, H-KL); several teachers by routing
    (MOPD) or mixed at each position; GKD's lambda mixes in the rows' own completions."""

    name = "onpolicy"
    position = 75
    section = OnPolicyTrainConfig
    default = False  # explicit fusion is opted into by listing it
    command = "train onpolicy"
    config_help = "the teachers and their backends, the loss, the student's sampling, lambda and the mix"
    command_inputs = (
        CommandInput("prompts", "Prompt rows (id, prompt; `completion` when lmbda < 1; the route_by column).",
                     schema=PromptRow),
        CommandInput(MODEL, "Pivot (student): hub id, folder or .gguf file.", kind="model"),
    )

    def fill(self, section: dict[str, Any], recipe: dict[str, Any]) -> dict[str, Any]:
        section = super().fill(section, recipe)
        if "teachers" not in section and isinstance(recipe.get("sources"), list):
            section["teachers"] = model_specs(recipe["sources"], EngineModel)
        return section

    def recipe_fills(self) -> dict[str, str | None]:
        return {**super().recipe_fills(), "teachers": "the recipe's sources, each with its own backend"}

    def requires(self, recipe: Any) -> tuple[str, ...]:
        section = recipe.onpolicy
        if section is not None and section.data:
            return ()
        return ("prompts",) if section is None or section.lmbda >= 1 else ("pairs",)

    def label(self, recipe: Any) -> str:
        return f"ONPOLICY-{recipe.onpolicy.objective.upper()}"

    def input_paths(self, ctx: Context) -> dict[str, str]:
        section = ctx.recipe.onpolicy
        if section.data:
            return {"prompts": section.data}
        return {"prompts": ctx.output("prompts", "prompts") if section.lmbda >= 1 else ctx.output("pairs", "sft")}

    def inputs(self, ctx: Context) -> dict[str, str]:
        return {**super().inputs(ctx), **paths_in({"teachers": [t.model_dump() for t in ctx.recipe.onpolicy.teachers]})}

    def execute(self, config: OnPolicyTrainConfig, inputs: dict[str, Any], out: Path, quiet: bool = False,
                resume: bool | None = None) -> dict[str, str]:
        from polyfuse.trainers.onpolicy import train_onpolicy

        prompts = inputs["prompts"]
        return {"model": str(train_onpolicy(inputs[MODEL], prompts.rows, config, out, where=prompts.path,
                                            resume=resume))}
