"""What every stage of a recipe sees: the `Context` of a run and the `Stage` protocol.

A stage is one file in `polyfuse.pipeline.stages` that subclasses `Stage` and registers itself in
`STAGES`; the recipe schema, the default stage list, the checks across stages and the runner all read
the registry, so adding a stage touches nothing else. This module imports no stage and no recipe: the
stages, the recipe and the runner are built on it, never the other way round.

One config class per stage. A stage's `section` is the single pydantic class that holds everything the
stage runs with: its engine's settings plus the keys only a recipe uses. The same class is the recipe's
section and the `--config` of the stage's own command (`polyfuse pairs -c`, `polyfuse teacher -c`,
`polyfuse train sft -c`, ...), and the engine function takes it as it is: nothing is copied from one
class into another by field name. The pattern, for a stage and its engine:

- Keys only a recipe reads (the teacher's `include_pivot`, distillation's `strategy`) live on the class
  too and are listed in its `recipe_only`; a command's `--config` refuses them (`polyfuse.config.load_config`).
- Values a section takes from the rest of the recipe (the recipe's `seed`, its sources as the models)
  are filled in one place, the stage's `fill` hook: it runs on the raw section when the recipe loads,
  before validation, and never overrides what the section itself says; `recipe_fills` names those keys.
  A command's `--config` gives them itself, so the class keeps them required where the engine needs them.
- What exists only once the run reaches the stage (the current pivot, the files of earlier stages) is
  not config: the stage reads it from the `Context` in `inputs` and `run` and hands it to the engine as
  an argument, as the trainers take the pivot.

So `teacher`'s `models` default to the recipe's sources (`fill`), `include_pivot` is recipe-only and puts
the current pivot first when the stage runs. In the same way `sample`'s models are the sources (plus the
recipe's pivot with `include_pivot`) and its seed the recipe's, both filled by `fill`; `logprobs` hands
the current pivot to its engine when it runs, and `fill` can turn a recipe's `sources: true` into the
list of the recipe's sources (`model_specs`), so recipes keep their key.

One way into a stage. A stage's engine lives in its component package (`polyfuse.sampling.run_sample`,
`polyfuse.pairs.run_pairs`, `polyfuse.trainers.train_sft`, ...); the stage is the adapter that hands it the
section and the files of earlier stages (`execute`). Its command (`polyfuse sample`, `polyfuse train sft`,
... built by `polyfuse.cli` from `command` and `command_inputs`) calls the same `execute` with the config file
and the files named on the command line, so a command and a recipe's stage run the same code with the same
defaults, and the engine validates once, for both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field

from polyfuse.config import fingerprinted, walk_config
from polyfuse.data.io import read_rows
from polyfuse.errors import ConfigError
from polyfuse.models import ModelSpec
from polyfuse.registry import Registry


@dataclass
class Context:
    """What stages know: the recipe (a `polyfuse.pipeline.recipe.Recipe`), where the work goes, and the
    outputs of the stages before."""

    recipe: Any
    work_dir: Path
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)
    quiet: bool = False
    stage_cache: Path | None = None  # where runs share finished work by content (`run_recipe`)

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


MODEL = "model"  # the input of a training stage that is the model it trains (`--model`)


@dataclass(frozen=True)
class CommandInput:
    """What a stage's command reads, `--<option>`: a data file of rows of `schema` (`rows`), a path handed on as
    it is (`path`: a folder such as the teacher store), or the model to train (`model`: hub id, folder, .gguf)."""

    option: str
    help: str
    kind: Literal["rows", "path", "model"] = "rows"
    schema: Any = None


@dataclass(frozen=True)
class DataFile:
    """An input file and its rows, as `Stage.execute` receives a `rows` input."""

    path: str
    rows: list[Any]


@dataclass(frozen=True)
class Command:
    """A command that runs a stage: its name (`sample`, `train dpo`), the config values it fixes (the objective
    of `train dpo`), its help, what its `--config` holds and the name `polyfuse config show` documents it by."""

    name: str
    fixed: dict[str, Any]
    help: str
    config_help: str
    config_name: str


class Stage(ABC):
    """One step of a recipe. A subclass sets the class attributes and implements `run` (and `inputs` when
    it reads files or models), then registers itself: `@STAGES.register("name")`.

    - `position`: where the stage sits in the fixed order of a recipe's stages (lower runs first);
    - `section`: the stage's one config class (a pydantic model; see the module docstring), the schema of
      its recipe section; `None` for none. `required`: the recipe must have the section;
      `section_default`: a listed stage without a section runs with the section's defaults;
    - `default`: the stage is in the stage list of a recipe that gives none (the FuseChat-3.0 pipeline);
    - `makes_model`: its output `model` is the pivot of the stages after it;
    - `seeded`: the recipe's `seed` is the default `seed` of its section (filled by `fill`);
    - `every_process`: under `accelerate launch` the stage runs on every process, which share its work
      (sharded inference, data-parallel training); any other stage runs on the main process alone;
    - `needs`: the stages that must run before it (`requires` when that depends on the recipe);
    - `command`: the name of its command (`train sft`; None: none is generated), `config_help` what its
      `--config` holds, `command_inputs` the files it reads, and `output` where its engine writes inside the
      stage folder ("": the folder itself), which the command's `-o` names (`output_help`).

    The class docstring is the command's help.
    """

    name: ClassVar[str]
    position: ClassVar[int]
    section: ClassVar[Any] = None
    required: ClassVar[bool] = False
    section_default: ClassVar[bool] = False
    default: ClassVar[bool] = True
    makes_model: ClassVar[bool] = False
    seeded: ClassVar[bool] = False
    every_process: ClassVar[bool] = False
    needs: ClassVar[tuple[str, ...]] = ()
    command: ClassVar[str | None] = None
    config_help: ClassVar[str] = ""
    command_inputs: ClassVar[tuple[CommandInput, ...]] = ()
    output: ClassVar[str] = ""
    output_help: ClassVar[str] = "Output folder."

    def field(self) -> tuple[Any, Any]:
        """(annotation, default) of the stage's field in the recipe schema."""
        if self.required:
            return self.section, ...
        if self.section_default:
            return self.section, Field(default_factory=self.section)
        return self.section | None, None

    def requires(self, recipe: Any) -> tuple[str, ...]:
        return self.needs

    def check(self, recipe: Any) -> None:  # noqa: B027 (a hook: most stages need no check)
        """Cross-stage needs beyond `requires`, checked when the recipe loads; raise ValueError."""

    def fill(self, section: dict[str, Any], recipe: dict[str, Any]) -> dict[str, Any]:
        """The section as the recipe file gives it, with the values that come from the rest of the recipe
        (`recipe`, also raw) filled in where the section does not give them; called once, when the recipe
        loads, before validation. A seeded stage takes the recipe's seed; stages override this to fill more
        (calling `super().fill` keeps the seed)."""
        if self.seeded:
            return {"seed": recipe.get("seed", 0), **section}
        return section

    def recipe_fills(self) -> dict[str, str | None]:
        """The section's keys whose value `fill` takes from the rest of the recipe when the section does not
        give them, key -> that value in words (what `config show STAGE --recipe` says of them); None: a key
        that is not the recipe's to give, set by the stage when it runs (left out of the resolved recipe)."""
        return {"seed": "the recipe's seed"} if self.seeded else {}

    def config(self, recipe: Any) -> dict[str, Any]:
        """What the stage's fingerprint hashes besides its inputs: its resolved section (without the settings
        that do not change results, `NOT_FINGERPRINTED`) and the seed."""
        section = getattr(recipe, self.name, None)
        resolved = fingerprinted(section) if isinstance(section, BaseModel) else section
        return {"section": resolved, "seed": recipe.seed}

    def inputs(self, ctx: Context) -> dict[str, str]:
        """The files and models the stage reads, name -> path (hashed into its fingerprint)."""
        return {}

    def commands(self) -> list[Command]:
        """The commands that run this stage (one, `command`, unless a stage has several: `train <objective>`)."""
        if self.command is None:
            return []
        return [Command(self.command, {}, " ".join((type(self).__doc__ or "").split()), self.config_help, self.name)]

    def label(self, recipe: Any) -> str:
        """How the model this stage makes shows in an evaluation row (`pivot+SFT+DPO`)."""
        return self.name.upper()

    def engine_config(self, ctx: Context) -> Any:
        """The section as the engine runs it: the recipe's, with what the run knows by now (the current pivot)."""
        return getattr(ctx.recipe, self.name)

    def input_paths(self, ctx: Context) -> dict[str, str]:
        """The files of `command_inputs` (option -> path) as the stages before this one wrote them."""
        return {}

    def read_inputs(self, ctx: Context) -> dict[str, Any]:
        """`input_paths`, a `DataFile` for each `rows` input: what `execute` takes."""
        kinds = {i.option: i for i in self.command_inputs}
        return {option: DataFile(path, read_rows(path, kinds[option].schema)) if kinds[option].kind == "rows" else path
                for option, path in self.input_paths(ctx).items()}

    @abstractmethod
    def execute(self, config: Any, inputs: dict[str, Any], out: Path, quiet: bool = False,
                resume: bool | None = None) -> dict[str, str]:
        """Run the engine with `config` (the section) on `inputs` (option of `command_inputs` -> `DataFile`, path
        or `ModelSpec`), writing to `out`; returns the outputs, name -> path. What the stage and its command
        both run. `resume`: training stages only (None: resume this run's checkpoints, as recipes do)."""

    def run(self, ctx: Context, folder: Path) -> dict[str, str]:
        """Do the work in `folder`; return the outputs, name -> path."""
        out = folder / self.output if self.output else folder
        return self.execute(self.engine_config(ctx), self.read_inputs(ctx), out, quiet=ctx.quiet)


