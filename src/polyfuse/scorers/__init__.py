"""Scorers: reward models (a number per response) and verifiers (pass/fail per response).

Built-in: `reward_model`, `math`, `code`, `choice` (multiple choice), `reasoning_gym` (a family's own
`score_answer`) and `toyworld` (the toy world's exact-match verifier); `SCORERS`
imports every module of this package on its first lookup, so a new scorer is one file here.
"""

from polyfuse.lazy import lazy_exports

_EXPORTS = {  # module -> the names it gives the package
    "base": ("SCORERS", "Scorer", "ScorerConfig", "ScorerSettings", "Verifier", "build_scorer", "parse_scorer_config", "unjudged"),
    "code_tests": ("CodeConfig", "CodeVerifier"),
    "math_answer": ("MathConfig", "MathVerifier"),
    "reward_model": ("RewardModelConfig", "RewardModelScorer"),
    "run": ("ScoreConfig", "run_score"),
    "sandbox": ("Limits", "Sandbox", "SandboxFailure", "SandboxReport", "run_script"),
    "toyworld": ("ToyVerifier", "ToyVerifierConfig", "exact_match"),
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
