"""The `openai` backend against a real vLLM OpenAI-compatible server, started here on 127.0.0.1 from the vLLM
venv (`python -m vllm.entrypoints.openai.api_server`; the `vllm serve` console script does not work with the
CPU wheel) and stopped by its process id. It serves the tiny toy world's `llama-compare` source.

- The FuseChat-3.0 toy recipe runs end to end with its source sampled, scored (prompt log-probs through
  the server, equal to the transformers path) and evaluated through `backend: openai`.
- `polyfuse sample` killed mid-run and run again resends none of the requests it had journaled, loses and
  duplicates no row, and gives the rows of an uninterrupted run (per-request seeds).
- The chat endpoint (the server's template) answers as the completions endpoint (polyfuse's rendering).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

import warm_python
from conftest import engine_env
from polyfuse.config import apply_overrides, read_yaml
from polyfuse.data import PreferenceRow, SampleRow, read_rows, write_rows
from polyfuse.logprobs import column_names, compute_reference_logps
from polyfuse.models import ModelSpec, load_model, load_tokenizer
from polyfuse.pipeline.demo import recipe_path
from polyfuse.pipeline.recipe import load_recipe
from polyfuse.pipeline.runner import run_recipe
from polyfuse.sampling import SampledModel, SamplingParams, build_backend
from test_ddp import free_port
from test_engines import assert_gold_bpb_of_transformers
from test_pipeline import tiny_overrides
from warm_python import ServedChild

SERVED = "llama-compare"


class Server:
    def __init__(self, process: ServedChild, url: str, started_s: float):
        self.process, self.url, self.started_s = process, url, started_s

    def log(self) -> str:
        """What the server printed so far (its last 4,000 characters)."""
        return (self.process.stdout() + self.process.stderr())[-4000:]

    def metric(self, name: str) -> float:
        """The sum of a Prometheus counter or gauge of the server over its labels."""
        text = urllib.request.urlopen(self.url.removesuffix("/v1") + "/metrics", timeout=10).read().decode()
        return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))

    def finished_requests(self) -> float:
        """Requests the server finished, once none is running any more."""
        for _ in range(300):
            if self.metric("vllm:num_requests_running") == 0 and self.metric("vllm:num_requests_waiting") == 0:
                break
            time.sleep(0.1)
        return self.metric("vllm:request_success_total")


@contextlib.contextmanager
def vllm_server(warm_vllm, model: Path, served: str, *options: str) -> Iterator[Server]:
    """A vLLM OpenAI-compatible server of `model` on a free port of 127.0.0.1, in the vLLM venv (a child of its fork
    server, `warm_vllm`: vLLM imported, as is its engine process, forked from it); stopped with the engine
    process it started on exit."""
    port = free_port()
    command = ["-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name", served, "--host",
               "127.0.0.1", "--port", port, "--dtype", "float32", "--enforce-eager", *options]
    cores = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    start = time.perf_counter()
    process = warm_vllm.start(command, env=engine_env(VLLM_CPU_OMP_THREADS_BIND=cores))
    server = Server(process, f"http://127.0.0.1:{port}/v1", 0.0)
    try:
        while True:
            assert process.poll() is None, f"the vLLM server exited:\n{server.log()}"
            assert time.perf_counter() - start < 600, f"no /health after 600 s:\n{server.log()}"
            try:
                if urllib.request.urlopen(server.url.removesuffix("/v1") + "/health", timeout=5).status == 200:
                    break
            except OSError:
                time.sleep(1)
        server.started_s = time.perf_counter() - start
        print(f"\nvLLM server answered /health after {server.started_s:.0f} s")
        yield server
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server and the engine process it started
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=60)  # then SIGKILL


@pytest.fixture(scope="module")
def toy_server(warm_vllm, tiny_world):
    with vllm_server(warm_vllm, tiny_world.source_paths[SERVED], SERVED, "--max-model-len", "128",
                     "--max-num-seqs", "16",
                     "--max-num-batched-tokens", "2048",  # >= max-num-seqs x max-model-len: seeded prefills never split
                     ) as server:
        yield server


def served_source(server: Server, **options) -> dict:
    return {"type": "openai", "base_url": server.url, "model": SERVED, **options}


def test_fusechat_toy_recipe_through_a_vllm_server(toy_server, tiny_world, tmp_path):
    recipe = apply_overrides(read_yaml(recipe_path("fusechat3-toy.yaml")), [
        *tiny_overrides(tiny_world.root.parent), "prompts.toyworld.per_domain=4", "eval.prompts.toyworld.per_domain=2",
        "logprobs.sources=true", f"work_dir={tmp_path / 'work'}",
    ])
    recipe["sources"] = [{**s, "backend": served_source(toy_server)} for s in recipe["sources"] if s["name"] == SERVED]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    before = toy_server.finished_requests()
    run_recipe(load_recipe(tmp_path / "recipe.yaml"), quiet=True)
    work = tmp_path / "work"
    samples = read_rows(work / "sample" / "samples.jsonl", SampleRow)
    prompts = len((work / "prompts" / "prompts.jsonl").read_text().splitlines())
    assert {s.model for s in samples} == {SERVED} and len(samples) == prompts * 4
    scored = read_rows(work / "logprobs" / "preference.jsonl", PreferenceRow)
    assert toy_server.finished_requests() - before >= 4 * prompts + 2 * len(scored)  # sampled (n=4) and scored there
    source = ModelSpec(name=SERVED, path=str(tiny_world.source_paths[SERVED]))
    expected = compute_reference_logps(load_model(source), load_tokenizer(source), scored)
    for row, ref in zip(scored, expected, strict=True):
        for role in ("chosen", "rejected"):
            total, _, count = column_names(role, "fuse")
            ref_total, _, ref_count = column_names(role)
            assert getattr(row, count)[0] == getattr(ref, ref_count)
            assert abs(getattr(row, total)[0] - getattr(ref, ref_total)) <= 1e-4 * getattr(ref, ref_count)
    assert SERVED in json.loads((work / "eval" / "results.json").read_text())
    assert_gold_bpb_of_transformers(work / "eval", SERVED, source)  # through the server's echoed log-probs


def test_a_killed_client_resends_nothing_it_has(toy_server, tiny_world, tmp_path):
    prompts = tiny_world.prompts("train", per_domain=30)[:64]
    write_rows(tmp_path / "prompts.jsonl", prompts)
    config = {"models": [{"name": SERVED, "path": str(tiny_world.source_paths[SERVED]),
                          "backend": served_source(toy_server, concurrency=2),
                          "sampling": {"n": 2, "temperature": 0.9, "max_new_tokens": 16}}],
              "chunk_size": 64, "seed": 3}
    (tmp_path / "sample.yaml").write_text(yaml.safe_dump(config))

    def command(out: str) -> list[str]:  # `python -m polyfuse sample ...` in a warm child (`warm_python`)
        return ["-m", "polyfuse", "sample", "--config", tmp_path / "sample.yaml", "--prompts", tmp_path / "prompts.jsonl",
                "--out", tmp_path / out, "--quiet"]

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    done = warm_python.run(command("whole"), env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    whole = read_rows(tmp_path / "whole" / "samples.jsonl", SampleRow)

    journal = tmp_path / "killed" / "shards" / f"{SERVED}-00000.partial.jsonl"
    client = warm_python.start(command("killed"), env=env)
    while not journal.exists() or journal.read_text().count("\n") < 16:
        assert client.poll() is None, "the client finished before it could be killed"
        time.sleep(0.02)
    client.kill()  # SIGKILL
    kept = journal.read_bytes().count(b"\n")  # complete records; a cut-off last line is redone
    before = toy_server.finished_requests()
    done = warm_python.run(command("killed"), env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert toy_server.finished_requests() - before == 2 * (len(prompts) - kept)  # vLLM counts each of n=2
    resumed = read_rows(tmp_path / "killed" / "samples.jsonl", SampleRow)
    assert len(resumed) == 2 * len(prompts) and len({r.id for r in resumed}) == len(resumed)
    assert [r.model_dump() for r in resumed] == [r.model_dump() for r in whole]  # per-request seeds
    assert not journal.exists()


def test_the_chat_endpoint_leaves_the_prompt_to_the_server_template(toy_server, tiny_world):
    """`endpoint: chat` sends messages and the server applies its chat template; for a model whose template
    polyfuse renders the same way, greedy answers are those of the completions endpoint (token ids)."""
    prompts = [p.prompt for p in tiny_world.prompts("heldout", per_domain=2)]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    base = {"name": SERVED, "path": str(tiny_world.source_paths[SERVED])}
    answers = []
    for endpoint in ("completions", "chat"):
        model = SampledModel.model_validate({**base, "backend": served_source(toy_server, endpoint=endpoint)})
        with build_backend(model) as backend:
            answers.append(backend.generate_all(prompts, greedy))
    assert answers[1] == answers[0]
