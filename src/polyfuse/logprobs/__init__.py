"""Reference log-prob engine: precomputed S, A and n columns, so no reference model is loaded in training."""

from polyfuse.logprobs.engine import (
    RESPONSE_ROLES,
    LogpReport,
    check_reference_columns,
    column_names,
    compute_reference_logps,
    length_limit,
    pad_batch,
    progress_bar,
    roles_of,
)
from polyfuse.logprobs.reference import ReferenceConfig, add_reference_columns

__all__ = [
    "RESPONSE_ROLES",
    "LogpReport",
    "ReferenceConfig",
    "add_reference_columns",
    "check_reference_columns",
    "column_names",
    "compute_reference_logps",
    "length_limit",
    "pad_batch",
    "progress_bar",
    "roles_of",
]
