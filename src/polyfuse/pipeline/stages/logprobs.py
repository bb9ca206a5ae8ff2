"""Stage `logprobs`: sequence log-probs of the pairs (or, when the recipe trains with `upo`, of the unpaired rows)
under the current pivot (`ref_*`) and, unless `sources: false`, under every source of the recipe (`fuse_*`, for
InfiFPO and CGPO; with the sources' completion entropies for unpaired rows), through
`polyfuse.logprobs.run_logprobs`. Each model is scored through its own `backend:` (or the section's `backend`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from polyfuse.config import fingerprinted
from polyfuse.data.schemas import ScoredRow, UnpairedRow
from polyfuse.logprobs import LogprobsConfig, run_logprobs
from polyfuse.pipeline.context import STAGES, CommandInput, Context, Stage, model_specs, model_stages
from polyfuse.sampling import BACKENDS, EngineModel


@STAGES.register("logprobs")
class LogprobsStage(Stage):
    """Sequence log-probs of every pair or unpaired row under the initial pivot (ref_* columns) and every source
    (fuse_* columns; for unpaired rows also each source's completion entropy), each model through its own
    tokenizer and chat template; resumable, data parallel under accelerate."""

    name = "logprobs"
    position = 90
    section = LogprobsConfig
    every_process = True
    needs = ("pairs",)
    command = "logprobs"
    config_help = "the initial pivot M0 (ref_* columns) and the sources (fuse_* columns)"
    command_inputs = (CommandInput("data", "Preference rows (TRL prompt/chosen/rejected, and chosen_source for WRPO), "
                                   "or unpaired rows (prompt/completion/label, and kl_completion).", schema=ScoredRow),)
    output = "preference.jsonl"
    output_help = "Output file: .jsonl, .parquet, or a folder for `datasets`."

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

    def engine_config(self, ctx: Context) -> LogprobsConfig:
        """The section with the current pivot as M0."""
        pivot = model_specs([ctx.current_pivot("logprobs")], EngineModel)[0]
        return ctx.recipe.logprobs.model_copy(update={"pivot": EngineModel.model_validate(pivot)})

    def rows_key(self, recipe) -> str:
        """The rows the recipe scores: the unpaired rows when it trains on them (`upo`), else the pairs."""
        return "unpaired" if "upo" in recipe.stages else "preference"

    def input_paths(self, ctx: Context) -> dict[str, str]:
        return {"data": ctx.output("pairs", self.rows_key(ctx.recipe))}

    def inputs(self, ctx: Context) -> dict[str, str]:
        config = self.engine_config(ctx)
        key = self.rows_key(ctx.recipe)
        return {
            key: ctx.output("pairs", key),
            "pivot": config.pivot.path,
            **{f"sources[{i}]": s.path for i, s in enumerate(config.sources)},
        }

    def run(self, ctx: Context, folder: Path) -> dict[str, str]:
        """The scored rows go to `<rows>.jsonl` in the stage folder: `preference.jsonl` or `unpaired.jsonl`."""
        out = folder / f"{self.rows_key(ctx.recipe)}.jsonl"
        return self.execute(self.engine_config(ctx), self.read_inputs(ctx), out, quiet=ctx.quiet)

    def execute(self, config: LogprobsConfig, inputs: dict[str, Any], out: Path, quiet: bool = False,
                resume: bool | None = None) -> dict[str, str]:
        rows = inputs["data"].rows
        key = "unpaired" if rows and isinstance(rows[0], UnpairedRow) else "preference"
        return {key: str(run_logprobs(config, rows, out, quiet))}
