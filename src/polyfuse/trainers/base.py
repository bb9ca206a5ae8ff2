"""What SFT and preference training share: the config, the collator, the loss normalisation and saving.

`PolyfuseTrainer` is a thin `transformers.Trainer`. Its loss is a *sum* over the micro-batch divided by
the number of items (response tokens for SFT, pairs for preference objectives) of the whole optimiser
step on all processes. Trainer counts those items over the accumulated micro-batches and passes the
count to `compute_loss` as `num_items_in_batch`, so gradient accumulation and data parallelism do not
change the loss: batch 1 x accumulation 4 gives the same update as batch 4 x accumulation 1.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, ValidationError, field_validator, model_validator
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from polyfuse.config import StrictModel
from polyfuse.data.io import atomic_write_folder
from polyfuse.errors import DataError
from polyfuse.models.forward import forward_logps, pad_batch
from polyfuse.progress import progress_bar
from polyfuse.registry import Registry
from polyfuse.trainers.checkpoints import CompleteCheckpoints, checkpoints, fingerprint, resolve_resume
from polyfuse.trainers.distributed import check_lora_supported, distributed_summary, fsdp_from_launcher


class LoraSettings(StrictModel):
    """A LoRA adapter (peft); the saved model has the adapter merged into plain weights."""

    r: int = Field(default=16, ge=1, description="Rank of the adapter matrices.")
    alpha: float = Field(default=32.0, gt=0, description="Scaling: the update is alpha / r times A @ B.")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout on the adapter's input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default="all-linear", description="Module names to adapt (e.g. [q_proj, v_proj]), or every linear layer but the head."
    )


class TrainConfig(StrictModel):
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
        from transformers.integrations.integration_utils import (
            INTEGRATION_TO_CALLBACK,
            get_available_reporting_integrations,
        )

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
        from transformers.trainer_utils import SchedulerType

        names = [s.value for s in SchedulerType]
        if value not in names:
            raise ValueError(f"{value!r} is not a learning-rate schedule of transformers; one of {', '.join(names)}")
        return value

    @field_validator("optim")
    @classmethod
    def _usable_optimizer(cls, value: str) -> str:
        """A name transformers knows, whose package is installed: asked of Trainer itself, with the default
        arguments (no model is needed for that)."""
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


@dataclass
class SequenceCollator:
    """Pads the responses of every role of a micro-batch into one forward: rows are ordered role by role
    (all chosen, then all rejected, ...). Numeric `columns` become tensors of the batch. Left padding puts
    every response at the end, so the LM head runs on response positions only (`forward_logps`)."""

    pad_token_id: int
    roles: tuple[str, ...]
    columns: tuple[str, ...] = ()

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [f[f"{role}_input_ids"] for role in self.roles for f in features]
        prompt_lengths = [f[f"{role}_prompt_length"] for role in self.roles for f in features]
        batch = pad_batch(ids, prompt_lengths, self.pad_token_id, side="left")
        for name in self.columns:
            batch[name] = torch.tensor([f[name] for f in features], dtype=torch.float32)
        return batch


class PolyfuseTrainer(Trainer):
    """Subclasses define `summed_loss(inputs, logps, ntokens) -> (loss summed over the micro-batch's items,
    metrics)` (or override `micro_batch_loss`) and `count_items(inputs) -> tensor` (how many items a
    micro-batch holds: response tokens for SFT and distillation, pairs for preference objectives)."""

    loss_is_scaled_for_ga = True  # normalised by the items of the whole step, see `compute_loss`

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._metric_sums: dict[str, torch.Tensor] = {}
        self._metric_counts: dict[str, int] = {}

    def create_accelerator_and_postprocess(self) -> None:
        """FSDP on CPU processes too: accelerate records the FSDP plugin only for accelerator devices and
        otherwise trains plain DDP (MULTI_CPU), silently; here the plugin built from `fsdp_config` is put
        in place, and `accelerator.prepare` then shards the model with FSDP2 over the gloo group."""
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled:
            from accelerate.state import PartialState
            from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

            plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            if self.accelerator.mixed_precision != "no":
                plugin.set_mixed_precision(self.accelerator.mixed_precision)
            self.accelerator.state.fsdp_plugin = plugin
            self.accelerator.state.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate's own state does
            self.is_fsdp_enabled = True

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        if not batch_samples:
            return None
        count = sum(self.count_items(b) for b in batch_samples).to(device)
        return self.accelerator.reduce(count, "sum") if self.accelerator.num_processes > 1 else count

    def micro_batch_loss(self, model, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor], Any]:
        """(loss summed over the micro-batch's items, metrics, model outputs); per-sequence log-probs by
        default, which distillation overrides because it needs the logits themselves."""
        logps, ntokens, outputs = forward_logps(model, inputs)
        return *self.summed_loss(inputs, logps, ntokens), outputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        total, metrics, outputs = self.micro_batch_loss(model, inputs)
        if num_items_in_batch is None:  # outside the training loop: this micro-batch alone
            num_items_in_batch = self.count_items(inputs)
        # DDP averages gradients over processes; scale back up so the step's loss is sum / items.
        loss = total / num_items_in_batch * self.accelerator.num_processes
        self._record(metrics)
        return (loss, outputs) if return_outputs else loss

    def _record(self, metrics: dict[str, torch.Tensor]) -> None:
        for name, value in metrics.items():
            value = value.detach().float()
            self._metric_sums[name] = self._metric_sums.get(name, 0) + value.sum()
            self._metric_counts[name] = self._metric_counts.get(name, 0) + value.numel()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean of each recorded metric since the last log, over all processes."""
        if self._metric_sums:
            names = sorted(self._metric_sums)
            sums = torch.stack([self._metric_sums[n] for n in names]).to(self.args.device)
            counts = torch.tensor([float(self._metric_counts[n]) for n in names], device=self.args.device)
            if self.accelerator.num_processes > 1:
                sums, counts = self.accelerator.reduce(sums, "sum"), self.accelerator.reduce(counts, "sum")
            logs.update({n: (s / c).item() for n, s, c in zip(names, sums, counts, strict=True)})
            self._metric_sums, self._metric_counts = {}, {}
        super().log(logs, start_time)


# transformers renamed `gradient_checkpointing` to `activation_checkpointing` (5.20); vLLM 0.32 pins < 5.20.
_CHECKPOINTING = ("activation_checkpointing" if "activation_checkpointing" in inspect.signature(TrainingArguments).parameters
                  else "gradient_checkpointing")


def training_arguments(config: TrainConfig, out_dir: str | Path) -> TrainingArguments:
    """Building these also sets up the (distributed) device; Trainer's scratch folder is a hidden sibling of
    `out_dir`, removed after saving."""
    out_dir = Path(out_dir)
    check_lora_supported(config.lora)
    return TrainingArguments(
        output_dir=str(out_dir.with_name(f".{out_dir.name}.work")),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        optim=config.optim,
        seed=config.seed,
        train_sampling_strategy="random" if config.shuffle else "sequential",
        bf16=config.bf16,
        **{_CHECKPOINTING: config.gradient_checkpointing,
           f"{_CHECKPOINTING}_kwargs": {"use_reentrant": False} if config.gradient_checkpointing else None},
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        save_total_limit=None,  # applied to complete checkpoints only (`CompleteCheckpoints`)
        eval_strategy="no",
        report_to=[name for name in config.report_to if name != "tensorboard"] or "none",
        run_name=config.run_name,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        **fsdp_from_launcher(),
    )


def prepare_model(model: Any, config: TrainConfig) -> Any:
    """Wrap `model` in a LoRA adapter when configured (seeded, so runs are reproducible)."""
    if config.lora is None:
        return model
    from peft import LoraConfig, get_peft_model

    set_seed(config.seed)
    lora = config.lora
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


def disable_dropout(model: Any) -> dict[tuple[int, str], float]:
    """Set every dropout rate of `model` to 0 and return the config-level rates it changed, keyed by
    (id of the config, attribute), so that saving can write the model's own rates back.

    TRL zeroes `nn.Dropout` modules only; attention dropout read from a float attribute (Llama's
    `attention_dropout`, passed to the attention kernel while `model.training`) is not a module, so the
    float attributes named like a dropout rate are zeroed too, on the modules and on the configs."""
    changed: dict[tuple[int, str], float] = {}
    configs = {}
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
            continue
        for name, value in vars(module).items():
            if _is_dropout_rate(name, value):
                setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            configs[id(config)] = config
            for sub in ("text_config", "vision_config", "audio_config"):  # composite configs
                if getattr(config, sub, None) is not None:
                    configs[id(getattr(config, sub))] = getattr(config, sub)
    for key, config in configs.items():
        for name, value in list(vars(config).items()):
            if _is_dropout_rate(name, value):
                changed[(key, name)] = value
                setattr(config, name, 0.0)
    model._polyfuse_dropout = (changed, configs)
    return changed


def _is_dropout_rate(name: str, value: Any) -> bool:
    return (
        isinstance(value, float)
        and not isinstance(value, bool)
        and value > 0
        and ("dropout" in name or name.endswith("pdrop"))
    )


def restore_dropout_config(model: Any) -> None:
    """Write back the config-level dropout rates `disable_dropout` zeroed (before saving the model)."""
    changed, configs = getattr(model, "_polyfuse_dropout", ({}, {}))
    for (key, name), value in changed.items():
        setattr(configs[key], name, value)


def save_trained(trainer: PolyfuseTrainer, tokenizer: Any, out_dir: Path, summary: dict[str, Any]) -> Path:
    """Save model (LoRA merged), tokenizer and a training summary as a plain HF folder, atomically
    (`atomic_write_folder`: a temporary folder beside `out_dir` renamed into place, files with the user's
    umask). Sharded weights (FSDP, DeepSpeed ZeRO-3) are gathered into a full state dict by every process
    together (`accelerator.get_state_dict`, a collective); then only the main process writes."""
    out_dir = Path(out_dir)
    accelerator = trainer.accelerator
    accelerator.wait_for_everyone()
    sharded = summary.get("distributed", {}).get("type") in ("FSDP", "DEEPSPEED")
    state_dict = accelerator.get_state_dict(trainer.model) if sharded else None
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(trainer.model)
        restore_dropout_config(model)
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        summary = {**summary, "log_history": trainer.state.log_history}

        def write(staging: Path) -> None:
            model.save_pretrained(staging, state_dict=state_dict)
            tokenizer.save_pretrained(staging)
            (staging / "polyfuse_training.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")

        atomic_write_folder(out_dir, write)
        shutil.rmtree(trainer.args.output_dir, ignore_errors=True)  # Trainer's scratch folder
    accelerator.wait_for_everyone()
    return out_dir


class TrainingProgress(TrainerCallback):
    """The training bar (optimiser steps, with the latest loss), on the main process and unless quiet. It
    stands in for transformers' tqdm bar and for its printing of every raw log dict on stdout; the logs
    are kept in `polyfuse_training.json`."""

    def __init__(self, description: str):
        self.description = description
        self.bar, self.task = None, None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = progress_bar()
            self.bar.start()
            self.task = self.bar.add_task(self.description, total=state.max_steps, completed=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.update(self.task, description=f"{self.description} (loss {float(logs['loss']):.4g})")

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def tracking_callbacks(config: TrainConfig, out_dir: Path) -> list[TrainerCallback]:
    """TensorBoard writes to `config.logging_dir` (Trainer's default is inside its scratch folder, which
    is removed after saving); the other trackers are Trainer's own, through `report_to`."""
    if "tensorboard" not in config.report_to:
        return []
    from transformers.integrations import TensorBoardCallback

    callback = TensorBoardCallback()
    callback.logging_dir = config.logging_dir or str(out_dir.parent / "logs" / out_dir.name)
    return [callback]


def run_training(
    trainer_cls: type[PolyfuseTrainer],
    model: Any,
    tokenizer: Any,
    features: list[dict[str, Any]] | Any,
    collator: SequenceCollator,
    args: TrainingArguments,
    config: TrainConfig,
    out_dir: Path,
    summary: dict[str, Any],
    callbacks: list[TrainerCallback] | None = None,
    resume: bool | None = None,
    **trainer_kwargs: Any,
) -> Path:
    """Train on pre-tokenised `features` (a list, or a `datasets.Dataset` kept on disk) and save the result
    to `out_dir`. `resume`: see `checkpoints.resolve_resume` (None: resume this run's last complete
    checkpoint if there is one, as recipes do; True: `--resume`; False: start at step 0). A failed run
    leaves Trainer's scratch folder only when it holds checkpoints to resume from."""
    if len(features) == 0:
        dropped = len(summary.get("dropped") or [])
        raise DataError(f"no training rows: all {dropped} rows are longer than max_length {config.max_length} tokens; "
                        "raise max_length" if dropped else "no training rows: the data is empty")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    expected = fingerprint(config, summary, args.world_size)
    checkpoint = resolve_resume(Path(args.output_dir), expected, resume, args.process_index == 0)
    model = prepare_model(model, config)
    if config.disable_dropout:
        disable_dropout(model)
    try:
        return _train_and_save(trainer_cls, model, tokenizer, features, collator, args, config, out_dir, summary,
                               callbacks, checkpoint, expected, **trainer_kwargs)
    except BaseException:
        scratch = Path(args.output_dir)  # keep it only for the checkpoints a rerun can resume from
        if args.process_index == 0 and scratch.is_dir() and not checkpoints(scratch):
            shutil.rmtree(scratch, ignore_errors=True)
        raise


def _train_and_save(trainer_cls, model, tokenizer, features, collator, args, config, out_dir, summary, callbacks,
                    checkpoint, expected, **trainer_kwargs) -> Path:
    from datasets import Dataset

    trainer = trainer_cls(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=features if isinstance(features, Dataset) else Dataset.from_list(features),
        processing_class=tokenizer,
        callbacks=[*tracking_callbacks(config, out_dir), *(callbacks or []), CompleteCheckpoints(expected, config.save_total_limit)],
        **trainer_kwargs,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    progress = TrainingProgress(f"train {getattr(config, 'objective', None) or summary['stage']}")
    trainer.add_callback(progress)
    distributed = distributed_summary(trainer.accelerator)
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        progress.close()  # also when training fails: the terminal gets its cursor back
    summary = {**summary, "config": config.model_dump(), "examples": len(features), "distributed": distributed}
    return save_trained(trainer, tokenizer, out_dir, summary)
