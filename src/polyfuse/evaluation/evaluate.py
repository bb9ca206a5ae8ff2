"""Greedy evaluation: generate one response per prompt, judge it with the verifier for its domain, and
measure the gold answer's bits per byte.

Each prompt is judged by the first verifier (in the order given) whose `applies_to` accepts it. A prompt no
verifier accepts, an empty gold answer, or a gold answer its verifier cannot read is an error, raised
before any model is loaded (never a silent zero). Accuracy is per domain; `average` is the unweighted mean
over domains, `overall` the fraction of all prompts.

**Gold bits per byte** (the evidence protocol's continuous metric): for every prompt with a gold answer,
the gold text (`gold_text`) is teacher-forced through the model's own tokenizer and template by polyfuse's
sequence convention (`polyfuse.models.encode`: its response tokens, the end-of-turn marker and whatever the
template writes after it, are the scored tokens) and scored by the backend (`Backend.greedy_and_score`, so
every backend gives it): `bpb = -(sum of ln p over the scored tokens) / (ln 2 * UTF-8 bytes of the gold text)`.
Lower is better. Generation and scoring batches are cut by a token budget over length-sorted prompts; the
transformers backend runs each prompt through the model once for both its gold answer and its greedy answer
(one KV cache, `polyfuse.models.forward.prefill`), the other backends score, then generate.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from rich.progress import Progress

from polyfuse.data.schemas import PromptRow, SampleRow, stable_id
from polyfuse.errors import UserError
from polyfuse.models import ModelSpec, encode
from polyfuse.models.forward import DEFAULT_TOKEN_BUDGET
from polyfuse.progress import progress_bar
from polyfuse.sampling import Backend, EngineModel, SamplingParams, build_backend
from polyfuse.scorers import SCORERS, Scorer, ScorerSettings, Verifier, build_scorer

_VERIFY_CHUNK = 16  # rows per verifier call: keeps the progress bar moving and code sandboxes parallel
# Padded tokens per batch: prompt + max_new_tokens per row when generating, prompt + gold when scoring.
EVAL_TOKEN_BUDGET = 2 * DEFAULT_TOKEN_BUDGET
_CALCULATOR = re.compile(r"<<.*?>>")  # GSM8K's calculator annotations, `<<48/2=24>>`
_OPERATOR = re.compile(r"\s*([+\-*/=])\s*")
_SPACES = re.compile(r"\s+")


class EvalRecord(BaseModel):
    prompt_id: str
    domain: str
    verifier: str
    response: str
    correct: bool
    bpb: float | None = None  # gold bits per byte; None without a gold answer (or with bpb off)
    details: dict[str, Any] = {}


class DomainScore(BaseModel):
    correct: int
    total: int
    bpb: float | None = None  # mean gold bits per byte over the items that have one

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


class EvalResult(BaseModel):
    model: str
    records: list[EvalRecord]

    @property
    def per_domain(self) -> dict[str, DomainScore]:
        records: dict[str, list[EvalRecord]] = defaultdict(list)
        for record in self.records:
            records[record.domain].append(record)
        scores = {}
        for domain, found in sorted(records.items()):
            bits = [r.bpb for r in found if r.bpb is not None]
            scores[domain] = DomainScore(correct=sum(r.correct for r in found), total=len(found),
                                         bpb=sum(bits) / len(bits) if bits else None)
        return scores

    @property
    def average(self) -> float:
        scores = self.per_domain.values()
        return sum(s.accuracy for s in scores) / len(scores) if scores else 0.0

    @property
    def overall(self) -> float:
        return sum(r.correct for r in self.records) / len(self.records) if self.records else 0.0

    @property
    def average_bpb(self) -> float | None:
        """Mean gold bits per byte over domains, when every domain has it."""
        bits = [s.bpb for s in self.per_domain.values()]
        return sum(bits) / len(bits) if bits and None not in bits else None

    def summary(self) -> dict[str, Any]:
        domains = {d: {"correct": s.correct, "total": s.total, "accuracy": s.accuracy, "bpb": s.bpb}
                   for d, s in self.per_domain.items()}
        return {"per_domain": domains, "average": self.average, "overall": self.overall, "average_bpb": self.average_bpb}


def records_file(out_dir: str | Path, label: str) -> Path:
    """Where an eval report keeps the per-item records of the model labelled `label`."""
    return Path(out_dir) / "records" / (re.sub(r"[^\w.-]+", "_", label) + ".jsonl")


def gold_text(row: PromptRow) -> str | None:
    """The text whose bits per byte are measured; None without a gold answer. The gold answer as given, except
    a GSM8K worked solution (`... #### 72`), written exactly as OLMES's gold-bpb GSM8K task writes it (tested
    on all 1,319 test items): calculator annotations dropped, a full stop closing the work, `So the answer is
    72.` for the marker, spaces around + - * / =, whitespace runs as one space, the first letter upper-case.
    (A HumanEval row's gold is its canonical solution, the body that completes the prompt: `load_humaneval`.)"""
    if row.answer is None or "####" not in row.answer:
        return row.answer
    work, final = row.answer.rsplit("####", 1)
    steps = _CALCULATOR.sub("", work).strip()
    text = f"{steps}{'' if not steps or steps.endswith('.') else '.'} So the answer is {final.strip()}."
    text = _SPACES.sub(" ", _OPERATOR.sub(r" \1 ", text)).strip()
    return text[:1].upper() + text[1:]


def default_verifier_configs(unsafe_local_code: bool = False) -> list[ScorerSettings]:
    """The config of every registered verifier that needs no options (math, code, choice, reasoning_gym, toyworld).
    `unsafe_local_code` runs the code verifier without its sandbox (see `CodeConfig.unsafe_local`)."""
    configs = []
    for name in SCORERS.names():
        scorer = SCORERS.get(name)
        if issubclass(scorer, Verifier) and not any(f.is_required() for f in scorer.Config.model_fields.values()):
            configs.append(scorer.Config(**({"unsafe_local": True} if name == "code" and unsafe_local_code else {})))
    return configs


def default_verifiers(unsafe_local_code: bool = False) -> list[Scorer]:
    """The verifiers of `default_verifier_configs`, built."""
    return [build_scorer(config) for config in default_verifier_configs(unsafe_local_code)]


def _as_sample(prompt: PromptRow, label: str, response: str, params: SamplingParams) -> SampleRow:
    fields = prompt.model_dump()
    fields.update(id=stable_id(prompt.id, label, 0), prompt_id=prompt.id, model=label, sample_index=0,
                  response=response, sampling=params.model_dump(), seed=params.seed)
    return SampleRow(**fields)


def _pick_verifiers(rows: list[SampleRow], verifiers: list[Scorer]) -> list[Scorer]:
    picked, unjudged = [], []
    for row in rows:
        verifier = next((v for v in verifiers if v.applies_to(row)), None)
        picked.append(verifier)
        if verifier is None:
            unjudged.append(f"{row.prompt_id} (domain {row.domain!r})")
    if unjudged:
        names = ", ".join(v.name for v in verifiers) or "none"
        raise UserError(
            f"no verifier applies to {len(unjudged)} prompts, e.g. {', '.join(unjudged[:5])}; "
            f"verifiers given: {names}. Add a verifier for those domains or give rows their answer/tests."
        )
    return picked


@dataclass(frozen=True)
class _Batching:
    """How `evaluate` batches (see its arguments) and whether it measures gold bits per byte."""

    batch_size: int
    token_budget: int
    bpb: bool


def _check_golds(rows: list[SampleRow], picked: list[Scorer]) -> None:
    """An empty gold answer, or one the row's verifier cannot read, is an error before any model runs."""
    problems = []
    for row, verifier in zip(rows, picked, strict=True):
        problem = "empty gold answer" if row.answer is not None and not row.answer.strip() else verifier.gold_problem(row)
        if problem:
            problems.append(f"{row.prompt_id} ({problem})")
    if problems:
        raise UserError(f"{len(problems)} prompts cannot be judged, e.g. {', '.join(problems[:5])}; "
                        "fix or drop them (an unjudgeable item would count as wrong)")


def judges(prompts: list[PromptRow], scorers: list[Scorer]) -> list[Scorer]:
    """The verifier that judges each prompt, after the checks that need no model: every prompt has a verifier,
    no gold answer is empty or unreadable to its verifier, every verifier can run here (the code sandbox).
    A `UserError` names the prompts otherwise; callable before any stage runs (a recipe's check)."""
    rows = [_as_sample(p, "check", "", SamplingParams(n=1, temperature=0.0)) for p in prompts]
    picked = _pick_verifiers(rows, [s for s in scorers if s.kind == "verifier"])
    _check_golds(rows, picked)
    for verifier in {id(v): v for v in picked}.values():
        verifier.require_ready()  # e.g. the code sandbox: refuse before the model is loaded
    return picked


def evaluate(
    model: ModelSpec | Backend,
    prompts: list[PromptRow],
    scorers: list[Scorer],
    batch_size: int = 8,
    max_new_tokens: int = 512,
    label: str | None = None,
    quiet: bool = False,
    bar: Progress | None = None,
    token_budget: int = EVAL_TOKEN_BUDGET,
    bpb: bool = True,
) -> EvalResult:
    """Greedy-decode every prompt with `model`, judge it, and (`bpb`) measure its gold answer's bits per
    byte. `model` is a spec (run through its `backend:`, transformers for a plain `ModelSpec`, built and freed
    here) or a backend the caller built and keeps. `token_budget`: padded tokens per batch where the backend
    batches itself (transformers); `batch_size`: prompts per engine call elsewhere (vLLM, servers).
    `bar`: a progress display to add this model's bars to (one display for several models), else its own."""
    label = label or (model.label if isinstance(model, ModelSpec) else model.spec.label)
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    picked = judges(prompts, scorers)
    batching = _Batching(batch_size, token_budget, bpb)
    if isinstance(model, ModelSpec):
        engine = model if isinstance(model, EngineModel) else EngineModel.model_validate(model.model_dump())
        with build_backend(engine) as backend:
            return _evaluate(backend, prompts, picked, params, batching, label, quiet, bar)
    return _evaluate(model, prompts, picked, params, batching, label, quiet, bar)


def _gold_sequences(backend: Backend, prompts: list[PromptRow]) -> list[tuple[list[int], int] | None]:
    """Each prompt's gold answer as a scored `(ids, prompt length)` sequence through the model's own template
    (`encode`); None without a gold answer."""
    sequences: list[tuple[list[int], int] | None] = []
    for prompt in prompts:
        gold = gold_text(prompt)
        encoded = encode(backend.tokenizer, prompt.prompt, gold) if gold else None
        sequences.append(None if encoded is None else (encoded.input_ids, len(encoded.prompt_ids)))
    return sequences


def _bits(prompts: list[PromptRow], sums: list[tuple[float, ...] | None]) -> list[float | None]:
    """Bits per UTF-8 byte of each gold answer from its summed log-prob (nats)."""
    return [None if found is None else -found[0] / (math.log(2) * len(gold_text(p).encode("utf-8")))
            for p, found in zip(prompts, sums, strict=True)]


def gold_bpb(backend: Backend, prompts: list[PromptRow], token_budget: int = EVAL_TOKEN_BUDGET,
             progress: Callable[[int], None] | None = None) -> list[float | None]:
    """Each prompt's gold bits per byte under `backend`'s model (None without a gold answer), in input order;
    all gold answers share the token-budget batches of one `score` call."""
    golds = _gold_sequences(backend, prompts)
    scored = [i for i, gold in enumerate(golds) if gold is not None]
    sums: list[tuple[float, ...] | None] = [None] * len(prompts)
    for i, found in zip(scored, backend.score([golds[i] for i in scored], token_budget, progress), strict=True):
        sums[i] = found
    return _bits(prompts, sums)


def _evaluate(backend: Backend, prompts: list[PromptRow], picked: list[Scorer], params: SamplingParams,
              batching: _Batching, label: str, quiet: bool, bar: Progress | None) -> EvalResult:
    verdicts: list[tuple[Any, dict[str, Any]]] = [(False, {})] * len(prompts)
    with nullcontext(bar) if bar is not None else progress_bar(disable=quiet) as bar:
        golds = _gold_sequences(backend, prompts) if batching.bpb else [None] * len(prompts)
        scoring = bar.add_task(f"gold bpb {label}", total=sum(gold is not None for gold in golds))
        generating = bar.add_task(f"generate {label}", total=len(prompts))
        # one call for both: the transformers backend prefills each prompt once for its gold answer and its answer
        responses, sums = backend.greedy_and_score(
            [p.prompt for p in prompts], golds, params, batch_size=batching.batch_size,
            token_budget=batching.token_budget, generated=lambda n: bar.advance(generating, n),
            scored=lambda n: bar.advance(scoring, n))
        bits = _bits(prompts, sums)
        rows = [_as_sample(p, label, response, params) for p, response in zip(prompts, responses, strict=True)]
        verifying = bar.add_task(f"verify {label}", total=len(rows))
        for verifier in {id(v): v for v in picked}.values():
            indices = [i for i, v in enumerate(picked) if v is verifier]
            for start in range(0, len(indices), _VERIFY_CHUNK):
                chunk = indices[start : start + _VERIFY_CHUNK]
                for i, verdict in zip(chunk, verifier.score([rows[i] for i in chunk]), strict=True):
                    verdicts[i] = verdict
                bar.advance(verifying, len(chunk))
    records = [
        EvalRecord(prompt_id=row.prompt_id, domain=row.domain, verifier=v.name, response=row.response,
                   correct=bool(verdict[0]), bpb=bit, details=verdict[1])
        for row, v, verdict, bit in zip(rows, picked, verdicts, bits, strict=True)
    ]
    return EvalResult(model=label, records=records)
