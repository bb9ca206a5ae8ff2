"""On-policy distillation through the real engines (slow lane): a vLLM engine as a teacher (top-K above vLLM's
default 20) and as the student (sampled ids, weights refreshed in place from the trainer, a training run that
samples with it), in the vLLM venv; and a real `vllm serve` of Gemma-3 (262k vocabulary) started here on
127.0.0.1, as the teacher of SmolLM2 (49k) and of the toy world's pivot, next to teachers in process: top-K
equal to transformers', multi-teacher runs across tokenizers, and a top-K larger than the server returns refused
in one line. Gemma-3 and SmolLM2 here are their random twins (`gemma3_twin`, `smollm2_twin`: the real
architectures and tokenizers, 2 layers of width 64): every check compares an engine with transformers on the
same weights or follows token ids across the two vocabularies, which the real weights do not change; they cost
a tenth of the 270M / 135M models to load, serve and train (tests/test_real_models.py and test_engines.py keep
the real weights where they are the point)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import engine_env
from polyfuse.data import write_rows
from polyfuse.models import ModelSpec, encode, load_model, load_tokenizer, render_prompt
from polyfuse.models.forward import pad_token_id, score_sequences
from polyfuse.sampling import EngineModel, build_backend
from test_engines_server import vllm_server

pytestmark = pytest.mark.slow

PAIRS = [("Which is largest: 3, 17, 9?", "17 is the largest."), ("Reverse ABC", "CBA")]
GEMMA = "gemma-3-twin"
SERVER_TOP_K = 16


def test_vllm_engine_as_teacher_and_as_student(warm_vllm, tiny_world, tmp_path):
    teacher = EngineModel(name="llama-compare", path=str(tiny_world.source_paths["llama-compare"]),
                          backend={"type": "vllm", "max_model_len": 128, "max_num_seqs": 8})
    student = ModelSpec(name="pivot", path=str(tiny_world.pivot_path))
    teacher_tokenizer, student_tokenizer = load_tokenizer(teacher), load_tokenizer(student)
    sequences = [(e.input_ids, len(e.prompt_ids)) for e in (encode(teacher_tokenizer, p, r) for p, r in PAIRS)]
    student_sequences = [(e.input_ids, len(e.prompt_ids)) for e in (encode(student_tokenizer, p, r) for p, r in PAIRS)]
    perturbed = load_model(student)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in perturbed.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    perturbed.save_pretrained(tmp_path / "perturbed")
    student_tokenizer.save_pretrained(tmp_path / "perturbed")
    rows = tiny_world.prompts("train", per_domain=3)[:8]
    job = {
        "teacher": teacher.model_dump(), "student": student.model_dump(), "k": 25, "sequences": sequences,
        "prompts": [render_prompt(student_tokenizer, p)[0] for p, _ in PAIRS], "max_new_tokens": 10,
        "perturbed": str(tmp_path / "perturbed"), "student_sequences": student_sequences,
        "rows": [r.model_dump() for r in rows], "out": str(tmp_path / "trained"),
        "train": {"teachers": [{"name": "qwen-strings", "path": str(tiny_world.source_paths["qwen-strings"])}],
                  "student_backend": {"type": "vllm", "max_model_len": 128, "max_num_seqs": 8}, "sync_steps": 1,
                  "objective_args": {"top_k": 8}, "sampling": {"max_new_tokens": 8}, "batch_size": 4,
                  "learning_rate": 1e-3, "save_steps": 0, "max_length": 96},
    }
    (tmp_path / "job.json").write_text(json.dumps(job))
    result = warm_vllm.run(["tests/onpolicy_engine_checks.py", tmp_path / "job.json", tmp_path / "out.json"],
                           env=engine_env(), timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads((tmp_path / "out.json").read_text())
    print(f"\nteacher engine {out['teacher_start_s']:.0f} s, student engine {out['student_start_s']:.0f} s, "
          f"weight refresh {out['refresh_s']:.2f} s, 2 on-policy steps {out['train_s']:.0f} s")

    ours = build_backend(EngineModel(path=teacher.path)).topk_logprobs(sequences, 25)  # transformers
    for theirs, mine in zip(out["topk"], ours, strict=True):
        assert np.asarray(theirs["ids"]).shape == (len(mine.token_logps), 25)  # above vLLM's default 20
        assert np.allclose(theirs["logps"], mine.topk_logprobs, atol=1e-4)
        assert np.allclose(theirs["own"], mine.token_logps, atol=1e-4)
        assert (np.asarray(theirs["ids"])[:, :5] == mine.topk_ids[:, :5]).mean() > 0.95  # ties may swap

    assert out["in_process"] and out["sampled"] == out["sampled_again"]  # per-request seeds
    for (ids,) in out["sampled"]:
        assert ids[-1] in out["stops"] or len(ids) == 10
    expected = score_sequences(load_model(ModelSpec(path=str(tmp_path / "perturbed"))), student_sequences,
                               pad_token_id(student_tokenizer))
    for (total, count), (want, want_count) in zip(out["scores"], expected, strict=True):
        assert count == want_count and abs(total - want) <= 1e-4 * count  # the engine took the new weights

    steps = [h for h in out["history"] if "loss" in h]
    assert len(steps) == 2 and all(h["onpolicy/on_policy"] == 1.0 for h in steps) and out["trained_differs"]


@pytest.fixture(scope="module")
def gemma_server(warm_vllm, gemma3_twin):
    with vllm_server(warm_vllm, gemma3_twin, GEMMA, "--max-model-len", "512", "--max-num-seqs", "8",
                     "--max-num-batched-tokens", "4096", "--max-logprobs", str(SERVER_TOP_K)) as server:
        yield server


def served_gemma(server, gemma3_twin) -> dict:
    return {"name": GEMMA, "path": str(gemma3_twin),
            "backend": {"type": "openai", "base_url": server.url, "model": GEMMA, "max_retries": 1}}


def test_served_gemma_top_k_equals_transformers(gemma_server, gemma3_twin):
    tokenizer = load_tokenizer(ModelSpec(path=str(gemma3_twin)))
    sequences = [(e.input_ids, len(e.prompt_ids)) for e in (encode(tokenizer, p, r) for p, r in PAIRS)]
    served = build_backend(EngineModel.model_validate(served_gemma(gemma_server, gemma3_twin)))
    in_process = build_backend(EngineModel(path=str(gemma3_twin)))
    for theirs, mine in zip(served.topk_logprobs(sequences, SERVER_TOP_K),
                            in_process.topk_logprobs(sequences, SERVER_TOP_K), strict=True):
        assert np.allclose(theirs.topk_logprobs, mine.topk_logprobs, atol=2e-3)
        assert np.allclose(theirs.token_logps, mine.token_logps, atol=2e-3)
        assert (theirs.topk_ids[:, :3] == mine.topk_ids[:, :3]).mean() > 0.95


def _run(polyfuse_cli, folder: Path, teachers: list[dict], rows, model: str, **settings):
    config = {"teachers": teachers, "objective_args": {"top_k": SERVER_TOP_K}, "sampling": {"max_new_tokens": 24},
              "batch_size": 2, "learning_rate": 1e-5, "save_steps": 0, "max_length": 256, **settings}
    (folder / "cfg.yaml").write_text(yaml.safe_dump(config))
    write_rows(folder / "prompts.jsonl", rows)
    return polyfuse_cli("train", "onpolicy", "-c", folder / "cfg.yaml", "--prompts", folder / "prompts.jsonl",
                        "--model", model, "-o", folder / "out", "-q")


def _history(folder: Path) -> dict:
    return json.loads((folder / "out" / "polyfuse_training.json").read_text())["log_history"][0]


def test_smollm2_learns_on_policy_from_a_served_gemma3_and_itself(gemma_server, gemma3_twin, smollm2_twin,
                                                                  polyfuse_cli, tmp_path):
    """Two teachers, two vocabularies, mixed at each position by uncertainty: Gemma-3 behind `vllm serve` (the
    student's text re-tokenised through Gemma's format) and SmolLM2 itself in process (the student's own ids)."""
    from polyfuse.data import PromptRow

    rows = [PromptRow(id=f"q{i}", prompt=p) for i, p in enumerate(["What is 12 times 12?", "Name a prime above 90.",
                                                                   "Write the number 1234567 in words."])]
    teachers = [served_gemma(gemma_server, gemma3_twin), {"name": "self", "path": str(smollm2_twin)}]
    proc = _run(polyfuse_cli, tmp_path, teachers, rows[:2], str(smollm2_twin), mix="uncertainty")
    assert proc.returncode == 0, proc.stderr
    history = _history(tmp_path)
    assert history[f"onpolicy/groups/{GEMMA}"] > 0 and history["onpolicy/groups/self"] > 0
    assert np.isfinite(history["loss"]) and history[f"kd/loss/{GEMMA}"] > 0


def test_smollm2_learns_on_policy_from_gemma3_in_process(gemma3_twin, smollm2_twin, polyfuse_cli, tmp_path):
    from polyfuse.data import PromptRow

    rows = [PromptRow(id="q0", prompt="What is 12 times 12?"), PromptRow(id="q1", prompt="Count to five.")]
    proc = _run(polyfuse_cli, tmp_path, [{"name": GEMMA, "path": str(gemma3_twin)}], rows, str(smollm2_twin),
                objective="gold")
    assert proc.returncode == 0, proc.stderr
    history = _history(tmp_path)
    assert history[f"onpolicy/groups/{GEMMA}"] > 0 and np.isfinite(history["loss"])


def test_the_toy_pivot_learns_from_a_served_teacher_and_toy_teachers(gemma_server, gemma3_twin, tiny_world,
                                                                     polyfuse_cli, tmp_path):
    """The toy world with a served teacher: each domain routed, `strings` to Gemma-3 behind the server."""
    rows = tiny_world.prompts("train", per_domain=2)
    teachers = [served_gemma(gemma_server, gemma3_twin),
                {"name": "llama-compare", "path": str(tiny_world.source_paths["llama-compare"])},
                {"name": "gpt2-arithmetic", "path": str(tiny_world.source_paths["gpt2-arithmetic"])}]
    proc = _run(polyfuse_cli, tmp_path, teachers, rows, str(tiny_world.pivot_path), mix="route", route_by="domain",
                routes={"strings": GEMMA, "compare": "llama-compare", "arithmetic": "gpt2-arithmetic"},
                sampling={"max_new_tokens": 8}, batch_size=6, max_length=96)
    assert proc.returncode == 0, proc.stderr
    history = _history(tmp_path)
    assert sum(history[f"onpolicy/groups/{t['name']}"] for t in teachers) > 0 and np.isfinite(history["loss"])


def test_a_top_k_larger_than_the_server_returns_is_one_line_and_exit_2(gemma_server, gemma3_twin,
                                                                        smollm2_twin, polyfuse_cli, tmp_path):
    from polyfuse.data import PromptRow

    proc = _run(polyfuse_cli, tmp_path, [served_gemma(gemma_server, gemma3_twin)],
                [PromptRow(id="q0", prompt="Hi")], str(smollm2_twin), objective_args={"top_k": 32})
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "\n" not in line and gemma_server.url in line and "32" in line and str(SERVER_TOP_K) in line, line
    assert not (tmp_path / "out").exists()