class TrainingStage(Stage):
    """A stage that trains the current pivot into the pivot of the stages after it (sft, distill, po): it
    runs on every process (data-parallel training), takes the recipe's seed, and reads the files it trains
    on (`input_paths`) and the pivot (its `model` input; a command's `--model`)."""

    every_process = True
    makes_model = True
    seeded = True
    output = "model"
    output_help = "Output model folder."

    def pivot(self, ctx: Context) -> ModelSpec:
        return ctx.current_pivot(self.name)

    def inputs(self, ctx: Context) -> dict[str, str]:
        return {**self.input_paths(ctx), "pivot": self.pivot(ctx).path}

    def read_inputs(self, ctx: Context) -> dict[str, Any]:
        return {**super().read_inputs(ctx), MODEL: self.pivot(ctx)}


STAGES: Registry[type[Stage]] = Registry("stage", package="polyfuse.pipeline.stages")


def objective_commands(objectives: Registry[Any]) -> list[Command]:
    """One `train <objective>` per objective of a registry (adding an objective file adds a command), which fixes
    the objective; its help is the first paragraph of the objective's docstring."""
    import inspect

    commands = []
    for name in objectives.names():
        summary = (inspect.getdoc(objectives.get(name)) or name).split("\n\n")[0]
        cli = name.replace("_", "-")
        commands.append(Command(f"train {cli}", {"objective": name}, " ".join(summary.split()),
                                f"the {name} settings and the training settings", cli))
    return commands


