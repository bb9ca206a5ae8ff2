"""What the training benches share: the model export, the step timer, interleaved subprocess runs, the
machine's dense-matmul throughput, model FLOPs of a step and a profile of one step.

Model FLOPs of a training step (the work the step must do, the same figure for every tool that trains on
the same rows): per sequence of T tokens with R scored (response) tokens,
`6 * N * T + 6 * L * d * T**2 + 6 * d * V * R`: N the weights of the decoder's matrix products
(embeddings and norms excluded), forward + backward = 3 x the forward's 2 FLOPs per multiply-add; causal
attention (QK^T and AV over T/2 keys on average, d = heads x head dim, L layers); and the LM head on the
positions that predict a scored token. A preference pair counts as its two sequences (prompt + chosen,
prompt + rejected) whether or not a tool shares the prompt. Divided by the step time it gives the
achieved model FLOP/s; divided by the dense-matmul throughput of this machine (a square fp32 matmul, or
bf16 on a GPU, measured in the same run with the same threads), how far a step is from the bound.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _pairs import smollm2_gguf

RESULT_TAG = "TRAIN_BENCH_RESULT "


def add_run_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """The options every training bench shares: seed, profiling, its work folder (`name` under the temp dir) and
    the hidden ones by which it launches itself as a worker per tool."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="the warm-up step of round 1 under torch.profiler (needs --warmup >= 1)")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / name))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)


def trl_help() -> str:
    """The line every TRL-comparing bench puts in its `--help`."""
    try:
        import trl

        found = f"installed: {trl.__version__}"
    except ImportError:
        found = "not installed"
    return f"Needs TRL 1.16 for the comparison (pip install -e '.[bench]'; {found})."


def require_trl() -> None:
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit("this bench compares with TRL, which is not installed: pip install -e '.[bench]' "
                         "(or pip install --no-deps trl==1.16.0)") from None


def export_gguf(folder: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain safetensors folder: its GGUF exported into `folder` once (`polyfuse
    export`: de-quantised float32, no quantization_config)."""
    from polyfuse.models.gguf import export_gguf as export

    if not (folder / "config.json").exists():
        export(smollm2_gguf(), folder)
    return folder


def use_bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def step_timer(stop_after: int, profile_step: int | None = None):
    """A callback timing every optimiser step (wall time in `times`, this process's CPU time in `cpu`: on a
    shared machine the CPU time measures the work, the wall time also the waiting) and stopping the run
    after `stop_after` steps; with
    `profile_step`, step `profile_step` (1-based) runs under `torch.profiler` and `table` holds its top
    operators by self time."""
    import torch
    from transformers import TrainerCallback

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.cpu: list[float] = []
            self.table = ""
            self._start = self._cpu_start = 0.0
            self._profiler = None

        def on_step_begin(self, args, state, control, **kwargs):
            if profile_step is not None and state.global_step + 1 == profile_step:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                self._profiler = torch.profiler.profile(activities=activities)
                self._profiler.__enter__()
            sync()
            self._start, self._cpu_start = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.times.append(time.perf_counter() - self._start)
            self.cpu.append(time.process_time() - self._cpu_start)
            if self._profiler is not None:
                self._profiler.__exit__(None, None, None)
                key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
                self.table = self._profiler.key_averages().table(sort_by=key, row_limit=15)
                self._profiler = None
            if state.global_step >= stop_after:
                control.should_training_stop = True
            return control

    return StepTimer()


def matmul_throughput(threads: int, size: int = 1024, repeats: int = 5) -> tuple[float, float]:
    """Best FLOP/s of a square dense matmul (fp32 on CPU with `threads` threads; bf16 on a GPU), per second
    of wall time and per second of this process's CPU time (on a GPU both are wall time)."""
    import torch

    torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    size = 8192 if cuda else size
    dtype = torch.bfloat16 if cuda else torch.float32
    a, b = (torch.randn(size, size, dtype=dtype, device="cuda" if cuda else "cpu") for _ in range(2))
    wall = cpu = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        if cuda:
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        a @ b
        if cuda:
            torch.cuda.synchronize()
        wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - cpu_start)
    return 2 * size**3 / wall, 2 * size**3 / (wall if cuda else cpu)


