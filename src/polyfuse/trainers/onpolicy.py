"""On-policy distillation (`polyfuse train onpolicy`): the student samples its own responses, every teacher scores
them through its own tokenizer, template and backend, and the student learns from the teachers' sparse top-K
on its own tokens, with a group loss (`kd`: forward / reverse KL, JSD, X-Token P-KL; `gold`: GOLD's hybrid,
H-KL). Spec: `methods/onpolicy-distillation.md`, section 6; the text and the teacher side are
`polyfuse.teacher.online`.

One optimiser step is one **rollout** of its accumulation slice (`OnPolicyTrainer.get_batch_samples`, where
Trainer gathers a step's micro-batches): with probability `lmbda` the student samples a response to every prompt
of the slice (GKD's lambda, drawn once per step from the seed and the step, so every process and a resumed run
draw the same), otherwise the rows' own `completion`s are used; the teachers score the whole slice at once;
the targets are built and collated into the slice's micro-batches. The loss is summed over aligned groups and
divided by the groups of the whole step on every process (`DistillTrainer.count_items`).

The student samples in this process (`student_backend: transformers`, the live model in eval mode), or in a vLLM
engine inside this process (`vllm`) whose weights are replaced by the trainer's every `sync_steps` optimiser
steps (`VllmBackend.load_weights`: vLLM's `reload_weights`); teachers run through any backend (`transformers` in
process, `vllm`, `openai`: a server with vLLM's prompt log-probs), so a large teacher never sits in training
memory. Teacher logits are never dense: K log-probs per position on the wire and in memory.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from polyfuse.data.schemas import PromptRow, response_text
from polyfuse.errors import ConfigError, DataError, UserError
from polyfuse.models import ModelSpec, encode, load_model, load_tokenizer, render_prompt
from polyfuse.models.forward import length_limit, pad_token_id
from polyfuse.objectives.distill import AlignedRow, DistillObjective
from polyfuse.objectives.topk import GROUP_WEIGHT, WEIGHT_FIELDS
from polyfuse.sampling.base import SamplingParams
from polyfuse.teacher.online import (
    WEIGHTED,
    OnlineTeacher,
    StudentText,
    common_groups,
    mix_weights,
    sampled_text,
    written_text,
)
from polyfuse.trainers.checkpoints import data_fingerprint
from polyfuse.trainers.collate import collator_for
from polyfuse.trainers.config import OnPolicyTrainConfig
from polyfuse.trainers.distill import DistillCollator, DistillTrainer
from polyfuse.trainers.memory import check_memory
from polyfuse.trainers.run import TrainingRun

logger = logging.getLogger(__name__)


def check_rows(rows: list[PromptRow], config: OnPolicyTrainConfig, where: str) -> list[int | None]:
    """Every row's teacher index (None: all teachers), and the rows' `completion`s when lmbda < 1, checked before
    any model is loaded: a value that names no teacher, or a missing completion, is one line naming the row."""
    names = [t.label for t in config.teachers]
    routed: list[int | None] = []
    for row in rows:
        extra = {**(row.model_extra or {}), **row.model_dump(include={"domain"})}
        if config.lmbda < 1 and not isinstance(extra.get("completion"), str | list):
            raise DataError(f"{where}: row {row.id!r} has no `completion`: lmbda {config.lmbda} < 1 trains on the rows' "
                            "own completions part of the time (GKD's off-policy branch)")
        if config.route_by is None:
            routed.append(None)
            continue
        value = extra.get(config.route_by)
        if value is None:
            raise DataError(f"{where}: row {row.id!r} has no {config.route_by!r} (route_by): every row names its teacher")
        teacher = config.routes.get(str(value), str(value))
        if teacher not in names:
            raise DataError(f"{where}: row {row.id!r}: {config.route_by} {value!r} names no teacher; teachers: "
                            f"{', '.join(names)}" + (f"; routes: {config.routes}" if config.routes else ""))
        routed.append(names.index(teacher))
    return routed


@dataclass
class RowIndexCollator:
    """The data loader's batches are row indices: a step's rollout makes the real batches."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {"row": torch.tensor([f["row"] for f in features], dtype=torch.long)}


