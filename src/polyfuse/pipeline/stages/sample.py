"""Stage `sample`: the recipe's sources (and with `include_pivot` its pivot) sample every prompt, through
`polyfuse.sampling.run_sample`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from polyfuse.data.schemas import PromptRow
from polyfuse.pipeline.context import STAGES, CommandInput, Context, Stage, paths_in
from polyfuse.pipeline.manifest import Manifest
from polyfuse.sampling import SampleConfig, ShardCache, run_sample


@STAGES.register("sample")
class SampleStage(Stage):
    """Sample N responses per prompt from every model in the config (data parallel under accelerate)."""

    name = "sample"
    position = 20
    section = SampleConfig
    section_default = True
    every_process = True
    seeded = True
    needs = ("prompts",)
    command = "sample"
    config_help = "the models to sample from, each with its sampling settings"
    command_inputs = (CommandInput("prompts", "Prompts: .jsonl, .parquet or a `datasets` folder of rows with id and "
                                   "prompt.", schema=PromptRow),)
    output_help = "Output folder; a rerun keeps the shards finished here."

    def fill(self, section: dict[str, Any], recipe: dict[str, Any]) -> dict[str, Any]:
        section = super().fill(section, recipe)
        if "models" not in section and isinstance(recipe.get("sources"), list):
            pivot = [recipe["pivot"]] if section.get("include_pivot") and "pivot" in recipe else []
            section["models"] = [*recipe["sources"], *pivot]
        return section

    def recipe_fills(self) -> dict[str, str | None]:
        return {**super().recipe_fills(), "models": "the recipe's sources (and its pivot, with include_pivot)"}

    def input_paths(self, ctx: Context) -> dict[str, str]:
        return {"prompts": ctx.output("prompts", "prompts")}

    def inputs(self, ctx: Context) -> dict[str, str]:
        return {**self.input_paths(ctx), **paths_in(ctx.recipe.sample.model_dump())}

    def execute(self, config: SampleConfig, inputs: dict[str, Any], out: Path, quiet: bool = False,
                resume: bool | None = None, cache: ShardCache | None = None) -> dict[str, str]:
        return {"samples": str(run_sample(inputs["prompts"].rows, config, out, quiet=quiet, cache=cache))}

    def run(self, ctx: Context, folder: Path) -> dict[str, str]:
        """Through a stage cache, each (model, chunk) shard is shared by content with other runs: the models'
        weights hashes are the ones the runner recorded as this stage's inputs."""
        config = self.engine_config(ctx)
        cache = None
        if ctx.stage_cache is not None:
            inputs = Manifest(folder).read()["inputs"]
            cache = ShardCache(ctx.stage_cache / "sample-shards", [inputs[f"models[{m}]"] for m in range(len(config.models))])
        return self.execute(config, self.read_inputs(ctx), folder, quiet=ctx.quiet, cache=cache)
