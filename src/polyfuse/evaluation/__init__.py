"""Greedy evaluation of models on verifiable prompts (accuracy and gold bits per byte), accuracy reports,
paired comparisons of methods with bootstrap intervals, and experiment files."""

# `evaluate` is named like its module, so it is bound here, where importing the module later cannot rebind it.
from polyfuse.evaluation.evaluate import evaluate as evaluate
from polyfuse.lazy import lazy_exports

_EXPORTS = {
    "load_eval_set": "datasets",
    "load_gsm8k": "datasets",
    "load_humaneval": "datasets",
    "DomainScore": "evaluate",
    "EvalRecord": "evaluate",
    "EvalResult": "evaluate",
    "default_verifier_configs": "evaluate",
    "default_verifiers": "evaluate",
    "gold_bpb": "evaluate",
    "gold_text": "evaluate",
    "judges": "evaluate",
    "records_file": "evaluate",
    "accuracy_table": "report",
    "bpb_table": "report",
    "load_eval_report": "report",
    "markdown_table": "report",
    "write_eval_report": "report",
    "EvalSettings": "run",
    "run_eval": "run",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted([*_EXPORTS, "evaluate"])
