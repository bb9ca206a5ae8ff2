"""Stage `logprobs`: sequence log-probs of the pairs under the current pivot (`ref_*`) and, unless
`sources: false`, under every source of the recipe (`fuse_*`, for InfiFPO). Each model is scored through
its own `backend:` (or the section's `backend`)."""

from __future__ import annotations

from pathlib import Path

from polyfuse.data.io import read_rows
from polyfuse.data.schemas import PreferenceRow
from polyfuse.logprobs import LogprobsConfig
from polyfuse.pipeline.context import STAGES, Context, Stage, model_stages
from polyfuse.sampling import BACKENDS, EngineModel


@STAGES.register("logprobs")
class LogprobsStage(Stage):
    name = "logprobs"
    position = 90
    section = LogprobsConfig
    every_process = True
    needs = ("pairs",)

    def check(self, recipe) -> None:
        section = recipe.logprobs
        if section.pivot is not None or isinstance(section.sources, list):
            raise ValueError("logprobs: a recipe scores its current pivot and (sources: true) its sources; "
                             "give no 'pivot' or list of 'sources' here")
        trained = [s for s in recipe.stages[: recipe.stages.index("logprobs")] if s in model_stages()]
        backend = section.backend or recipe.pivot.backend
        if trained and not BACKENDS.get(backend.type).loads_weights:
            raise ValueError(f"logprobs: the pivot is trained by {trained[-1]!r} before this stage, and backend "
                             f"{backend.type!r} serves a fixed model; set logprobs.backend to transformers or vllm")

    def logprobs_config(self, ctx: Context) -> LogprobsConfig:
        section = ctx.recipe.logprobs
        sources = [] if section.sources is False else [EngineModel.model_validate(s.model_dump(exclude={"sampling"}))
                                                       for s in ctx.recipe.sources]
        pivot = EngineModel.model_validate(ctx.current_pivot("logprobs").model_dump(exclude={"sampling"}))
        return section.model_copy(update={"pivot": pivot, "sources": sources})

    def config(self, recipe) -> dict:
        """The section with the sources it scores and their backends (the pivot's path is an input)."""
        section = recipe.logprobs
        sources = [] if section.sources is False else [s.model_dump(mode="json", exclude={"sampling"}) for s in recipe.sources]
        return {"section": section.model_dump(mode="json"), "sources": sources,
                "pivot_backend": (section.backend or recipe.pivot.backend).model_dump(mode="json")}

    def inputs(self, ctx: Context) -> dict[str, str]:
        config = self.logprobs_config(ctx)
        return {
            "preference": ctx.output("pairs", "preference"),
            "pivot": config.pivot.path,
            **{f"sources[{i}]": s.path for i, s in enumerate(config.sources)},
        }

    def run(self, ctx: Context, folder: Path) -> dict[str, str]:
        from polyfuse.logprobs import run_logprobs

        rows = read_rows(ctx.output("pairs", "preference"), PreferenceRow)
        out = folder / "preference.jsonl"
        run_logprobs(self.logprobs_config(ctx), rows, out, ctx.quiet)
        return {"preference": str(out)}
