"""Greedy evaluation of models on verifiable prompts, and accuracy reports."""

from polyfuse.evaluation.datasets import load_eval_set, load_gsm8k, load_humaneval
from polyfuse.evaluation.evaluate import (
    DomainScore,
    EvalRecord,
    EvalResult,
    default_verifier_configs,
    default_verifiers,
    evaluate,
)
from polyfuse.evaluation.report import accuracy_table, load_eval_report, markdown_table, write_eval_report
from polyfuse.evaluation.run import EvalSettings, run_eval

__all__ = [
    "DomainScore",
    "EvalRecord",
    "EvalResult",
    "EvalSettings",
    "accuracy_table",
    "default_verifier_configs",
    "default_verifiers",
    "evaluate",
    "load_eval_report",
    "load_eval_set",
    "load_gsm8k",
    "load_humaneval",
    "markdown_table",
    "run_eval",
    "write_eval_report",
]