class Rollout:
    """Turns a step's rows into training features: the student's texts (sampled or written), every teacher's
    answer on them, the aligned groups, the mix weights and the objective's targets."""

    def __init__(self, rows: list[PromptRow], routed: list[int | None], config: OnPolicyTrainConfig,
                 objective: DistillObjective, spec: ModelSpec, tokenizer: Any, teachers: list[OnlineTeacher]):
        from polyfuse.alignment import token_bytes

        self.rows, self.routed, self.config, self.objective = rows, routed, config, objective
        self.spec, self.tokenizer, self.teachers = spec, tokenizer, teachers
        self.pieces = token_bytes(tokenizer)
        self.prompt_ids = [render_prompt(tokenizer, row.prompt)[0] for row in rows]
        self.student: Any = None  # the sampling backend, built on the first on-policy step
        self.synced_step: int | None = None

    def longest(self, index: int) -> int:
        """The longest sequence a row can train on: its prompt and max_new_tokens when it may be sampled, its own
        completion when it may be read (lmbda < 1)."""
        sampled = len(self.prompt_ids[index]) + self.config.sampling.max_new_tokens if self.config.lmbda > 0 else 0
        if self.config.lmbda >= 1:
            return sampled
        row = self.rows[index]
        written = encode(self.tokenizer, row.prompt, response_text(row.model_extra["completion"]))
        return max(sampled, len(written.input_ids))

    def close(self) -> None:
        """Free the teachers and the student's sampling engine."""
        for backend in [*self.teachers, *filter(None, [self.student])]:
            backend.close()

    def sampler(self, model: Any) -> Any:
        """The student's sampling backend: the training model itself, or a vLLM engine in this process."""
        if self.student is None:
            from polyfuse.sampling import BACKENDS

            settings = self.config.student_backend
            if settings.type == "transformers":
                self.student = BACKENDS.get("transformers")(self.spec, settings, model=model)
            else:  # an engine inside this process, whose weights are refreshed in place (`load_weights`)
                self.student = BACKENDS.get("vllm")(self.spec, settings, in_process=True)
        return self.student

    def refresh(self, model: Any, step: int) -> None:
        """A vLLM student takes the trainer's weights on its first sampling step and every `sync_steps` after."""
        if self.config.student_backend.type != "vllm":
            return
        if self.synced_step is None and step == 0:
            self.synced_step = 0  # the engine loaded the same initial weights
        elif self.synced_step is None or step - self.synced_step >= self.config.sync_steps:
            self.student.load_weights((name, tensor.detach()) for name, tensor in model.state_dict().items())
            self.synced_step = step

    def texts(self, indices: list[int], on_policy: bool, model: Any, seed: int, step: int) -> list[StudentText]:
        rows = [self.rows[i] for i in indices]
        if not on_policy:
            return [written_text(self.tokenizer, row.prompt, response_text(row.model_extra["completion"]))
                    for row in rows]
        student = self.sampler(model)
        self.refresh(model, step)
        params = SamplingParams(**self.config.sampling.model_dump(), seed=seed)
        was_training = model.training
        model.eval()
        try:
            sampled = student.generate_ids([self.prompt_ids[i] for i in indices], params)
        finally:
            model.train(was_training)
        stops = set(student.stop_token_ids())
        return [sampled_text(row.prompt, self.prompt_ids[i], ids[0], stops, self.pieces)
                for i, row, ids in zip(indices, rows, sampled, strict=True)]

    def features(self, indices: list[int], on_policy: bool, model: Any, seed: int, step: int
                 ) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
        """The features of `indices` (rows in order) and per-row metrics."""
        texts = self.texts(indices, on_policy, model, seed, step)
        answers: list[list[Any]] = []
        for t, teacher in enumerate(self.teachers):
            mine = [k for k, i in enumerate(indices) if self.routed[i] in (None, t)]
            scored = teacher.score([texts[k] for k in mine])
            column: list[Any] = [None] * len(indices)
            for k, answer in zip(mine, scored, strict=True):
                column[k] = answer
            answers.append(column)
        features, groups_per_teacher = [], torch.zeros(len(indices), len(self.teachers))
        for k, text in enumerate(texts):
            row_answers = [answers[t][k] for t in range(len(self.teachers))]
            groups = [None if a is None else a.groups(text) for a in row_answers]
            if self.config.mix in WEIGHTED:
                groups = common_groups(groups)
            weights = mix_weights(self.config.mix, groups, row_answers, len(text.response_ids),
                                  self.config.uncertainty_tau)
            row = AlignedRow(text.response_ids, [None if a is None else a.outputs for a in row_answers], groups,
                             [None] * len(self.teachers), self.pieces)
            targets = self.objective.targets(row)
            groups_per_teacher[k] = (torch.tensor(targets["group"]) > 0).sum(0).float()
            features.append({"completion_input_ids": text.prompt_ids + text.response_ids,
                             "completion_prompt_length": len(text.prompt_ids), **targets,
                             GROUP_WEIGHT: weights.tolist()})
        metrics = {
            "onpolicy/on_policy": torch.full((len(indices),), float(on_policy)),
            "onpolicy/response_tokens": torch.tensor([float(len(t.response_ids)) for t in texts]),
            "onpolicy/stopped": torch.tensor([float(t.stop is not None) for t in texts]),
            **{f"onpolicy/groups/{teacher.name}": groups_per_teacher[:, t] for t, teacher in enumerate(self.teachers)},
        }
        return features, metrics


