"""Sequence log-probs: S, A and n of every response of every pair under one model (spec section 6).

Sequences are encoded with `polyfuse.models.encode` (the scored tokens are the response ids of the
convention) and scored by an HF forward with fp32 log-softmax. Speed comes from three things:

- batches are cut by a **token budget** over length-sorted sequences, so a batch pads only to the
  next-longest sequence, and chosen, rejected (and WRPO's source response) share forwards;
- the LM head runs only on the positions that predict a scored token, in chunks of `HEAD_CHUNK`
  positions (`response_logps`): prompt and padding positions are never projected onto the vocabulary,
  and the fp32 logits never exceed one chunk x vocabulary (a 262k vocabulary makes the head the larger
  half of a small model's work). The first batch is also scored by the model's own forward; if the two
  disagree (a model that post-processes its logits), the whole run uses the model's own forward;
- log-probs are accumulated in fp32 whatever the model's dtype.

Every row is checked: `|A*n - S| <= 1e-5 + 1e-5*|S|` and n >= 1. A pair whose prompt + response exceeds
`max_length` is dropped whole (never truncated: the policy must see exactly the text the references
scored) and reported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from polyfuse.data.schemas import PreferenceRow, response_text
from polyfuse.errors import DataError
from polyfuse.models.templates import Encoded, encode
from polyfuse.objectives.logps import IGNORE_INDEX, sequence_logps

logger = logging.getLogger(__name__)

# Responses a preference row can hold; `chosen_source` is WRPO's y_ws and is scored when present.
RESPONSE_ROLES = ("chosen", "rejected", "chosen_source")
DEFAULT_TOKEN_BUDGET = 4096
HEAD_CHUNK = 512  # scored positions per LM-head call in `response_logps`


def column_names(role: str, prefix: str = "ref") -> tuple[str, str, str]:
    """(sum, mean, count) column names of one response role, e.g. `ref_chosen_logps`,
    `ref_mean_chosen_logps`, `ref_chosen_ntokens` (spec section 7)."""
    return f"{prefix}_{role}_logps", f"{prefix}_mean_{role}_logps", f"{prefix}_{role}_ntokens"


def roles_of(row: PreferenceRow) -> list[str]:
    return [role for role in RESPONSE_ROLES if getattr(row, role, None) is not None]


def encode_row(tokenizer: Any, row: PreferenceRow) -> dict[str, Encoded]:
    """Every response of a pair under one tokenizer's convention."""
    return {role: encode(tokenizer, row.prompt, response_text(getattr(row, role))) for role in roles_of(row)}


@dataclass
class LogpReport:
    """Rows left out of scoring because a sequence was longer than `max_length`."""

    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        ids = ", ".join(self.dropped[:10]) + (" ..." if len(self.dropped) > 10 else "")
        return f"dropped {len(self.dropped)} pairs longer than max_length ({ids})"


def length_limit(model_config: Any, max_length: int | None) -> int:
    """The longest sequence to score or train on: `max_length`, capped at the model's context size."""
    context = getattr(model_config, "max_position_embeddings", None) or 10**9
    return context if max_length is None else min(max_length, context)


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def check_logp_columns(rows: list[PreferenceRow], prefix: str = "ref") -> None:
    """Fail loudly on a row whose (S, A, n) columns disagree or whose n is not positive. `fuse_*`
    columns hold one value per source and are checked element by element."""
    for row in rows:
        for role in roles_of(row):
            sum_name, mean_name, count_name = column_names(role, prefix)
            values = [getattr(row, name, None) for name in (sum_name, mean_name, count_name)]
            if None in values:
                continue
            totals, means, counts = (_as_list(v) for v in values)
            if not len(totals) == len(means) == len(counts):
                raise DataError(f"row {row.id!r}: {sum_name}, {mean_name} and {count_name} differ in length")
            for total, mean, count in zip(totals, means, counts, strict=True):
                if count <= 0:
                    raise DataError(
                        f"row {row.id!r}: {count_name} is {count}; a scored response has at least one token"
                    )
                if abs(mean * count - total) > 1e-5 + 1e-5 * abs(total):
                    raise DataError(
                        f"row {row.id!r}: {mean_name} * {count_name} = {mean * count} but {sum_name} = {total}; "
                        "the mean and sum columns must come from the same scoring run"
                    )


