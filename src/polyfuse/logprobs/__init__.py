"""Sequence log-prob engine: precomputed S, A and n columns of the initial pivot (`ref_*`) and of every
source (`fuse_*`), so no reference or source model is loaded in training."""

from polyfuse.logprobs.engine import (
    RESPONSE_ROLES,
    LogpReport,
    check_logp_columns,
    column_names,
    compute_reference_logps,
    encode_row,
    forward_logps,
    forward_response,
    head_logits,
    length_limit,
    pad_batch,
    plan_batches,
    roles_of,
    score_rows,
    score_sequences,
    scored_hidden_states,
)
from polyfuse.logprobs.stage import LogprobsConfig, LogprobsSettings, fusion_sources, run_logprobs

__all__ = [
    "RESPONSE_ROLES",
    "LogpReport",
    "LogprobsConfig",
    "LogprobsSettings",
    "check_logp_columns",
    "column_names",
    "compute_reference_logps",
    "encode_row",
    "forward_logps",
    "forward_response",
    "head_logits",
    "fusion_sources",
    "length_limit",
    "pad_batch",
    "plan_batches",
    "roles_of",
    "run_logprobs",
    "score_rows",
    "score_sequences",
    "scored_hidden_states",
]
