"""Greedy evaluation: generate one response per prompt, judge it with the verifier for its domain.

Each prompt is judged by the first verifier (in the order given) whose `applies_to` accepts it; a prompt
no verifier accepts is an error, raised before any model is loaded. Accuracy is per domain; `average`
is the unweighted mean over domains, `overall` the fraction of all prompts.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import nullcontext
from typing import Any

from pydantic import BaseModel
from rich.progress import Progress

from polyfuse.data.schemas import PromptRow, SampleRow, stable_id
from polyfuse.errors import UserError
from polyfuse.models import ModelSpec
from polyfuse.progress import progress_bar
from polyfuse.sampling import Backend, EngineModel, SamplingParams, build_backend
from polyfuse.scorers import SCORERS, Scorer, ScorerSettings, Verifier, build_scorer

_VERIFY_CHUNK = 16  # rows per verifier call: keeps the progress bar moving and code sandboxes parallel


class EvalRecord(BaseModel):
    prompt_id: str
    domain: str
    verifier: str
    response: str
    correct: bool
    details: dict[str, Any] = {}


class DomainScore(BaseModel):
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


class EvalResult(BaseModel):
    model: str
    records: list[EvalRecord]

    @property
    def per_domain(self) -> dict[str, DomainScore]:
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for record in self.records:
            counts[record.domain][0] += record.correct
            counts[record.domain][1] += 1
        return {domain: DomainScore(correct=c, total=t) for domain, (c, t) in sorted(counts.items())}

    @property
    def average(self) -> float:
        scores = self.per_domain.values()
        return sum(s.accuracy for s in scores) / len(scores) if scores else 0.0

    @property
    def overall(self) -> float:
        return sum(r.correct for r in self.records) / len(self.records) if self.records else 0.0

    def summary(self) -> dict[str, Any]:
        domains = {d: {"correct": s.correct, "total": s.total, "accuracy": s.accuracy} for d, s in self.per_domain.items()}
        return {"per_domain": domains, "average": self.average, "overall": self.overall}


def default_verifier_configs(unsafe_local_code: bool = False) -> list[ScorerSettings]:
    """The config of every registered verifier that needs no options (math, code, toyworld).
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


def evaluate(
    model: ModelSpec | Backend,
    prompts: list[PromptRow],
    scorers: list[Scorer],
    batch_size: int = 8,
    max_new_tokens: int = 512,
    label: str | None = None,
    quiet: bool = False,
    bar: Progress | None = None,
) -> EvalResult:
    """Greedy-decode every prompt with `model` and judge it. `model` is a spec (run through its `backend:`,
    transformers for a plain `ModelSpec`, built and freed here) or a backend the caller built and keeps.
    `bar`: a progress display to add this model's bars to (one display for several models), else its own."""
    label = label or (model.label if isinstance(model, ModelSpec) else model.spec.label)
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    verifiers = [s for s in scorers if s.kind == "verifier"]
    picked = _pick_verifiers([_as_sample(p, label, "", params) for p in prompts], verifiers)
    for verifier in {id(v): v for v in picked}.values():
        verifier.require_ready()  # e.g. the code sandbox: refuse before the model is loaded
    if isinstance(model, ModelSpec):
        engine = model if isinstance(model, EngineModel) else EngineModel.model_validate(model.model_dump())
        with build_backend(engine) as backend:
            return _evaluate(backend, prompts, picked, params, batch_size, label, quiet, bar)
    return _evaluate(model, prompts, picked, params, batch_size, label, quiet, bar)


def _evaluate(backend: Backend, prompts: list[PromptRow], picked: list[Scorer], params: SamplingParams,
              batch_size: int, label: str, quiet: bool, bar: Progress | None) -> EvalResult:
    verdicts: list[tuple[Any, dict[str, Any]]] = [(False, {})] * len(prompts)
    with nullcontext(bar) if bar is not None else progress_bar(disable=quiet) as bar:
        generating = bar.add_task(f"generate {label}", total=len(prompts))
        outputs = backend.generate_all([p.prompt for p in prompts], params, batch_size=batch_size,
                                       progress=lambda n: bar.advance(generating, n))
        rows = [_as_sample(p, label, out[0], params) for p, out in zip(prompts, outputs, strict=True)]
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
                   correct=bool(verdict[0]), details=verdict[1])
        for row, v, verdict in zip(rows, picked, verdicts, strict=True)
    ]
    return EvalResult(model=label, records=records)