def pad_batch(
    sequences: list[list[int]],
    prompt_lengths: list[int],
    pad_id: int,
    side: Literal["right", "left"] = "right",
) -> dict[str, torch.Tensor]:
    """Padded `input_ids`, `attention_mask`, `position_ids` and `labels` (IGNORE_INDEX on prompt and
    padding). Position ids count real tokens only, so left padding gives the same positions as none."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for i, (seq, prompt_length) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        start = width - len(seq) if side == "left" else 0
        ids = torch.tensor(seq, dtype=torch.long)
        input_ids[i, start : start + len(seq)] = ids
        attention_mask[i, start : start + len(seq)] = 1
        labels[i, start + prompt_length : start + len(seq)] = ids[prompt_length:]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "labels": labels}


def plan_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Indices of `lengths` grouped longest first so that `rows x longest row <= token_budget` (a
    sequence longer than the budget gets a batch of its own). Memory problems show on the first batch."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= token_budget:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def forward_response(model: Any, batch: dict[str, torch.Tensor]) -> tuple[Any, torch.Tensor]:
    """The model's own forward with the LM head only from the first position that predicts a scored token of
    some row (`logits_to_keep`): with left padding that is the longest response + 1 positions, so prompts are
    never projected onto the vocabulary. Returns the outputs and the labels cut to the kept positions (kept
    position k predicts label k + 1)."""
    labels = batch["labels"]
    scored = (labels[:, 1:] != IGNORE_INDEX).any(0)
    first = int(scored.int().argmax()) if bool(scored.any()) else 0
    outputs = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=labels.shape[1] - first,
        use_cache=False,
    )
    return outputs, labels[:, first:]


def forward_logps(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(S, n) of every row of a padded batch on the model's device, and the model outputs (`forward_response`)."""
    outputs, labels = forward_response(model, batch)
    sums, counts = sequence_logps(outputs.logits, labels)
    return sums, counts, outputs


def scored_hidden_states(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(states, tokens, rows): the decoder's last hidden states at the positions that predict a scored
    token, those tokens, and the row of each, in row-major order (position k predicts token k + 1)."""
    hidden = model.get_decoder()(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    return hidden[rows, cols], targets[rows, cols], rows


def head_logits(model: Any, states: torch.Tensor) -> Iterator[torch.Tensor]:
    """fp32 logits of `states` through the output embeddings, `HEAD_CHUNK` positions at a time, so the
    logits never exceed one chunk x vocabulary."""
    head = model.get_output_embeddings()
    for i in range(0, len(states), HEAD_CHUNK):
        yield head(states[i : i + HEAD_CHUNK]).float()


def response_logps(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, n) of every row of a padded batch: the decoder's hidden states at the positions that predict a
    scored token, through the output embeddings chunk by chunk, fp32 log-softmax. Inference only: it calls
    the decoder and the head directly, past any wrapper's forward."""
    states, tokens, rows = scored_hidden_states(model, batch)
    chunks = [
        _token_logps(logits, tokens[i * HEAD_CHUNK : i * HEAD_CHUNK + len(logits)])
        for i, logits in enumerate(head_logits(model, states))
    ]
    token_logps = torch.cat(chunks) if chunks else states.new_zeros(0, dtype=torch.float32)
    batch_size = batch["labels"].shape[0]
    sums = torch.zeros(batch_size, dtype=torch.float32, device=states.device).index_add_(0, rows, token_logps)
    return sums, (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1)


def _token_logps(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return logits.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _agree(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a - b).abs() <= 1e-3 + 1e-5 * b.abs()).all())