def model_shape(model_dir: str | Path) -> dict[str, int]:
    """N (matrix-product weights of the decoder), L, d (attention width) and V of a model folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    text = config.get_text_config()
    head = model.get_output_embeddings().weight
    embeddings = {id(model.get_input_embeddings().weight), id(head)}
    matmul = sum(p.numel() for p in model.parameters() if p.dim() == 2 and id(p) not in embeddings)
    heads = text.num_attention_heads
    width = heads * (getattr(text, "head_dim", None) or text.hidden_size // heads)
    return {"N": matmul, "L": text.num_hidden_layers, "d": width, "V": head.shape[0], "hidden": head.shape[1]}


def training_flops(shape: dict[str, int], sequences: list[tuple[int, int]]) -> float:
    """Model FLOPs of training on `sequences` ((tokens, scored tokens) each), as the module says."""
    n, layers, d, hidden, vocab = shape["N"], shape["L"], shape["d"], shape["hidden"], shape["V"]
    return sum(6 * n * t + 6 * layers * d * t * t + 6 * hidden * vocab * r for t, r in sequences)


def launch(script: str, tool: str, args: list[str], log: Path, in_process: bool = False) -> dict[str, Any]:
    """Run one worker (`script --worker tool ...`) in its own process; its result line as a dict, with the
    load average before it started. `in_process` (the benches' `--smoke`, which checks the plumbing) runs it in
    this process instead: a new interpreter costs 4-6 CPU seconds of imports (torch, transformers, TRL), more
    than a smoke run's one step."""
    load = os.getloadavg()[0]
    command = [script, "--worker", tool, *args]
    with log.open("w") as stderr:
        if in_process:
            code, stdout = run_script_here(command, stderr)
        else:
            done = subprocess.run([sys.executable, *command], stdout=subprocess.PIPE, stderr=stderr, text=True,
                                  check=False)
            code, stdout = done.returncode, done.stdout
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_TAG)]
    if code or not lines:
        raise SystemExit(f"{tool} failed (exit {code}); see {log}")
    result = json.loads(lines[-1][len(RESULT_TAG):])
    result["load_before"] = load
    return result


def run_script_here(command: list[str], stderr: Any) -> tuple[int, str]:
    """`python SCRIPT ARGS` run as `__main__` in this process (a smoke run's plumbing, without a new interpreter's
    imports): its exit code and what it printed; its standard error goes to `stderr`."""
    argv, stdout = sys.argv, io.StringIO()
    sys.argv = list(command)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            runpy.run_path(command[0], run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
    finally:
        sys.argv = argv
    return code, stdout.getvalue()


def report_result(result: dict[str, Any]) -> None:
    print(RESULT_TAG + json.dumps(result), flush=True)


def summarise(values: list[float]) -> str:
    return f"min {min(values):.3f} median {statistics.median(values):.3f}"


def describe_run(result: dict[str, Any]) -> str:
    return (f"wall {result['mean']:.2f} s, CPU {result['cpu']:.2f} s per step (steps {', '.join(f'{t:.1f}' for t in result['times'])}; "
            f"{result['layout']}; load avg {result['load_before']:.2f})")  # fmt: skip


def report_speeds(tools: list[str], results: dict[str, list[dict[str, Any]]], peaks: list[tuple[float, float]],
                  flops: float, peer: str, work: float, unit: str) -> dict[str, float]:
    """Per tool, over rounds: min and median of wall and CPU seconds per step, `unit` per CPU second
    (`work` of them per step), the ratio to `peer` by CPU and by wall time, and the model FLOP/s per CPU
    second as a fraction of the matmul's per CPU second. Returns the median CPU seconds per step."""
    peak_wall = statistics.median(p[0] for p in peaks)
    peak_cpu = statistics.median(p[1] for p in peaks)
    print(f"\ndense matmul: median {peak_wall / 1e9:.1f} GFLOP/s of wall time, {peak_cpu / 1e9:.1f} of CPU time "
          f"(per CPU second: min {min(p[1] for p in peaks) / 1e9:.1f}, max {max(p[1] for p in peaks) / 1e9:.1f})")
    cpu = {tool: statistics.median(r["cpu"] for r in runs) for tool, runs in results.items()}
    wall = {tool: statistics.median(r["mean"] for r in runs) for tool, runs in results.items()}
    for tool in tools:
        ratio = (f" ratio to {peer}: CPU {cpu[tool] / cpu[peer]:.3f}, wall {wall[tool] / wall[peer]:.3f};"
                 if peer in cpu else "")  # fmt: skip
        print(f"  {tool:<22} CPU s/step {summarise([r['cpu'] for r in results[tool]])}; wall s/step "
              f"{summarise([r['mean'] for r in results[tool]])};{ratio} {work / cpu[tool]:.1f} {unit} per CPU s; "
              f"model {flops / cpu[tool] / 1e9:.2f} GFLOP per CPU s = {flops / cpu[tool] / peak_cpu:.1%} of the matmul's")
    return cpu
