"""Speed of cross-tokenizer alignment (offsets walk vs edit-distance DP) and of the vocabulary maps.

What it measures
----------------
`--responses` chat responses (`bench/_pairs.py` `synthetic_pairs`: English prose of 10-400 words,
log-normal lengths, each with its own prompt) are aligned between SmolLM2-135M-Instruct (byte-level BPE,
ChatML) and Gemma-3-270M (SentencePiece with byte fallback, no template: plain mode):

* offsets: `response_spans` for both tokenizers (this includes `encode` and the tokenisation with offsets)
  then `align_offsets`, the O(m + n) walk; the walk alone is reported too;
* DP: `align_dp` (rapidfuzz cost matrix + one numpy cumulative minimum per row) on the canonical bytes of
  the same response tokens (end-of-turn and EOS excluded);
* reference: a pure-Python cell loop of the same DP (FuseLLM's), on the first `--reference` responses; its
  paths must equal `align_dp`'s. Ratios are per response on that same subset;
* long: FuseLLM's worst case, one block of about `--long` tokens per side (whole responses' token lists
  concatenated), through `align_dp` and the reference loop.

Then `vocab_map` SmolLM2 -> Gemma-3 and Gemma-3 -> SmolLM2, exact and MinED: cold (empty cache folder)
and cache hit (the same call again: it hashes both vocabularies' bytes, memoised per tokenizer, for the
cache key; a new process adds `token_bytes` once per tokenizer, about 0.3 s for Gemma-3).

The offsets and DP rows are the best of `--repeats` rounds (the machine may be shared). Torch runs on one
thread; rapidfuzz's `cdist` uses every core for large matrices (the vocabulary maps, DP matrices over a
million cells). Wall times.

Run it
------
    python bench/alignment_speed.py                      # 1000 responses, reference DP on 30
    python bench/alignment_speed.py --responses 200 --reference 10 --skip-mined
    python bench/alignment_speed.py --smoke              # two toy-world tokenizers, 12 responses: seconds
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _pairs import REPO, gemma3_gguf, smollm2_gguf, synthetic_pairs  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))
from dtw_reference import reference_dp  # noqa: E402


def path_of(groups) -> set[tuple[int, int]]:
    """The (a, b) pairs a group list implies, enough to compare with a reference path's groups."""
    return {(i, j) for group_a, group_b in groups for i in group_a for j in group_b}


def text_tokens(table, encoded, spans) -> tuple[list[int], list[bytes]]:
    """Response indices and canonical bytes of the tokens that have a span (the response's text)."""
    kept = [k for k, span in enumerate(spans) if span is not None]
    return kept, [table[encoded.response_ids[k]] for k in kept]


def to_response_indices(groups, index_a: list[int], index_b: list[int]):
    return [([index_a[i] for i in a], [index_b[j] for j in b]) for a, b in groups]


def toy_tokenizers() -> dict:
    """The smoke run's pair: two toy-world tokenizers of different algorithms and templates."""
    from polyfuse.toyworld.tokenizers import train_tokenizer

    return {"toy byte-level BPE": train_tokenizer("bpe-bytelevel", 400, "llama3"),
            "toy metaspace BPE": train_tokenizer("bpe-metaspace", 400, "zephyr")}


