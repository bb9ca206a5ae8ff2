"""Stage `prompts`: the recipe's prompts, from a file (JSONL / Parquet / datasets folder of PromptRow) or
from the toy world, written once so the stages after it read one fixed file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from polyfuse.config import StrictModel
from polyfuse.data.io import write_rows
from polyfuse.pipeline.context import STAGES, Context, Stage


class ToyPrompts(StrictModel):
    split: Literal["train", "heldout"] = "train"
    per_domain: int = Field(default=100, ge=1)
    domains: list[str] | None = None
    seed: int = Field(default=0, description="Which prompts are drawn; in a recipe: default the recipe's seed.")


class PromptSource(StrictModel):
    """Prompts from a file (JSONL / Parquet / datasets folder of PromptRow) or from the toy world."""

    path: str | None = None
    toyworld: ToyPrompts | None = None
    limit: int | None = Field(default=None, ge=1)
    skip_invalid: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> PromptSource:
        if (self.path is None) == (self.toyworld is None):
            raise ValueError("give exactly one of 'path' or 'toyworld'")
        return self


def seeded_source(source: Any, seed: int) -> Any:
    """A raw prompt source whose toy-world draw takes `seed` unless it gives its own."""
    if isinstance(source, dict) and isinstance(source.get("toyworld"), dict):
        return {**source, "toyworld": {"seed": seed, **source["toyworld"]}}
    return source


@STAGES.register("prompts")
class PromptsStage(Stage):
    name = "prompts"
    position = 10
    section = PromptSource
    required = True

    def fill(self, section: dict[str, Any], recipe: dict[str, Any]) -> dict[str, Any]:
        return seeded_source(section, recipe.get("seed", 0))

    def inputs(self, ctx: Context) -> dict[str, str]:
        return {"prompts": ctx.recipe.prompts.path} if ctx.recipe.prompts.path else {}

    def run(self, ctx: Context, folder: Path) -> dict[str, str]:
        out = folder / "prompts.jsonl"
        write_rows(out, ctx.recipe.load_prompts(ctx.recipe.prompts))
        return {"prompts": str(out)}
