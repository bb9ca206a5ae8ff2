"""Sampling: every model through its own template, seeded per shard, resumable, and data parallel
under `accelerate launch` with the same rows as one process."""

from __future__ import annotations

import os

import pytest
import yaml

import warm_python
from polyfuse.config import validate
from polyfuse.data import SampleRow, read_rows, write_rows
from polyfuse.data.io import read_metadata, write_metadata
from polyfuse.errors import ConfigError
from polyfuse.sampling import SampleConfig, run_sample
from test_ddp import free_port


def sample_config(world) -> SampleConfig:
    return SampleConfig.model_validate({
        "models": [
            {"name": name, "path": str(path), "sampling": {"n": 2, "temperature": 0.9, "max_new_tokens": 6}}
            for name, path in list(world.source_paths.items())[:2]
        ],
        "chunk_size": 3, "batch_size": 4, "seed": 5,
    })


def test_rows_carry_provenance_and_are_reproducible(tiny_world, tmp_path):
    prompts = tiny_world.prompts("train", per_domain=2)
    config = sample_config(tiny_world)
    rows = read_rows(run_sample(prompts, config, tmp_path / "a", quiet=True), SampleRow)
    assert len(rows) == len(prompts) * 2 * 2
    first = rows[0]
    assert first.id == f"{first.prompt_id}:{first.model}:0"
    assert first.sampling["temperature"] == 0.9 and first.answer is not None
    again = read_rows(run_sample(prompts, config, tmp_path / "b", quiet=True), SampleRow)
    assert [r.response for r in again] == [r.response for r in rows]
    seeds = {(r.model, r.seed) for r in rows}
    assert len(seeds) == 2 * 2  # one seed per (model, chunk): 6 prompts / chunks of 3


def test_a_models_sampling_settings_have_no_seed_of_their_own(tiny_world):
    """The stage's seed (a recipe's seed) decides every shard's seed; a per-model `sampling.seed` would do
    nothing, so it is refused rather than ignored."""
    entry = sample_config(tiny_world).model_dump(mode="json", exclude=set(SampleConfig.recipe_only))
    entry["models"][1]["sampling"]["seed"] = 7
    with pytest.raises(ConfigError, match=r"^config: invalid config\n  models.1.sampling.seed: unknown key \(the keys "
                                          r"here: n, temperature, top_p, repetition_penalty, max_new_tokens, stop\)$"):
        validate(SampleConfig, entry)


def test_finished_shards_are_not_redone(tiny_world, tmp_path):
    prompts = tiny_world.prompts("train", per_domain=2)
    config = sample_config(tiny_world)
    out = tmp_path / "run"
    model = config.models[0].label
    marker = SampleRow(id="x:0", prompt_id="x", model=model, sample_index=0, prompt="p", response="FROM-SHARD")
    write_rows(out / "shards" / f"{model}-00000.jsonl", [marker])
    write_metadata(out / "shards" / f"{model}-00000.jsonl", {"process": 0, "processes": 1})  # finished: shard and sidecar
    rows = read_rows(run_sample(prompts, config, out, quiet=True), SampleRow)
    assert rows[0].response == "FROM-SHARD"
    assert len(rows) == 1 + (len(prompts) - 3) * 2 + len(prompts) * 2


def test_a_shard_cache_shares_a_models_shards_between_runs_by_content(tiny_world, tmp_path):
    """A run that samples a model another run sampled (same settings, weights, prompts, seed) takes its shards as hard
    links; the rows are those of a run without the cache, and a model with other settings is sampled anew."""
    from polyfuse.sampling import ShardCache

    prompts = tiny_world.prompts("train", per_domain=2)
    config = sample_config(tiny_world)
    shared, other = config.models
    plain = read_rows(run_sample(prompts, config, tmp_path / "plain", quiet=True), SampleRow)
    cache = ShardCache(tmp_path / "cache", ["weights-a", "weights-b"])
    run_sample(prompts, config.model_copy(update={"models": [shared]}), tmp_path / "first", quiet=True,
               cache=ShardCache(cache.folder, ["weights-a"]))
    hotter = other.model_copy(update={"sampling": other.sampling.model_copy(update={"temperature": 1.5})})
    for name, second in [("same", other), ("hotter", hotter)]:
        out = tmp_path / name
        rows = read_rows(run_sample(prompts, config.model_copy(update={"models": [shared, second]}), out, quiet=True,
                                    cache=cache), SampleRow)
        linked = [(out / "shards" / f"{shared.label}-{c:05d}.jsonl").stat().st_ino for c in range(2)]
        assert linked == [(tmp_path / "first" / "shards" / f"{shared.label}-{c:05d}.jsonl").stat().st_ino for c in range(2)]
        assert [r.response for r in rows if r.model == shared.label] == [r.response for r in plain if r.model == shared.label]
    assert [r.response for r in rows if r.model == other.label] != [r.response for r in plain if r.model == other.label]
    again = read_rows(run_sample(prompts, config, tmp_path / "again", quiet=True, cache=cache), SampleRow)
    assert [r.model_dump() for r in again] == [r.model_dump() for r in plain]  # "same" sampled the other model too
    assert (tmp_path / "again" / "shards" / f"{other.label}-00000.jsonl").stat().st_ino == (
        tmp_path / "same" / "shards" / f"{other.label}-00000.jsonl").stat().st_ino
    changed = ShardCache(cache.folder, ["weights-a", "other-weights"])  # another checkpoint of the same name
    run_sample(prompts, config, tmp_path / "retrained", quiet=True, cache=changed)
    assert (tmp_path / "retrained" / "shards" / f"{other.label}-00000.jsonl").stat().st_ino != (
        tmp_path / "same" / "shards" / f"{other.label}-00000.jsonl").stat().st_ino


