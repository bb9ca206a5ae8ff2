"""Scorers: reward models (a number per response) and verifiers (pass/fail per response).

Built-in: `reward_model`, `math`, `code` and `toyworld` (the toy world's exact-match verifier); `SCORERS`
imports every module of this package on its first lookup, so a new scorer is one file here.
"""

from polyfuse.lazy import lazy_exports

_EXPORTS = {
    "SCORERS": "base",
    "Scorer": "base",
    "ScorerConfig": "base",
    "ScorerSettings": "base",
    "Verifier": "base",
    "build_scorer": "base",
    "parse_scorer_config": "base",
    "unjudged": "base",
    "CodeConfig": "code_tests",
    "CodeVerifier": "code_tests",
    "MathConfig": "math_answer",
    "MathVerifier": "math_answer",
    "RewardModelConfig": "reward_model",
    "RewardModelScorer": "reward_model",
    "ScoreConfig": "run",
    "run_score": "run",
    "Limits": "sandbox",
    "Sandbox": "sandbox",
    "SandboxFailure": "sandbox",
    "SandboxReport": "sandbox",
    "run_script": "sandbox",
    "ToyVerifier": "toyworld",
    "ToyVerifierConfig": "toyworld",
    "exact_match": "toyworld",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
