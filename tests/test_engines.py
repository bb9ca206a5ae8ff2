"""The vLLM backend against the real offline engine (vLLM's CPU build, in its own venv: `vllm_python`).

One engine start on SmolLM2-135M-Instruct does several checks (tests/engine_checks.py): greedy responses
against the transformers backend on the same prompts, seeded sampling reproducible, sequence log-probs
equal to the transformers path. Then the FuseChat-3.0 toy recipe runs end to end with every source
sampled (and scored, and evaluated) through `backend: vllm`.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import engine_env
from polyfuse.data import PreferenceRow, SampleRow, read_rows, write_rows
from polyfuse.data.io import read_metadata
from polyfuse.logprobs import compute_reference_logps, encode_row
from polyfuse.models import ModelSpec, encode, load_model, load_tokenizer
from polyfuse.models.forward import pad_token_id, score_sequences
from polyfuse.models.templates import cut_at_stop
from polyfuse.pipeline.demo import recipe_path
from polyfuse.sampling import SamplingParams
from polyfuse.sampling.transformers_backend import TransformersBackend, TransformersSettings
from test_gguf import CHAT
from test_pipeline import tiny_overrides

GREEDY = [
    "What is the capital of France?", "Name three primary colours.", "What is 12 times 12?",
    "Write a haiku about the sea.", "Who wrote Hamlet?", "Explain photosynthesis in one sentence.",
    "What is the boiling point of water in Celsius?", "Give me a synonym for happy.",
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Largest planet?"}],
    "Translate 'good morning' into Spanish.", "How many legs does a spider have?", "What colour is the sky on a clear day?",
]
SCORED = [
    ("What is 2 + 2?", "2 + 2 = 4."), ("Say hello.", "Hello! How can I help you today?"),
    ("Name a fruit.", "Banana"), ("What is the capital of Italy?", "The capital of Italy is Rome."),
]


STOP = [".", ","]  # vLLM's own stop strings: the engine starts with its tokenizer to match them


@pytest.fixture(scope="module")
def smollm2_engine_checks(warm_vllm, smollm2_folder, tmp_path_factory) -> dict:
    """tests/engine_checks.py on SmolLM2-135M-Instruct's export: one engine start for the checks of the two tests
    below (a start of its own for the second cost a vLLM import and an engine start, ~15 CPU seconds)."""
    folder = tmp_path_factory.mktemp("smollm2-engine")
    spec = ModelSpec(name="smollm2", path=str(smollm2_folder))
    sequences = [(e.input_ids, len(e.prompt_ids)) for e in (encode(load_tokenizer(spec), p, r) for p, r in SCORED)]
    job = {"model": {**spec.model_dump(), "backend": {"type": "vllm", "max_model_len": 512}, "sampling": {"stop": STOP}},
           "greedy": GREEDY, "max_new_tokens": 32, "seeded": GREEDY[:4], "sequences": sequences, "chat": CHAT}
    (folder / "job.json").write_text(json.dumps(job))
    result = warm_vllm.run(["tests/engine_checks.py", folder / "job.json", folder / "out.json"],
                           env=engine_env(VLLM_ENABLE_V1_MULTIPROCESSING="0"), timeout=900)  # see `vllm_recipe_run`
    assert result.returncode == 0, result.stderr[-4000:]
    return {**json.loads((folder / "out.json").read_text()), "sequences": sequences}


def test_vllm_backend_agrees_with_transformers_on_smollm2(smollm2_engine_checks, smollm2_folder):
    spec = ModelSpec(name="smollm2", path=str(smollm2_folder))
    tokenizer = load_tokenizer(spec)
    vllm, sequences, stop = smollm2_engine_checks, smollm2_engine_checks["sequences"], STOP
    backend = TransformersBackend(spec, TransformersSettings())
    greedy = backend.generate_all(GREEDY, SamplingParams(temperature=0.0, max_new_tokens=32), batch_size=4)
    identical = sum(a == b for a, b in zip(vllm["greedy"], greedy, strict=True))
    print(f"\nvLLM engine start {vllm['start_s']:.1f} s; greedy identical {identical}/{len(GREEDY)}")
    for ours, theirs in zip(vllm["greedy"], greedy, strict=True):
        first = [tokenizer(text, add_special_tokens=False)["input_ids"][:1] for text in (ours[0], theirs[0])]
        assert first[0] == first[1], (ours, theirs)  # the first token of every response agrees
    assert identical >= len(GREEDY) // 2

    # stop strings: each response is the engine's own full greedy text up to the earliest stop string, as the
    # transformers backend's (same stop strings) is of its own
    assert vllm["detokenizes"]
    stopped = backend.generate_all(GREEDY, SamplingParams(temperature=0.0, max_new_tokens=32, stop=stop), batch_size=4)
    for cut, whole, ours_cut, ours in zip(vllm["stopped"], vllm["greedy"], stopped, greedy, strict=True):
        assert cut[0] == cut_at_stop(whole[0], stop).strip() and ours_cut[0] == cut_at_stop(ours[0], stop).strip()
    assert any(c != w for c, w in zip(vllm["stopped"], vllm["greedy"], strict=True))  # some response was cut

    first, again, other = vllm["seeded"]
    assert first == again  # the same seeds give the same samples
    assert first != other
    assert any(a != b for a, b in first)  # n=2 draws two samples, not one twice

    expected = score_sequences(backend.model, sequences, pad_token_id(tokenizer))
    worst = 0.0
    for (total, count), (expected_total, expected_count) in zip(vllm["scores"], expected, strict=True):
        assert count == expected_count
        worst = max(worst, abs(total - expected_total) / count)
    print(f"log-prob sums: largest difference per token {worst:.2e}")
    assert worst <= 1e-4


def test_vllm_loads_an_export_with_its_tokenizer_and_agrees_with_transformers(smollm2_engine_checks, smollm2_folder):
    """vLLM reads the exported GGUF folder (`polyfuse.models.gguf`) itself (weights, tokenizer, chat template: the
    engine loads its tokenizer) and gives transformers' greedy text and prompt log-probs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    vllm = smollm2_engine_checks["chat"]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    model = AutoModelForCausalLM.from_pretrained(smollm2_folder).eval()
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert vllm["prompt"] == tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert vllm["ids"] == ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        greedy = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):]
    expected = logits[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(vllm["logps"]), expected, atol=1e-4)
    assert vllm["text"] == tokenizer.decode(greedy, skip_special_tokens=True)


