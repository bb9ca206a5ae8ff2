"""Reference log-probs: S, A and n of every response of every pair under one model (spec section 6).

Sequences are encoded with `polyfuse.models.encode` (the scored tokens are the response ids of the
convention), sorted by length so that each batch pads little, scored by an HF forward with fp32
log-softmax, and checked: `|A*n - S| <= 1e-5 + 1e-5*|S|` on every row, and n >= 1. A pair whose
prompt + response exceeds `max_length` is dropped whole (never truncated: the policy must see exactly
the text the reference scored) and reported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from polyfuse.data.schemas import PreferenceRow, response_text
from polyfuse.errors import DataError
from polyfuse.models.templates import encode
from polyfuse.objectives.logps import IGNORE_INDEX, sequence_logps

logger = logging.getLogger(__name__)

# Responses a preference row can hold; `chosen_source` is WRPO's y_ws and is scored when present.
RESPONSE_ROLES = ("chosen", "rejected", "chosen_source")


def column_names(role: str, prefix: str = "ref") -> tuple[str, str, str]:
    """(sum, mean, count) column names of one response role, e.g. `ref_chosen_logps`,
    `ref_mean_chosen_logps`, `ref_chosen_ntokens` (spec section 7)."""
    return f"{prefix}_{role}_logps", f"{prefix}_mean_{role}_logps", f"{prefix}_{role}_ntokens"


def roles_of(row: PreferenceRow) -> list[str]:
    return [role for role in RESPONSE_ROLES if getattr(row, role, None) is not None]


@dataclass
class LogpReport:
    """Rows left out of scoring because a sequence was longer than `max_length`."""

    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        ids = ", ".join(self.dropped[:10]) + (" ..." if len(self.dropped) > 10 else "")
        return f"dropped {len(self.dropped)} pairs longer than max_length ({ids})"


def length_limit(model: Any, max_length: int | None) -> int:
    """The longest sequence to score or train on: `max_length`, capped at the model's context size."""
    context = getattr(model.config, "max_position_embeddings", None) or 10**9
    return context if max_length is None else min(max_length, context)


def check_reference_columns(rows: list[PreferenceRow], prefix: str = "ref") -> None:
    """Fail loudly on a row whose (S, A, n) columns disagree or whose n is not positive."""
    for row in rows:
        for role in roles_of(row):
            sum_name, mean_name, count_name = column_names(role, prefix)
            total, mean, count = (getattr(row, name, None) for name in (sum_name, mean_name, count_name))
            if count is not None and count <= 0:
                raise DataError(
                    f"row {row.id!r}: {count_name} is {count}; a scored response has at least one token"
                )
            if None not in (total, mean, count) and abs(mean * count - total) > 1e-5 + 1e-5 * abs(total):
                raise DataError(
                    f"row {row.id!r}: {mean_name} * {count_name} = {mean * count} but {sum_name} = {total}; "
                    "the mean and sum columns must come from the same scoring run"
                )


def pad_batch(sequences: list[list[int]], prompt_lengths: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (IGNORE_INDEX on prompt and padding)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for i, (seq, prompt_length) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        ids = torch.tensor(seq, dtype=torch.long)
        input_ids[i, : len(seq)] = ids
        attention_mask[i, : len(seq)] = 1
        labels[i, prompt_length : len(seq)] = ids[prompt_length:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def compute_reference_logps(
    model: Any,
    tokenizer: Any,
    rows: list[PreferenceRow],
    batch_size: int = 8,
    max_length: int | None = None,
    overflow: Literal["drop", "error"] = "drop",
    progress: Callable[[int], None] | None = None,
    report: LogpReport | None = None,
) -> list[PreferenceRow]:
    """Rows with `ref_{role}_logps` (S), `ref_mean_{role}_logps` (A) and `ref_{role}_ntokens` (n) for every
    response role, scored by `model` in eval mode. `max_length` is capped at the model's context size;
    longer pairs are dropped (listed in `report`) or, with `overflow="error"`, raise `DataError`.
    `progress` is called with the number of sequences scored since the last call."""
    max_length = length_limit(model, max_length)
    report = report if report is not None else LogpReport()
    kept: list[PreferenceRow] = []
    sequences: list[tuple[int, str, list[int], int]] = []  # (kept row index, role, ids, prompt length)
    for row in rows:
        encoded = {
            role: encode(tokenizer, row.prompt, response_text(getattr(row, role))) for role in roles_of(row)
        }
        longest = max(len(e.input_ids) for e in encoded.values())
        if longest > max_length:
            if overflow == "error":
                raise DataError(f"row {row.id!r}: {longest} tokens exceed max_length {max_length}")
            report.dropped.append(row.id)
            continue
        for role, e in encoded.items():
            sequences.append((len(kept), role, e.input_ids, len(e.prompt_ids)))
        kept.append(row)
    if report.dropped:
        logger.warning("reference log-probs: %s", report.summary())

    sequences.sort(key=lambda s: len(s[2]), reverse=True)  # longest first: memory problems show at once
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    updates: list[dict[str, float | int]] = [{} for _ in kept]
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            batch = pad_batch([s[2] for s in chunk], [s[3] for s in chunk], pad_id)
            logits = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                use_cache=False,
            ).logits
            sums, counts = sequence_logps(logits, batch["labels"].to(device))
            for (row_index, role, _, _), total, count in zip(
                chunk, sums.tolist(), counts.tolist(), strict=True
            ):
                sum_name, mean_name, count_name = column_names(role)
                if count == 0:
                    raise DataError(f"row {kept[row_index].id!r}: the {role} response has no scored tokens")
                updates[row_index].update({sum_name: total, mean_name: total / count, count_name: count})
            if progress is not None:
                progress(len(chunk))
    scored = [row.model_copy(update=update) for row, update in zip(kept, updates, strict=True)]
    check_reference_columns(scored)
    return scored


@contextmanager
def progress_bar(description: str, total: int, disable: bool = False) -> Iterator[Callable[[int], None]]:
    """polyfuse's rich progress bar; yields the `advance(n)` callable that engines take as `progress`."""
    from polyfuse.pipeline.progress import progress_bar as rich_progress

    with rich_progress(disable=disable) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
