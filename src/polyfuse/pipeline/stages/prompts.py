"""Stage `prompts`: the recipe's prompts, from a file (JSONL / Parquet / datasets folder of PromptRow), an
evaluation set or the toy world, written once so the stages after it read one fixed file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from polyfuse.data.io import write_rows
from polyfuse.pipeline.context import STAGES, Context, Stage
from polyfuse.pipeline.sources import PromptSource, load_prompts, recipe_source


@STAGES.register("prompts")
class PromptsStage(Stage):
    """Write the prompts of a source (a PromptRow file, an evaluation set or the toy world) to prompts.jsonl."""

    name = "prompts"
    position = 10
    section = PromptSource
    required = True
    command = "prompts"
    config_help = "the prompt source: a file (path), humaneval, gsm8k:FILE, or the toy world (toyworld)"

    def fill(self, section: dict[str, Any], recipe: dict[str, Any]) -> dict[str, Any]:
        return recipe_source(section, recipe)

    def inputs(self, ctx: Context) -> dict[str, str]:
        path = ctx.recipe.prompts.data_file
        return {"prompts": path} if path else {}

    def execute(self, config: PromptSource, inputs: dict[str, Any], out: Path, quiet: bool = False,
                resume: bool | None = None) -> dict[str, str]:
        write_rows(out / "prompts.jsonl", load_prompts(config, quiet))
        return {"prompts": str(out / "prompts.jsonl")}
