"""Sequence log-prob engine: precomputed S, A and n columns of the initial pivot (`ref_*`) and of every
source (`fuse_*`, with the completion entropy for unpaired rows), so no reference or source model is loaded in
training; and CGPO's consensus step, whose outputs are columns built from them."""

from polyfuse.logprobs.consensus import ConsensusConfig, calibration_prompt_ids, run_consensus
from polyfuse.logprobs.engine import (
    RESPONSE_ROLES,
    LogpReport,
    check_logp_columns,
    column_names,
    compute_reference_logps,
    encode_row,
    roles_of,
    score_encoded,
    score_rows,
)
from polyfuse.logprobs.run import LogprobsConfig, fusion_sources, run_logprobs

__all__ = [
    "RESPONSE_ROLES",
    "ConsensusConfig",
    "LogpReport",
    "LogprobsConfig",
    "check_logp_columns",
    "column_names",
    "compute_reference_logps",
    "calibration_prompt_ids",
    "encode_row",
    "fusion_sources",
    "roles_of",
    "run_consensus",
    "run_logprobs",
    "score_encoded",
    "score_rows",
]
