"""Training data from scored samples: SFT targets and preference pairs (FuseChat-3.0's intra-source pairs,
InfiFPO's cross-model pairs, WRPO's triples), ranked by verifier verdicts, a reward model, or both."""

from polyfuse.pairs.rules import PairsConfig, build_pairs, sft_split
from polyfuse.pairs.run import run_pairs

__all__ = ["PairsConfig", "build_pairs", "run_pairs", "sft_split"]
