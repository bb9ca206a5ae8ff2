"""Backend configs: `backend:` per model is validated with the config, before any model or engine starts,
and a mistake is one line naming the key (exit 2 from the CLI); the sample journal keeps every complete
record across a kill."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from polyfuse.config import validate
from polyfuse.data.io import ShardStore, write_metadata, write_rows
from polyfuse.errors import ConfigError
from polyfuse.pipeline.demo import recipe_path
from polyfuse.pipeline.recipe import load_recipe
from polyfuse.sampling import SampledModel
from polyfuse.sampling.openai_backend import OpenAISettings
from polyfuse.sampling.vllm_backend import VllmSettings, engine_kwargs

SRC = str(Path(__file__).resolve().parents[1] / "src")


def polyfuse(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "polyfuse", *args], capture_output=True, text=True,
                          env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})


def test_a_backend_is_a_name_or_a_mapping_validated_by_its_own_options():
    model = SampledModel.model_validate({"path": "m", "backend": "vllm"})
    assert isinstance(model.backend, VllmSettings) and model.backend.tensor_parallel_size == 1
    model = SampledModel.model_validate({"path": "m", "backend": {"type": "openai", "base_url": "http://h/v1"}})
    assert isinstance(model.backend, OpenAISettings) and model.backend.concurrency == 16
    assert SampledModel(path="m").backend.type == "transformers"
    with pytest.raises(ConfigError, match=r"backend: unknown backend 'vlm'; expected one of: openai, transformers, vllm"):
        validate(SampledModel, {"path": "m", "backend": "vlm"})
    with pytest.raises(ConfigError, match="tensor_parallel"):
        validate(SampledModel, {"path": "m", "backend": {"type": "vllm", "tensor_parallel": 2}})
    with pytest.raises(ConfigError, match="base_url"):
        validate(SampledModel, {"path": "m", "backend": {"type": "openai"}})


def test_vllm_engine_arguments_follow_the_model_and_work_around_chunked_seeded_prefills():
    model = SampledModel.model_validate({"path": "/m", "dtype": "bfloat16", "revision": "r1", "backend": {
        "type": "vllm", "max_num_seqs": 8, "engine_args": {"swap_space": 0}}})
    cpu = engine_kwargs(model, model.backend, on_cpu=True, context=8192)
    assert (cpu["model"], cpu["dtype"], cpu["revision"], cpu["load_format"], cpu["skip_tokenizer_init"]) == (
        "/m", "bfloat16", "r1", "safetensors", True)
    assert (cpu["max_model_len"], cpu["max_num_seqs"], cpu["max_num_batched_tokens"], cpu["enforce_eager"]) == (
        2048, 8, 8 * 2048, True)
    assert cpu["swap_space"] == 0
    gpu = engine_kwargs(model, model.backend, on_cpu=False, context=8192)
    assert "max_model_len" not in gpu and "enforce_eager" not in gpu and gpu["max_num_seqs"] == 8
    stops = model.model_copy(update={"sampling": model.sampling.model_copy(update={"stop": ["\n"]})})
    assert engine_kwargs(stops, model.backend, on_cpu=True, context=8192)["skip_tokenizer_init"] is False  # it detokenizes
    pickles = model.model_copy(update={"allow_pickle": True, "path": "/folder/m"})
    assert "load_format" not in engine_kwargs(pickles, model.backend, on_cpu=True, context=None)


def test_a_journal_keeps_complete_records_and_drops_a_cut_off_line(tmp_path):
    store = ShardStore(tmp_path)
    store.append("m-00000", {"index": 0, "responses": ["a"]})
    store.append("m-00000", {"index": 2, "responses": ["b"]})
    with store.journal("m-00000").open("a") as handle:
        handle.write('{"index": 1, "resp')  # a kill in the middle of a line
    assert store.journaled("m-00000") == [{"index": 0, "responses": ["a"]}, {"index": 2, "responses": ["b"]}]
    store.append("m-00000", {"index": 1, "responses": ["c"]})
    assert [r["index"] for r in store.journaled("m-00000")] == [0, 2, 1]
    store.write("m-00000", [{"id": "x"}], {"process": 0, "processes": 1})
    assert not store.journal("m-00000").exists() and store.done("m-00000")


def test_a_journal_left_beside_its_finished_shard_is_deleted_by_the_next_store(tmp_path):
    """A kill between the shard's sidecar and the journal's deletion leaves both; the shard is complete, so
    the next run's store deletes the journal, and keeps the journal of a shard still missing, or missing its
    sidecar (a kill between the shard and its sidecar: the shard is redone, from its journal)."""
    store = ShardStore(tmp_path)
    for key in ("m-00000", "m-00001", "m-00002"):
        store.append(key, {"index": 0, "responses": ["a"]})
    write_rows(store.path("m-00000"), [{"id": "x"}])  # the shard and its sidecar renamed into place, then the kill
    write_metadata(store.path("m-00000"), {"process": 0, "processes": 1})
    write_rows(store.path("m-00002"), [{"id": "y"}])  # the shard renamed into place, then the kill
    ShardStore(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "m-00000.jsonl", "m-00000.jsonl.meta.json", "m-00001.partial.jsonl", "m-00002.jsonl", "m-00002.partial.jsonl"]
    assert ShardStore(tmp_path).journaled("m-00001") == [{"index": 0, "responses": ["a"]}]
    assert store.done("m-00000") and not store.done("m-00002")


def test_a_trained_pivot_cannot_be_run_by_a_server(tmp_path):
    from polyfuse.config import read_yaml

    recipe = read_yaml(recipe_path("fusechat3-toy.yaml"))
    recipe["pivot"]["backend"] = {"type": "openai", "base_url": "http://127.0.0.1:9/v1"}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match=r"logprobs: the pivot is trained by 'sft' before this stage, and backend 'openai'"):
        load_recipe(tmp_path / "recipe.yaml")
    recipe["logprobs"]["backend"] = "transformers"
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match=r"eval.models: 'sft' is a model this recipe trains"):
        load_recipe(tmp_path / "recipe.yaml")


def test_cli_mistakes_exit_2_with_one_line(tmp_path):
    (tmp_path / "prompts.jsonl").write_text('{"id": "a", "prompt": "hi"}\n')
    (tmp_path / "sample.yaml").write_text(yaml.safe_dump({"models": [{"path": "m", "backend": {"type": "vllm", "tp": 2}}]}))
    result = polyfuse("sample", "-c", str(tmp_path / "sample.yaml"), "--prompts", str(tmp_path / "prompts.jsonl"),
                      "-o", str(tmp_path / "out"))
    assert result.returncode == 2 and "models.0.backend.tp: unknown key" in result.stderr, result.stderr
    (tmp_path / "sample.yaml").write_text(yaml.safe_dump({"models": [{"path": "m"}], "include_pivot": True}))
    result = polyfuse("sample", "-c", str(tmp_path / "sample.yaml"), "--prompts", str(tmp_path / "prompts.jsonl"),
                      "-o", str(tmp_path / "out"))
    assert result.returncode == 2 and "include_pivot: only a recipe's section reads this key" in result.stderr, result.stderr
    (tmp_path / "logprobs.yaml").write_text(yaml.safe_dump({"pivot": {"path": "m"}, "sources": True}))
    result = polyfuse("logprobs", "-c", str(tmp_path / "logprobs.yaml"), "--data", str(tmp_path / "prompts.jsonl"),
                      "-o", str(tmp_path / "out.jsonl"))
    assert result.returncode == 2 and "sources: Input should be a valid list" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.jsonl").exists()


def test_one_served_model_cannot_score_several_models(tmp_path):
    """`logprobs.backend` with `model:` would send the pivot's and every source's sequences to the one model the
    server serves under that name (identical ref_* and fuse_* columns): refused in a command's config and in a
    recipe, allowed for a pivot alone, and without `model:` (each model asked for by its path)."""
    from polyfuse.config import read_yaml
    from polyfuse.logprobs import LogprobsConfig

    served = {"type": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "llama-70b"}
    refusal = (r"backend: model 'llama-70b' would score the pivot and every source \({} models\) with the one model the "
               r"server serves under that name; remove `model`")
    config = {"pivot": {"path": "p"}, "sources": [{"path": "a"}, {"path": "b"}], "backend": served}
    with pytest.raises(ConfigError, match=refusal.format(3)):
        validate(LogprobsConfig, config)
    assert validate(LogprobsConfig, {"pivot": {"path": "p"}, "backend": served}).backend.model == "llama-70b"
    unnamed = validate(LogprobsConfig, {**config, "backend": {**served, "model": None}})
    assert [m.backend.model for m in unnamed.models()] == [None] * 3

    recipe = read_yaml(recipe_path("infifpo-toy.yaml"))
    recipe["logprobs"]["backend"] = served
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match="logprobs." + refusal.format(4)):  # the recipe's pivot and 3 sources
        load_recipe(tmp_path / "recipe.yaml")


def test_the_openai_backend_refuses_source_entropies_in_one_line(tiny_world):
    """A server returns a few log-probs per position, not the distribution CGPO's consensus entropy needs."""
    from polyfuse.models import ModelSpec
    from polyfuse.sampling.openai_backend import OpenAIBackend

    backend = OpenAIBackend(ModelSpec(name="src", path=str(tiny_world.pivot_path)), OpenAISettings(base_url="http://127.0.0.1:9/v1"))
    with pytest.raises(ConfigError, match="src: backend openai cannot give source completion entropies"):
        backend.score([([1, 2, 3], 1)], entropy=True)
    with pytest.raises(ConfigError, match="src: backend openai cannot give source completion entropies"):
        OpenAIBackend.logprob_settings(backend.spec, backend.config, None, entropy=True)  # the log-prob stage asks before any engine starts
