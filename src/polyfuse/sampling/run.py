"""The sampling engine (`polyfuse sample`, a recipe's `sample` stage): N responses per prompt from every model,
each through its own chat template and its own backend (`backend:` per model: transformers, vllm, openai).

Work is cut into (model, chunk of prompts) shards (`polyfuse.data.sharded`): each is written atomically
once finished, so a killed run resumes with the shards still missing, and under `accelerate launch` the
processes take shards in turn. Through a server (`backend: openai`) every finished request is also
journaled as it arrives, so a run killed mid-shard resends none of them. Each shard's seed depends only on the model, the
chunk and the recipe seed, and each request's seed on the shard's seed and its position, so the output
does not depend on the number of processes or on where a run was killed. So a shard is a function of its model
(settings and weights), its prompts, its seed and the batch size: with a `ShardCache`, runs that sample the same model
on the same prompts (two recipes that differ only in the pivot's sampling) take each other's finished shards as hard
links instead of sampling them again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pydantic import Field

from polyfuse.config import StrictModel
from polyfuse.data.io import ShardStore, link_or_copy, write_json, write_rows
from polyfuse.data.schemas import PromptRow, SampleRow, stable_id
from polyfuse.data.sharded import ShardPlan
from polyfuse.progress import progress_bar
from polyfuse.sampling.base import SampledModel, SamplingParams, build_backend, request_seed


class SampleConfig(StrictModel):
    """`polyfuse sample --config` and a recipe's `sample` section: the models (in a recipe: its sources, and
    its pivot with `include_pivot`), the seed (in a recipe: its seed) and the settings."""

    recipe_only: ClassVar[tuple[str, ...]] = ("include_pivot",)

    models: list[SampledModel] = Field(min_length=1, description="Each with its sampling settings and backend.")
    batch_size: int = Field(default=32, ge=1, description="Prompts per engine call.")
    chunk_size: int = Field(default=256, ge=1, description="Prompts per resumable shard.")
    seed: int = Field(default=0, description="The shards' and requests' sampling seeds derive from it.")
    include_pivot: bool = Field(default=False, description="Recipe: sample the pivot too.")


def _shard_seed(seed: int, model: str, chunk: int) -> int:
    return int(stable_id("sample", seed, model, chunk), 16) % (2**31)


@dataclass(frozen=True)
class ShardCache:
    """Where finished shards are found by content: `folder` holds one pointer per shard content key, to the shard
    that has it; `model_hashes` are the content hashes of `config.models`' weights, in order (the stage's inputs)."""

    folder: Path
    model_hashes: list[str]

    def pointer(self, spec: SampledModel, weights: str, chunk: list[PromptRow], seed: int, batch_size: int) -> Path:
        blob = json.dumps({"model": spec.model_dump(mode="json"), "weights": weights, "seed": seed,
                           "batch_size": batch_size, "prompts": [p.model_dump(mode="json") for p in chunk]},
                          sort_keys=True)
        return self.folder / f"{hashlib.sha256(blob.encode()).hexdigest()}.json"

    def take(self, pointer: Path, store: ShardStore, key: str) -> bool:
        """Link the shard `pointer` names into `store` as `key` (the shard, then its sidecar, as `store.write`)."""
        if not pointer.is_file():
            return False
        where = json.loads(pointer.read_text())
        source = ShardStore(where["folder"])
        found = source.path(where["key"])
        if not source.done(where["key"]) or found == store.path(key).resolve():  # redone since, or this very shard
            return False
        store.folder.mkdir(parents=True, exist_ok=True)
        for suffix in ("", ".meta.json"):
            target = Path(f"{store.path(key)}{suffix}")
            target.unlink(missing_ok=True)
            link_or_copy(f"{found}{suffix}", target)
        store.journal(key).unlink(missing_ok=True)
        return True


def run_sample(prompts: list[PromptRow], config: SampleConfig, out_dir: str | Path, quiet: bool = False,
               cache: ShardCache | None = None) -> Path:
    out_dir = Path(out_dir)
    store = ShardStore(out_dir / "shards")
    chunks = [prompts[i : i + config.chunk_size] for i in range(0, len(prompts), config.chunk_size)]
    keys = [[f"{spec.label}-{c:05d}" for c in range(len(chunks))] for spec in config.models]
    plan = ShardPlan(len(config.models), len(chunks))

    def pointer(cache: ShardCache, m: int, c: int) -> Path:
        spec = config.models[m]
        return cache.pointer(spec, cache.model_hashes[m], chunks[c], _shard_seed(config.seed, spec.label, c),
                             config.batch_size)

    def finished(m: int, c: int) -> bool:
        return store.done(keys[m][c]) or (cache is not None and cache.take(pointer(cache, m, c), store, keys[m][c]))

    with progress_bar(disable=quiet or not plan.is_main) as bar:
        for m, spec in enumerate(config.models):
            todo = [(c, keys[m][c]) for c in plan.todo(m, lambda c, m=m: finished(m, c))]
            if not todo:
                continue
            task = bar.add_task(f"sample {spec.label}", total=sum(len(chunks[c]) for c, _ in todo))
            with build_backend(spec) as backend:  # freed before the next model's
                for c, key in todo:
                    params = SamplingParams(**spec.sampling.model_dump(), seed=_shard_seed(config.seed, spec.label, c))
                    responses = {record["index"]: record["responses"] for record in store.journaled(key)}
                    bar.advance(task, len(responses))
                    left = [i for i in range(len(chunks[c])) if i not in responses]

                    def done(j: int, texts: list[str], left=left, key=key, responses=responses, task=task,
                             journal=backend.journals_requests) -> None:
                        responses[left[j]] = texts
                        if journal:
                            store.append(key, {"index": left[j], "responses": texts})
                        bar.advance(task, 1)

                    backend.generate([chunks[c][i].prompt for i in left], params, done,
                                     [request_seed(params.seed, i) for i in left], config.batch_size)
                    rows = [
                        SampleRow(
                            **prompt.model_dump(exclude_none=True, exclude={"id"}),
                            id=f"{prompt.id}:{spec.label}:{k}", prompt_id=prompt.id, model=spec.label,
                            sample_index=k, response=text, sampling=params.model_dump(), seed=params.seed,
                        )
                        for i, prompt in enumerate(chunks[c])
                        for k, text in enumerate(responses[i])
                    ]
                    store.write(key, rows, plan.writer)
                    if cache is not None:
                        write_json(pointer(cache, m, c), {"folder": str(store.folder.resolve()), "key": key})
    out = out_dir / "samples.jsonl"
    plan.on_main(lambda: write_rows(out, store.read_all(SampleRow, [key for row in keys for key in row])))
    return out
