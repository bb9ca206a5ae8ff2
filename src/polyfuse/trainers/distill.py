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
from polyfuse.objectives.distill import DistillBatch, DistillObjective, TargetField
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
            if not spec.sparse:
                batch[name] = torch.cat([torch.tensor(f[name], dtype=spec.dtype) for f in features])
                continue
            positions = [entry for f in features for entry in f[name]]
            padded = torch.zeros((len(positions), max(map(len, positions))), dtype=spec.dtype)
            for n, entry in enumerate(positions):
                padded[n, : len(entry)] = torch.tensor(entry, dtype=spec.dtype)
            batch[name] = padded
        return batch


class DistillTrainer(PolyfuseTrainer):
    """The student's logits at the response positions, with the targets, go to a `DistillObjective`."""

    def __init__(self, *args: Any, objective: DistillObjective, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.objective = objective

    def micro_batch_loss(self, model, inputs):
        outputs, labels = forward_response(model, inputs)
        targets = labels[:, 1:]
        rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)  # row-major, as the collator concatenates
        fields = {name: inputs[name] for name in self.objective.required_fields()}
        for name, value in fields.items():
            if len(value) != len(rows):
                raise DataError(f"{name} has {len(value)} positions for {len(rows)} response tokens")
        batch = DistillBatch(logits=outputs.logits[rows, cols], labels=targets[rows, cols], **fields)
        losses, metrics = self.objective(batch)
        return losses.sum(), metrics, outputs

    def count_items(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return (inputs["labels"][:, 1:] != IGNORE_INDEX).sum()


def build_features(pivot_tokenizer: Any, rows: list[SFTRow], teacher_dir: str | Path, config: DistillTrainConfig,
                   max_length: int, cache_dir: Path) -> tuple[Any, list[str], list[str]]:
    """The training set with its targets (an on-disk Dataset), the teacher names, and the dropped row ids."""
    from datasets import Dataset
    from datasets.exceptions import DatasetGenerationError

    from polyfuse.teacher import open_stores
    from polyfuse.teacher.store import text_hash
    from polyfuse.teacher.targets import distill_features, load_teachers

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
    return dataset, [s.name for s in stores], dropped


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
    features, teachers, dropped = build_features(tokenizer, rows, teacher_dir, config, max_length, cache_dir)
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
    saved = run.train(DistillTrainer, model, tokenizer, features, collator, summary, objective=objective)
    shutil.rmtree(cache_dir, ignore_errors=True)
    return saved
