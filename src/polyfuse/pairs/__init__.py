"""Training data from scored samples: SFT targets, preference pairs (FuseChat-3.0's intra-source pairs,
InfiFPO's cross-model pairs, WRPO's triples) and unpaired D / U rows (KTO, CGPO, FuseSFT), ranked or labelled
by verifier verdicts, a reward model, or both."""

from polyfuse.pairs.rules import PairsConfig, build_pairs, sft_split, unpaired_rows
from polyfuse.pairs.run import run_pairs
from polyfuse.pairs.unpaired import (
    UnpairedSettings,
    anchor_partners,
    kl_partners,
    rotation_mismatch,
    shuffled_order,
    with_kl_completions,
)

__all__ = [
    "PairsConfig",
    "UnpairedSettings",
    "anchor_partners",
    "build_pairs",
    "kl_partners",
    "rotation_mismatch",
    "run_pairs",
    "sft_split",
    "shuffled_order",
    "unpaired_rows",
    "with_kl_completions",
]
