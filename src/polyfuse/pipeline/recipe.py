"""Recipe files: one YAML that names the models, the prompts and the settings of every stage.

Paths of the form `toyworld://pivot` or `toyworld://sources/<name>` point into the recipe's toy world;
they are resolved from the world's config hash alone, so validation needs no model and no build.
Relative paths are relative to the current directory.

In the `merge` section, a model may also be named instead of given as a path: `pivot` (the recipe's pivot),
a source name, or a stage that ran before `merge` (`sft`: its output model; `stage:key`: its output `key`).
Stage names are reserved: write `./sft` for a folder of that name. `base_model` defaults to the current
pivot (the latest model a stage produced), and the merged model becomes the pivot of the stages after it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from polyfuse.config import StrictModel, apply_overrides, read_yaml, validate
from polyfuse.data.io import ReadReport, read_rows
from polyfuse.data.schemas import PromptRow
from polyfuse.errors import ConfigError
from polyfuse.logprobs import LogprobsSettings
from polyfuse.merge.config import MergeConfig, check_method, parse_merge_config
from polyfuse.pipeline.pairs import PairsConfig
from polyfuse.pipeline.sample import SampleConfig, SampledModel
from polyfuse.pipeline.score import ScoreConfig
from polyfuse.scorers import ScorerConfig
from polyfuse.teacher import TeacherSettings
from polyfuse.trainers import DistillTrainConfig, PreferenceTrainConfig, SFTTrainConfig

STAGE_ORDER = (
    "prompts", "sample", "score", "pairs", "sft", "teacher", "distill", "merge", "logprobs", "po", "eval"
)
# FuseChat-3.0; explicit fusion (teacher, distill) and merging are opted into by listing them
DEFAULT_STAGES = tuple(s for s in STAGE_ORDER if s not in ("teacher", "distill", "merge"))
MODEL_STAGES = ("sft", "distill", "merge", "po")  # stages whose output `model` is the pivot of the stages after them
TOY_SCHEME = "toyworld://"
CURRENT_PIVOT = "<current pivot>"  # the merge base before the stages run; resolved by the merge stage


def stage_reference(name: str) -> tuple[str, str] | None:
    """(stage, output key) when a merge model `name` names a stage (`sft`, `sft:model`), else None."""
    stage, _, key = name.partition(":")
    return (stage, key or "model") if stage in STAGE_ORDER else None


class ToyWorldRef(StrictModel):
    preset: Literal["default", "tiny"] = "default"
    seed: int = 0
    cache_dir: str | None = None


class ToyPrompts(StrictModel):
    split: Literal["train", "heldout"] = "train"
    per_domain: int = Field(default=100, ge=1)
    domains: list[str] | None = None


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


class SampleStage(StrictModel):
    backend: str = "transformers"
    batch_size: int = Field(default=32, ge=1)
    chunk_size: int = Field(default=256, ge=1)
    include_pivot: bool = False


class LogprobsStage(LogprobsSettings):
    """Sequence log-probs of the pairs under the current pivot (`ref_*`) and, with `sources: true`, under
    every source of the recipe (`fuse_*`, for InfiFPO)."""

    sources: bool = True


class TeacherStage(TeacherSettings):
    """Top-K outputs of every source on the SFT rows; `include_pivot` adds the current pivot's own
    (FuseLLM / FuseChat candidates)."""

    include_pivot: bool = False
    data: str | None = Field(default=None, description="SFT rows (TRL prompt/completion); default: the pairs stage's.")


class DistillStage(DistillTrainConfig):
    """Distillation on the SFT rows against the `teacher` stage's outputs: one `unified` run with every
    teacher, or one `pairwise` run per source (then merge them in a `merge` stage)."""

    strategy: Literal["unified", "pairwise"] = "unified"

    def train_config(self) -> DistillTrainConfig:
        return DistillTrainConfig.model_validate(self.model_dump(exclude={"strategy"}))


class EvalStage(StrictModel):
    prompts: PromptSource
    models: list[str] = Field(
        default_factory=lambda: ["sources", "pivot", "sft", "po"],
        description="'sources', 'pivot', a source name, or a model stage name (sft, merge, po: its output model).",
    )
    scorers: list[ScorerConfig] | None = Field(default=None, description="Default: the score stage's verifiers.")
    batch_size: int = Field(default=64, ge=1)
    max_new_tokens: int = Field(default=32, ge=1)


class Recipe(StrictModel):
    name: str
    work_dir: str | None = None
    seed: int = 0
    toyworld: ToyWorldRef | None = None
    sources: list[SampledModel] = Field(min_length=1)
    pivot: SampledModel
    stages: list[Literal[STAGE_ORDER]] = Field(default_factory=lambda: list(DEFAULT_STAGES))  # type: ignore[valid-type]
    prompts: PromptSource
    sample: SampleStage = Field(default_factory=SampleStage)
    score: ScoreConfig | None = None
    pairs: PairsConfig | None = None
    sft: SFTTrainConfig | None = None
    teacher: TeacherStage | None = None
    distill: DistillStage | None = None
    merge: MergeConfig | None = Field(default=None, description="A mergekit-style config; see the module doc.")
    logprobs: LogprobsStage | None = None
    po: PreferenceTrainConfig | None = None
    eval: EvalStage | None = None

    @model_validator(mode="before")
    @classmethod
    def _seed_sections(cls, data: Any) -> Any:
        """The recipe's `seed` is the default seed of the split and of training, so one number changes the
        whole run; a section's own `seed` wins."""
        if isinstance(data, dict):
            for section in ("pairs", "sft", "distill", "po"):
                if isinstance(data.get(section), dict):
                    data[section] = {"seed": data.get("seed", 0), **data[section]}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        for stage in self.stages:
            if stage not in ("prompts", "sample") and getattr(self, stage) is None:  # those two have defaults
                raise ValueError(f"stage {stage!r} is listed in 'stages' but has no '{stage}' section")
        if sorted(self.stages, key=STAGE_ORDER.index) != list(self.stages):
            raise ValueError(f"stages must keep the order {list(STAGE_ORDER)}")
        labels = [s.label for s in self.sources] + [self.pivot.label]
        if len(set(labels)) != len(labels):
            raise ValueError(f"model names must be unique, got {labels}")
        if "merge" in self.stages:
            self._check_merge()
        return self

    @field_validator("merge", mode="before")
    @classmethod
    def _parse_merge(cls, value: Any) -> Any:
        """mergekit's refusals and the method name first, with the merge engine's own messages."""
        return value if value is None or isinstance(value, MergeConfig) else parse_merge_config(value, "merge", check=False)

    def _check_merge(self) -> None:
        """Named stages must run before `merge`; the method's needs are checked with the base defaulted."""
        earlier = self.stages[: self.stages.index("merge")]
        names = [self.merge.base_model, self.merge.tokenizer_source, *(e.model for e in self.merge.models)]
        for name in filter(None, names):
            reference = stage_reference(name)
            if reference and reference[0] not in earlier:
                raise ValueError(f"merge: {name!r} names the stage {reference[0]!r}, which does not run before merge")
            if reference and reference[1] == "model" and reference[0] not in MODEL_STAGES:
                raise ValueError(f"merge: {name!r}: the stage {reference[0]!r} makes no model "
                                 f"(model stages: {', '.join(MODEL_STAGES)}; or name an output, stage:key)")
        check_method(self.merge.model_copy(update={"base_model": self.merge.base_model or CURRENT_PIVOT}), "merge")

    @property
    def resolved_work_dir(self) -> Path:
        return Path(self.work_dir or f"runs/{self.name}")

    def sample_config(self) -> SampleConfig:
        models = self.sources + ([self.pivot] if self.sample.include_pivot else [])
        return SampleConfig(models=models, backend=self.sample.backend, batch_size=self.sample.batch_size,
                            chunk_size=self.sample.chunk_size, seed=self.seed)

    def world(self, quiet: bool = False):
        """The recipe's toy world, built on first use (cached by config hash)."""
        from polyfuse.toyworld import ToyWorldConfig, build_world

        if self.toyworld is None:
            raise ConfigError("prompts.toyworld needs a 'toyworld' section in the recipe")
        config = ToyWorldConfig.preset(self.toyworld.preset).model_copy(update={"seed": self.toyworld.seed})
        return build_world(config, cache_dir=self.toyworld.cache_dir, progress=not quiet)

    def load_prompts(self, source: PromptSource) -> list[PromptRow]:
        if source.toyworld is not None:
            spec = source.toyworld
            rows = self.world().prompts(spec.split, per_domain=spec.per_domain, domains=spec.domains, seed=self.seed)
        else:
            report = ReadReport()
            rows = read_rows(source.path, PromptRow, skip_invalid=source.skip_invalid, report=report)
            if report.skipped:
                from rich.console import Console

                Console(stderr=True).print(f"[yellow]{source.path}: {report.summary()}[/]")
        return rows[: source.limit] if source.limit else rows

    def save_resolved(self, path: Path) -> None:
        from polyfuse.data.io import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))


def _resolve_toy_paths(node: Any, root: Path) -> Any:
    if isinstance(node, dict):
        return {k: _resolve_toy_paths(v, root) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_toy_paths(v, root) for v in node]
    if isinstance(node, str) and node.startswith(TOY_SCHEME):
        return str(root / node.removeprefix(TOY_SCHEME))
    return node


def _uses_toy_paths(node: Any) -> bool:
    if isinstance(node, dict):
        return any(_uses_toy_paths(v) for v in node.values())
    if isinstance(node, list):
        return any(_uses_toy_paths(v) for v in node)
    return isinstance(node, str) and node.startswith(TOY_SCHEME)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override, resolve `toyworld://` paths and validate a recipe; no model is loaded."""
    data = apply_overrides(read_yaml(path), overrides)
    if _uses_toy_paths(data):
        from polyfuse.toyworld import ToyWorldConfig, world_dir

        toy = validate(ToyWorldRef, data.get("toyworld") or {}, source=f"{path}: toyworld")
        config = ToyWorldConfig.preset(toy.preset).model_copy(update={"seed": toy.seed})
        data = _resolve_toy_paths(data, world_dir(config, toy.cache_dir))
    return validate(Recipe, data, source=str(path))
