"""Explicit fusion on two real, heterogeneous models: Gemma-3-270M (teacher, 262k vocabulary) distilled into
SmolLM2-135M-Instruct (student, 49k vocabulary), on CPU.

What it does, each phase in its own process so that its peak memory is its own (`--smoke`: in this process):
1. `teacher`: `polyfuse.teacher.run_teacher` stores Gemma-3's top-10 logits over the response tokens of
   `--texts` synthetic chat texts (its own plain prompt format: the GGUF has no chat template), and SmolLM2's
   own (FuseLLM's candidates include the pivot). Prints, per model, the load time, the scoring time, the
   response positions stored per second of scoring, and the stored bytes per position.
2. `uld`: `train_distill` with InfiFusion's ULD (positional alignment, logit standardisation, top-10)
   for `--steps` optimiser steps; no teacher model is loaded.
3. `fusellm`: the MinED vocabulary map Gemma-3 -> SmolLM2 (built once and cached), character-offset
   alignment, MinCE over {SmolLM2, Gemma-3}, loss 0.9 CE + 0.1 soft CE, `--steps` steps.
Each phase prints its wall time, its peak RSS and the logged losses; the last line is a JSON summary.

    python bench/distill_real.py                    # 16 texts, 4 steps, 2 threads
    python bench/distill_real.py --texts 32 --steps 8
    python bench/distill_real.py --smoke            # the tiny toy world's pivot and a source, 4 short texts, in process
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _pairs import gemma3_gguf, peak_rss_mib, smollm2_gguf, synthetic_pairs, tiny_world  # noqa: E402


def texts(n: int, prompt_words: int = 60, response_words: int = 80) -> list:
    """SFT rows: synthetic chat prompts with their first response, clipped (CPU time)."""
    from polyfuse.data import SFTRow

    rows = []
    for pair in synthetic_pairs(n, seed=1):
        words = pair["chosen"][0]["content"].split()[:response_words]
        prompt = [{**m, "content": " ".join(m["content"].split()[:prompt_words])} for m in pair["prompt"]]
        rows.append(SFTRow(id=pair["id"], prompt=prompt, completion=" ".join(words)))
    return rows


def models(smoke: bool):
    """(student, teacher): SmolLM2 and Gemma-3, or in a smoke run the tiny toy world's pivot and one source
    (other architecture, other tokenizer)."""
    from polyfuse.models import ModelSpec

    if smoke:
        world = tiny_world()
        return (ModelSpec(name="pivot", path=str(world.pivot_path)),
                ModelSpec(name="llama-compare", path=str(world.source_paths["llama-compare"])))
    smol, gemma = smollm2_gguf(), gemma3_gguf()
    return (ModelSpec(name="smollm2", path=str(smol.parent), gguf_file=smol.name),
            ModelSpec(name="gemma3", path=str(gemma.parent), gguf_file=gemma.name))


def time_model_loading() -> dict:
    """Wrap the loader `run_teacher` calls, so that model loading can be taken out of the scoring time."""
    import polyfuse.teacher.run as teacher_run

    spent = {"s": 0.0}
    load = teacher_run.load_model

    def timed(*args, **kwargs):
        begun = time.perf_counter()
        try:
            return load(*args, **kwargs)
        finally:
            spent["s"] += time.perf_counter() - begun

    teacher_run.load_model = timed
    return spent


def phase(name: str, args: argparse.Namespace) -> dict:
    import torch

    from polyfuse.teacher import TeacherConfig, open_stores, run_teacher
    from polyfuse.trainers import DistillTrainConfig, train_distill

    torch.set_num_threads(args.threads)
    student, teacher = models(args.smoke)
    rows = texts(args.texts, 4, 6) if args.smoke else texts(args.texts)  # the toy models have 128 positions
    store = args.work_dir / "store"
    started = time.perf_counter()
    if name == "teacher":
        result, loading = {}, time_model_loading()
        for spec in (teacher, student):  # one model at a time, model loading timed apart from the rest
            begun, loaded_before = time.perf_counter(), loading["s"]
            run_teacher(rows, TeacherConfig(models=[spec], top_k=10, token_budget=1), store, quiet=True)
            manifest = open_stores(store, [spec.label])[0].manifest
            load_s = loading["s"] - loaded_before
            scoring = time.perf_counter() - begun - load_s
            result[spec.label] = {"positions": manifest["positions"], "bytes": manifest["bytes"],
                                  "bytes_per_position": round(manifest["bytes_per_position"], 1),
                                  "model_load_s": round(load_s, 1), "scoring_s": round(scoring, 1),
                                  "positions_per_s": round(manifest["positions"] / scoring, 1)}
    else:
        batch = max(1, args.texts // args.steps)
        objective = {"uld": {"objective": "uld", "teachers": [teacher.label]},
                     "fusellm": {"objective": "fusellm", "teachers": [student.label, teacher.label]}}[name]
        config = DistillTrainConfig(**objective, batch_size=batch, epochs=1, learning_rate=1e-5, max_length=512,
                                    warmup_ratio=0.0, logging_steps=1)
        out = train_distill(student, rows, store, config, args.work_dir / name)
        history = json.loads((out / "polyfuse_training.json").read_text())["log_history"]
        result = {"losses": [e["loss"] for e in history if "loss" in e],
                  "kd": [e["loss/kd"] for e in history if "loss/kd" in e],
                  "steps": sum(1 for e in history if "loss" in e)}
    result.update(phase=name, wall_s=round(time.perf_counter() - started, 1), peak_rss_mib=round(peak_rss_mib()))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/distill-real"))
    parser.add_argument("--smoke", action="store_true", help="the tiny toy world's pivot (student) and a source "
                        "(teacher) instead of SmolLM2 and Gemma-3, 4 short texts, 1 step: the plumbing in seconds")
    parser.add_argument("--phase", choices=["teacher", "uld", "fusellm"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.texts, args.steps, args.threads = 4, 1, 1
    if args.phase:
        print("RESULT " + json.dumps(phase(args.phase, args)))
        return
    results = []
    for name in ("teacher", "uld", "fusellm"):
        if args.smoke:  # the plumbing: each phase in this process, not in a new interpreter (~5 CPU s of imports)
            result = phase(name, args)
            print(f"{name}: {result}")
            results.append(result)
            continue
        command = [sys.executable, __file__, "--phase", name, "--texts", str(args.texts), "--steps", str(args.steps),
                   "--threads", str(args.threads), "--work-dir", str(args.work_dir)]
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"phase {name} failed:\n{proc.stderr[-4000:]}")
        result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
        print(f"{name}: {result}")
        results.append(result)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
