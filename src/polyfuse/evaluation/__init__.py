"""Greedy evaluation of models on verifiable prompts (accuracy and gold bits per byte), accuracy reports,
paired comparisons of methods with bootstrap intervals, and experiment files."""

# `evaluate` is named like its module, so it is bound here, where importing the module later cannot rebind it.
from polyfuse.evaluation.evaluate import evaluate as evaluate
from polyfuse.lazy import lazy_exports

_EXPORTS = {  # module -> the names it gives the package
    "datasets": ("load_eval_set", "load_gsm8k", "load_humaneval"),
    "evaluate": ("DomainScore", "EvalRecord", "EvalResult", "default_verifier_configs", "default_verifiers", "gold_bpb", "gold_text", "judges", "records_file"),
    "report": ("accuracy_table", "bpb_table", "load_eval_report", "markdown_table", "write_eval_report"),
    "run": ("EvalSettings", "run_eval"),
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(["evaluate", *(name for names in _EXPORTS.values() for name in names)])