def test_two_processes_give_the_same_rows_as_one(tiny_world, tmp_path):
    prompts = tiny_world.prompts("train", per_domain=2)
    write_rows(tmp_path / "prompts.jsonl", prompts)
    config = sample_config(tiny_world)
    (tmp_path / "sample.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json", exclude=set(config.recipe_only))))
    single = read_rows(run_sample(prompts, config, tmp_path / "single", quiet=True), SampleRow)
    command = [  # the launcher in a warm child (`warm_python`); the processes it starts are new interpreters
        "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "-m", "polyfuse", "sample", "--config", str(tmp_path / "sample.yaml"),
        "--prompts", str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / "ddp"), "--quiet",
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = warm_python.run(command, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    parallel = read_rows(tmp_path / "ddp" / "samples.jsonl", SampleRow)
    assert [r.model_dump() for r in parallel] == [r.model_dump() for r in single]
    shards = (tmp_path / "ddp" / "shards").glob("*.jsonl")
    assert sorted(read_metadata(s)["process"] for s in shards) == [0, 0, 1, 1]  # 4 shards, taken in turn


def test_a_stop_string_ends_the_response_and_is_not_kept(tiny_world):
    """transformers stops at the token that completes a stop string (`stop_strings`), and the response is the text
    before the earliest stop string, as vLLM and OpenAI return it: the greedy text without stop strings, cut."""
    from polyfuse.models import ModelSpec, render_prompt
    from polyfuse.sampling import SamplingParams
    from polyfuse.sampling.transformers_backend import TransformersBackend, TransformersSettings

    backend = TransformersBackend(ModelSpec(path=str(next(iter(tiny_world.source_paths.values())))), TransformersSettings())
    prompts = [p.prompt for p in tiny_world.prompts("train", per_domain=2)]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=16)
    full = backend.generate_all(prompts, greedy)
    first = next(i for i, (text,) in enumerate(full) if len(text) >= 6)
    stop = full[first][0][2:4]  # two characters inside the first long response
    cut = backend.generate_all(prompts, greedy.model_copy(update={"stop": [stop, "never-generated"]}))
    for (whole,), (response,) in zip(full, cut, strict=True):
        assert response == whole.split(stop)[0].strip()
        assert stop not in response
    assert cut != full  # at least the first long response was cut
    # generation itself stopped: the ids end with the token that completed the stop string
    prompt_ids = render_prompt(backend.tokenizer, prompts[first])[0]
    ids = next(backend._sample([prompt_ids], greedy.model_copy(update={"stop": [stop]}), 4, None))[1][0]
    ids = [i for i in ids if i != backend.tokenizer.pad_token_id]
    assert stop in backend.tokenizer.decode(ids, skip_special_tokens=True)
    assert stop not in backend.tokenizer.decode(ids[:-1], skip_special_tokens=True)


def test_stop_must_be_a_list_of_non_empty_strings():
    from polyfuse.sampling.base import SamplingSettings

    assert SamplingSettings(stop=["\n", "User:"]).stop == ["\n", "User:"]
    with pytest.raises(ConfigError, match=r"stop: Input should be a valid list"):
        validate(SamplingSettings, {"stop": "\n"})
    with pytest.raises(ConfigError, match=r"stop\.0: String should have at least 1 character"):
        validate(SamplingSettings, {"stop": [""]})
    assert "stop" not in SamplingSettings().model_dump()  # runs without stop strings keep their fingerprints


def test_one_prefill_for_n_responses_gives_transformers_own_samples(tiny_world):
    """Each prompt is prefilled once (the batch's shared prefix once for all) and its KV cache copied for its n
    responses; the samples are those of transformers' own `generate(num_return_sequences=n)` on the same prompts,
    left-padded, in the same row order and seed (the same random draws, one row per response), with a stop string
    too."""
    import torch

    from polyfuse.models import ModelSpec, render_prompt
    from polyfuse.models.forward import common_prefix, pad_batch
    from polyfuse.sampling import SamplingParams
    from polyfuse.sampling.transformers_backend import TransformersBackend, TransformersSettings

    backend = TransformersBackend(ModelSpec(path=str(next(iter(tiny_world.source_paths.values())))), TransformersSettings())
    prompt_ids = [render_prompt(backend.tokenizer, p.prompt)[0] for p in tiny_world.prompts("train", per_domain=3)]
    assert common_prefix(prompt_ids) > 0  # the template's head: a prefix the prefill shares
    for stop in ([], ["e"]):
        params = SamplingParams(n=3, temperature=1.0, max_new_tokens=8, seed=11, stop=stop)
        ours = dict(backend._sample(prompt_ids, params, batch_size=len(prompt_ids) * 3, token_budget=None))
        (order,) = backend._batches(prompt_ids, [len(p) for p in prompt_ids], len(prompt_ids) * 3, None, n=3)  # one batch
        padded = pad_batch([prompt_ids[i] for i in order], [len(prompt_ids[i]) for i in order], backend.tokenizer.pad_token_id,
                           side="left")
        torch.manual_seed(params.seed)
        with torch.inference_mode():
            out = backend.model.generate(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                                         num_return_sequences=3, **backend._generate_options(params))
        theirs = out[:, padded["input_ids"].shape[1]:].tolist()
        for k, i in enumerate(order):
            assert ours[i] == theirs[3 * k : 3 * k + 3]
        assert len({tuple(seq) for seqs in ours.values() for seq in seqs}) > len(prompt_ids)  # n differ per prompt
