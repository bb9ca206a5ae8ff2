"""Stage `logprobs`: sequence log-probs of the pairs under the current pivot (`ref_*`) and, with
`sources: true`, under every source of the recipe (`fuse_*`, for InfiFPO)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from polyfuse.data.io import read_rows
from polyfuse.data.schemas import PreferenceRow
from polyfuse.logprobs import LogprobsSettings
from polyfuse.models import ModelSpec
from polyfuse.pipeline.context import STAGES, Context, Stage


class LogprobsSection(LogprobsSettings):
    """The engine's settings; the models are the recipe's current pivot and (with `sources`) its sources."""

    sources: bool = Field(default=True, description="Score the sources too (fuse_* columns, InfiFPO); false: the pivot only.")


@STAGES.register("logprobs")
class LogprobsStage(Stage):
    name = "logprobs"
    position = 90
    section = LogprobsSection
    every_process = True
    needs = ("pairs",)

    def sources(self, ctx: Context) -> list[ModelSpec]:
        if not ctx.recipe.logprobs.sources:
            return []
        return [ModelSpec.model_validate(s.model_dump(exclude={"sampling"})) for s in ctx.recipe.sources]

    def inputs(self, ctx: Context) -> dict[str, str]:
        return {
            "preference": ctx.output("pairs", "preference"),
            "pivot": ctx.current_pivot("logprobs").path,
            **{f"sources[{i}]": s.path for i, s in enumerate(self.sources(ctx))},
        }

    def run(self, ctx: Context, folder: Path) -> dict[str, str]:
        from polyfuse.logprobs import run_logprobs

        rows = read_rows(ctx.output("pairs", "preference"), PreferenceRow)
        out = folder / "preference.jsonl"
        run_logprobs(ctx.current_pivot("logprobs"), self.sources(ctx), rows, ctx.recipe.logprobs, out, ctx.quiet)
        return {"preference": str(out)}
