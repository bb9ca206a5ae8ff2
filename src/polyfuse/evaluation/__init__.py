"""Greedy evaluation of models on verifiable prompts, and accuracy reports."""

from polyfuse.evaluation.datasets import load_eval_set, load_gsm8k, load_humaneval
from polyfuse.evaluation.evaluate import DomainScore, EvalRecord, EvalResult, default_verifiers, evaluate
from polyfuse.evaluation.report import accuracy_table, load_eval_report, markdown_table, write_eval_report

__all__ = [
    "DomainScore",
    "EvalRecord",
    "EvalResult",
    "accuracy_table",
    "default_verifiers",
    "evaluate",
    "load_eval_report",
    "load_eval_set",
    "load_gsm8k",
    "load_humaneval",
    "markdown_table",
    "write_eval_report",
]
