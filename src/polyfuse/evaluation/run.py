"""The evaluation engine (`polyfuse eval`, a recipe's `eval` stage): greedy accuracy and gold bits per byte of
several models on one prompt set, written as tables, JSON, PNG and per-item records (what `polyfuse compare`
reads)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from polyfuse.config import StrictModel
from polyfuse.data.io import write_rows
from polyfuse.data.schemas import PromptRow
from polyfuse.evaluation.evaluate import EVAL_TOKEN_BUDGET, EvalResult, default_verifiers, evaluate
from polyfuse.models import ModelSpec
from polyfuse.progress import progress_bar
from polyfuse.scorers import ScorerConfig, build_scorer

DEFAULT_NEW_TOKENS = 256  # GSM8K-style reasoning fits; toy answers and HumanEval bodies get their own (EvalSection)


class EvalSettings(StrictModel):
    """What an evaluation runs with besides the models and the prompts."""

    scorers: list[ScorerConfig] | None = Field(
        default=None, description="The verifiers that grade (a reward model gives no accuracy); None: every "
        "registered verifier that needs no options (math, code, toyworld). In a recipe: default the verifiers of "
        "its score section.")
    batch_size: int = Field(default=64, ge=1, description="Prompts per engine call (vLLM, servers); the "
                            "transformers backend batches by token_budget.")
    token_budget: int = Field(default=EVAL_TOKEN_BUDGET, ge=1, description="transformers: padded tokens per batch "
                              "over length-sorted prompts (prompt + max_new_tokens per row when generating, prompt + "
                              "gold answer when scoring).")
    max_new_tokens: int | None = Field(default=None, ge=1, description="Generation budget per prompt (greedy); "
                                       "None: 32 for toy-world prompts, 512 for HumanEval, else 256.")
    bpb: bool = Field(default=True, description="Measure every gold answer's bits per byte (teacher-forced through "
                      "each model's template).")


def run_eval(models: dict[str, ModelSpec], prompts: list[PromptRow], settings: EvalSettings, out_dir: str | Path,
             quiet: bool = False, sources: set[str] | None = None) -> dict[str, EvalResult]:
    """Evaluate every model (row label -> model) on `prompts` and write the report into `out_dir` (the prompts
    too, as `prompts.jsonl`); `sources` names the source models, drawn apart in the chart."""
    from polyfuse.evaluation.report import write_eval_report  # numpy, matplotlib: not for `polyfuse --help`

    out_dir = Path(out_dir)
    write_rows(out_dir / "prompts.jsonl", prompts)
    scorers = default_verifiers() if settings.scorers is None else [build_scorer(c) for c in settings.scorers]
    with progress_bar(disable=quiet) as bar:  # one display, two bars per model
        results = {
            label: evaluate(spec, prompts, scorers, batch_size=settings.batch_size, label=label, bar=bar,
                            max_new_tokens=settings.max_new_tokens or DEFAULT_NEW_TOKENS,
                            token_budget=settings.token_budget, bpb=settings.bpb)
            for label, spec in models.items()
        }
    write_eval_report(results, out_dir, sources=sources)
    return results
