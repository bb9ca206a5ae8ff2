"""Explicit fusion by distillation (`polyfuse train distill`): CE on the gold response plus a loss against
the teachers' precomputed top-K outputs (ULD for InfiFusion, soft-target CE for FuseLLM / FuseChat).

No teacher model is loaded: targets are built once from the teacher store (`polyfuse.teacher.targets`)
into an on-disk `datasets.Dataset`, sparse (K entries per position and teacher), so memory does not grow
with the vocabulary. The loss is a sum over response tokens divided by the response tokens of the whole
optimiser step on all processes (`PolyfuseTrainer`), so gradient accumulation and DDP do not change it.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from polyfuse.data.schemas import SFTRow, response_text
from polyfuse.errors import DataError, UserError
from polyfuse.models import ModelSpec, load_model, load_tokenizer
from polyfuse.models.forward import forward_response, length_limit, pad_token_id
from polyfuse.objectives import IGNORE_INDEX
from polyfuse.objectives.distill import (
    DistillBatch,
    DistillObjective,
    Projection,
    TargetField,
)
from polyfuse.objectives.topk import GROUP_WEIGHT, WEIGHT_FIELDS, teacher_metric
from polyfuse.trainers.checkpoints import data_fingerprint
from polyfuse.trainers.collate import SequenceCollator, collator_for
from polyfuse.trainers.config import DistillTrainConfig
from polyfuse.trainers.memory import check_memory
from polyfuse.trainers.run import TrainingRun
from polyfuse.trainers.trainer import PolyfuseTrainer

logger = logging.getLogger(__name__)

@dataclass
class DistillCollator(SequenceCollator):
    """Pads the sequences, and concatenates each row's per-position targets in row order: the order of the
    scored positions of the left-padded batch (`labels[:, 1:] != IGNORE_INDEX`, row-major). `fields`: the
    objective's target fields, batched as each declares."""

    fields: dict[str, TargetField] = field(default_factory=dict)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(features)
        for name, spec in self.fields.items():
            if not spec.sparse:  # one tensor from all rows' entries: a tensor per row cost more than the cat
                batch[name] = torch.tensor([entry for f in features for entry in f[name]], dtype=spec.dtype)
                continue
            positions = [entry for f in features for entry in f[name]]
            padded = torch.zeros((len(positions), max(map(len, positions))), dtype=spec.dtype)
            for n, entry in enumerate(positions):
                padded[n, : len(entry)] = torch.tensor(entry, dtype=spec.dtype)
            batch[name] = padded
        return batch


