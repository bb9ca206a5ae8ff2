"""Stage `upo`: training of the current pivot on unpaired rows (KTO, CGPO, FuseSFT) with one objective of
`polyfuse.objectives.UNPAIRED_OBJECTIVES`, through `polyfuse.trainers.train_unpaired`; its commands are
`polyfuse train <objective>`, one per objective. Its rows are the consensus step's when it ran, else the
log-prob stage's, else the pairs stage's unpaired rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from polyfuse.data.schemas import UnpairedRow
from polyfuse.pipeline.context import (
    MODEL,
    STAGES,
    Command,
    CommandInput,
    Context,
    TrainingStage,
    objective_commands,
)
from polyfuse.trainers import UnpairedTrainConfig

# The KL completions each objective's reference point needs (`pairs.unpaired.kl_completion`).
KL_RULES = {"kto": "rotation", "cgpo": "anchor", "fusesft": "none"}


def kl_rule(objective: str, objective_args: dict[str, Any]) -> str:
    """The `kl_completion` rule of an objective's rows: none for KTO's apo_zero_unpaired, which has no z0."""
    return "none" if objective_args.get("loss_type") == "apo_zero_unpaired" else KL_RULES.get(objective, "anchor")


@STAGES.register("upo")
class UnpairedStage(TrainingStage):
    """Training on unpaired desirable / undesirable rows with one objective of
    `polyfuse.objectives.UNPAIRED_OBJECTIVES` (KTO, CGPO, FuseSFT); reads precomputed columns, loads no reference or
    source model."""

    name = "upo"
    position = 105
    section = UnpairedTrainConfig
    default = False  # opted into by listing it (and `pairs` then writes unpaired rows)
    needs = ("pairs",)
    command_inputs = (
        CommandInput("data", "Unpaired rows (TRL prompt/completion/label), e.g. from `polyfuse pairs`, `polyfuse "
                     "logprobs` or `polyfuse consensus`.", schema=UnpairedRow),
        CommandInput(MODEL, "Initial pivot M0 (the SFT checkpoint): hub id, folder or .gguf.", kind="model"),
    )

    def commands(self) -> list[Command]:
        """One `train <objective>` per registered unpaired objective."""
        from polyfuse.objectives import UNPAIRED_OBJECTIVES

        return objective_commands(UNPAIRED_OBJECTIVES)

    def requires(self, recipe: Any) -> tuple[str, ...]:
        """CGPO against the sources' consensus needs the consensus step before it."""
        section = recipe.upo
        if section.objective == "cgpo" and section.build_objective().reference != "policy_anchored":
            return (*self.needs, "consensus")
        return self.needs

    def check(self, recipe: Any) -> None:
        unpaired, section = recipe.pairs.unpaired, recipe.upo
        if unpaired is None:
            raise ValueError("pairs.unpaired is null, and upo trains on unpaired rows; leave the key out (the recipe "
                             "sets it) or give its settings")
        wanted = kl_rule(section.objective, section.objective_args)
        if unpaired.kl_completion != wanted and not (wanted == "anchor" and unpaired.kl_completion == "rotation"):
            raise ValueError(f"pairs.unpaired.kl_completion is {unpaired.kl_completion!r}, and upo's objective "
                             f"{section.objective!r} needs {wanted!r}; leave the key out (the recipe sets it)")
        if wanted == "rotation" and unpaired.kl_block != section.batch_size:
            raise ValueError(f"pairs.unpaired.kl_block is {unpaired.kl_block} and upo.batch_size "
                             f"{section.batch_size}: kto's KL completions rotate within each micro-batch, so they "
                             "must be equal; leave kl_block out (the recipe sets it)")

    def label(self, recipe: Any) -> str:
        return recipe.upo.objective.upper()

    def input_paths(self, ctx: Context) -> dict[str, str]:
        for stage in ("consensus", "logprobs"):
            if "unpaired" in ctx.outputs.get(stage, {}):
                return {"data": ctx.outputs[stage]["unpaired"]}
        return {"data": ctx.output("pairs", "unpaired")}

    def execute(self, config: UnpairedTrainConfig, inputs: dict[str, Any], out: Path, quiet: bool = False,
                resume: bool | None = None) -> dict[str, str]:
        from polyfuse.trainers import train_unpaired

        data = inputs["data"]
        model = train_unpaired(inputs[MODEL], data.rows, config, out, resume=resume, data_path=data.path)
        return {"model": str(model)}
