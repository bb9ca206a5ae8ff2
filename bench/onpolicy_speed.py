"""On-policy distillation speed: polyfuse with the teacher in process and behind a `vllm serve`, against TRL's
`GKDTrainer` (lmbda 1) and `DistillationTrainer`, in the same run, on the same-vocabulary case.

What it measures
----------------
The student samples a response to every prompt of a step, the teacher scores it, the student takes one
optimiser step (forward KL, beta 0; temperature 1, top-p 1, no top-k; the same `max_new_tokens`, micro-batch,
learning rate, `adamw_torch`, fp32 on CPU). The student and the teacher are both SmolLM2-135M-Instruct (one
vocabulary: TRL's trainers need it); the prompts are the same synthetic chat prompts in the same order.

A step's time is the wall and CPU time between two consecutive optimiser steps (`LoopTimer`): sampling,
teacher scoring and the update, wherever each tool does them (polyfuse makes a step's rollout before
Trainer's step begins, TRL inside its training step). Tokens are the tokens the student trains on in the
step (prompt + sampled response, counted by a hook on the student's forward with gradients on), so a tool
whose samples stop earlier is not favoured. Tools (`--tools`):

* `polyfuse`: `train_onpolicy`, `kd` over the teacher's top-16 + tail, the teacher in process (transformers);
  the teacher shares the vocabulary and the template, so it scores the student's own ids;
* `polyfuse:served`: the same, the teacher behind a vLLM OpenAI-compatible server (started here from the vLLM
  venv, `--vllm-python`; on a CPU-only machine it shares the cores with the trainer) returning prompt log-probs;
* `trl:gkd`: TRL 1.16 `GKDTrainer`, lmbda 1 (always on-policy), beta 0, full-vocabulary KL;
* `trl:distillation`: TRL 1.16 `DistillationTrainer` (on-policy only), beta 0, full-vocabulary KL, no vLLM.

As the other training benches: each tool in its own subprocess, tools interleaved over `--rounds`, the dense
matmul's throughput measured each round, min and median of the runs, ratios by CPU and by wall time.

    pip install -e '.[bench]'
    python bench/onpolicy_speed.py                 # SmolLM2-135M-Instruct (tens of minutes on 2 loaded cores)
    python bench/onpolicy_speed.py --smoke         # a tiny random Llama, one round, no server: the plumbing
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _pairs import build_tiny
from _train_bench import (
    export_gguf,
    launch,
    matmul_throughput,
    report_result,
    require_trl,
    trl_help,
    use_bf16,
)
from po_step_speed import tokenizer_words

from polyfuse.sampling import vllm_env

DEFAULT_VLLM = vllm_env.default_folder() / "bin" / "python"  # `python -m polyfuse.sampling.vllm_env` builds it


def loop_timer(stop_after: int):
    """Wall and CPU seconds between consecutive optimiser steps (the first from the start of training), and the
    tokens the student's forward trained on in each (`count`: a forward hook adds to `pending`)."""
    from transformers import TrainerCallback

    class LoopTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.cpu: list[float] = []
            self.tokens: list[int] = []
            self.pending = 0
            self._wall = self._cpu = 0.0

        def count(self, module, args, kwargs) -> None:
            import torch

            if not torch.is_grad_enabled():
                return
            mask = kwargs.get("attention_mask")
            ids = kwargs.get("input_ids")
            if ids is None:
                ids = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if mask is not None:
                self.pending += int(mask.sum())
            elif ids is not None:
                self.pending += int(ids.numel())

        def on_train_begin(self, args, state, control, **kwargs):
            self._wall, self._cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            now, cpu = time.perf_counter(), time.process_time()
            self.times.append(now - self._wall)
            self.cpu.append(cpu - self._cpu)
            self.tokens.append(self.pending)
            self.pending, self._wall, self._cpu = 0, now, cpu
            if state.global_step >= stop_after:
                control.should_training_stop = True
            return control

    return LoopTimer()


def write_prompts(model_dir: Path, args: argparse.Namespace) -> Path:
    """Synthetic chat prompts of 30-60 words of the model's vocabulary, as JSONL (id, prompt)."""
    from polyfuse.models import ModelSpec, load_tokenizer

    path = Path(args.workdir) / f"onpolicy-{model_dir.name}-{args.rows_count}-{args.seed}.jsonl"
    if not path.exists():
        words = tokenizer_words(load_tokenizer(ModelSpec(path=str(model_dir))))
        rng = random.Random(args.seed)
        rows = [{"id": f"p{i}", "prompt": [{"role": "user", "content": " ".join(
            rng.choice(words) for _ in range(rng.randint(30, 60)))}]} for i in range(args.rows_count)]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def hooked(model: Any, timer: Any) -> Any:
    """The timer counts what the decoder reads: every tool runs it, also TRL's loss, which calls the backbone
    directly."""
    model.get_decoder().register_forward_pre_hook(timer.count, with_kwargs=True)
    return model