def score_sequences(
    model: Any,
    sequences: list[tuple[list[int], int]],
    pad_id: int,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[float, int]]:
    """(S, n) of each `(input ids, prompt length)` sequence, in input order, under `model` in eval mode."""
    device = next(model.parameters()).device
    results: list[tuple[float, int]] = [(0.0, 0)] * len(sequences)
    head_only = None  # whether `response_logps` reproduces the model's own forward (checked on batch 1)
    model.eval()
    with torch.inference_mode():
        for indices in plan_batches([len(ids) for ids, _ in sequences], token_budget):
            chunk = [sequences[i] for i in indices]
            batch = pad_batch([ids for ids, _ in chunk], [p for _, p in chunk], pad_id, side="left")
            batch = {k: v.to(device) for k, v in batch.items()}
            if head_only is None:
                sums, counts, _ = forward_logps(model, batch)
                head_only = _agree(response_logps(model, batch)[0], sums)
                if not head_only:
                    logger.warning("%s post-processes its logits: scoring with its own forward", type(model).__name__)
            elif head_only:
                sums, counts = response_logps(model, batch)
            else:
                sums, counts, _ = forward_logps(model, batch)
            for index, total, count in zip(indices, sums.tolist(), counts.tolist(), strict=True):
                results[index] = (total, count)
            if progress is not None:
                progress(len(chunk))
    return results


def compute_reference_logps(
    model: Any,
    tokenizer: Any,
    rows: list[PreferenceRow],
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    max_length: int | None = None,
    overflow: Literal["drop", "error"] = "drop",
    progress: Callable[[int], None] | None = None,
    report: LogpReport | None = None,
) -> list[PreferenceRow]:
    """Rows with `ref_{role}_logps` (S), `ref_mean_{role}_logps` (A) and `ref_{role}_ntokens` (n) for every
    response role under `model` (the initial pivot M0). `max_length` is capped at the model's context
    size; longer pairs are dropped (listed in `report`) or, with `overflow="error"`, raise `DataError`.
    `progress` is called with the number of sequences scored since the last call."""
    max_length = length_limit(model.config, max_length)
    report = report if report is not None else LogpReport()
    kept: list[PreferenceRow] = []
    encoded: list[dict[str, Encoded]] = []
    for row in rows:
        responses = encode_row(tokenizer, row)
        longest = max(len(e.input_ids) for e in responses.values())
        if longest > max_length:
            if overflow == "error":
                raise DataError(f"row {row.id!r}: {longest} tokens exceed max_length {max_length}")
            report.dropped.append(row.id)
            continue
        kept.append(row)
        encoded.append(responses)
    if report.dropped:
        logger.warning("reference log-probs: %s", report.summary())
    scores = score_rows(model, tokenizer, encoded, token_budget, progress)
    scored = [
        row.model_copy(update=logp_columns(row.id, values, "ref"))
        for row, values in zip(kept, scores, strict=True)
    ]
    check_logp_columns(scored)
    return scored


def score_rows(
    model: Any,
    tokenizer: Any,
    encoded: list[dict[str, Encoded]],
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, tuple[float, int]]]:
    """role -> (S, n) for each row's encoded responses; all responses of all rows share the batches."""
    flat = [(i, role, e) for i, responses in enumerate(encoded) for role, e in responses.items()]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores = score_sequences(model, [(e.input_ids, len(e.prompt_ids)) for _, _, e in flat], pad_id, token_budget, progress)
    out: list[dict[str, tuple[float, int]]] = [{} for _ in encoded]
    for (i, role, _), score in zip(flat, scores, strict=True):
        out[i][role] = score
    return out


def logp_columns(row_id: str, scores: dict[str, tuple[float, int]], prefix: str) -> dict[str, float | int]:
    """The (S, A, n) columns of one row's scores; a response with no scored token is an error."""
    columns: dict[str, float | int] = {}
    for role, (total, count) in scores.items():
        if count == 0:
            raise DataError(f"row {row_id!r}: the {role} response has no scored tokens")
        sum_name, mean_name, count_name = column_names(role, prefix)
        columns.update({sum_name: total, mean_name: total / count, count_name: count})
    return columns
