"""Stage `transplant`: the current pivot given a donor's tokenizer without training, through mergekit-tokensurgeon
(`polyfuse.merge.transplant`, the same engine as `polyfuse transplant MODEL DONOR OUT`, the stage's command).

The donor is a source of the recipe, by name, or a model folder. The transplanted pivot becomes the pivot of the
stages after it, so a same-vocabulary distillation from the donor follows (`onpolicy` with the donor as its
teacher: the two share the vocabulary, W = I), as Arcee built SuperNova-Medius (arXiv 2506.06607).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from polyfuse.config import StrictModel
from polyfuse.merge.transplant import Method
from polyfuse.pipeline.context import MODEL, STAGES, Context, Stage


class TransplantConfig(StrictModel):
    """A recipe's `transplant` section: the donor and tokensurgeon's settings."""

    donor: str = Field(description="A source of the recipe, by name, or a model folder whose tokenizer the pivot gets.")
    method: Method = Field(default="omp", description="How tokensurgeon approximates the donor's new tokens (omp: "
                           "mergekit's recommendation).")
    k: int = Field(default=64, ge=1, description="Sparsity of omp (at most the donor's hidden size) / stb / mp_rope, "
                   "neighbours of common_interpolation.")
    device: str = Field(default="cpu", description="Where tokensurgeon's matrix arithmetic runs: cpu, cuda, cuda:1.")


@STAGES.register("transplant")
class TransplantStage(Stage):
    """The pivot given a donor's tokenizer without training (mergekit-tokensurgeon)."""

    name = "transplant"
    position = 45
    section = TransplantConfig
    default = False  # opted into by listing it
    makes_model = True
    output = "model"

    def label(self, recipe: Any) -> str:
        return "TRANSPLANT"

    def donor(self, ctx: Context) -> str:
        name = ctx.recipe.transplant.donor
        return next((s.path for s in ctx.recipe.sources if s.label == name), name)

    def inputs(self, ctx: Context) -> dict[str, str]:
        return {MODEL: ctx.current_pivot(self.name).path, "donor": self.donor(ctx)}

    def read_inputs(self, ctx: Context) -> dict[str, Any]:
        return self.inputs(ctx)

    def execute(self, config: TransplantConfig, inputs: dict[str, Any], out: Path, quiet: bool = False,
                resume: bool | None = None) -> dict[str, str]:
        from polyfuse.merge.transplant import TransplantOptions, transplant

        options = TransplantOptions(config.method, config.k, config.device, quiet)
        return {"model": str(transplant(inputs[MODEL], inputs["donor"], out, options).out)}
