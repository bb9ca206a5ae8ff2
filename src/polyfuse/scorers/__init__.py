"""Scorers: reward models (a number per response) and verifiers (pass/fail per response).

Built-in: `reward_model`, `math`, `code` and `toyworld` (the toy world's exact-match verifier); `SCORERS`
imports every module of this package on its first lookup, so a new scorer is one file here.
"""

from polyfuse.scorers.base import (
    SCORERS,
    Scorer,
    ScorerConfig,
    ScorerSettings,
    Verifier,
    build_scorer,
    parse_scorer_config,
    unjudged,
)
from polyfuse.scorers.code_tests import CodeConfig, CodeVerifier
from polyfuse.scorers.math_answer import MathConfig, MathVerifier
from polyfuse.scorers.reward_model import RewardModelConfig, RewardModelScorer
from polyfuse.scorers.run import ScoreConfig, run_score
from polyfuse.scorers.sandbox import Limits, Sandbox, SandboxFailure, SandboxReport, run_script
from polyfuse.scorers.toyworld import ToyVerifier, ToyVerifierConfig, exact_match

__all__ = [
    "run_score",
    "ScoreConfig",
    "SCORERS",
    "CodeConfig",
    "CodeVerifier",
    "MathConfig",
    "MathVerifier",
    "RewardModelConfig",
    "RewardModelScorer",
    "Limits",
    "Sandbox",
    "SandboxFailure",
    "SandboxReport",
    "Scorer",
    "ToyVerifier",
    "ToyVerifierConfig",
    "ScorerConfig",
    "ScorerSettings",
    "Verifier",
    "build_scorer",
    "unjudged",
    "exact_match",
    "parse_scorer_config",
    "run_script",
]