def best_of(repeats: int, compute):
    """(result, best wall time in seconds) of `repeats` calls of `compute`."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = compute()
        times.append(time.perf_counter() - started)
    return result, min(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--responses", type=int, default=1000)
    parser.add_argument("--reference", type=int, default=30, help="responses for the pure-Python DP")
    parser.add_argument("--long", type=int, default=2048, help="tokens per side of the long DP case")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the offsets and DP timings (best kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-mined", action="store_true", help="time only the exact vocabulary maps")
    parser.add_argument("--smoke", action="store_true", help="two toy-world tokenizers (byte-level BPE, "
                        "SentencePiece-style BPE) instead of SmolLM2 and Gemma-3, 12 responses, one round: seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.responses, args.reference, args.long, args.repeats = 12, 4, 256, 1

    import torch

    torch.set_num_threads(1)
    from polyfuse.alignment import align_dp, align_offsets, response_spans, token_bytes, vocab_map
    from polyfuse.models import ModelSpec, load_tokenizer

    rows = [(r["prompt"], r["chosen"][0]["content"]) for r in synthetic_pairs(args.responses, seed=args.seed)]
    started = time.perf_counter()
    tokenizers = toy_tokenizers() if args.smoke else {
        name: load_tokenizer(ModelSpec(path=str(gguf.parent), gguf_file=gguf.name))
        for name, gguf in (("SmolLM2", smollm2_gguf()), ("Gemma-3", gemma3_gguf()))}
    print(f"tokenizers {', '.join(tokenizers)} loaded in {time.perf_counter() - started:.1f} s")
    (first, one), (second, other) = tokenizers.items()
    tables = {name: token_bytes(t) for name, t in tokenizers.items()}

    spans, spans_time = best_of(
        args.repeats, lambda: [(response_spans(one, p, r), response_spans(other, p, r)) for p, r in rows])
    offset_groups, walk_time = best_of(args.repeats, lambda: [align_offsets(a[1], b[1]) for a, b in spans])
    texts = [(text_tokens(tables[first], *a), text_tokens(tables[second], *b)) for a, b in spans]
    sides = [(a[1], b[1]) for a, b in texts]
    tokens = sum(len(a) + len(b) for a, b in sides)
    dp_groups, dp_time = best_of(args.repeats, lambda: [align_dp(a, b) for a, b in sides])
    same = sum(groups == to_response_indices(dp, a[0], b[0])
               for groups, dp, (a, b) in zip(offset_groups, dp_groups, texts, strict=True))

    subset = sides[: args.reference]
    started = time.perf_counter()
    reference_paths = [reference_dp(a, b) for a, b in subset]
    reference_time = time.perf_counter() - started
    started = time.perf_counter()
    subset_groups = [align_dp(a, b) for a, b in subset]
    subset_dp_time = time.perf_counter() - started
    started = time.perf_counter()
    for a, b in spans[: args.reference]:
        align_offsets(a[1], b[1])
    subset_walk_time = time.perf_counter() - started
    assert all(path_of(g) == set(p) for g, p in zip(subset_groups, reference_paths, strict=True)), "DP != reference"
    long_a, long_b = [], []
    for a, b in sides:
        if len(long_a) >= args.long:
            break
        long_a, long_b = long_a + a, long_b + b
    started = time.perf_counter()
    long_groups = align_dp(long_a, long_b)
    long_dp_time = time.perf_counter() - started
    started = time.perf_counter()
    long_reference = reference_dp(long_a, long_b)
    long_reference_time = time.perf_counter() - started
    assert path_of(long_groups) == set(long_reference), "DP != reference on the long case"

    n = len(rows)
    print(f"\n{n} responses, {tokens} response tokens (both sides), {tokens / n:.0f} per response pair")
    print("| alignment | total s | ms / response |")
    print("|---|---:|---:|")
    print(f"| spans (encode + offsets, both sides) | {spans_time:.2f} | {1000 * spans_time / n:.2f} |")
    print(f"| offsets walk (`align_offsets`) | {walk_time:.3f} | {1000 * walk_time / n:.3f} |")
    print(f"| DP (`align_dp`, vectorised) | {dp_time:.2f} | {1000 * dp_time / n:.2f} |")
    k = len(subset)
    print(f"| reference DP, pure Python ({k} responses) | {reference_time:.2f} | {1000 * reference_time / k:.1f} |")
    print(f"\non the {k}-response subset: reference / vectorised DP = {reference_time / subset_dp_time:.0f}x, "
          f"vectorised DP / offsets walk = {subset_dp_time / subset_walk_time:.0f}x; "
          f"vectorised DP paths equal the reference: yes")
    print(f"DP groups identical to offset groups on {same}/{n} responses")
    print(f"long case {len(long_a)} x {len(long_b)} tokens: vectorised DP {long_dp_time:.2f} s, "
          f"reference {long_reference_time:.1f} s ({long_reference_time / long_dp_time:.0f}x), same path: yes")

    print("\n| vocabulary map | method | cold s | cache hit s | unmapped |")
    print("|---|---|---:|---:|---:|")
    methods = ["exact"] if args.skip_mined else ["exact", "mined"]
    with tempfile.TemporaryDirectory() as cache:
        for source, pivot in ((first, second), (second, first)):
            for method in methods:
                started = time.perf_counter()
                mapping = vocab_map(tokenizers[source], tokenizers[pivot], method, cache_dir=cache)
                cold = time.perf_counter() - started
                started = time.perf_counter()
                vocab_map(tokenizers[source], tokenizers[pivot], method, cache_dir=cache)
                hit = time.perf_counter() - started
                print(f"| {source} -> {pivot} ({len(mapping)} ids) | {method} | {cold:.1f} | {hit:.2f} | "
                      f"{int((mapping < 0).sum())} |")


if __name__ == "__main__":
    main()
