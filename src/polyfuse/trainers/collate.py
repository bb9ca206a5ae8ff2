"""Collators: features of pre-tokenised rows to the batches the trainers' forward takes.

Three layouts (`polyfuse.models.forward` / `polyfuse.models.layouts`): left-padded rows, one sequence per
row (`pad_batch`); every sequence of the micro-batch in one row without padding (`pack_batch`, SFT and
distillation with `padding_free`); one row per pair with the prompt once (`shared_prompt_batch`,
preference objectives with `share_prompt`). In every layout the per-sequence log-probs come out role by
role (all chosen, then all rejected, ...), so the losses read them alike.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

from polyfuse.models.forward import pad_batch
from polyfuse.models.layouts import pack_batch, shared_prompt_batch

logger = logging.getLogger(__name__)


@dataclass
class SequenceCollator:
    """Each role's sequence of each row, role by role, left-padded (or packed, `padding_free`). Numeric
    `columns` become tensors of the batch. Left padding puts every response at the end, so the LM head runs
    on response positions only (`forward_logps`)."""

    pad_token_id: int
    roles: tuple[str, ...]
    columns: tuple[str, ...] = ()
    padding_free: bool = False

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [f[f"{role}_input_ids"] for role in self.roles for f in features]
        prompt_lengths = [f[f"{role}_prompt_length"] for role in self.roles for f in features]
        if self.padding_free:
            batch = pack_batch(ids, prompt_lengths)
        else:
            batch = pad_batch(ids, prompt_lengths, self.pad_token_id, side="left")
        return self.add_columns(batch, features)

    def add_columns(self, batch: dict[str, torch.Tensor], features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        for name in self.columns:
            batch[name] = torch.tensor([f[name] for f in features], dtype=torch.float32)
        return batch


@dataclass
class SharedPromptCollator(SequenceCollator):
    """One row per pair: the prompt once, each role's response behind it (`shared_prompt_batch`).
    `mask_dtype`: None for a boolean mask (sdpa), the model's dtype for an additive one (eager)."""

    mask_dtype: torch.dtype | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        first = self.roles[0]
        items = [(f[f"{first}_input_ids"][: f[f"{first}_prompt_length"]],
                  [f[f"{role}_input_ids"][f[f"{role}_prompt_length"]:] for role in self.roles]) for f in features]  # fmt: skip
        return self.add_columns(shared_prompt_batch(items, self.pad_token_id, self.mask_dtype), features)


def same_prompt(feature: dict[str, Any], roles: tuple[str, ...]) -> bool:
    """Whether every role's sequence of a row starts with the same prompt ids (what sharing needs)."""
    prompts = [feature[f"{role}_input_ids"][: feature[f"{role}_prompt_length"]] for role in roles]
    return all(p == prompts[0] for p in prompts) and len(prompts[0]) > 0


def collator_for(model: Any, features: Any, padded: SequenceCollator, padding_free: bool, sample: int = 4
                 ) -> tuple[SequenceCollator, str]:
    """The collator a run trains with, and its layout in words for the run's summary: `padded` itself, or
    with `padding_free` its fast layout (preference objectives, i.e. several roles: the shared prompt;
    else packing) when `model` takes it. That is checked on the first `sample` rows: the layout's own
    conditions, then one forward in each layout, whose per-sequence log-probs and counts must agree
    (`layouts_disagree`). A model that cannot take it trains padded, with a warning saying why."""
    from polyfuse.models.forward import forward_logps
    from polyfuse.models.layouts import (
        SEGMENT_ATTENTION,
        attention_of,
        layouts_disagree,
        mask_dtype,
        mask_problem,
    )

    if not padding_free:
        return padded, "padded"
    rows = [features[i] for i in range(min(sample, len(features)))]
    if len(padded.roles) > 1:
        fast: SequenceCollator = SharedPromptCollator(padded.pad_token_id, padded.roles, padded.columns,
                                                      mask_dtype=mask_dtype(model))
        attentions: list[str | None] = [None]
        if not all(same_prompt(f, padded.roles) for f in features):
            reason = "some pair's responses follow different prompt ids"
        else:
            reason = mask_problem(model, max(sum(len(f[f"{r}_input_ids"]) for r in padded.roles) for f in features))
    else:  # sdpa: attention per packed sequence (`segment_attention`), else the model's own
        fast, reason = dataclasses.replace(padded, padding_free=True), None
        attentions = [SEGMENT_ATTENTION, None] if attention_of(model) == "sdpa" else [None]
    for attention in attentions if reason is None and rows else ():
        reason = layouts_disagree(model, padded(rows), fast(rows), forward_logps, attention)
        if reason is None:
            break
    if reason is None:
        return fast, "shared_prompt" if isinstance(fast, SharedPromptCollator) else "packed"
    logger.warning("padding_free: %s; training with padded rows", reason)
    return padded, f"padded ({reason})"
