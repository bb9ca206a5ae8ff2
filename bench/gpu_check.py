"""GPU check (one CUDA device, one run): bf16 steps of SmolLM2-135M-Instruct with polyfuse's SFT and
InfiFPO trainers, against TRL 1.16's `DPOTrainer` with `precompute_ref_log_probs=True` and without, in
the same run; mean step time and peak GPU memory (`torch.cuda.max_memory_allocated`) of each.

Every tool runs in-process one after the other on the same folder, rows, micro-batch, `max_length`,
AdamW and bf16 autocast; the first `--warmup` steps are not timed (the `po_step_speed.py` callback).
Figures go to stdout as one JSON line per tool and a table; record them in docs/performance.md.

    pip install -e '.[bench]'             # TRL 1.16 (or: pip install --no-deps trl==1.16.0)
    python bench/gpu_check.py            # about two minutes on one recent GPU
    python bench/gpu_check.py --smoke    # a tiny random Llama, one step per tool, on CUDA or the CPU: seconds

The real-model tier at its GPU size runs on the same machine: `python bench/real_tier.py --gpu` (docs/real-tier.md).
Written for a lent GPU machine; it refuses to run without CUDA, except `--smoke` (the plumbing, fp32 on a CPU).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _pairs import build_tiny
from _train_bench import require_trl, trl_help, use_bf16
from po_step_speed import export_gguf, scored_rows, step_timer


def peak_reset():
    import torch

    if not torch.cuda.is_available():
        return
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def run_sft(args, timer, work: Path) -> None:
    from polyfuse.data import PreferenceRow, SFTRow
    from polyfuse.models import ModelSpec
    from polyfuse.trainers import SFTTrainConfig, train_sft

    pairs = [PreferenceRow.model_validate_json(line) for line in Path(args.rows).read_text().splitlines()]
    rows = [SFTRow(id=p.id, prompt=p.prompt, completion=p.chosen) for p in pairs]
    config = SFTTrainConfig(batch_size=2 * args.batch_size, max_length=args.max_length, bf16=args.bf16, shuffle=False,
                            learning_rate=args.lr)  # fmt: skip
    train_sft(ModelSpec(path=args.model_dir, device=args.device), rows, config, work / "sft", callbacks=[timer])


def run_infifpo(args, timer, work: Path) -> None:
    from polyfuse.data import PreferenceRow
    from polyfuse.models import ModelSpec
    from polyfuse.trainers import PreferenceTrainConfig, train_preference

    rows = [PreferenceRow.model_validate_json(line) for line in Path(args.rows).read_text().splitlines()]
    config = PreferenceTrainConfig(objective="infifpo", batch_size=args.batch_size, max_length=args.max_length,
                                   bf16=args.bf16, shuffle=False, learning_rate=args.lr)  # fmt: skip
    train_preference(ModelSpec(path=args.model_dir, device=args.device), rows, config, work / "po", callbacks=[timer])


def run_trl(args, timer, work: Path, precompute: bool) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines()]
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model, ref = (AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32) for _ in range(2))
    config = DPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=args.batch_size,
                       max_length=args.max_length, learning_rate=args.lr, bf16=args.bf16, gradient_checkpointing=False,
                       beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=precompute,
                       train_sampling_strategy="sequential", num_train_epochs=1, logging_steps=1,
                       save_strategy="no", report_to="none", seed=0)  # fmt: skip
    DPOTrainer(model=model, ref_model=ref, args=config, train_dataset=data, processing_class=tokenizer,
               callbacks=[timer]).train()  # fmt: skip


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " " + trl_help())
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--sources", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per micro-batch")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "polyfuse-gpu-check"))
    parser.add_argument("--smoke", action="store_true", help="a tiny random Llama, 8 pairs, one warm-up and one "
                        "timed step per tool; runs on the CPU too (fp32): the plumbing in seconds")
    args = parser.parse_args()
    require_trl()
    if args.smoke:
        # 8 pairs: SFT (micro-batch 2 x 2 rows) still makes the warm-up step and a timed one
        args.pairs, args.batch_size, args.max_length, args.warmup, args.steps, args.threads = 8, 2, 256, 1, 1, 1
    elif not torch.cuda.is_available():
        raise SystemExit("bench/gpu_check.py needs a CUDA device (--smoke runs on the CPU)")
    args.device, args.bf16 = ("cuda", True) if torch.cuda.is_available() else ("cpu", use_bf16())
    torch.set_num_threads(args.threads)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.model_dir = str(build_tiny(Path(args.workdir) / "tiny-llama", max_positions=1024))
    else:
        args.model_dir = str(export_gguf(Path(args.workdir) / "smollm2-135m"))
    args.rows = str(scored_rows(Path(args.model_dir), args))
    tools = {"polyfuse sft": run_sft, "polyfuse infifpo": run_infifpo,
             "TRL DPO (ref model)": lambda a, t, w: run_trl(a, t, w, precompute=False),
             "TRL DPO (precomputed ref)": lambda a, t, w: run_trl(a, t, w, precompute=True)}  # fmt: skip
    results = []
    for name, run in tools.items():
        work = Path(tempfile.mkdtemp(dir=args.workdir))
        timer = step_timer(args.warmup + args.steps)
        peak_reset()
        start = time.perf_counter()
        run(args, timer, work)
        shutil.rmtree(work, ignore_errors=True)
        measured = timer.times[args.warmup :]
        cuda = torch.cuda.is_available()
        result = {"tool": name, "step_s": statistics.mean(measured),
                  "peak_gib": torch.cuda.max_memory_allocated() / 1024**3 if cuda else float("nan"),
                  "wall_s": time.perf_counter() - start, "device": torch.cuda.get_device_name() if cuda else "cpu"}
        print("GPU_CHECK " + json.dumps(result), flush=True)
        results.append(result)
    base = next(r for r in results if r["tool"] == "TRL DPO (ref model)")["step_s"]
    print(f"\n{'tool':<28}{'s/step':>9}{'/ TRL':>8}{'peak GiB':>10}")
    for r in results:
        print(f"{r['tool']:<28}{r['step_s']:>9.3f}{r['step_s'] / base:>8.2f}{r['peak_gib']:>10.2f}")


if __name__ == "__main__":
    main()
