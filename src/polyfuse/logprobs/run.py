"""The log-prob engine's run (`polyfuse logprobs`, a recipe's `logprobs` stage): score a preference file once
with the initial pivot M0 and every source.

Each model scores the fixed text of every response through its **own** tokenizer and chat template
(the convention of `polyfuse.models.templates`). M0's values become the `ref_*` columns; the sources'
become `fuse_*` lists in the order of `sources`, whose names are recorded in the metadata sidecar
(`<out>.meta.json`): a trainer never infers which source a list position is from position alone.

Length policy: every model's tokenizer measures every pair first (no weights; only the lengths are
kept, the ids are encoded again chunk by chunk while scoring, so memory does not grow with models x
rows x tokens). A model's limit is `max_length`, capped at its context and at what its backend takes
(vLLM's `max_model_len`), all known before anything is scored. A pair too long for *any* model is
dropped for all of them, so the references and the policy score the same pairs; the dropped ids and
the models they were too long for are reported in the metadata.

Work is cut into (model, chunk of rows) shards written atomically: a killed run keeps its finished
shards and scores only the missing ones. Under `accelerate launch` processes take shards in turn.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from polyfuse.config import StrictModel
from polyfuse.data.io import ShardStore, read_metadata, write_metadata, write_rows
from polyfuse.data.schemas import UnpairedRow
from polyfuse.data.sharded import ShardPlan
from polyfuse.errors import ConfigError, DataError
from polyfuse.logprobs.engine import (
    ScoredRow,
    encode_row,
    logp_columns,
    roles_of,
    score_encoded,
    source_roles,
)
from polyfuse.models import load_config, load_tokenizer
from polyfuse.models.forward import DEFAULT_TOKEN_BUDGET, length_limit
from polyfuse.models.records import model_record
from polyfuse.sampling import (
    BACKENDS,
    BackendConfig,
    BackendSettings,
    EngineModel,
    backend_max_length,
    build_backend,
)

# Version of the sequence convention (`polyfuse.models.templates`) the columns were computed with.
CONVENTION = "polyfuse-logps-1"


class LogprobsConfig(StrictModel):
    """`polyfuse logprobs --config` and a recipe's `logprobs` section (one schema). In a recipe the pivot is
    the current pivot (M0: the recipe's pivot, or the model the last training stage made, handed over when
    the stage runs), and `sources` is `true` (the default: the recipe's sources) or `false` (none)."""

    pivot: EngineModel = Field(description="M0 (the SFT checkpoint): the ref_* columns.")
    sources: list[EngineModel] = Field(default_factory=list, description="The fuse_* models, in this order.")
    backend: BackendConfig | None = Field(
        default=None, description="Score every model through this backend instead of its own `backend:` (openai: "
        "without `model`, each model is asked for by its path)."
    )
    token_budget: int = Field(
        default=DEFAULT_TOKEN_BUDGET,
        ge=1,
        description="transformers backend: padded tokens per forward (rows x longest row). On CPU, for models of "
        "100M parameters or more, 1 (one unpadded sequence per forward) is fastest; batching pays on GPUs and "
        "for tiny models.",
    )
    max_length: int | None = Field(default=None, ge=2, description="None: each model's context size.")
    overflow: Literal["drop", "error"] = Field(default="drop", description="A pair longer than max_length: drop it (and count it), or stop.")
    entropy_top_k: int | None = Field(
        default=None, ge=1, description="Unpaired rows on the vllm backend: estimate each source's completion "
        "entropy from the k largest log-probs of each position (the largest error bound goes to the metadata) "
        "instead of all V of them (exact, but V numbers per token leave the engine: slow for large vocabularies). "
        "The transformers backend is always exact.")
    chunk_size: int = Field(default=1024, ge=1, description="Rows per resumable shard.")

    @field_validator("backend")
    @classmethod
    def _one_served_model_per_model(cls, backend: BackendSettings | None, info: ValidationInfo) -> BackendSettings | None:
        """A server serves a model per name: one `model:` for several models would score them all with the same
        served model, silently (identical ref_* and fuse_* columns)."""
        scored = 1 + len(info.data.get("sources") or [])
        if scored > 1 and getattr(backend, "model", None) is not None:
            raise ValueError(f"model {backend.model!r} would score the pivot and every source ({scored} models) with "
                             "the one model the server serves under that name; remove `model` (each model is then "
                             "asked for by its path) or give each model its own backend")
        return backend

    def models(self) -> list[EngineModel]:
        """M0 then the sources, each with the backend it is scored with."""
        models = [self.pivot, *self.sources]
        if self.backend is not None:
            models = [m.model_copy(update={"backend": self.backend}) for m in models]
        return models


class ShardScores(StrictModel):
    id: str
    scores: dict[str, list[float]]  # role -> [S, n] (and the entropy sum [, its error bound] where scored)


def run_logprobs(config: LogprobsConfig, rows: list[ScoredRow], out: str | Path, quiet: bool = False) -> Path:
    """Write `rows` with M0's `ref_*` columns and the sources' `fuse_*` lists to `out` (format by
    suffix), plus its metadata sidecar. Shards live in `<out's folder>/shards-<out's name>/`.

    Preference rows: M0 and every source score every response. Unpaired rows (KTO, CGPO): M0 scores the
    completion and the `kl_completion`; the sources score the completion, with its mean normalised token entropy
    (`fuse_completion_entropy`, CGPO's consensus weights), exact, or estimated from the `entropy_top_k` largest
    log-probs of each position on vLLM, the largest error bound recorded in the metadata."""
    from polyfuse.progress import progress_bar

    models = config.models()
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"model names must be unique, got {labels}")
    if not rows:
        raise DataError("no rows to score")
    unpaired = _row_kind(rows)
    if unpaired:  # the sources' engines start able to give the entropies
        models = [models[0], *(m.model_copy(update={"backend": BACKENDS.get(m.backend.type).logprob_settings(
            m, m.backend, config.entropy_top_k, entropy=True)}) for m in models[1:])]
    out = Path(out)
    roles = [roles_of if k == 0 else source_roles for k in range(len(models))]  # per model: what it scores of a row
    tokenizers = [load_tokenizer(m) for m in models]
    limits = [_limit(m, config.max_length) for m in models]
    lengths: list[list[int]] = [[] for _ in models]  # per model: the longest response's sequence, per row
    modes: list[Counter] = [Counter() for _ in models]  # per model: template modes seen
    for k, tokenizer in enumerate(tokenizers):
        for row in rows:
            responses = encode_row(tokenizer, row, roles[k](row)).values()
            lengths[k].append(max(len(e.input_ids) for e in responses))
            modes[k].update(e.mode for e in responses)

    kept, dropped = [], []
    for i, row in enumerate(rows):
        too_long = [labels[k] for k in range(len(models)) if lengths[k][i] > limits[k]]
        if not too_long:
            kept.append(i)
        elif config.overflow == "error":
            raise DataError(f"row {row.id!r}: longer than max_length for {too_long}")
        else:
            dropped.append({"id": row.id, "models": too_long})

    chunks = [kept[i : i + config.chunk_size] for i in range(0, len(kept), config.chunk_size)]
    keys = [[f"{k:02d}-{labels[k]}-{c:05d}" for c in range(len(chunks))] for k in range(len(models))]
    plan = ShardPlan(len(models), len(chunks))
    store = ShardStore(out.parent / f"shards-{out.name}")
    with progress_bar(disable=quiet or not plan.is_main) as bar:
        for k, spec in enumerate(models):
            todo = [(c, keys[k][c]) for c in plan.todo(k, lambda c, k=k: store.done(keys[k][c]))]
            if not todo:
                continue
            sequences = sum(len(roles[k](rows[i])) for c, _ in todo for i in chunks[c])
            task = bar.add_task(f"log-probs {spec.label}", total=sequences)
            entropy = unpaired and k > 0
            with build_backend(spec) as backend:  # freed before the next model's
                for c, key in todo:
                    scores = score_encoded(
                        lambda sequences, t=task, e=entropy: backend.score(
                            sequences, config.token_budget, lambda n: bar.advance(t, n), entropy=e,
                            entropy_top_k=config.entropy_top_k),
                        [encode_row(tokenizers[k], rows[i], roles[k](rows[i])) for i in chunks[c]],
                    )
                    shard = [ShardScores(id=rows[i].id, scores=s) for i, s in zip(chunks[c], scores, strict=True)]
                    store.write(key, shard, plan.writer)

    def gather() -> None:
        per_model = [[s.scores for s in store.read_all(ShardScores, keys[k])] for k in range(len(models))]
        scored = [_with_columns(rows[i], [scores[n] for scores in per_model]) for n, i in enumerate(kept)]
        write_rows(out, scored)
        records = [model_record(m, tok, seen) for m, tok, seen in zip(models, tokenizers, modes, strict=True)]
        write_metadata(out, {
            "pivot": records[0],
            "sources": records[1:],
            "convention": CONVENTION,
            "backends": {m.label: m.backend.type for m in models},
            "token_budget": config.token_budget,
            "max_length": {label: limit for label, limit in zip(labels, limits, strict=True)},
            "rows": len(scored),
            "dropped": dropped,
            **({"entropy": _entropy_record(models[1:], per_model[1:], config.entropy_top_k)} if unpaired else {}),
        })

    plan.on_main(gather)
    return out


