"""`polyfuse`: every pipeline stage as a command, plus `run` for whole recipes and `demo`.

Stage commands take a YAML config (`--config`) validated before any model is loaded; `--set KEY=VALUE`
(repeatable) overrides config keys. User mistakes print one clear message and exit with code 2.

This module imports only typer and rich at load time: torch and transformers are imported by the command
that runs, so `polyfuse --help` (and a mistyped flag) answers at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from polyfuse.errors import EXIT_USER_ERROR, UserError, storage_error


class _TrainCommands(TyperGroup):
    """`polyfuse train`: its fixed commands plus one per registered preference objective, built the first
    time the group lists or looks up a command it does not have (importing the objectives imports torch)."""

    def _add_objective_commands(self) -> None:
        if getattr(self, "_objectives_added", False):
            return
        self._objectives_added = True
        commands = typer.Typer()
        _register_preference_commands(commands)
        built = typer.main.get_command(commands)
        for name, command in (built.commands.items() if hasattr(built, "commands") else [(built.name, built)]):
            self.add_command(command, name)

    def list_commands(self, ctx: Any) -> list[str]:
        self._add_objective_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is None:
            self._add_objective_commands()
            command = super().get_command(ctx, cmd_name)
        return command


app = typer.Typer(no_args_is_help=True, add_completion=False, help="Fuse heterogeneous LLMs into one pivot model.")
train_app = typer.Typer(cls=_TrainCommands, no_args_is_help=True,
                        help="Train the pivot: SFT, distillation or preference optimisation.")
toy_app = typer.Typer(no_args_is_help=True, help="The offline toy world: tiny specialist sources and a weak pivot.")


def _print_version(value: bool) -> None:
    if value:
        from polyfuse import __version__

        print(f"polyfuse {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    # Runs before any command (not for `--help`): polyfuse reports progress itself, so transformers'
    # chatter stays out. (A comment, not a docstring: typer would show a docstring as the app's help.)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


app.add_typer(train_app, name="train")
app.add_typer(toy_app, name="toyworld")
console = Console()

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML config of this stage.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config key: KEY=VALUE (repeatable).")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Train even when the memory estimate says it cannot fit.")]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Continue from the last complete checkpoint of this run (same config and data).")
]


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (see recipes/).")],
    work_dir: Annotated[Path | None, typer.Option(help="Work directory (default: the recipe's work_dir).")] = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Run a recipe's stages in order; finished stages are skipped, interrupted ones resume."""
    from polyfuse.pipeline.recipe import load_recipe
    from polyfuse.pipeline.runner import run_recipe

    ctx = run_recipe(load_recipe(recipe, set_), work_dir, quiet=quiet)
    console.print(f"[green]done[/]: {ctx.work_dir}")


@app.command()
def demo(
    work_dir: Annotated[Path, typer.Option(help="Work directory.")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option(help="Recipe seed (sampling, split, training).")] = 0,
    preset: Annotated[str, typer.Option(help="Toy world preset: default or tiny.")] = "default",
    quiet: QuietOpt = False,
) -> None:
    """Build the toy world, run FuseChat-3.0 on it, and print the accuracy table and report."""
    from polyfuse.pipeline.demo import run_demo

    run_demo(work_dir, seed=seed, preset=preset, quiet=quiet)


