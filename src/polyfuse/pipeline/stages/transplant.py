"""Stage `transplant`: the current pivot given a donor's tokenizer without training, through mergekit-tokensurgeon
(`polyfuse.merge.transplant`); its command is `polyfuse transplant --model MODEL --donor DONOR -o OUT`.

The donor is a source of the recipe, by name, or a model folder (the command's `--donor`). The transplanted pivot becomes the pivot of the
stages after it, so a same-vocabulary distillation from the donor follows (`onpolicy` with the donor as its
teacher: the two share the vocabulary, W = I), as Arcee built SuperNova-Medius (arXiv 2506.06607).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from polyfuse.config import StrictModel
from polyfuse.merge.transplant import Method
from polyfuse.pipeline.context import MODEL, STAGES, CommandInput, Context, Stage


class TransplantConfig(StrictModel):
    """`polyfuse transplant --config` and a recipe's `transplant` section: tokensurgeon's settings, and in a recipe
    the donor (the command's `--donor`)."""

    recipe_only: ClassVar[tuple[str, ...]] = ("donor",)

    donor: str | None = Field(default=None, description="Recipe (required there): a source of the recipe, by name, "
                              "or a model folder whose tokenizer the pivot gets.")
    method: Method = Field(default="omp", description="How tokensurgeon approximates the donor's new tokens (omp: "
                           "mergekit's recommendation).")
    k: int = Field(default=64, ge=1, description="Sparsity of omp (at most the donor's hidden size) / stb / mp_rope, "
                   "neighbours of common_interpolation.")
    device: str = Field(default="cpu", description="Where tokensurgeon's matrix arithmetic runs: cpu, cuda, cuda:1.")


@STAGES.register("transplant")
class TransplantStage(Stage):
    """Give a model a donor's vocabulary without training, through mergekit-tokensurgeon (mergekit 0.1.5): shared
    tokens keep their embeddings, the donor's other tokens are approximated (OMP by default); rerunning skips a
    finished transplant."""

    name = "transplant"
    position = 45
    section = TransplantConfig
    default = False  # opted into by listing it
    makes_model = True
    output = "model"
    command = "transplant"
    config_help = "tokensurgeon's approximation method, its k and device"
    command_inputs = (CommandInput(MODEL, "Model folder whose weights are kept.", kind="path"),
                      CommandInput("donor", "Model folder whose tokenizer MODEL gets.", kind="path"))
    output_help = "Output model folder (with transplant.json: what was done)."

    def check(self, recipe: Any) -> None:
        if recipe.transplant.donor is None:
            raise ValueError("transplant: donor is required: a source of the recipe, by name, or a model folder")

    def label(self, recipe: Any) -> str:
        return "TRANSPLANT"

    def input_paths(self, ctx: Context) -> dict[str, str]:
        """The current pivot, and the donor: the source of that name, else the folder the section names."""
        name = ctx.recipe.transplant.donor
        return {MODEL: ctx.current_pivot(self.name).path,
                "donor": next((s.path for s in ctx.recipe.sources if s.label == name), name)}

    def inputs(self, ctx: Context) -> dict[str, str]:
        return self.input_paths(ctx)

    def execute(self, config: TransplantConfig, inputs: dict[str, Any], out: Path, quiet: bool = False,
                resume: bool | None = None) -> dict[str, str]:
        from polyfuse.merge.transplant import TransplantOptions, transplant

        options = TransplantOptions(config.method, config.k, config.device, quiet)
        return {"model": str(transplant(inputs[MODEL], inputs["donor"], out, options).out)}