def test_the_venv_runs_this_checkouts_code_without_pythonpath(vllm_python, tmp_path):
    """polyfuse is installed editable from this checkout (`polyfuse.sampling.vllm_env`), so a user who runs
    `FOLDER/bin/python -m polyfuse` gets the checkout's current code, not the code of when the venv was built."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = subprocess.run([str(vllm_python), "-c", "import polyfuse; print(polyfuse.__file__)"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(found) == Path(__file__).resolve().parents[1] / "src" / "polyfuse" / "__init__.py"


def test_pairs_longer_than_the_engines_max_model_len_are_dropped_before_anything_is_scored(warm_vllm, tiny_world,
                                                                                           tmp_path):
    """A source on vLLM scores at most `max_model_len - 1` tokens (a request leaves one to generate): longer pairs
    are dropped for every model when the stage starts, like pairs beyond a model's context, instead of stopping
    the stage after the pivot's shards were written. The kept pairs' scores are the transformers path's."""
    name = "llama-compare"
    source = ModelSpec(name=name, path=str(tiny_world.source_paths[name]))
    tokenizer = load_tokenizer(source)
    rows = [PreferenceRow(id=f"r{k}", prompt="1 + 1 =", chosen="2 " * k, rejected="3") for k in range(1, 40, 3)]
    length = {r.id: max(len(e.input_ids) for e in encode_row(tokenizer, r).values()) for r in rows}
    max_model_len = length["r19"]  # within the model's 128 positions, but no room left to generate: dropped
    too_long = [r.id for r in rows if length[r.id] > max_model_len - 1]
    assert "r16" not in too_long and too_long[0] == "r19"
    write_rows(tmp_path / "pairs.jsonl", rows)
    config = {"pivot": {"name": "pivot", "path": str(tiny_world.pivot_path)},
              "sources": [{**source.model_dump(), "backend": {"type": "vllm", "max_model_len": max_model_len}}]}
    (tmp_path / "logprobs.yaml").write_text(yaml.safe_dump(config))
    result = warm_vllm.run(["-m", "polyfuse", "logprobs", "--config", tmp_path / "logprobs.yaml", "--data",
                            tmp_path / "pairs.jsonl", "--out", tmp_path / "scored.jsonl", "-q"],
                           env=engine_env(VLLM_ENABLE_V1_MULTIPROCESSING="0"), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    meta = read_metadata(tmp_path / "scored.jsonl")
    assert meta["max_length"] == {"pivot": 128, name: max_model_len - 1}
    assert meta["dropped"] == [{"id": i, "models": [name]} for i in too_long]
    scored = read_rows(tmp_path / "scored.jsonl", PreferenceRow)
    kept = [r for r in rows if r.id not in too_long]
    assert [r.id for r in scored] == [r.id for r in kept]
    expected = compute_reference_logps(load_model(source), tokenizer, kept)
    for row, ref in zip(scored, expected, strict=True):
        assert row.fuse_chosen_ntokens == [ref.ref_chosen_ntokens]
        assert abs(row.fuse_chosen_logps[0] - ref.ref_chosen_logps) <= 1e-4 * ref.ref_chosen_ntokens


def vllm_recipe(tiny_world, work) -> dict:
    """The demo recipe shrunk to the tiny world (as tests/test_pipeline.py does), every source on vLLM and
    scored by it too (`logprobs.sources`)."""
    from polyfuse.config import apply_overrides, read_yaml

    recipe = apply_overrides(read_yaml(recipe_path("fusechat3-toy.yaml")), [
        *tiny_overrides(tiny_world.root.parent), "prompts.toyworld.per_domain=4", "eval.prompts.toyworld.per_domain=2",
        "logprobs.sources=true", f"work_dir={work}",
    ])
    for source in recipe["sources"]:
        source["backend"] = {"type": "vllm", "max_num_seqs": 16}
    return recipe


@pytest.fixture(scope="module")
def vllm_recipe_run(warm_vllm, tiny_world, tmp_path_factory) -> tuple[Path, dict]:
    """The recipe run once. Its nine engines (three sources: sampling, scoring, evaluation) run inside the
    polyfuse process (VLLM_ENABLE_V1_MULTIPROCESSING=0), as the other engines of this file do: for tiny models
    the start dominates, and it is half as long there (an engine process of its own imports vLLM twice more);
    vLLM's default, an engine process of its own, is what the two-process test runs (under a launcher) and the
    server tests and `bench/sampling_speed.py --smoke` (test_benches) run."""
    folder = tmp_path_factory.mktemp("vllm-recipe")
    recipe = vllm_recipe(tiny_world, folder / "work")
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = warm_vllm.run(["-m", "polyfuse", "run", folder / "recipe.yaml", "--quiet"],
                           env=engine_env(VLLM_ENABLE_V1_MULTIPROCESSING="0"), timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return folder / "work", recipe


def test_fusechat_toy_recipe_samples_every_source_through_vllm(vllm_recipe_run, tiny_world):
    work, recipe = vllm_recipe_run
    samples = read_rows(work / "sample" / "samples.jsonl", SampleRow)
    prompts = len((work / "prompts" / "prompts.jsonl").read_text().splitlines())
    names = [s["name"] for s in recipe["sources"]]
    assert sorted({s.model for s in samples}) == sorted(names)
    assert len(samples) == prompts * 4 * len(names) and len({s.id for s in samples}) == len(samples)
    assert sum(bool(s.response) for s in samples) > len(samples) // 2
    resolved = json.loads((work / "sample" / "manifest.json").read_text())
    assert [m["backend"]["type"] for m in resolved["config"]["section"]["models"]] == ["vllm"] * len(names)
    scored = read_rows(work / "logprobs" / "preference.jsonl", PreferenceRow)
    assert scored and all(len(r.fuse_chosen_logps) == len(names) for r in scored)
    meta = read_metadata(work / "logprobs" / "preference.jsonl")
    assert meta["backends"] == {"pivot": "transformers", **{name: "vllm" for name in names}}
    results = json.loads((work / "eval" / "results.json").read_text())
    assert set(names) <= set(results)
    for source in recipe["sources"]:  # gold bits per byte through vLLM's prompt log-probs
        path = tiny_world.source_paths[source["name"]]
        assert_gold_bpb_of_transformers(work / "eval", source["name"], ModelSpec(name=source["name"], path=str(path)))


def assert_gold_bpb_of_transformers(folder: Path, label: str, spec: ModelSpec) -> None:
    """The eval output's gold bits per byte of `label` (scored by another backend) equal the transformers
    backend's on the same prompts (1e-4 per token of log-prob, a few bytes per token)."""
    from polyfuse.data import PromptRow
    from polyfuse.evaluation import gold_bpb, load_eval_report

    prompts = read_rows(folder / "prompts.jsonl", PromptRow)
    expected = gold_bpb(TransformersBackend(spec, TransformersSettings()), prompts)
    found = [record.bpb for record in load_eval_report(folder)[label].records]
    assert None not in found and None not in expected and len(found) == len(prompts)
    assert max(abs(a - b) for a, b in zip(found, expected, strict=True)) <= 1e-3


def test_two_processes_share_the_shards_and_give_the_rows_of_one(vllm_python, vllm_recipe_run, tmp_path):
    """Data parallel under `accelerate launch`: each process runs its own engine (in a process of its own)
    on its shards (each shard's sidecar says which process wrote it) and half the cores; per-request seeds
    make the rows those of the one-process recipe run."""
    from test_ddp import free_port

    work, _ = vllm_recipe_run
    config = json.loads((work / "sample" / "manifest.json").read_text())["config"]["section"]
    config["models"] = config["models"][:1]  # three shards of one model: one engine per process
    del config["include_pivot"]  # the recipe's own key
    (tmp_path / "sample.yaml").write_text(yaml.safe_dump(config))
    launch = [str(vllm_python), "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]  # without --multi_gpu, a machine with no GPU runs one process
    two = subprocess.run([*launch, "-m", "polyfuse", "sample", "--config", str(tmp_path / "sample.yaml"), "--prompts",
                          str(work / "prompts" / "prompts.jsonl"), "--quiet", "--out", str(tmp_path / "two")],
                         env=engine_env(ACCELERATE_USE_CPU="true"), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-4000:]
    name = config["models"][0]["name"]
    one = [r for r in read_rows(work / "sample" / "samples.jsonl", SampleRow) if r.model == name]
    parallel = read_rows(tmp_path / "two" / "samples.jsonl", SampleRow)
    shards = sorted((tmp_path / "two" / "shards").glob("*.jsonl"))
    assert [read_metadata(s) for s in shards] == [{"process": p, "processes": 2} for p in (0, 1, 0)]  # in turn
    assert [r.model_dump() for r in parallel] == [r.model_dump() for r in one]


@pytest.mark.parametrize("top_k", [None, 3], ids=["exact", "top-3"])
def test_source_entropies_on_vllm_are_the_transformers_values_or_within_the_top_k_bound(warm_vllm, tiny_world,
                                                                                        tmp_path, top_k):
    """Unpaired rows through `polyfuse logprobs` with a source on vLLM: the engine starts with the prompt log-probs
    the entropy needs; from the whole vocabulary (`prompt_logprobs=-1`) the completion entropy is the transformers
    path's, from the top 3 it is within the bound recorded in the metadata."""
    from polyfuse.data import UnpairedRow

    name = "qwen-strings"
    source = ModelSpec(name=name, path=str(tiny_world.source_paths[name]))
    rows = [UnpairedRow(id=f"u{k}", prompt=f"{k} + {k} =", prompt_id=f"p{k}", completion=f"{2 * k} " * (1 + k % 3),
                        label="DU"[k % 2], kl_completion=f"{k + 1}") for k in range(6)]  # fmt: skip
    write_rows(tmp_path / "rows.jsonl", rows)
    config = {"pivot": {"name": "pivot", "path": str(tiny_world.pivot_path)},
              "sources": [{**source.model_dump(), "backend": {"type": "vllm"}}], "entropy_top_k": top_k}
    (tmp_path / "logprobs.yaml").write_text(yaml.safe_dump(config))
    result = warm_vllm.run(["-m", "polyfuse", "logprobs", "--config", tmp_path / "logprobs.yaml", "--data",
                            tmp_path / "rows.jsonl", "--out", tmp_path / "scored.jsonl", "-q"],
                           env=engine_env(VLLM_ENABLE_V1_MULTIPROCESSING="0"), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    scored = read_rows(tmp_path / "scored.jsonl", UnpairedRow)
    model, tokenizer = load_model(source), load_tokenizer(source)
    sequences = [(e.input_ids, len(e.prompt_ids)) for e in (encode(tokenizer, r.prompt, r.completion) for r in rows)]
    expected = score_sequences(model, sequences, pad_token_id(tokenizer), entropy=True)
    entropy = read_metadata(tmp_path / "scored.jsonl")["entropy"][name]
    bound = 1e-5 if top_k is None else entropy["max_error"]
    assert entropy == "exact" if top_k is None else (entropy["top_k"] == 3 and 0 < bound < 0.5)
    for row, (total, count, summed) in zip(scored, expected, strict=True):
        assert row.fuse_completion_ntokens == [count] and abs(row.fuse_mean_completion_logps[0] - total / count) < 1e-4
        assert abs(row.fuse_completion_entropy[0] - summed / count) <= bound + 1e-5