def stage(name: str) -> Stage:
    return STAGES.get(name)()


def stage_order() -> list[str]:
    """Every registered stage, in the order a recipe runs them."""
    return sorted(STAGES.names(), key=lambda name: STAGES.get(name).position)


def model_stages() -> list[str]:
    """The stages whose output `model` is the pivot of the stages after them."""
    return [name for name in stage_order() if STAGES.get(name).makes_model]


def stage_reference(name: str) -> tuple[str, str] | None:
    """(stage, output key) when a model `name` names a stage (`sft`, `sft:model`), else None."""
    stage_name, _, key = name.partition(":")
    return (stage_name, key or "model") if stage_name in STAGES else None


def model_specs(models: list[Any], schema: type[ModelSpec] = ModelSpec) -> list[Any]:
    """Recipe models (raw, as `fill` sees them, or validated) with the keys of `schema` alone: plain model specs
    (`ModelSpec`, without a source's backend and sampling settings), or the models an engine runs
    (`EngineModel`: with the backend). An entry that is not a mapping is left as it is, for validation to
    report."""
    plain = [m.model_dump(exclude_unset=True) if hasattr(m, "model_dump") else m for m in models]
    return [{k: v for k, v in m.items() if k in schema.model_fields} if isinstance(m, dict) else m for m in plain]


def paths_in(node: Any) -> dict[str, str]:
    """Every `path` value in a config section (models, reward models), keyed by where its owner sits."""
    return {(where.removesuffix("path").removesuffix(".") or "path"): value for where, value in walk_config(node)
            if isinstance(value, str) and (where == "path" or where.endswith(".path"))}
