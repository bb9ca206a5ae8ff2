"""`polyfuse teacher`: run every model once over the training texts and store its top-K outputs.

Each model reads the same (prompt, response) rows through its **own** tokenizer and chat template; only
response positions are kept (`store.py` describes what is stored). The LM head runs on those positions
only, chunk by chunk, so the full-vocabulary logits never exceed one chunk (as in the log-prob engine).

Work is cut into (model, chunk of rows) shards, each written atomically: a killed run keeps its finished
shards and computes only the missing ones, and under `accelerate launch` the processes take shards in
turn. A model's folder records a fingerprint (model hash, data, settings); a rerun with other data or
settings starts that model over, and leaves the other models' outputs alone. Rows longer than a model's
`max_length` are left out for that model only (listed in its manifest); training then uses the other
teachers, or the gold tokens alone, for them.
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from polyfuse.config import StrictModel
from polyfuse.data.io import remove_stale_temporaries, write_json
from polyfuse.data.schemas import SFTRow, response_text
from polyfuse.data.sharded import ShardPlan
from polyfuse.errors import ConfigError, DataError
from polyfuse.lazy import lazy_import
from polyfuse.models import ModelSpec, encode, load_config, load_model, load_tokenizer
from polyfuse.models.forward import (
    DEFAULT_TOKEN_BUDGET,
    checked_response_topk,
    length_limit,
    pad_token_id,
    padded_batches,
)
from polyfuse.models.records import model_record
from polyfuse.teacher.store import FORMAT, TeacherExample, text_hash, write_shard

np = lazy_import("numpy")
torch = lazy_import("torch")


class TeacherConfig(StrictModel):
    """`polyfuse teacher --config` and a recipe's `teacher` section: the models and the settings of the run,
    plus two keys only a recipe reads."""

    recipe_only: ClassVar[tuple[str, ...]] = ("include_pivot", "data")

    models: list[ModelSpec] = Field(
        min_length=1, description="The teachers; in a recipe: default its sources. FuseLLM's MinCE also runs the pivot."
    )
    top_k: int = Field(default=10, ge=1, description="Logits kept per response position.")
    token_budget: int = Field(
        default=DEFAULT_TOKEN_BUDGET, ge=1, description="Padded tokens per forward; 1 is fastest on CPU."
    )
    max_length: int | None = Field(default=None, ge=2, description="None: each model's context size.")
    chunk_size: int = Field(default=1000, ge=1, description="Examples per shard (the unit of resumption).")
    include_pivot: bool = Field(
        default=False, description="Recipe: the current pivot runs too, first (FuseLLM / FuseChat candidates)."
    )
    data: str | None = Field(default=None, description="Recipe: SFT rows (TRL prompt/completion); default: the pairs stage's.")

    def settings(self) -> dict[str, Any]:
        """What a model's stored outputs depend on besides the model and the rows (in its fingerprint): every
        key but the models and the recipe's own."""
        return self.model_dump(exclude={"models", *self.recipe_only})


def row_hashes(rows: list[SFTRow]) -> dict[str, str]:
    return {row.id: text_hash(row.prompt, response_text(row.completion)) for row in rows}


def _score_chunk(model: Any, tokenizer: Any, encoded: list[tuple[str, Any, list]], config: TeacherConfig,
                 head_only: bool | None, advance) -> tuple[dict[str, TeacherExample], bool | None]:
    """The examples of one chunk, and whether the head-only path reproduces the model's own forward (decided
    on the first batch of the run, as in the log-prob engine; None until a batch was scored)."""
    sequences = [(e.input_ids, len(e.prompt_ids)) for _, e, _ in encoded]
    results: dict[int, TeacherExample] = {}
    model.eval()
    with torch.inference_mode():
        for indices, batch in padded_batches(model, sequences, pad_token_id(tokenizer), config.token_budget):
            outputs, rows, head_only = checked_response_topk(model, batch, config.top_k, head_only)
            rows = rows.cpu()
            for position, index in enumerate(indices):
                mine = rows == position
                _, enc, spans = encoded[index]
                results[index] = TeacherExample(
                    token_ids=np.asarray(enc.response_ids, dtype=np.int32),
                    spans=np.asarray([s if s is not None else (-1, -1) for s in spans], dtype=np.int32).reshape(-1, 2),
                    topk_ids=outputs["topk_ids"][mine].cpu().numpy().astype(np.int32),
                    topk_logits=outputs["topk_logits"][mine].cpu().numpy().astype(np.float16),
                    std=outputs["std"][mine].cpu().numpy().astype(np.float32),
                    logsumexp=outputs["logsumexp"][mine].cpu().numpy().astype(np.float32),
                    token_logps=outputs["token_logps"][mine].cpu().numpy().astype(np.float32),
                )
            advance(len(indices))
    return {encoded[i][0]: results[i] for i in range(len(encoded))}, head_only