def run_polyfuse(args: argparse.Namespace, tool: str, timer: Any, work: Path) -> str:
    from polyfuse.data import PromptRow
    from polyfuse.models import ModelSpec
    from polyfuse.trainers import onpolicy

    teacher: dict[str, Any] = {"name": "teacher", "path": args.model_dir}
    if tool == "polyfuse:served":
        teacher["backend"] = {"type": "openai", "base_url": args.server, "model": "teacher", "concurrency": 16}
    rows = [PromptRow.model_validate_json(line) for line in Path(args.rows).read_text().splitlines()]
    config = onpolicy.OnPolicyTrainConfig(
        teachers=[teacher], objective="kd", objective_args={"beta": 0.0, "top_k": 16},
        sampling={"temperature": 1.0, "top_p": 1.0, "max_new_tokens": args.max_new_tokens},
        learning_rate=args.lr, batch_size=args.batch_size, max_length=args.max_length, shuffle=False,
        bf16=use_bf16(), seed=args.seed, save_steps=0)  # fmt: skip
    load = onpolicy.load_model
    onpolicy.load_model = lambda spec: hooked(load(spec), timer)  # count the student's trained tokens
    out = onpolicy.train_onpolicy(ModelSpec(path=args.model_dir), rows, config, work / "out", callbacks=[timer])
    return json.loads((out / "polyfuse_training.json").read_text())["teachers"][0]["backend"]


def run_trl(args: argparse.Namespace, tool: str, timer: Any, work: Path) -> str:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    student = hooked(AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32), timer)
    teacher = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    common = dict(
        output_dir=str(work / "trl"), per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
        lr_scheduler_type="cosine", warmup_steps=0.1, max_grad_norm=1.0, optim="adamw_torch", bf16=use_bf16(),
        num_train_epochs=1, logging_steps=1, save_strategy="no", report_to="none", dataloader_num_workers=0,
        seed=args.seed, temperature=1.0, beta=0.0, disable_dropout=True,
    )  # fmt: skip
    if tool == "trl:gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        config = GKDConfig(**common, lmbda=1.0, max_new_tokens=args.max_new_tokens, max_length=args.max_length)
        data = Dataset.from_list([{"messages": [*r["prompt"], {"role": "assistant", "content": "ok"}]} for r in rows])
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=data,
                             processing_class=tokenizer, callbacks=[timer])
    else:
        from trl import DistillationConfig, DistillationTrainer

        config = DistillationConfig(**common, top_p=1.0, top_k=0, max_completion_length=args.max_new_tokens,
                                    use_vllm=False)
        data = Dataset.from_list([{"prompt": r["prompt"]} for r in rows])
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=data,
                                      processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    return "in process"


def worker(args: argparse.Namespace) -> None:
    import shutil

    import torch

    torch.set_num_threads(args.threads)
    timer = loop_timer(args.warmup + args.steps)
    work = Path(tempfile.mkdtemp(prefix="onpolicy-speed-", dir=args.workdir))
    try:
        teacher = (run_trl if args.worker.startswith("trl") else run_polyfuse)(args, args.worker, timer, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    measured = slice(args.warmup, None)
    report_result({"tool": args.worker, "times": timer.times, "mean": statistics.mean(timer.times[measured]),
                   "cpu": statistics.mean(timer.cpu[measured]), "tokens": statistics.mean(timer.tokens[measured]),
                   "layout": f"teacher {teacher}"})  # fmt: skip


@contextlib.contextmanager
def served_teacher(python: Path, model_dir: str, workdir: Path, max_logprobs: int) -> Iterator[str]:
    """`vllm serve` of the teacher on a free port of 127.0.0.1 (vLLM's CPU wheel: the api_server module), until
    the block ends; its URL."""
    import socket

    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        port = handle.getsockname()[1]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_HOST_IP": "127.0.0.1",
           "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, sorted(os.sched_getaffinity(0))))}
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--served-model-name",
               "teacher", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
               "--max-model-len", "1024", "--max-num-seqs", "16", "--max-num-batched-tokens", "16384",
               "--max-logprobs", str(max_logprobs)]  # fmt: skip
    log = workdir / "vllm-server.log"
    start = time.perf_counter()
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        while True:
            if process.poll() is not None or time.perf_counter() - start > 900:
                raise SystemExit(f"the vLLM server did not start; see {log}")
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status == 200:
                    break
            time.sleep(1)
        print(f"vLLM server of the teacher answered after {time.perf_counter() - start:.0f} s: {url}", flush=True)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def worker_args(args: argparse.Namespace) -> list[str]:
    names = ("workdir", "batch_size", "max_new_tokens", "max_length", "lr", "warmup", "steps", "threads", "seed")
    return ["--model-dir", args.model_dir, "--rows", args.rows, *(["--server", args.server] if args.server else []),
            *(f"--{name.replace('_', '-')}={getattr(args, name)}" for name in names)]  # fmt: skip


