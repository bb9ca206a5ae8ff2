"""Scorers: reward models (a number per response) and verifiers (pass/fail per response).

Built-in: `reward_model`, `math`, `code`; `SCORERS` imports every module of this package on its first
lookup, so a new scorer is one file here. A module elsewhere may register one when it is imported (the toy
world registers `toyworld` when `polyfuse.toyworld.scorer` is imported).
"""

from polyfuse.scorers.base import (
    SCORERS,
    Scorer,
    ScorerConfig,
    ScorerSettings,
    Verifier,
    build_scorer,
    parse_scorer_config,
)
from polyfuse.scorers.code_tests import CodeConfig, CodeVerifier
from polyfuse.scorers.math_answer import MathConfig, MathVerifier
from polyfuse.scorers.reward_model import RewardModelConfig, RewardModelScorer
from polyfuse.scorers.sandbox import Limits, Sandbox, SandboxFailure, SandboxReport, run_script

__all__ = [
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
    "ScorerConfig",
    "ScorerSettings",
    "Verifier",
    "build_scorer",
    "parse_scorer_config",
    "run_script",
]