@app.command()
def sample(
    config: ConfigOpt,
    prompts: Annotated[Path, typer.Option(help="Prompts (JSONL / Parquet / datasets folder of PromptRow).")],
    out: OutOpt,
    set_: SetOpt = None,
    skip_invalid: Annotated[bool, typer.Option(help="Skip malformed prompt rows and report them.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Sample N responses per prompt from every model in the config (data parallel under accelerate)."""
    from polyfuse.config import load_config
    from polyfuse.data import PromptRow
    from polyfuse.pipeline.stages.sample import SampleConfig, run_sample

    cfg = load_config(SampleConfig, config, set_)
    console.print(f"wrote {run_sample(_read(prompts, PromptRow, skip_invalid), cfg, out, quiet=quiet)}")


@app.command()
def score(
    config: ConfigOpt,
    samples: Annotated[Path, typer.Option(help="Samples written by `polyfuse sample`.")],
    out: OutOpt,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Score samples with reward models and verifiers (math, code sandbox, toy world)."""
    from polyfuse.config import load_config
    from polyfuse.data import SampleRow
    from polyfuse.pipeline.stages.score import ScoreConfig, run_score

    cfg = load_config(ScoreConfig, config, set_)
    console.print(f"wrote {run_score(_read(samples, SampleRow), cfg, out, quiet=quiet)}")


@app.command()
def pairs(
    config: ConfigOpt,
    scored: Annotated[Path, typer.Option(help="Scored samples written by `polyfuse score`.")],
    out: OutOpt,
    set_: SetOpt = None,
) -> None:
    """Build SFT rows and preference pairs with the FuseChat-3.0 rules (or WRPO / cross-model layouts)."""
    import json

    from polyfuse.config import load_config
    from polyfuse.data import SampleRow
    from polyfuse.pipeline.stages.pairs import PairsConfig, run_pairs

    cfg = load_config(PairsConfig, config, set_)
    paths = run_pairs(_read(scored, SampleRow), cfg, out)
    console.print_json(json.dumps(json.loads(paths["report"].read_text())))


@train_app.command("sft")
def train_sft_cmd(
    config: ConfigOpt,
    data: Annotated[Path, typer.Option(help="SFT rows (TRL prompt/completion).")],
    model: Annotated[str, typer.Option(help="Pivot: hub id, folder or .gguf file.")],
    out: OutOpt,
    set_: SetOpt = None,
    resume: ResumeOpt = False,
    force: ForceOpt = False,
) -> None:
    """Supervised fine-tuning of the pivot on response tokens."""
    from polyfuse.config import load_config
    from polyfuse.data import SFTRow
    from polyfuse.models import ModelSpec
    from polyfuse.trainers import SFTTrainConfig, train_sft

    cfg = load_config(SFTTrainConfig, config, [*(set_ or []), *(["force=true"] if force else [])])
    console.print(f"saved {train_sft(ModelSpec(path=model), _read(data, SFTRow), cfg, out, resume=resume)}")


@train_app.command("distill")
def train_distill_cmd(
    data: Annotated[Path, typer.Option(help="SFT rows (TRL prompt/completion): the texts the teachers ran on.")],
    teachers: Annotated[Path, typer.Option(help="Teacher store written by `polyfuse teacher`.")],
    model: Annotated[str, typer.Option(help="Pivot (student): hub id, folder or .gguf file.")],
    out: OutOpt,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML training config.")] = None,
    set_: SetOpt = None,
    resume: ResumeOpt = False,
    force: ForceOpt = False,
) -> None:
    """Explicit fusion: CE on the gold response plus ULD (InfiFusion) or fused soft targets (FuseLLM) against
    the stored teacher outputs; no teacher model is loaded."""
    from polyfuse.config import load_config
    from polyfuse.data import SFTRow
    from polyfuse.models import ModelSpec
    from polyfuse.trainers import DistillTrainConfig, train_distill

    cfg = load_config(DistillTrainConfig, config, [*(set_ or []), *(["force=true"] if force else [])])
    console.print(f"saved {train_distill(ModelSpec(path=model), _read(data, SFTRow), teachers, cfg, out, resume=resume)}")


def _train_preference_command(objective: str, summary: str):
    def command(
        data: Annotated[Path, typer.Option(help="Preference rows (TRL prompt/chosen/rejected), e.g. from `polyfuse logprobs`.")],
        model: Annotated[str, typer.Option(help="Initial pivot M0 (the SFT checkpoint): hub id, folder or .gguf.")],
        out: OutOpt,
        config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML training config.")] = None,
        set_: SetOpt = None,
        resume: ResumeOpt = False,
        force: ForceOpt = False,
    ) -> None:
        from polyfuse.config import apply_overrides, read_yaml, validate
        from polyfuse.data import PreferenceRow
        from polyfuse.errors import ConfigError
        from polyfuse.logprobs import fusion_sources
        from polyfuse.models import ModelSpec
        from polyfuse.trainers import PreferenceTrainConfig, train_preference

        values = apply_overrides(read_yaml(config) if config else {}, [*(set_ or []), *(["force=true"] if force else [])])
        if values.setdefault("objective", objective) != objective:
            raise ConfigError(f"{config}: objective is {values['objective']!r} but the command is `train {objective}`")
        cfg = validate(PreferenceTrainConfig, values, source=str(config or "config"))
        rows = _read(data, PreferenceRow)
        saved = train_preference(
            ModelSpec(path=model), rows, cfg, out, source_names=fusion_sources(data, rows), resume=resume
        )
        console.print(f"saved {saved}")

    command.__doc__ = escape(summary)  # typer renders help as rich markup
    return command


def _register_preference_commands(target: typer.Typer) -> None:
    """One `polyfuse train <objective>` per registered objective (adding an objective file adds a command)."""
    from polyfuse.objectives import OBJECTIVES

    for name in OBJECTIVES.names():
        cls = OBJECTIVES.get(name)
        summary = (cls.__doc__ or name).strip().splitlines()[0]
        target.command(name.replace("_", "-"))(_train_preference_command(name, summary))


@app.command()
def logprobs(
    config: ConfigOpt,
    data: Annotated[Path, typer.Option(help="Preference rows (TRL prompt/chosen/rejected, and chosen_source for WRPO).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file (.jsonl / .parquet / folder).")],
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Sequence log-probs of every pair under the initial pivot (ref_*) and every source (fuse_*), each model
    through its own tokenizer and chat template; resumable, data parallel under accelerate."""
    from polyfuse.config import load_config
    from polyfuse.data import PreferenceRow
    from polyfuse.logprobs import LogprobsConfig, run_logprobs

    cfg = load_config(LogprobsConfig, config, set_)
    cfg.models()  # pivot and sources given: refused before the data is read
    console.print(f"wrote {run_logprobs(cfg, _read(data, PreferenceRow), out, quiet)}")


@app.command()
def teacher(
    config: ConfigOpt,
    data: Annotated[Path, typer.Option(help="SFT rows (TRL prompt/completion): the training texts.")],
    out: OutOpt,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Store every model's top-K next-token logits over the response tokens of the training texts, each model
    through its own tokenizer and chat template; resumable, data parallel under accelerate."""
    from polyfuse.config import load_config
    from polyfuse.data import SFTRow
    from polyfuse.teacher import TeacherConfig, run_teacher

    cfg = load_config(TeacherConfig, config, set_)
    console.print(f"wrote {run_teacher(_read(data, SFTRow), cfg, out, quiet)}")


@app.command()
def merge(
    config: Annotated[Path, typer.Argument(help="mergekit-style merge YAML (merge_method, base_model, models, ...).")],
    out: Annotated[Path, typer.Argument(help="Output model folder (an interrupted merge resumes here).")],
    set_: SetOpt = None,
    allow_pickle: Annotated[bool, typer.Option(help="Also read pickle (.bin) checkpoints; they can run code.")] = False,
    max_shard_size: Annotated[str, typer.Option(help="Output shard limit in bytes: 5GB, 500MB, 4GiB.")] = "5GB",
    smoke_check: Annotated[bool, typer.Option(help="Load the output, one forward pass, perplexity vs the base.")] = True,
    quiet: QuietOpt = False,
) -> None:
    """Merge same-architecture checkpoints tensor by tensor in bounded memory (linear, TIES, DARE, SCE, ...);
    the config is checked against every model's config and safetensors headers before any tensor is read."""
    from polyfuse.merge import MergeOptions, load_merge_config, run_merge

    cfg = load_merge_config(config, set_)
    options = MergeOptions(allow_pickle=allow_pickle, max_shard_size=max_shard_size, smoke_check=smoke_check,
                           quiet=quiet)
    result = run_merge(cfg, out, source=str(config), options=options, console=console)
    console.print(f"[green]merged[/]: {result.out} ({len(result.files)} shards)")



def named_models(models: list[str]) -> dict[str, str]:
    """Row name -> path for `--model` values, in the order given. `NAME=PATH` names a row; otherwise the
    folder's name, made unique by its parent folders when two share it (`sft/model`, `po/model`: every
    stage writes `model`)."""
    pairs = [item.partition("=") for item in models]
    pairs = [(name, path) if sep and name and "/" not in name else (None, name + sep + path) for name, sep, path in pairs]
    parts = {path: Path(path.rstrip("/")).parts for name, path in pairs if name is None}
    named: dict[str, str] = {}
    for name, path in pairs:
        if name is None:
            depth = 1
            while depth < len(parts[path]) and sum(p[-depth:] == parts[path][-depth:] for p in parts.values()) > 1:
                depth += 1
            name = "/".join(parts[path][-depth:]).removesuffix(".gguf")
        if name in named:
            raise UserError(f"--model: two models are named {name!r}; name them with NAME=PATH")
        named[name] = path
    return named


@app.command("eval")
def eval_cmd(
    model: Annotated[list[str], typer.Option(help="Model to evaluate: folder, hub id or .gguf, or NAME=PATH to name its row (repeatable).")],
    data: Annotated[str, typer.Option(help="'toyworld', 'humaneval', 'gsm8k:<file.jsonl>', or a PromptRow file.")],
    out: OutOpt,
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluate the first N prompts only.")] = None,
    per_domain: Annotated[int, typer.Option(min=1, help="Toy world: held-out prompts per domain.")] = 100,
    toy_preset: Annotated[str, typer.Option(help="Toy world preset for --data toyworld.")] = "default",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Generation budget per prompt.")] = 256,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per generate call.")] = 16,
    backend: Annotated[str, typer.Option(help="Inference backend with its default options: transformers or vllm.")] = "transformers",
    unsafe_local_code: Annotated[bool, typer.Option(
        help="Run generated code without the bubblewrap sandbox (it can then touch your files and processes)."
    )] = False,
    quiet: QuietOpt = False,
) -> None:
    """Greedy accuracy per domain on held-out prompts: a table, results.json, results.md and a PNG bar chart."""
    from polyfuse.config import validate
    from polyfuse.evaluation import (
        accuracy_table,
        default_verifiers,
        evaluate,
        load_eval_set,
        write_eval_report,
    )
    from polyfuse.sampling import EngineModel
    from polyfuse.toyworld import ToyWorldConfig, build_world

    if data == "toyworld":
        prompts = build_world(ToyWorldConfig.preset(toy_preset)).prompts("heldout", per_domain=per_domain)[:limit]
    else:
        prompts = load_eval_set(data, limit)
    scorers = default_verifiers(unsafe_local_code)
    results = {}
    for name, path in named_models(model).items():
        spec = validate(EngineModel, {"name": name, "path": path, "backend": backend}, source="--model/--backend")
        results[spec.label] = evaluate(spec, prompts, scorers, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                       quiet=quiet)
    write_eval_report(results, out)
    console.print(accuracy_table(results))
    console.print(f"report: {out}")


@toy_app.command("build")
def toy_build(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML ToyWorldConfig (overrides the preset).")] = None,
    preset: Annotated[str, typer.Option(help="default or tiny.")] = "default",
    cache_dir: Annotated[Path | None, typer.Option(help="Cache folder (default $POLYFUSE_CACHE, else $XDG_CACHE_HOME/polyfuse, else ~/.cache/polyfuse).")] = None,
    set_: SetOpt = None,
) -> None:
    """Build (or reuse from cache) the toy world: sources, pivot, reward model, tokenizers."""
    from polyfuse.toyworld import build_world

    world = build_world(_toy_config(config, preset, set_), cache_dir=cache_dir)
    console.print(f"toy world ready: {world.root}")


@toy_app.command("info")
def toy_info(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML ToyWorldConfig.")] = None,
    preset: Annotated[str, typer.Option(help="default or tiny.")] = "default",
    cache_dir: Annotated[Path | None, typer.Option(help="Cache folder.")] = None,
    set_: SetOpt = None,
) -> None:
    """Held-out accuracy of every toy model on every domain."""
    from polyfuse.evaluation import accuracy_table
    from polyfuse.toyworld import build_world, world_info

    world = build_world(_toy_config(config, preset, set_), cache_dir=cache_dir)
    console.print(f"toy world: {world.root}")
    console.print(accuracy_table(world_info(world)))


def _toy_config(path: Path | None, preset: str, overrides: list[str] | None):
    from polyfuse.config import apply_overrides, read_yaml, validate
    from polyfuse.toyworld import ToyWorldConfig

    base = ToyWorldConfig.preset(preset).model_dump()
    base.update(read_yaml(path) if path else {})
    return validate(ToyWorldConfig, apply_overrides(base, overrides), source=str(path or f"preset {preset}"))


def _read(path: Path, schema, skip_invalid: bool = False):
    from polyfuse.data.io import ReadReport, read_rows

    report = ReadReport()
    rows = read_rows(path, schema, skip_invalid=skip_invalid, report=report)
    if report.skipped:
        console.print(f"[yellow]{path}: {report.summary()}[/]")
        for number, problem in report.skipped[:20]:
            console.print(f"  line {number}: {problem}")
    return rows


def main() -> None:
    """Entry point: user errors become one red line and exit code 2, never a traceback."""
    import os

    # polyfuse shows one rich progress display per stage; the libraries' own tqdm bars (the GGUF
    # de-quantiser's, `datasets`' split bars) would only interleave with it. Read when tqdm is imported.
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        app()  # bad flags: typer's own usage message and exit code 2
    except UserError as err:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {err}", highlight=False)
        sys.exit(EXIT_USER_ERROR)
    except Exception as err:  # a full disk, a read-only folder, a file where a folder must go
        if (user_error := storage_error(err)) is None:
            raise
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {user_error}", highlight=False)
        sys.exit(EXIT_USER_ERROR)
