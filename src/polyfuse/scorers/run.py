"""The scoring engine (`polyfuse score`, a recipe's `score` stage): every sample gets a reward from each reward
scorer and a verdict from each verifier that applies to it. Resumable by chunk of samples and data parallel
under `accelerate launch`, like sampling (`polyfuse.data.sharded`)."""

from __future__ import annotations

import gc
from pathlib import Path

from pydantic import Field

from polyfuse.config import StrictModel
from polyfuse.data.io import ShardStore, write_rows
from polyfuse.data.schemas import SampleRow
from polyfuse.data.sharded import ShardPlan
from polyfuse.progress import progress_bar
from polyfuse.scorers.base import ScorerConfig, build_scorer


class ScoreConfig(StrictModel):
    """`polyfuse score --config` and a recipe's `score` section: the scorers and the settings of the run."""

    scorers: list[ScorerConfig] = Field(min_length=1, description="Reward models and verifiers; every one scores every sample of its domains.")
    chunk_size: int = Field(default=1024, ge=1, description="Samples per resumable shard.")
    device: str = Field(default="cpu", description="Device of the reward models.")


def run_score(samples: list[SampleRow], config: ScoreConfig, out_dir: str | Path, quiet: bool = False) -> Path:
    out_dir = Path(out_dir)
    store = ShardStore(out_dir / "shards")
    chunks = [samples[i : i + config.chunk_size] for i in range(0, len(samples), config.chunk_size)]
    keys = [f"scored-{c:05d}" for c in range(len(chunks))]
    plan = ShardPlan(1, len(chunks))
    todo = plan.todo(0, lambda c: store.done(keys[c]))
    if todo:
        scorers = [build_scorer(cfg, device=config.device) for cfg in config.scorers]
        with progress_bar(disable=quiet or not plan.is_main) as bar:
            task = bar.add_task("score", total=sum(len(chunks[c]) for c in todo))
            for c in todo:
                rows = [row.model_copy(deep=True) for row in chunks[c]]
                for scorer in scorers:
                    picked = [row for row in rows if scorer.applies_to(row)]
                    for row, (value, details) in zip(picked, scorer.score(picked), strict=True):
                        if scorer.kind == "reward":
                            row.rewards[scorer.name] = float(value)
                        else:
                            row.verdicts[scorer.name] = bool(value)
                        if details:
                            row.details[scorer.name] = details
                store.write(keys[c], rows, plan.writer)
                bar.advance(task, len(rows))
        del scorers
        gc.collect()
    out = out_dir / "scored.jsonl"
    plan.on_main(lambda: write_rows(out, store.read_all(SampleRow, keys)))
    return out