def spans_if_fast(tokenizer: Any, prompt: Any, response: str) -> tuple[Any, list]:
    """`encode()`'s ids with their character spans; a slow tokenizer has no offsets, so its spans are all
    None and training aligns it by the edit-distance DP instead (`polyfuse.teacher.targets`)."""
    from polyfuse.alignment import response_spans

    if getattr(tokenizer, "is_fast", False):
        return response_spans(tokenizer, prompt, response)
    encoded = encode(tokenizer, prompt, response)
    return encoded, [None] * len(encoded.response_ids)


def _fingerprint(record: dict[str, Any], config: TeacherConfig, data: str) -> str:
    blob = json.dumps({"model": record["hash"], "settings": config.settings(), "data": data, "format": FORMAT},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def run_teacher(rows: list[SFTRow], config: TeacherConfig, out: str | Path, quiet: bool = False) -> Path:
    """Write the top-K outputs of every model of `config` on `rows` under `out/<model name>/`; resumable,
    data parallel."""
    from polyfuse.progress import progress_bar

    models = config.models
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"model names must be unique, got {labels}")
    if not rows:
        raise DataError("no training rows to run the teachers on")
    out = Path(out)
    hashes = row_hashes(rows)
    data = hashlib.sha256(json.dumps(hashes).encode()).hexdigest()
    chunks = [rows[i : i + config.chunk_size] for i in range(0, len(rows), config.chunk_size)]
    plan = ShardPlan(len(models), len(chunks))
    with progress_bar(disable=quiet or not plan.is_main) as bar:
        for k, spec in enumerate(models):
            folder = out / spec.label
            tokenizer = load_tokenizer(spec)
            limit = length_limit(load_config(spec), config.max_length)
            modes = Counter(  # the template mode, from a sample of rows
                encode(tokenizer, row.prompt, response_text(row.completion)).mode for row in rows[:50]
            )
            record = {**model_record(spec, tokenizer, modes), "offsets": bool(getattr(tokenizer, "is_fast", False))}
            fingerprint = _fingerprint(record, config, data)
            plan.on_main(lambda: _start_folder(folder, fingerprint))  # noqa: B023  (called at once)
            todo = plan.todo(k, lambda c: _shard(folder, c).exists())  # noqa: B023
            model, head_only = None, None
            task = bar.add_task(f"teacher {spec.label}", total=sum(len(chunks[c]) for c in todo))
            for c in todo:
                encoded = []
                for row in chunks[c]:
                    enc, spans = spans_if_fast(tokenizer, row.prompt, response_text(row.completion))
                    if len(enc.input_ids) <= limit:
                        encoded.append((row.id, enc, spans))
                model = model if model is not None else load_model(spec)
                examples, head_only = _score_chunk(model, tokenizer, encoded, config, head_only,
                                                   lambda n, t=task: bar.advance(t, n))
                write_shard(_shard(folder, c), examples)
            del model
            gc.collect()
            plan.on_main(lambda: _finish_folder(folder, fingerprint, record, config, hashes, len(chunks)))  # noqa: B023
    return out


def _shard(folder: Path, chunk: int) -> Path:
    return folder / f"shard-{chunk:05d}.npz"


def _start_folder(folder: Path, fingerprint: str) -> None:
    """Keep a folder computed with the same fingerprint (resume); start over for anything else."""
    manifest = folder / "manifest.json"
    if folder.exists() and (not manifest.exists() or json.loads(manifest.read_text()).get("fingerprint") != fingerprint):
        shutil.rmtree(folder)
    remove_stale_temporaries(folder)  # shards whose writer was killed before its rename
    if not manifest.exists():
        write_json(manifest, {"format": FORMAT, "fingerprint": fingerprint, "complete": False})


def _finish_folder(folder: Path, fingerprint: str, record: dict[str, Any], config: TeacherConfig,
                   hashes: dict[str, str], n_chunks: int) -> None:
    shards = [_shard(folder, c) for c in range(n_chunks)]
    stored: list[str] = []
    positions = 0
    for shard in shards:
        with np.load(shard, allow_pickle=False) as arrays:
            stored.extend(arrays["example_ids"].tolist())
            positions += int(arrays["offsets"][-1])
    kept = set(stored)
    size = sum(s.stat().st_size for s in shards)
    write_json(folder / "manifest.json", {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "complete": True,
        "model": record,
        "top_k": config.top_k,
        "settings": config.settings(),
        "shards": [s.name for s in shards],
        "examples": {i: hashes[i] for i in stored},  # id -> text hash, checked against the training rows
        "dropped": [i for i in hashes if i not in kept],
        "positions": positions,
        "bytes": size,
        "bytes_per_position": size / max(positions, 1),
    })
