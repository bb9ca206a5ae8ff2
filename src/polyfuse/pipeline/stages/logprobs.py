"""Stage `logprobs`: sequence log-probs of the pairs under the current pivot (`ref_*`) and, unless
`sources: false`, under every source of the recipe (`fuse_*`, for InfiFPO). Each model is scored through
its own `backend:` (or the section's `backend`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from polyfuse.config import fingerprinted
from polyfuse.data.io import read_rows
from polyfuse.data.schemas import PreferenceRow
from polyfuse.logprobs import LogprobsConfig
from polyfuse.pipeline.context import STAGES, Context, Stage, model_specs, model_stages
from polyfuse.sampling import BACKENDS, EngineModel


@STAGES.register("logprobs")
class LogprobsStage(Stage):
    name = "logprobs"
    position = 90
    section = LogprobsConfig
    every_process = True
    needs = ("pairs",)

    def fill(self, section: dict[str, Any], recipe: dict[str, Any]) -> dict[str, Any]:
        """The pivot is the recipe's (replaced by the current pivot when the stage runs); `sources: true` (the
        default) scores the recipe's sources, each with its own backend."""
        if "pivot" in section:
            raise ValueError("logprobs.pivot: a recipe scores its current pivot (the recipe's, or the model the "
                             "last training stage made); remove the key")
        if isinstance(recipe.get("pivot"), dict):
            section["pivot"] = model_specs([recipe["pivot"]], EngineModel)[0]
        sources = section.get("sources", True)
        if isinstance(sources, bool) and isinstance(recipe.get("sources"), list):
            section["sources"] = model_specs(recipe["sources"], EngineModel) if sources else []
        return section

    def recipe_fills(self) -> dict[str, str | None]:
        return {"pivot": None, "sources": "true: the recipe's sources, each with its own backend (the default); "
                                          "false: none"}

    def check(self, recipe) -> None:
        section = recipe.logprobs
        trained = [s for s in recipe.stages[: recipe.stages.index("logprobs")] if s in model_stages()]
        backend = section.backend or recipe.pivot.backend
        if trained and not BACKENDS.get(backend.type).loads_weights:
            raise ValueError(f"logprobs: the pivot is trained by {trained[-1]!r} before this stage, and backend "
                             f"{backend.type!r} serves a fixed model; set logprobs.backend to transformers or vllm")

    def config(self, recipe) -> dict:
        """The section (its sources with their backends) and the pivot's backend (its path is an input)."""
        return {**super().config(recipe), "pivot_backend": fingerprinted(recipe.logprobs.backend or recipe.pivot.backend)}

    def logprobs_config(self, ctx: Context) -> LogprobsConfig:
        pivot = model_specs([ctx.current_pivot("logprobs")], EngineModel)[0]
        return ctx.recipe.logprobs.model_copy(update={"pivot": EngineModel.model_validate(pivot)})

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