def report(tools: list[str], results: dict[str, list[dict[str, Any]]], peaks: list[tuple[float, float]]) -> None:
    print(f"\ndense matmul: median {statistics.median(p[1] for p in peaks) / 1e9:.1f} GFLOP per CPU s")
    cpu = {tool: statistics.median(r["cpu"] for r in runs) for tool, runs in results.items()}
    wall = {tool: statistics.median(r["mean"] for r in runs) for tool, runs in results.items()}
    tokens = {tool: statistics.median(r["tokens"] for r in runs) for tool, runs in results.items()}
    for tool in tools:
        print(f"  {tool:<18} steps per wall s {1 / wall[tool]:.4f} (median {wall[tool]:.1f} s per step), CPU s per step "
              f"{cpu[tool]:.1f}; {tokens[tool]:.0f} trained tokens per step: {tokens[tool] / cpu[tool]:.1f} per CPU s, "
              f"{tokens[tool] / wall[tool]:.1f} per wall s")  # fmt: skip
    if "polyfuse" in cpu and "polyfuse:served" in cpu:
        print(f"polyfuse served / in process, steps per second: wall {wall['polyfuse'] / wall['polyfuse:served']:.3f}, "
              f"CPU of the trainer {cpu['polyfuse'] / cpu['polyfuse:served']:.3f}")
    for peer in ("trl:gkd", "trl:distillation"):
        if "polyfuse" in cpu and peer in cpu:
            by_cpu = (tokens["polyfuse"] / cpu["polyfuse"]) / (tokens[peer] / cpu[peer])
            by_wall = (tokens["polyfuse"] / wall["polyfuse"]) / (tokens[peer] / wall[peer])
            print(f"polyfuse / {peer}, trained tokens per second: CPU {by_cpu:.3f}, wall {by_wall:.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " " + trl_help())
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="a plain HF model folder, student and teacher (default: SmolLM2-135M-Instruct)")
    source.add_argument("--smoke", action="store_true", help="a tiny random Llama, 1 round of 1 step, no server, every tool in this process")
    parser.add_argument("--tools", default=None, help="polyfuse, polyfuse:served, trl:gkd, trl:distillation "
                        "(default: all; --smoke: all but the served one)")
    parser.add_argument("--vllm-python", default=str(DEFAULT_VLLM), help="the vLLM venv's python (polyfuse:served)")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per step")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "polyfuse-onpolicy-speed"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    parser.add_argument("--server", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.worker:
        return worker(args)
    if args.smoke:
        args.warmup, args.steps, args.rounds, args.batch_size, args.max_new_tokens = 1, 1, 1, 2, 8
    default = "polyfuse,trl:gkd,trl:distillation" if args.smoke else "polyfuse,polyfuse:served,trl:gkd,trl:distillation"
    tools = [t for t in (args.tools or default).split(",") if t]
    if any(t.startswith("trl") for t in tools):
        require_trl()
    args.rows_count = (args.warmup + args.steps) * args.batch_size
    workdir = Path(args.workdir)
    model_dir = (build_tiny(workdir / "tiny-llama", max_positions=1024) if args.smoke
                 else Path(args.model) if args.model else export_gguf(workdir / "smollm2-135m-instruct"))
    args.model_dir, args.rows = str(model_dir), str(write_prompts(model_dir, args))
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores visible)"
    print(f"student and teacher {model_dir} | {device} | {'bf16' if use_bf16() else 'fp32'} | threads {args.threads} | "
          f"{args.batch_size} prompts per step, {args.max_new_tokens} new tokens at most | {args.warmup} warm-up + "
          f"{args.steps} measured steps | {args.rounds} rounds", flush=True)  # fmt: skip
    script = str(Path(__file__).resolve())
    results: dict[str, list[dict[str, Any]]] = {tool: [] for tool in tools}
    peaks = []
    with contextlib.ExitStack() as stack:
        args.server = (stack.enter_context(served_teacher(Path(args.vllm_python), args.model_dir, workdir, 16))
                       if "polyfuse:served" in tools else None)
        for round_index in range(args.rounds):
            peaks.append(matmul_throughput(args.threads))
            print(f"round {round_index + 1}/{args.rounds}: dense matmul {peaks[-1][1] / 1e9:.1f} GFLOP per CPU s",
                  flush=True)
            for tool in (tools if round_index % 2 == 0 else tools[::-1]):
                result = launch(script, tool, worker_args(args), workdir / f"onpolicy-{tool.replace(':', '-')}.log",
                                in_process=args.smoke)
                results[tool].append(result)
                print(f"  {tool:<18} wall {result['mean']:.1f} s, CPU {result['cpu']:.1f} s per step, "
                      f"{result['tokens']:.0f} trained tokens (steps {', '.join(f'{t:.1f}' for t in result['times'])}; "
                      f"{result['layout']}; load avg {result['load_before']:.2f})", flush=True)  # fmt: skip
    report(tools, results, peaks)
    print(f"load average now: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    sys.exit(main())
