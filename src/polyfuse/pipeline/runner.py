"""`polyfuse run RECIPE.yaml`: the stages of a recipe, in order, in one work directory.

Each stage runs in `<work_dir>/<stage>/` and records a manifest (resolved config, input hashes,
package versions). A finished stage whose config and inputs are unchanged is skipped; a stage whose
fingerprint changed starts over in a clean folder; an unfinished one resumes from its finished shards.
Stages only communicate through files, so a killed run, rerun, gives the same result.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from polyfuse.data.hashing import hash_path
from polyfuse.data.io import read_rows, write_rows
from polyfuse.data.schemas import PreferenceRow, PromptRow, SampleRow, SFTRow
from polyfuse.errors import ConfigError
from polyfuse.models import ModelSpec
from polyfuse.pipeline.manifest import Manifest, fingerprint
from polyfuse.pipeline.recipe import Recipe

console = Console(stderr=True)


@dataclass
class Context:
    """What stages know: the recipe, where the work goes, and the outputs of the stages before."""

    recipe: Recipe
    work_dir: Path
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)
    quiet: bool = False

    def output(self, stage: str, key: str) -> str:
        if stage not in self.outputs:
            raise ConfigError(f"stages: '{stage}' must run before the stages that use its {key!r}")
        if key not in self.outputs[stage]:
            raise ConfigError(f"stage '{stage}' has no output {key!r}; it has {', '.join(self.outputs[stage])}")
        return self.outputs[stage][key]

    def current_pivot(self, before: str) -> ModelSpec:
        """The pivot as it stands before stage `before`: the latest trained model, else the recipe's pivot."""
        names = self.recipe.stages
        for stage in reversed(names[: names.index(before)]):
            if "model" in self.outputs.get(stage, {}):
                return self.recipe.pivot.model_copy(update={"path": self.outputs[stage]["model"], "gguf_file": None})
        return self.recipe.pivot


@dataclass
class Stage:
    """`inputs` names the files and models a stage reads (hashed into its fingerprint); `run` does the work
    in the stage folder and returns its outputs as name -> path."""

    inputs: Callable[[Context], dict[str, str]]
    run: Callable[[Context, Path], dict[str, str]]


def _prompts_inputs(ctx: Context) -> dict[str, str]:
    return {"prompts": ctx.recipe.prompts.path} if ctx.recipe.prompts.path else {}


def _prompts_run(ctx: Context, folder: Path) -> dict[str, str]:
    rows = ctx.recipe.load_prompts(ctx.recipe.prompts)
    out = folder / "prompts.jsonl"
    write_rows(out, rows)
    return {"prompts": str(out)}


def _sample_run(ctx: Context, folder: Path) -> dict[str, str]:
    from polyfuse.pipeline.sample import run_sample

    prompts = read_rows(ctx.output("prompts", "prompts"), PromptRow)
    out = run_sample(prompts, ctx.recipe.sample_config(), folder, quiet=ctx.quiet)
    return {"samples": str(out)}


def _score_run(ctx: Context, folder: Path) -> dict[str, str]:
    from polyfuse.pipeline.score import run_score

    samples = read_rows(ctx.output("sample", "samples"), SampleRow)
    return {"scored": str(run_score(samples, ctx.recipe.score, folder, quiet=ctx.quiet))}


def _pairs_run(ctx: Context, folder: Path) -> dict[str, str]:
    from polyfuse.pipeline.pairs import run_pairs

    samples = read_rows(ctx.output("score", "scored"), SampleRow)
    return {k: str(v) for k, v in run_pairs(samples, ctx.recipe.pairs, folder).items()}


def _sft_run(ctx: Context, folder: Path) -> dict[str, str]:
    from polyfuse.trainers import train_sft

    rows = read_rows(ctx.output("pairs", "sft"), SFTRow)
    model = train_sft(ctx.current_pivot("sft"), rows, ctx.recipe.sft, folder / "model")
    return {"model": str(model)}


def _teacher_inputs(ctx: Context) -> dict[str, str]:
    from polyfuse.pipeline.distill import teacher_models, training_rows

    return {"sft": training_rows(ctx), **{f"models[{i}]": m.path for i, m in enumerate(teacher_models(ctx))}}


def _teacher_run(ctx: Context, folder: Path) -> dict[str, str]:
    from polyfuse.pipeline.distill import run_teacher_stage

    return run_teacher_stage(ctx, folder)


def _distill_run(ctx: Context, folder: Path) -> dict[str, str]:
    from polyfuse.pipeline.distill import run_distill_stage

    return run_distill_stage(ctx, folder)


def _merge_inputs(ctx: Context) -> dict[str, str]:
    from polyfuse.pipeline.merge import merge_inputs

    return merge_inputs(ctx)


def _merge_run(ctx: Context, folder: Path) -> dict[str, str]:
    from polyfuse.pipeline.merge import run_merge_stage

    return run_merge_stage(ctx, folder)


def _logprobs_sources(ctx: Context) -> list[ModelSpec]:
    if not ctx.recipe.logprobs.sources:
        return []
    return [ModelSpec.model_validate(s.model_dump(exclude={"sampling"})) for s in ctx.recipe.sources]


