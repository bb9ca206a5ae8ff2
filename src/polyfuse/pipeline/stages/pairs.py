"""Stage `pairs`: SFT targets and preference pairs from the scored samples, through `polyfuse.pairs.run_pairs`
(the rules: `polyfuse.pairs.rules`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from polyfuse.data.schemas import SampleRow
from polyfuse.pairs import PairsConfig, run_pairs
from polyfuse.pipeline.context import STAGES, CommandInput, Context, Stage


@STAGES.register("pairs")
class PairsStage(Stage):
    """Build SFT rows and preference pairs with the FuseChat-3.0 rules (or the WRPO and cross-model layouts),
    ranked by verifier verdicts, a reward model, or both; with `unpaired:`, also every judged response of the
    preference prompts as a desirable / undesirable row (KTO, CGPO, FuseSFT)."""

    name = "pairs"
    position = 40
    section = PairsConfig
    section_default = True  # nothing is required: without a section the verifier verdicts rank
    seeded = True
    needs = ("score",)
    command = "pairs"
    config_help = "what ranks the responses (verifiers, a reward), the pair rule and the SFT / preference split"
    command_inputs = (CommandInput("scored", "Scored samples written by `polyfuse score`.", schema=SampleRow),)

    def check(self, recipe) -> None:
        from polyfuse.scorers import SCORERS

        kinds = {c.name or c.type: SCORERS.get(c.type).kind for c in recipe.score.scorers}
        rewards = [name for name, kind in kinds.items() if kind == "reward"]
        if kinds.get(recipe.pairs.reward) == "verifier":
            raise ValueError(f"pairs.reward: {recipe.pairs.reward!r} is a verifier, not a reward scorer; verifier "
                             "verdicts always rank (correct over incorrect): leave pairs.reward out to rank by them "
                             "alone, or name a reward_model scorer to rank within the correct and the incorrect ones")
        if recipe.pairs.reward is not None and recipe.pairs.reward not in rewards:
            raise ValueError(f"pairs.reward: {recipe.pairs.reward!r} is not a reward scorer of the score stage; "
                             f"its reward scorers: {', '.join(rewards) or 'none (leave pairs.reward out: the verifiers rank)'}")
        if recipe.pairs.reward is None and "verifier" not in kinds.values():
            raise ValueError("pairs: no reward is set and the score stage has no verifier, so nothing ranks the "
                             f"responses; set pairs.reward to one of: {', '.join(rewards)}, or add a verifier")
        for fraction, stage, rows in ((0.0, "sft", "SFT rows"), (1.0, "po", "preference pairs"), (1.0, "upo", "unpaired rows")):
            if recipe.pairs.sft_fraction == fraction and stage in recipe.stages:
                raise ValueError(f"pairs.sft_fraction is {fraction:g}: no prompt gives {rows}, but the recipe runs "
                                 f"'{stage}'")

    def fill(self, section: dict[str, Any], recipe: dict[str, Any]) -> dict[str, Any]:
        """The seed, and, when the recipe trains with `upo`, the unpaired rows its objective needs: their KL
        completions' rule and, for kto, the block they rotate in (upo's batch_size); what the section gives wins."""
        from polyfuse.pipeline.stages.upo import kl_rule
        from polyfuse.trainers import UnpairedTrainConfig

        section = super().fill(section, recipe)
        upo, unpaired = recipe.get("upo"), section.get("unpaired", {})
        if "upo" in (recipe.get("stages") or []) and isinstance(upo, dict) and isinstance(unpaired, dict):
            defaults = UnpairedTrainConfig.model_fields
            args = upo.get("objective_args")
            rule = kl_rule(upo.get("objective", defaults["objective"].default), args if isinstance(args, dict) else {})
            filled = {"kl_completion": rule, "kl_block": upo.get("batch_size", defaults["batch_size"].default)}
            unpaired.update({k: v for k, v in filled.items() if k not in unpaired and (rule == "rotation" or k != "kl_block")})
            section["unpaired"] = unpaired
        return section

    def recipe_fills(self) -> dict[str, str | None]:
        return {**super().recipe_fills(), "unpaired": "when the recipe trains with `upo`: the KL completions its "
                "objective needs (kl_completion, and kto's kl_block = upo.batch_size)"}

    def input_paths(self, ctx: Context) -> dict[str, str]:
        return {"scored": ctx.output("score", "scored")}

    def inputs(self, ctx: Context) -> dict[str, str]:
        return self.input_paths(ctx)

    def execute(self, config: PairsConfig, inputs: dict[str, Any], out: Path, quiet: bool = False,
                resume: bool | None = None) -> dict[str, str]:
        return {k: str(v) for k, v in run_pairs(inputs["scored"].rows, config, out).items()}
