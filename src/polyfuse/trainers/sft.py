"""Supervised fine-tuning on TRL prompt-completion rows; the loss is on response tokens only."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from polyfuse.data.schemas import SFTRow, response_text
from polyfuse.models import ModelSpec, encode, load_model, load_tokenizer
from polyfuse.models.forward import length_limit, pad_token_id
from polyfuse.objectives import IGNORE_INDEX
from polyfuse.trainers.checkpoints import data_fingerprint
from polyfuse.trainers.collate import SequenceCollator, collator_for
from polyfuse.trainers.config import SFTTrainConfig
from polyfuse.trainers.memory import check_memory
from polyfuse.trainers.run import TrainingRun
from polyfuse.trainers.trainer import PolyfuseTrainer

logger = logging.getLogger(__name__)


class SFTTrainer(PolyfuseTrainer):
    """Mean token NLL over the response tokens of the whole optimiser step."""

    roles = ("completion",)

    def summed_loss(self, inputs, logps, ntokens):
        return -logps.sum(), {}

    def count_items(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return (inputs["labels"][:, 1:] != IGNORE_INDEX).sum()


def tokenize_sft(
    tokenizer: Any, rows: list[SFTRow], max_length: int
) -> tuple[list[dict[str, Any]], list[str]]:
    """Features for `SequenceCollator`, and the ids of rows dropped for exceeding `max_length`."""
    features, dropped = [], []
    for row in rows:
        encoded = encode(tokenizer, row.prompt, response_text(row.completion))
        if len(encoded.input_ids) > max_length:
            dropped.append(row.id)
            continue
        features.append(
            {"completion_input_ids": encoded.input_ids, "completion_prompt_length": len(encoded.prompt_ids)}
        )
    return features, dropped


def train_sft(
    model_spec: ModelSpec,
    rows: list[SFTRow],
    config: SFTTrainConfig,
    out_dir: str | Path,
    callbacks: list[TrainerCallback] | None = None,
    resume: bool | None = None,
) -> Path:
    """Fine-tune `model_spec` on `rows` and save a plain HF folder (model + tokenizer) at `out_dir`."""
    tokenizer = load_tokenizer(model_spec)
    run = TrainingRun(config, Path(out_dir), callbacks, resume)
    check_memory(model_spec, config, 1)
    model = load_model(model_spec).to(run.device)
    max_length = length_limit(model.config, config.max_length)
    features, dropped = tokenize_sft(tokenizer, rows, max_length)
    if dropped:
        logger.warning("SFT: dropped %d rows longer than max_length %d", len(dropped), max_length)
    padded = SequenceCollator(pad_token_id(tokenizer), SFTTrainer.roles)
    collator, layout = collator_for(model, features, padded, config.padding_free)
    summary = {"stage": "sft", "model": model_spec.model_dump(), "data": data_fingerprint(rows), "dropped": dropped,
               "layout": layout}
    return run.train(SFTTrainer, model, tokenizer, features, collator, summary)
