"""The training config (`polyfuse config show sft`), and the `TrainingArguments` Trainer is built with.

Why not TRL's habit of making the config a `TrainingArguments` subclass: building a `TrainingArguments`
sets up the device and, under a launcher, the process group (its `__post_init__` reads `self.device`),
and a recipe validates every stage's section when it loads (`run --check`, before any stage): a
dataclass built there would start distributed state in the parent process. Its ~130 keys would also
bury polyfuse's in `config show`, and its errors do not name the key. So the config stays a pydantic
model with polyfuse's keys, and `trainer_args` passes any other `TrainingArguments` option through by
its own name (checked against the dataclass's fields when the config validates): every transformers
option works without a mapping. The keys that are transformers' under another name are in `RENAMED`.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from polyfuse.config import StrictModel
from polyfuse.objectives.base import OBJECTIVES
from polyfuse.objectives.distill import DISTILL_OBJECTIVES
from polyfuse.objectives.unpaired import KL_COMPLETION, UNPAIRED_OBJECTIVES
from polyfuse.registry import Registry
from polyfuse.sampling.base import BackendConfig, EngineModel, SamplingSettings
from polyfuse.teacher.online import WEIGHTED, Mix
from polyfuse.trainers.distributed import check_lora_supported, fsdp_from_launcher

if TYPE_CHECKING:
    from transformers import TrainingArguments

# polyfuse's key -> the TrainingArguments field it is. transformers 5 takes a warm-up *ratio* as a float
# `warmup_steps` in [0, 1) (`warmup_ratio` was removed), which is what polyfuse's `warmup_ratio` (< 1) is.
RENAMED = {"batch_size": "per_device_train_batch_size", "grad_accum": "gradient_accumulation_steps",
           "epochs": "num_train_epochs", "lr_scheduler": "lr_scheduler_type", "warmup_ratio": "warmup_steps"}  # fmt: skip
# What polyfuse's design fixes, so `trainer_args` may not change it (with the reason).
FIXED = {
    "output_dir": "the scratch folder beside the output (`.<out>.work`)",
    "remove_unused_columns": "the collators read the precomputed columns",
    "save_strategy": "set by save_steps (0: none)",
    "save_total_limit": "polyfuse's save_total_limit counts complete checkpoints only",
    "eval_strategy": "training stages do not evaluate; the eval stage does",
    "train_sampling_strategy": "set by shuffle",
    "gradient_checkpointing": "set by gradient_checkpointing",
    "activation_checkpointing": "set by gradient_checkpointing",
    "report_to": "set by report_to",
    "fsdp": "set by the launcher's accelerate config (examples/accelerate/)",
    "fsdp_config": "set by the launcher's accelerate config (examples/accelerate/)",
}


def trainer_fields() -> set[str]:
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments) if f.init}


def checkpointing_key() -> str:
    """transformers renamed `gradient_checkpointing` to `activation_checkpointing` (5.20); vLLM 0.32 pins < 5.20."""
    from transformers import TrainingArguments

    return ("activation_checkpointing" if "activation_checkpointing" in inspect.signature(TrainingArguments).parameters
            else "gradient_checkpointing")


class LoraSettings(StrictModel):
    """A LoRA adapter (peft); the saved model has the adapter merged into plain weights."""

    r: int = Field(default=16, ge=1, description="Rank of the adapter matrices.")
    alpha: float = Field(default=32.0, gt=0, description="Scaling: the update is alpha / r times A @ B.")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout on the adapter's input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default="all-linear", description="Module names to adapt (e.g. [q_proj, v_proj]), or every linear layer but the head."
    )


class TrainConfig(StrictModel):
    learning_rate: float = Field(default=1e-5, gt=0, description="Peak learning rate.")
    epochs: float = Field(default=1.0, gt=0, description="Passes over the data (fractions allowed).")
    batch_size: int = Field(default=8, ge=1, description="Micro-batch size per process.")
    grad_accum: int = Field(default=1, ge=1, description="Micro-batches per optimiser step.")
    max_length: int = Field(default=2048, ge=2, description="Longer rows are dropped, never truncated.")
    lr_scheduler: str = Field(default="cosine", description="A transformers schedule: linear, cosine, constant, constant_with_warmup, ...")
    warmup_ratio: float = Field(default=0.1, ge=0.0, lt=1.0, description="Share of the steps spent warming up.")
    weight_decay: float = Field(default=0.0, ge=0.0, description="Decoupled weight decay (AdamW).")
    max_grad_norm: float = Field(default=1.0, ge=0.0, description="0 disables clipping.")
    optim: str = Field(default="adamw_torch", description="A transformers optimizer: adamw_torch, adafactor, sgd, ...")
    seed: int = Field(default=42, description="Seed of initialisation (LoRA), data order and dropout.")
    shuffle: bool = Field(default=True, description="Shuffle the rows every epoch (false: file order).")
    bf16: bool = Field(default=False, description="Mixed precision in bfloat16 (weights stay float32).")
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations in the backward pass: less memory, about 30% slower.")
    logging_steps: int = Field(default=1, ge=1, description="Log loss and metrics every this many steps.")
    save_steps: int = Field(
        default=500, ge=0,
        description="Write a resumable checkpoint (weights, optimizer, scheduler, RNG, data position) every "
        "this many optimiser steps; 0: none. A killed run resumes from the last complete one.",
    )
    save_total_limit: int | None = Field(
        default=2, ge=1, description="Complete checkpoints kept (the oldest go first); None: all."
    )
    report_to: list[str] = Field(
        default_factory=list,
        description="Experiment trackers, as Trainer names them: tensorboard, wandb, mlflow, trackio, ...; "
        "empty: none.",
    )
    run_name: str | None = Field(default=None, description="The run's name in the trackers.")
    logging_dir: str | None = Field(
        default=None, description="TensorBoard event folder; None: <output's parent>/logs/<output's name>."
    )
    lora: LoraSettings | None = None
    force: bool = Field(
        default=False, description="Train even when the memory estimate exceeds the memory of the devices."
    )
    disable_dropout: bool = Field(
        default=False,
        description="Set every dropout of the policy to 0 while training (nn.Dropout modules and config-level "
        "rates such as Llama's attention_dropout); the saved config keeps the model's own rates. Preference "
        "objectives default to true, as TRL's DPOTrainer; SFT and distillation keep the model's dropout.",
    )
    padding_free: bool = Field(
        default=True,
        description="Compute no padding: SFT and distillation pack a micro-batch's sequences into one row, "
        "position ids restarting at each (TRL's padding_free); preference objectives hold each pair's "
        "prompt once, its responses behind a block mask (prefix sharing). Exact: the loss equals the "
        "padded layout's. A model that cannot take the layout (checked on the first rows) trains padded, "
        "with a warning saying why.",
    )
    trainer_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other transformers TrainingArguments option by its own name (adam_beta2, "
        "lr_scheduler_kwargs, torch_compile, neftune_noise_alpha, dataloader_num_workers, ...), passed "
        "through as given.",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, value: Any) -> Any:
        """Trainer's spellings: a name, a list, "none" or "all"."""
        if isinstance(value, str):
            value = [value]
        return [] if value in (None, ["none"]) else value

    @field_validator("report_to")
    @classmethod
    def _installed_trackers(cls, value: list[str]) -> list[str]:
        from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

        for name in value:
            if name != "all" and name not in INTEGRATION_TO_CALLBACK:
                raise ValueError(f"{name!r} is not a tracker of transformers; one of all, none, "
                                 f"{', '.join(INTEGRATION_TO_CALLBACK)}")
            if name != "all" and name not in get_available_reporting_integrations():
                raise ValueError(f"{name!r}: its package is not installed (pip install {name})")
        return value

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        from transformers import SchedulerType

        names = [s.value for s in SchedulerType]
        if value not in names:
            raise ValueError(f"{value!r} is not a learning-rate schedule of transformers; one of {', '.join(names)}")
        return value

    @field_validator("optim")
    @classmethod
    def _usable_optimizer(cls, value: str) -> str:
        """A name transformers knows, whose package is installed: asked of Trainer's own (static) lookup,
        with the default arguments (no model, no device is needed for that)."""
        from transformers import Trainer, TrainingArguments
        from transformers.training_args import OptimizerNames

        names = [o.value for o in OptimizerNames]
        if value not in names:
            raise ValueError(f"{value!r} is not an optimizer of transformers; one of {', '.join(names)}")
        defaults = {f.name: f.default for f in dataclasses.fields(TrainingArguments) if f.default is not dataclasses.MISSING}
        try:
            Trainer.get_optimizer_cls_and_kwargs(SimpleNamespace(**{**defaults, "optim": value}))
        except (ImportError, ValueError) as err:
            raise ValueError(f"{value!r} cannot be used here: {err}") from None
        return value

    @field_validator("trainer_args")
    @classmethod
    def _trainer_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        """Names of TrainingArguments' fields, none that a polyfuse key already sets or polyfuse fixes."""
        import difflib

        known = trainer_fields()
        own = {trainer: key for key, trainer in RENAMED.items()} | {k: k for k in cls.model_fields if k in known}
        for name in value:
            if name in FIXED:
                raise ValueError(f"{name!r} cannot be set here: {FIXED[name]}")
            if name in own:
                raise ValueError(f"{name!r} is polyfuse's key {own[name]!r}: set that instead")
            if name not in known:
                close = difflib.get_close_matches(name, known, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ValueError(f"{name!r} is not an option of transformers' TrainingArguments{hint}")
        return value

    def training_arguments(self, out_dir: str | Path) -> TrainingArguments:
        """Trainer's arguments: polyfuse's keys under transformers' names (same-named ones as they are,
        `RENAMED` ones renamed), then `trainer_args`. Building them also sets up the (distributed) device;
        Trainer's scratch folder is a hidden sibling of `out_dir`, removed after saving."""
        import torch
        from transformers import TrainingArguments

        out_dir = Path(out_dir)
        check_lora_supported(self.lora)
        known = trainer_fields()
        values = self.model_dump(exclude={"lora", "trainer_args", "report_to", "save_total_limit"})
        passed = {RENAMED.get(key, key): value for key, value in values.items() if RENAMED.get(key, key) in known}
        del passed["gradient_checkpointing"]  # transformers' name depends on its version: `checkpointing_key`
        checkpointing = checkpointing_key()
        arguments = {
            **passed,
            "output_dir": str(out_dir.with_name(f".{out_dir.name}.work")),
            "train_sampling_strategy": "random" if self.shuffle else "sequential",
            checkpointing: self.gradient_checkpointing,
            f"{checkpointing}_kwargs": {"use_reentrant": False} if self.gradient_checkpointing else None,
            "save_strategy": "steps" if self.save_steps else "no",
            "save_steps": self.save_steps or 500,
            "save_total_limit": None,  # applied to complete checkpoints only (`CompleteCheckpoints`)
            "eval_strategy": "no",
            "report_to": [name for name in self.report_to if name != "tensorboard"] or "none",  # see `tracking_callbacks`
            "remove_unused_columns": False,
            # defaults of polyfuse's own, which trainer_args may change
            "dataloader_num_workers": 0,
            "ddp_find_unused_parameters": False,
            "dataloader_pin_memory": torch.cuda.is_available(),
            **self.trainer_args,
            **fsdp_from_launcher(),
        }
        try:
            return TrainingArguments(**arguments)
        except (TypeError, ValueError) as err:
            from polyfuse.errors import ConfigError

            raise ConfigError(f"trainer_args: transformers refuses these training arguments: {err}") from None


class ObjectiveTrainConfig(TrainConfig):
    """Training with a loss from a registry of objectives (`objectives`): its name and hyper-parameters,
    checked when the config validates, so a wrong one fails before any model is loaded."""

    objectives: ClassVar[Registry[Any]]

    objective: str
    objective_args: dict[str, Any] = Field(default_factory=dict, description="Its hyper-parameters.")

    @model_validator(mode="after")
    def _objective_is_valid(self) -> ObjectiveTrainConfig:
        self.build_objective()
        return self

    def objective_values(self) -> dict[str, Any]:
        """The hyper-parameters the objective is built with."""
        return self.objective_args

    def build_objective(self) -> Any:
        """The objective; its problems become one ValueError naming it, which the config's validation
        reports with the key it came from."""
        try:
            return self.objectives.get(self.objective).model_validate(self.objective_values())
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
            raise ValueError(f"objective {self.objective!r}: {problems}") from None


class SFTTrainConfig(TrainConfig):
    """SFT takes the shared settings only; its own class keeps recipes and overrides explicit."""


class ReferenceTrainConfig(ObjectiveTrainConfig):
    """Training the policy against a frozen reference's log-probs (the paired `po` and unpaired `upo` objectives):
    their shared settings, a small learning rate, `beta` beside the objective's other hyper-parameters, and the
    budget of the reference's forwards."""

    learning_rate: float = Field(default=1e-6, gt=0)
    objective_args: dict[str, Any] = Field(default_factory=dict, description="Other hyper-parameters of the objective.")
    beta: float | None = Field(default=None, gt=0, description="None: the objective's own default.")
    reference_token_budget: int = Field(
        default=4096, ge=1, description="Padded tokens per forward when missing ref_* columns are computed.")

    def objective_values(self) -> dict[str, Any]:
        return {**self.objective_args, **({} if self.beta is None else {"beta": self.beta})}


class PreferenceTrainConfig(ReferenceTrainConfig):
    """`polyfuse train <objective> --config` and a recipe's `po` section."""

    objectives = OBJECTIVES

    disable_dropout: bool = Field(
        default=True,
        description="As TRL: the policy's log-probs are compared with references scored without dropout "
        "(M0 in eval mode), so at step 0 DPO's loss is ln 2.",
    )
    objective: str = Field(default="dpo", description="A registered preference objective (`polyfuse train --help` lists "
                           "them; an unknown name is refused with the list).")


class UnpairedTrainConfig(ReferenceTrainConfig):
    """`polyfuse train kto|cgpo|fusesft --config` and a recipe's `upo` section."""

    objectives = UNPAIRED_OBJECTIVES

    batch_size: int = Field(default=8, ge=1, description="Micro-batch size per process (cgpo: half desirable, "
                            "half undesirable rows, so an even number; kto: the block its KL completions rotate in).")
    shuffle: bool = Field(default=True, description="fusesft: shuffle the rows every epoch (false: file order). kto "
                          "reads the rows in their order (shuffled when built), cgpo samples them by class.")
    disable_dropout: bool = Field(
        default=True, description="As TRL: the policy's log-probs are compared with references scored without "
        "dropout, so at step 0 every KTO / CGPO row's loss is 0.5.")
    objective: str = Field(default="cgpo", description="A registered unpaired objective: kto, cgpo or fusesft.")

    def build_objective(self) -> Any:
        objective = super().build_objective()
        if self.objective == "cgpo" and self.batch_size % 2:
            raise ValueError(f"batch_size {self.batch_size}: cgpo's micro-batch is half desirable, half undesirable "
                             "rows, so it must be even")
        if KL_COMPLETION in objective.scored_roles() and self.objective == "kto" and self.batch_size < 2:
            raise ValueError("batch_size 1: kto's KL completions rotate within each micro-batch, which needs at least "
                             "2 rows (TRL requires it too); or use objective_args.loss_type: apo_zero_unpaired")
        return objective


class DistillTrainConfig(ObjectiveTrainConfig):
    """`polyfuse train distill --config` and a recipe's `distill` section."""

    recipe_only: ClassVar[tuple[str, ...]] = ("strategy",)
    objectives = DISTILL_OBJECTIVES

    objective: str = Field(default="uld", description="A registered distillation objective (uld: InfiFusion's; an unknown "
                           "name is refused with the list).")
    teachers: list[str] | None = Field(
        default=None, description="Teacher names in the store, in this order; None: every teacher stored."
    )
    alignment: Literal["positional", "offsets", "dp"] | None = Field(
        default=None, description="None: the objective's own (uld: positional, as published; fusellm: offsets)."
    )
    strategy: Literal["unified", "pairwise"] = Field(
        default="unified",
        description="Recipe: one run with every teacher (`unified`), or one per source (`pairwise`, then merge them).",
    )

    def resolved_alignment(self) -> str:
        return self.alignment or self.build_objective().default_alignment


STUDENT_BACKENDS = ("transformers", "vllm")


class StudentSampling(SamplingSettings):
    """How the student samples: one response per prompt and step, at temperature 1 by default (TRL's
    distillation trainers)."""

    n: int = Field(default=1, ge=1, le=1, description="One response per prompt and step.")
    temperature: float = Field(default=1.0, ge=0.0, description="0: greedy decoding.")
    max_new_tokens: int = Field(default=128, ge=1, description="Generation budget per response.")


class OnPolicyTrainConfig(ObjectiveTrainConfig):
    """`polyfuse train onpolicy --config` and a recipe's `onpolicy` section."""

    recipe_only: ClassVar[tuple[str, ...]] = ("data",)
    objectives = DISTILL_OBJECTIVES

    objective: str = Field(default="kd", description="A group loss: kd (forward / reverse KL, JSD; X-Token P-KL across "
                           "tokenizers) or gold (GOLD's hybrid, H-KL); its top_k is what each teacher returns.")
    teachers: list[EngineModel] = Field(min_length=1, description="The teachers, each with its backend (transformers, "
                                        "vllm, openai); in a recipe: default its sources.")
    student_backend: BackendConfig = Field(
        default="transformers", validate_default=True,
        description="Where the student samples: transformers (the training model itself) or vllm (an engine in this "
        "process, its weights refreshed every sync_steps).")
    sync_steps: int = Field(default=1, ge=1, description="vllm student: optimiser steps between weight refreshes.")
    sampling: StudentSampling = Field(default_factory=StudentSampling, description="How the student samples.")
    lmbda: float = Field(default=1.0, ge=0, le=1, description="Share of steps that sample on-policy (GKD's lambda; "
                         "1: always); the others train on the rows' own `completion`.")
    mix: Mix = Field(default="sum", description="Several teachers: sum (each teacher's groups), route (one teacher per "
                     "row, by route_by: MOPD), or per position: average, confident, uncertainty.")
    route_by: str | None = Field(default=None, description="mix route: the row column naming its teacher (teacher_id, "
                                 "domain, ...).")
    routes: dict[str, str] = Field(default_factory=dict, description="mix route: column value -> teacher name; a value "
                                   "not listed must itself be a teacher name.")
    uncertainty_tau: float = Field(default=1.0, gt=0, description="mix uncertainty: softmax(-H / tau) over teachers.")
    disable_dropout: bool = Field(default=True, description="Dropout off while training and sampling (as TRL's GKD "
                                  "and distillation trainers).")
    data: str | None = Field(default=None, description="Recipe: prompt rows (with `completion` when lmbda < 1); "
                             "default: the prompts stage's (lmbda 1) or the pairs stage's SFT rows.")

    @model_validator(mode="after")
    def _check_on_policy(self) -> OnPolicyTrainConfig:
        objective = self.build_objective()
        if objective.projection_match() is None:
            raise ValueError(f"objective {self.objective!r} reads stored teacher logits; on-policy distillation trains "
                             "with a group loss: kd or gold")
        if self.student_backend.type not in STUDENT_BACKENDS:
            raise ValueError(f"student_backend {self.student_backend.type!r}: the student samples with transformers "
                             "or vllm (a server cannot take the trainer's weights)")
        names = [t.label for t in self.teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teachers: names must be unique, got {names}")
        if (self.mix == "route") != (self.route_by is not None):
            raise ValueError("mix route needs route_by (the column naming each row's teacher), and route_by needs "
                             "mix route")
        unknown = sorted({t for t in self.routes.values() if t not in names})
        if unknown:
            raise ValueError(f"routes: {unknown} name no teacher; teachers: {', '.join(names)}")
        if self.mix in WEIGHTED and getattr(objective, "compat", False):
            raise ValueError(f"mix {self.mix}: gold_compat (TRL's observed merge) mixes teachers by sum or route only")
        return self
