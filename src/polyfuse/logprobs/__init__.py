"""Reference log-prob engine: precomputed S, A and n columns, so no reference model is loaded in training."""

from polyfuse.logprobs.engine import (
    RESPONSE_ROLES,
    LogpReport,
    check_reference_columns,
    column_names,
    compute_reference_logps,
    pad_batch,
    progress_bar,
    roles_of,
)

__all__ = [
    "RESPONSE_ROLES",
    "LogpReport",
    "check_reference_columns",
    "column_names",
    "compute_reference_logps",
    "pad_batch",
    "progress_bar",
    "roles_of",
]
