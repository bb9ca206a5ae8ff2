"""Sequence log-probs: S, A and n of every response of every pair under one model.

Sequences are encoded with `polyfuse.models.encode` (the scored tokens are the response ids of the
convention) and scored by the shared forward kernel (`polyfuse.models.forward`): token-budget batches
over length-sorted sequences (chosen, rejected and WRPO's source response share forwards), the LM head
on response positions only (checked once per run against the model's own forward, which is used instead
when the two disagree), log-probs accumulated in fp32 whatever the model's dtype.

Every row is checked: `|A*n - S| <= 1e-5 + 1e-5*|S|` and n >= 1. A pair whose prompt + response exceeds
`max_length` is dropped whole (never truncated: the policy must see exactly the text the references
scored) and reported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from polyfuse.data.schemas import PreferenceRow, UnpairedRow, response_text
from polyfuse.errors import DataError
from polyfuse.models.forward import DEFAULT_TOKEN_BUDGET, length_limit, pad_token_id, score_sequences
from polyfuse.models.templates import Encoded, encode

logger = logging.getLogger(__name__)

ScoredRow = PreferenceRow | UnpairedRow

# Responses a row can hold: a preference row's (`chosen_source` is WRPO's y_ws, scored when present), and an
# unpaired row's (`kl_completion`: a completion of another prompt for KTO's / CGPO's reference point).
RESPONSE_ROLES = ("chosen", "rejected", "chosen_source", "completion", "kl_completion")
SOURCE_ROLES = ("completion",)  # what the sources score of an unpaired row (CGPO's consensus reads no other)


def column_names(role: str, prefix: str = "ref") -> tuple[str, str, str]:
    """(sum, mean, count) column names of one response role, e.g. `ref_chosen_logps`,
    `ref_mean_chosen_logps`, `ref_chosen_ntokens` (the InfiXAI/InfiFPO README's names; the counts are
    polyfuse's)."""
    return f"{prefix}_{role}_logps", f"{prefix}_mean_{role}_logps", f"{prefix}_{role}_ntokens"


def roles_of(row: ScoredRow) -> list[str]:
    return [role for role in RESPONSE_ROLES if getattr(row, role, None) is not None]


def source_roles(row: ScoredRow) -> list[str]:
    """The responses a source scores: every one of a pair (InfiFPO), the completion of an unpaired row."""
    return [role for role in roles_of(row) if not isinstance(row, UnpairedRow) or role in SOURCE_ROLES]


def encode_row(tokenizer: Any, row: ScoredRow, roles: list[str] | None = None) -> dict[str, Encoded]:
    """The responses of a row (`roles`, default all it has) under one tokenizer's convention."""
    return {role: encode(tokenizer, row.prompt, response_text(getattr(row, role))) for role in roles or roles_of(row)}


@dataclass
class LogpReport:
    """Rows left out of scoring because a sequence was longer than `max_length`."""

    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        ids = ", ".join(self.dropped[:10]) + (" ..." if len(self.dropped) > 10 else "")
        return f"dropped {len(self.dropped)} pairs longer than max_length ({ids})"


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def check_logp_columns(rows: Sequence[ScoredRow], prefix: str = "ref") -> None:
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


def compute_reference_logps(
    model: Any,
    tokenizer: Any,
    rows: list[ScoredRow],
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    max_length: int | None = None,
    overflow: Literal["drop", "error"] = "drop",
    progress: Callable[[int], None] | None = None,
    report: LogpReport | None = None,
) -> list[ScoredRow]:
    """Rows with `ref_{role}_logps` (S), `ref_mean_{role}_logps` (A) and `ref_{role}_ntokens` (n) for every
    response role under `model` (the initial pivot M0). `max_length` is capped at the model's context
    size; longer pairs are dropped (listed in `report`) or, with `overflow="error"`, raise `DataError`.
    `progress` is called with the number of sequences scored since the last call."""
    max_length = length_limit(model.config, max_length)
    report = report if report is not None else LogpReport()
    kept: list[ScoredRow] = []
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
    return [row.model_copy(update=logp_columns(row.id, values, "ref")) for row, values in zip(kept, scores, strict=True)]


def score_rows(
    model: Any,
    tokenizer: Any,
    encoded: list[dict[str, Encoded]],
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, tuple[float, int]]]:
    """role -> (S, n) for each row's encoded responses under a loaded model; all responses of all rows
    share the batches."""
    return score_encoded(
        lambda sequences: score_sequences(model, sequences, pad_token_id(tokenizer), token_budget, progress), encoded
    )


def score_encoded(
    score: Callable[[list[tuple[list[int], int]]], list[tuple[float, int]]], encoded: list[dict[str, Encoded]]
) -> list[dict[str, tuple[float, int]]]:
    """role -> (S, n) for each row's encoded responses, all scored in one call of `score` (a backend's
    `score`, or the forward kernel's), which takes `(ids, prompt length)` sequences."""
    flat = [(i, role, e) for i, responses in enumerate(encoded) for role, e in responses.items()]
    scores = score([(e.input_ids, len(e.prompt_ids)) for _, _, e in flat])
    out: list[dict[str, tuple[float, int]]] = [{} for _ in encoded]
    for (i, role, _), value in zip(flat, scores, strict=True):
        out[i][role] = value
    return out


def logp_columns(row_id: str, scores: dict[str, Sequence[float]], prefix: str) -> dict[str, float | int]:
    """The (S, A, n) columns of one row's scores (S, n[, entropy sum, ...]) and, where an entropy sum was scored,
    the mean normalised entropy `{prefix}_{role}_entropy`; a response with no scored token is an error."""
    columns: dict[str, float | int] = {}
    for role, (total, count, *entropy) in scores.items():
        if count == 0:
            raise DataError(f"row {row_id!r}: the {role} response has no scored tokens")
        sum_name, mean_name, count_name = column_names(role, prefix)
        columns.update({sum_name: total, mean_name: total / count, count_name: int(count)})
        if entropy:
            columns[f"{prefix}_{role}_entropy"] = min(1.0, max(0.0, entropy[0] / count))  # [0, 1] up to rounding
    return columns