def _row_kind(rows: list[ScoredRow]) -> bool:
    """Whether the rows are unpaired rows (else preference rows); a file of both is refused."""
    kinds = {isinstance(row, UnpairedRow) for row in rows}
    if len(kinds) > 1:
        raise DataError("the rows mix preference rows (chosen / rejected) and unpaired rows (completion / label); "
                        "score each kind in a file of its own")
    return kinds.pop()


def _entropy_record(sources: list[EngineModel], scores: list[list[dict[str, list[float]]]],
                    top_k: int | None) -> dict[str, Any]:
    """How each source's entropy column was computed: exact, or estimated from the top k with the largest error
    bound of a row's mean (the bound of each position's estimate, averaged over the row's tokens)."""
    record: dict[str, Any] = {}
    for model, rows in zip(sources, scores, strict=True):
        bounds = [s[3] / s[1] for row in rows for s in row.values() if len(s) > 3]
        record[model.label] = {"top_k": top_k, "max_error": max(bounds, default=0.0)} if bounds else "exact"
    return record


def _limit(model: EngineModel, max_length: int | None) -> int:
    """The longest pair `model` scores: `max_length`, capped at the model's context and at what its backend
    takes (vLLM's `max_model_len`, 2048 on CPU by default), known before any engine starts."""
    limit = length_limit(load_config(model), max_length)
    backend = backend_max_length(model)
    return limit if backend is None else min(limit, backend)


