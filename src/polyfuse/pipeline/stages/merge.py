"""Stage `merge`: the recipe's `merge` section, a mergekit-style config, run by the merge engine.

Recipes fuse in steps (InfiFusion, FuseChat 2.0: distil each source into its own copy of the pivot, then
merge the copies), so a merge must be able to name models that only exist once earlier stages have run.
Wherever the `merge` section names a model (`base_model`, `models`, `slices` sources and bases, the tokenizer
source, per-token sources, either side of `MODEL+LORA`) it may be given as a path or named: `pivot` (the
recipe's pivot), a source name, or a stage that ran before `merge` (`sft`: its output model; `stage:key`: its
output `key`); every model it reads is an input of the stage's fingerprint. Stage names are reserved: write
`./sft` for a folder of that name. `base_model` defaults to the current pivot
(the latest model a stage produced), the merge seed to the recipe's, and the merged model becomes the
pivot of the stages after it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from polyfuse.merge.config import MergeConfig, check_method, parse_merge_config
from polyfuse.merge.reference import ModelReference
from polyfuse.pipeline.context import STAGES, Context, Stage, model_stages, stage_reference

SOURCE = "merge"  # how error messages name the recipe section
CURRENT_PIVOT = "<current pivot>"  # the merge base before the stages run; resolved when the stage runs


def _parse(value: Any) -> Any:
    """mergekit's refusals and the method name first, with the merge engine's own messages."""
    return value if value is None or isinstance(value, MergeConfig) else parse_merge_config(value, SOURCE, check=False)


def model_path(ctx: Context, name: str) -> str:
    """The path a merge model name stands for: a stage's output, the recipe's pivot, a source, or `name`."""
    reference = stage_reference(name)
    if reference is not None:
        return ctx.output(*reference)
    if name == "pivot":
        return ctx.recipe.pivot.path
    return next((s.path for s in ctx.recipe.sources if s.label == name), name)


def resolved_merge_config(ctx: Context) -> MergeConfig:
    """The `merge` section with every model name resolved to a path, wherever the section names a model (a
    model's LoRA adapter too), and the base defaulted to the current pivot; checked like a `polyfuse merge`
    config."""

    def resolve(ref: ModelReference) -> ModelReference:
        return ModelReference(model_path(ctx, ref.path), None if ref.lora is None else model_path(ctx, ref.lora))

    cfg = ctx.recipe.merge.map_models(resolve)
    if cfg.base_model is None:
        cfg = cfg.updated(base_model=ctx.current_pivot("merge").path)
    check_method(cfg, SOURCE)
    return cfg


@STAGES.register("merge")
class MergeStage(Stage):
    name = "merge"
    position = 80
    section = MergeConfig
    default = False  # merging is opted into by listing it
    makes_model = True
    output = "model"

    def fill(self, section: dict[str, Any], recipe: dict[str, Any]) -> dict[str, Any]:
        """The merge seed (random masks: DARE, DELLA, ...) defaults to the recipe's."""
        parameters = section.get("parameters")
        if parameters is None or isinstance(parameters, dict):
            section["parameters"] = {"seed": recipe.get("seed", 0), **(parameters or {})}
        return section

    def field(self) -> tuple[Any, Any]:
        annotation = Annotated[MergeConfig | None, BeforeValidator(_parse)]
        return annotation, Field(default=None, description="A mergekit-style config; see polyfuse.pipeline.stages.merge.")

    def check(self, recipe) -> None:
        """Named stages must run before `merge`; the method's needs are checked with the base defaulted."""
        earlier = recipe.stages[: recipe.stages.index("merge")]
        makers = model_stages()
        for ref in recipe.merge.named_models():
            for name in filter(None, (ref.path, ref.lora)):
                reference = stage_reference(name)
                if reference and reference[0] not in earlier:
                    raise ValueError(f"merge: {name!r} names the stage {reference[0]!r}, which does not run before "
                                     f"merge")
                if reference and reference[1] == "model" and reference[0] not in makers:
                    raise ValueError(f"merge: {name!r}: the stage {reference[0]!r} makes no model "
                                     f"(model stages: {', '.join(makers)}; or name an output, stage:key)")
        section = recipe.merge
        check_method(section if section.base_model else section.updated(base_model=CURRENT_PIVOT), SOURCE)

    def inputs(self, ctx: Context) -> dict[str, str]:
        """Every model the merge reads, by the config key that names it first (a LoRA adapter as KEY+lora)."""
        inputs = {}
        for ref, where in resolved_merge_config(ctx).referenced_models().items():
            inputs[where] = ref.path
            if ref.lora is not None:
                inputs[f"{where}+lora"] = ref.lora
        return inputs

    def label(self, recipe: Any) -> str:
        return f"MERGE({recipe.merge.merge_method})"

    def engine_config(self, ctx: Context) -> MergeConfig:
        return resolved_merge_config(ctx)

    def execute(self, config: MergeConfig, inputs: dict[str, Any], out: Path, quiet: bool = False,
                resume: bool | None = None) -> dict[str, str]:
        """Merge into `out` (the engine resumes an interrupted merge from its finished shards)."""
        from rich.console import Console

        from polyfuse.merge import MergeOptions, run_merge

        run_merge(config, out, SOURCE, MergeOptions(quiet=quiet), Console(stderr=True, quiet=quiet))
        return {"model": str(out)}