class OnPolicyTrainer(DistillTrainer):
    """A `DistillTrainer` whose step's micro-batches are made by a rollout of the step's rows (module docstring)."""

    def __init__(self, *args: Any, rollout: Rollout, features_collator: DistillCollator, padding_free: bool,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.rollout, self.features_collator, self.padding_free = rollout, features_collator, padding_free
        self.layout: str | None = None

    def on_policy(self, step: int) -> bool:
        """GKD's draw, once per optimiser step: a function of the seed and the step alone, so every process and a
        resumed run draw the same."""
        lmbda = self.rollout.config.lmbda
        return lmbda >= 1 or (lmbda > 0 and random.Random(f"{self.args.seed}:{step}").random() < lmbda)

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device
                          ) -> tuple[list, torch.Tensor | None]:
        slices = []
        for _ in range(num_batches):
            try:
                slices.append(next(epoch_iterator)["row"].tolist())
            except StopIteration:
                break
        if not slices:
            return [], None
        step = self.state.global_step
        model = self.accelerator.unwrap_model(self.model)
        seed = self.args.seed + step * self.args.world_size + self.args.process_index
        features, metrics = self.rollout.features([i for s in slices for i in s], self.on_policy(step), model, seed,
                                                  step)
        self._record(metrics)
        if self.layout is None:
            collator, self.layout = collator_for(model, features, self.features_collator, self.padding_free)
            self.features_collator = collator
            logger.info("on-policy distillation: %s layout", self.layout)
        batches, at = [], 0
        for size in map(len, slices):
            batches.append(self.features_collator(features[at : at + size]))
            at += size
        items = self._get_num_items_in_batch(batches, device)
        return batches, items.clamp(min=1) if items is not None else None


def build_teachers(config: OnPolicyTrainConfig, objective: DistillObjective, tokenizer: Any) -> list[OnlineTeacher]:
    """Start (or connect to) every teacher and probe it; a teacher that fails closes the ones started before."""
    teachers: list[OnlineTeacher] = []
    top_k = int(getattr(objective, "top_k", 1))
    try:
        for model in config.teachers:
            teachers.append(OnlineTeacher(model, top_k, tokenizer, objective.projection_match()))
            teachers[-1].probe()
    except BaseException:
        for teacher in teachers:
            teacher.close()
        raise
    return teachers


def train_onpolicy(model_spec: ModelSpec, rows: list[PromptRow], config: OnPolicyTrainConfig, out_dir: str | Path,
                   where: str = "data", callbacks: list[TrainerCallback] | None = None,
                   resume: bool | None = None) -> Path:
    """Distil `config.teachers` into `model_spec` on its own samples of `rows`' prompts (module docstring) and save a
    plain HF folder at `out_dir`. `where` names the rows' file in error messages."""
    from datasets import Dataset

    objective = config.build_objective()
    routed = check_rows(rows, config, where)
    if config.student_backend.type == "vllm" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("student_backend vllm: refreshing the engine's weights needs it inside this process, which a "
                        "multi-process launch does not allow; sample with the transformers backend")
    tokenizer = load_tokenizer(model_spec)
    teachers = build_teachers(config, objective, tokenizer)  # a server that is down stops the run here
    try:
        rollout = Rollout(rows, routed, config, objective, model_spec, tokenizer, teachers)
    except BaseException:
        for teacher in teachers:
            teacher.close()
        raise
    try:
        run = TrainingRun(config, Path(out_dir), callbacks, resume)
        check_memory(model_spec, config, 1)
        model = load_model(model_spec).to(run.device)
        limit = length_limit(model.config, config.max_length)
        if config.lmbda > 0 and limit <= config.sampling.max_new_tokens:
            raise ConfigError(f"max_length {config.max_length} leaves no room for the prompt: sampling.max_new_tokens "
                              f"is {config.sampling.max_new_tokens}")
        fits = [rollout.longest(i) <= limit for i in range(len(rows))]
        kept = [i for i, ok in enumerate(fits) if ok]
        dropped = [rows[i].id for i, ok in enumerate(fits) if not ok]
        if dropped:
            logger.warning("on-policy distillation: dropped %d rows whose prompt and response (max_new_tokens, or "
                           "their completion) exceed max_length %d", len(dropped), limit)
        fields = {**{name: objective.target_fields[name] for name in objective.required_fields()}, **WEIGHT_FIELDS}
        summary = {
            "stage": "onpolicy",
            "objective": {"name": config.objective, **objective.model_dump()},
            "teachers": [{"name": t.name, "path": t.model.path, "backend": t.model.backend.type} for t in teachers],
            "model": model_spec.model_dump(),
            "data": data_fingerprint(rows),
            "dropped": dropped,
        }
        return run.train(
            OnPolicyTrainer, model, tokenizer, Dataset.from_list([{"row": i} for i in kept]), RowIndexCollator(),
            summary, objective=objective, projections=[t.projection for t in teachers],
            teacher_names=[t.name for t in teachers], rollout=rollout, padding_free=config.padding_free,
            features_collator=DistillCollator(pad_token_id(tokenizer), ("completion",), fields=fields))
    finally:
        rollout.close()