def _with_columns(row: ScoredRow, scores: list[dict[str, list[float]]]) -> ScoredRow:
    """`ref_*` from M0 (scores[0]); `fuse_*` lists, one entry per source, from the rest (the entropy too, where
    the sources scored one)."""
    update = logp_columns(row.id, scores[0], "ref")
    for role in scores[1] if len(scores) > 1 else ():
        per_source = [logp_columns(row.id, {role: s[role]}, "fuse") for s in scores[1:]]
        for name in per_source[0]:
            update[name] = [columns[name] for columns in per_source]
    return row.model_copy(update=update)


def fusion_sources(path: str | Path, rows: list[ScoredRow]) -> list[str]:
    """The ordered source names of a data file's `fuse_*` columns, from its metadata; refuses a file
    with `fuse_*` columns but no source list, and rows whose lists do not have one value per source."""
    names = [s["name"] for s in read_metadata(path).get("sources", [])]
    fuse_columns = sorted({c for row in rows for c, value in row if c.startswith("fuse_") and value is not None})
    if fuse_columns and not names:
        raise DataError(
            f"{path}: has {fuse_columns} but its metadata ({path}.meta.json) lists no sources; "
            "write it with `polyfuse logprobs`"
        )
    for row in rows:
        for column in fuse_columns:
            value = getattr(row, column, None)
            if not isinstance(value, list) or len(value) != len(names):
                raise DataError(
                    f"{path}: row {row.id!r}: {column} must be a list with one value per source "
                    f"({len(names)}: {names}), got {value!r}"
                )
    return names
