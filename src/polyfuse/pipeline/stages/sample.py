"""Stage `sample`: N responses per prompt from every model, each through its own chat template.

Work is cut into (model, chunk of prompts) shards (`polyfuse.data.sharded`): each is written atomically
once finished, so a killed run resumes with the shards still missing, and under `accelerate launch` the
processes take shards in turn. Each shard's seed depends only on the model, the chunk and the recipe
seed, so the output does not depend on the number of processes.
"""

from __future__ import annotations

import gc
from pathlib import Path

from pydantic import Field

from polyfuse.config import StrictModel
from polyfuse.data.io import ShardStore, read_rows, write_rows
from polyfuse.data.schemas import PromptRow, SampleRow, stable_id
from polyfuse.data.sharded import ShardPlan
from polyfuse.models import ModelSpec, load_model, load_tokenizer
from polyfuse.pipeline.context import STAGES, Context, Stage, paths_in
from polyfuse.progress import progress_bar
from polyfuse.sampling import SamplingParams, get_backend


class SampledModel(ModelSpec):
    """A model and how to sample from it."""

    sampling: SamplingParams = Field(default_factory=SamplingParams)


class SampleConfig(StrictModel):
    models: list[SampledModel] = Field(min_length=1, description="The models to sample from, each with its sampling settings.")
    backend: str = Field(default="transformers", description="The generation engine.")
    batch_size: int = Field(default=32, ge=1, description="Prompts per generate call.")
    chunk_size: int = Field(default=256, ge=1, description="Prompts per resumable shard.")
    seed: int = Field(default=0, description="Seed the shards' sampling seeds derive from.")


def _shard_seed(seed: int, model: str, chunk: int) -> int:
    return int(stable_id("sample", seed, model, chunk), 16) % (2**31)


def run_sample(prompts: list[PromptRow], config: SampleConfig, out_dir: str | Path, quiet: bool = False) -> Path:
    out_dir = Path(out_dir)
    store = ShardStore(out_dir / "shards")
    chunks = [prompts[i : i + config.chunk_size] for i in range(0, len(prompts), config.chunk_size)]
    keys = [[f"{spec.label}-{c:05d}" for c in range(len(chunks))] for spec in config.models]
    plan = ShardPlan(len(config.models), len(chunks))
    backend_cls = get_backend(config.backend)
    with progress_bar(disable=quiet or not plan.is_main) as bar:
        for m, spec in enumerate(config.models):
            todo = [(c, keys[m][c]) for c in plan.todo(m, lambda c, m=m: store.done(keys[m][c]))]
            if not todo:
                continue
            task = bar.add_task(f"sample {spec.label}", total=sum(len(chunks[c]) for c, _ in todo))
            model, tokenizer = load_model(spec), load_tokenizer(spec, padding_side="left")
            backend = backend_cls(model, tokenizer, batch_size=config.batch_size)
            for c, key in todo:
                params = spec.sampling.model_copy(update={"seed": _shard_seed(config.seed, spec.label, c)})
                texts = backend.generate(
                    [p.prompt for p in chunks[c]], params, progress=lambda n, t=task: bar.advance(t, n)
                )
                rows = [
                    SampleRow(
                        **prompt.model_dump(exclude_none=True, exclude={"id"}),
                        id=f"{prompt.id}:{spec.label}:{k}", prompt_id=prompt.id, model=spec.label,
                        sample_index=k, response=text, sampling=params.model_dump(), seed=params.seed,
                    )
                    for prompt, responses in zip(chunks[c], texts, strict=True)
                    for k, text in enumerate(responses)
                ]
                store.write(key, rows)
            del model, backend
            gc.collect()
    out = out_dir / "samples.jsonl"
    plan.on_main(lambda: write_rows(out, store.read_all(SampleRow, [key for row in keys for key in row])))
    return out


class SampleSection(StrictModel):
    """The recipe's `sample` section; the models are the recipe's sources (and, with `include_pivot`, the
    pivot), the seed is the recipe's."""

    backend: str = Field(default="transformers", description="The generation engine.")
    batch_size: int = Field(default=32, ge=1, description="Prompts per generate call.")
    chunk_size: int = Field(default=256, ge=1, description="Prompts per resumable shard.")
    include_pivot: bool = Field(default=False, description="Sample the pivot too (InfiFPO's cross-model pairs).")


@STAGES.register("sample")
class SampleStage(Stage):
    name = "sample"
    position = 20
    section = SampleSection
    section_default = True
    every_process = True
    needs = ("prompts",)

    def sample_config(self, recipe) -> SampleConfig:
        section = recipe.sample
        models = recipe.sources + ([recipe.pivot] if section.include_pivot else [])
        return SampleConfig(models=models, backend=section.backend, batch_size=section.batch_size,
                            chunk_size=section.chunk_size, seed=recipe.seed)

    def inputs(self, ctx: Context) -> dict[str, str]:
        return {"prompts": ctx.output("prompts", "prompts"), **paths_in(self.sample_config(ctx.recipe).model_dump())}

    def run(self, ctx: Context, folder: Path) -> dict[str, str]:
        prompts = read_rows(ctx.output("prompts", "prompts"), PromptRow)
        return {"samples": str(run_sample(prompts, self.sample_config(ctx.recipe), folder, quiet=ctx.quiet))}