def _logprobs_run(ctx: Context, folder: Path) -> dict[str, str]:
    from polyfuse.logprobs import run_logprobs

    rows = read_rows(ctx.output("pairs", "preference"), PreferenceRow)
    out = folder / "preference.jsonl"
    run_logprobs(ctx.current_pivot("logprobs"), _logprobs_sources(ctx), rows, ctx.recipe.logprobs, out, ctx.quiet)
    return {"preference": str(out)}


def _preference_data(ctx: Context) -> str:
    return ctx.outputs.get("logprobs", {}).get("preference") or ctx.output("pairs", "preference")


def _po_run(ctx: Context, folder: Path) -> dict[str, str]:
    from polyfuse.logprobs import fusion_sources
    from polyfuse.trainers import train_preference

    rows = read_rows(_preference_data(ctx), PreferenceRow)
    sources = fusion_sources(_preference_data(ctx), rows)
    model = train_preference(ctx.current_pivot("po"), rows, ctx.recipe.po, folder / "model", source_names=sources)
    return {"model": str(model)}


def _eval_run(ctx: Context, folder: Path) -> dict[str, str]:
    from polyfuse.pipeline.evaluate import run_eval_stage

    return run_eval_stage(ctx, folder)


def _paths_in(node: Any, prefix: str = "") -> dict[str, str]:
    """Every `path` value in a config section (models, reward models), keyed by where it sits."""
    found: dict[str, str] = {}
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "path" and isinstance(value, str):
                found[prefix or "path"] = value
            else:
                found.update(_paths_in(value, f"{prefix}.{key}" if prefix else key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found.update(_paths_in(value, f"{prefix}[{i}]"))
    return found


def _eval_inputs(ctx: Context) -> dict[str, str]:
    from polyfuse.pipeline.evaluate import eval_models

    models = {label: spec.path for label, spec in eval_models(ctx).items()}
    return {**models, **_paths_in(ctx.recipe.eval.model_dump())}


STAGES: dict[str, Stage] = {
    "prompts": Stage(_prompts_inputs, _prompts_run),
    "sample": Stage(lambda c: {"prompts": c.output("prompts", "prompts"), **_paths_in(c.recipe.sample_config().model_dump())}, _sample_run),
    "score": Stage(lambda c: {"samples": c.output("sample", "samples"), **_paths_in(c.recipe.score.model_dump())}, _score_run),
    "pairs": Stage(lambda c: {"scored": c.output("score", "scored")}, _pairs_run),
    "sft": Stage(lambda c: {"sft": c.output("pairs", "sft"), "pivot": c.current_pivot("sft").path}, _sft_run),
    "teacher": Stage(_teacher_inputs, _teacher_run),
    "distill": Stage(
        lambda c: {"sft": c.output("teacher", "sft"), "store": c.output("teacher", "store"),
                   "pivot": c.current_pivot("distill").path},
        _distill_run,
    ),
    "merge": Stage(_merge_inputs, _merge_run),
    "logprobs": Stage(
        lambda c: {
            "preference": c.output("pairs", "preference"),
            "pivot": c.current_pivot("logprobs").path,
            **{f"sources[{i}]": s.path for i, s in enumerate(_logprobs_sources(c))},
        },
        _logprobs_run,
    ),
    "po": Stage(lambda c: {"preference": _preference_data(c), "pivot": c.current_pivot("po").path}, _po_run),
    "eval": Stage(_eval_inputs, _eval_run),
}


def _stage_config(recipe: Recipe, name: str) -> dict[str, Any]:
    section = getattr(recipe, name, None)
    resolved = section.model_dump(mode="json") if hasattr(section, "model_dump") else section
    return {"section": resolved, "seed": recipe.seed}


def run_recipe(recipe: Recipe, work_dir: str | Path | None = None, quiet: bool = False) -> Context:
    """Run (or resume) every stage of `recipe`; returns the context with every stage's outputs."""
    ctx = Context(recipe=recipe, work_dir=Path(work_dir or recipe.resolved_work_dir), quiet=quiet)
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    if recipe.toyworld is not None:
        recipe.world(quiet)  # built once and cached; every toyworld:// path must exist before hashing inputs
    recipe.save_resolved(ctx.work_dir / "recipe.resolved.yaml")
    for name in recipe.stages:
        stage = STAGES[name]
        folder = ctx.work_dir / name
        manifest = Manifest(folder)
        inputs = {k: hash_path(v) for k, v in stage.inputs(ctx).items()}
        config = _stage_config(recipe, name)
        print_ = fingerprint(config, inputs)
        if manifest.is_done(print_):
            ctx.outputs[name] = manifest.read()["outputs"]
            console.print(f"[green]✓[/] {name}: finished earlier, skipped")
            continue
        if manifest.read().get("fingerprint") not in (None, print_):
            shutil.rmtree(folder)  # config or inputs changed: partial work is not reusable
        folder.mkdir(parents=True, exist_ok=True)
        manifest.start(name, config, inputs, print_)
        console.print(f"[bold]▶ {name}[/]")
        started = time.perf_counter()
        outputs = stage.run(ctx, folder)
        manifest.finish(outputs)
        ctx.outputs[name] = outputs
        console.print(f"[green]✓[/] {name}: done in {time.perf_counter() - started:.1f}s")
    return ctx
