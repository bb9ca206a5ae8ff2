"""`accelerate launch -m polyfuse run` with two processes gives the outputs of one process, rerun after
rerun with changed seeds (every stage's folder is then deleted and redone): the sharded stages split
their work, the single-process stages run once, and folders, manifests, `run.json` and the report are
written by one process, which alone prints the accuracy table."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

import warm_python
from polyfuse.pipeline.demo import recipe_path
from polyfuse.pipeline.recipe import load_recipe
from polyfuse.pipeline.runner import run_recipe
from polyfuse.teacher import open_stores
from test_ddp import free_port
from test_pipeline import tiny_overrides

STAGES = "[prompts, sample, score, pairs, teacher, logprobs, eval]"
FILES = ["prompts/prompts.jsonl", "sample/samples.jsonl", "score/scored.jsonl", "pairs/sft.jsonl",
         "pairs/preference.jsonl", "logprobs/preference.jsonl", "eval/results.json"]


def overrides(cache_dir: Path, seed: int) -> list[str]:
    """The tiny recipe without training, with several shards per model in every sharded stage."""
    return [*tiny_overrides(cache_dir), f"stages={STAGES}", f"seed={seed}", "score.chunk_size=8",
            "teacher={top_k: 4, chunk_size: 3}", "logprobs.sources=true", "logprobs.chunk_size=3",
            "eval.models=[pivot]"]


def outputs(work: Path) -> dict[str, object]:
    found: dict[str, object] = {name: hashlib.sha256((work / name).read_bytes()).hexdigest() for name in FILES}
    for store in open_stores(work / "teacher" / "store"):
        found[f"teacher/{store.name}"] = [
            (key, *(getattr(example, a).tobytes() for a in ("token_ids", "topk_ids", "topk_logits", "token_logps")))
            for key, example in sorted(store.examples())
        ]
    return found


def launch_two(work: Path, extra: list[str]) -> subprocess.CompletedProcess:
    command = [  # the launcher in a warm child (`warm_python`); the processes it starts are new interpreters
        "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "-m", "polyfuse", "run", str(recipe_path("fusechat3-toy.yaml")),
        "--work-dir", str(work), "--quiet", *[a for o in extra for a in ("--set", o)],
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    return warm_python.run(command, env=env, timeout=900)


@pytest.mark.slow
def test_two_processes_rerun_with_changed_seeds_give_the_single_process_outputs(tiny_world, tmp_path):
    cache = tiny_world.root.parent
    parallel = tmp_path / "two-processes"  # one work folder for every rerun: each seed change redoes all
    for seed in (1, 2):  # the second seed changes every stage's inputs: each folder is deleted and redone
        single = tmp_path / f"one-process-{seed}"
        run_recipe(load_recipe(recipe_path("fusechat3-toy.yaml"), overrides(cache, seed)), single, quiet=True)
        result = launch_two(parallel, overrides(cache, seed))
        assert result.returncode == 0, result.stderr[-4000:]
        assert outputs(parallel) == outputs(single), f"seed {seed}"
        assert len(list((parallel / "sample" / "shards").glob("*.jsonl"))) > 2  # really sharded
        assert_one_report_of_this_run(parallel, result, skipped=False)
    before = {p: p.stat().st_mtime_ns for p in parallel.rglob("manifest.json")}
    again = launch_two(parallel, overrides(cache, 2))  # unchanged: every stage is skipped
    assert again.returncode == 0, again.stderr[-4000:]
    assert {p: p.stat().st_mtime_ns for p in parallel.rglob("manifest.json")} == before
    assert_one_report_of_this_run(parallel, again, skipped=True)


def assert_one_report_of_this_run(work: Path, result: subprocess.CompletedProcess, skipped: bool) -> None:
    """One accuracy table and one `done` line, and a report whose wall times are this run's `run.json`: every
    stage ran (a changed seed) or every stage was skipped (a rerun), not an earlier run's times."""
    assert result.stdout.count("Accuracy (%)") == 1 and result.stdout.count("done") == 1, result.stdout
    run, report = (json.loads((work / name).read_text()) for name in ("run.json", "report.json"))
    stages = STAGES.strip("[]").split(", ")
    assert [step for step in run["steps"] if step in stages] == stages
    assert all(run["steps"][stage].get("skipped", False) is skipped for stage in stages), run["steps"]
    assert (report["steps"], report["wall_s"]) == (run["steps"], run["wall_s"])
