"""Greedy evaluation of models on verifiable prompts (accuracy and gold bits per byte), accuracy reports,
paired comparisons of methods with bootstrap intervals, and experiment files."""

from polyfuse.evaluation.datasets import load_eval_set, load_gsm8k, load_humaneval
from polyfuse.evaluation.evaluate import (
    DomainScore,
    EvalRecord,
    EvalResult,
    default_verifier_configs,
    default_verifiers,
    evaluate,
    gold_bpb,
    gold_text,
    judges,
    records_file,
)
from polyfuse.evaluation.report import (
    accuracy_table,
    bpb_table,
    load_eval_report,
    markdown_table,
    write_eval_report,
)
from polyfuse.evaluation.run import EvalSettings, run_eval

__all__ = [
    "DomainScore",
    "EvalRecord",
    "EvalResult",
    "EvalSettings",
    "accuracy_table",
    "bpb_table",
    "default_verifier_configs",
    "default_verifiers",
    "evaluate",
    "gold_bpb",
    "gold_text",
    "judges",
    "load_eval_report",
    "load_eval_set",
    "load_gsm8k",
    "load_humaneval",
    "markdown_table",
    "records_file",
    "run_eval",
    "write_eval_report",
]