class DistillTrainer(PolyfuseTrainer):
    """The student's logits at the response positions, with the targets (and, for the group losses, each teacher's
    vocabulary projection), go to a `DistillObjective`. One loss item is a response token, or for the group
    losses (`kd`, `gold`) an aligned group of one teacher, weighted by its `group_weight` when teachers are mixed
    at each position."""

    def __init__(self, *args: Any, objective: DistillObjective, projections: Sequence[Projection | None] = (),
                 teacher_names: Sequence[str] = (), **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.projections = tuple(projections)
        self.metric_names = {teacher_metric(t): f"kd/loss/{name}" for t, name in enumerate(teacher_names)}

    def _record(self, metrics: dict[str, torch.Tensor]) -> None:
        super()._record({self.metric_names.get(name, name): value for name, value in metrics.items()})

    def micro_batch_loss(self, model, inputs):
        outputs, labels = forward_response(model, inputs)
        targets = labels[:, 1:]
        rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)  # row-major, as the collator concatenates
        names = [*self.objective.required_fields(), *(n for n in WEIGHT_FIELDS if n in inputs)]
        fields = {name: inputs[name] for name in names}
        for name, value in fields.items():
            if len(value) != len(rows):
                raise DataError(f"{name} has {len(value)} positions for {len(rows)} response tokens")
        batch = DistillBatch(outputs.logits[rows, cols], targets[rows, cols], self.projections, **fields)
        losses, metrics = self.objective(batch)
        total = losses.sum()
        if not total.requires_grad:  # no item in this micro-batch (no aligned group): a zero that still backpropagates
            total = outputs.logits.sum() * 0.0
        return total, metrics, outputs

    def count_items(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if "group" in inputs:  # one item per aligned group and teacher
            groups = inputs["group"] > 0
            return (groups * inputs[GROUP_WEIGHT]).sum() if GROUP_WEIGHT in inputs else groups.sum()
        return (inputs["labels"][:, 1:] != IGNORE_INDEX).sum()


def build_features(pivot_tokenizer: Any, rows: list[SFTRow], teacher_dir: str | Path, config: DistillTrainConfig,
                   max_length: int, cache_dir: Path) -> tuple[Any, list[str], list[str], list[Projection | None]]:
    """The training set with its targets (an on-disk Dataset), the teacher names, the dropped row ids and each
    teacher's vocabulary projection (None for objectives that read none)."""
    from datasets import Dataset
    from datasets.exceptions import DatasetGenerationError

    from polyfuse.teacher import open_stores
    from polyfuse.teacher.store import text_hash
    from polyfuse.teacher.targets import distill_features, load_teachers, store_projections

    objective = config.build_objective()
    alignment = config.resolved_alignment()
    stores = open_stores(teacher_dir, config.teachers)
    hashes = {row.id: text_hash(row.prompt, response_text(row.completion)) for row in rows}
    for store in stores:
        store.check_rows(hashes)
    teachers = load_teachers(stores, pivot_tokenizer, alignment, objective.vocabulary_map())
    dropped: list[str] = []
    shutil.rmtree(cache_dir, ignore_errors=True)

    def generate():
        yield from distill_features(pivot_tokenizer, rows, teachers, objective, max_length, dropped)

    try:
        dataset = Dataset.from_generator(generate, cache_dir=str(cache_dir), keep_in_memory=False)
    except DatasetGenerationError as err:  # a data problem found while building: report it, not the wrapper
        shutil.rmtree(cache_dir, ignore_errors=True)
        raise err.__cause__ if isinstance(err.__cause__, UserError) else err from None
    return dataset, [s.name for s in stores], dropped, store_projections(stores, pivot_tokenizer,
                                                                          objective.projection_match())


def train_distill(
    model_spec: ModelSpec,
    rows: list[SFTRow],
    teacher_dir: str | Path,
    config: DistillTrainConfig,
    out_dir: str | Path,
    callbacks: list[TrainerCallback] | None = None,
    resume: bool | None = None,
) -> Path:
    """Distil the teachers stored in `teacher_dir` (`polyfuse teacher`) into `model_spec` on `rows` and save
    a plain HF folder at `out_dir`."""
    objective = config.build_objective()
    out_dir = Path(out_dir)
    tokenizer = load_tokenizer(model_spec)
    run = TrainingRun(config, out_dir, callbacks, resume)
    check_memory(model_spec, config, 1)
    model = load_model(model_spec).to(run.device)
    max_length = length_limit(model.config, config.max_length)
    cache_dir = out_dir.with_name(f".{out_dir.name}.targets-{run.args.process_index}")  # one per process: no races
    features, teachers, dropped, projections = build_features(tokenizer, rows, teacher_dir, config, max_length,
                                                              cache_dir)
    if dropped:
        logger.warning("distillation: dropped %d rows longer than max_length %d", len(dropped), max_length)
    fields = {name: objective.target_fields[name] for name in objective.required_fields()}
    padded = DistillCollator(pad_token_id(tokenizer), ("completion",), fields=fields)
    collator, layout = collator_for(model, features, padded, config.padding_free)
    summary = {
        "stage": "distill",
        "objective": {"name": config.objective, **objective.model_dump()},
        "alignment": config.resolved_alignment(),
        "teachers": teachers,
        "model": model_spec.model_dump(),
        "data": data_fingerprint(rows),
        "dropped": dropped,
        "layout": layout,
    }
    saved = run.train(DistillTrainer, model, tokenizer, features, collator, summary, objective=objective,
                      projections=projections, teacher_names=teachers)
    shutil.rmtree(cache_dir, ignore_errors=True)
    return saved
