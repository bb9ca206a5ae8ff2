"""A tiny random Llama and a word-level tokenizer with a chat template, saved as a plain HF folder.

Shared by the trainer, log-prob and DDP tests: small enough that a training step takes milliseconds on
CPU, real enough to go through `polyfuse.models.load_model` / `encode` like any checkpoint.
"""

from __future__ import annotations

import random
from pathlib import Path

WORDS = "the a cat dog sat ran on mat big small red blue one two three four five yes no and or is not".split()
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS[4:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(folder: Path, seed: int = 0, max_positions: int = 64) -> str:
    """Save a 2-layer random Llama and its tokenizer in `folder`; returns the folder as a string."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def sentence(rng: random.Random, low: int = 2, high: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def source_columns(rng: random.Random, sources: int) -> dict[str, list]:
    """Consistent `fuse_*` lists (sum = mean x count) for chosen and rejected."""
    columns: dict[str, list] = {}
    for role in ("chosen", "rejected"):
        counts = [rng.randint(3, 9) for _ in range(sources)]
        means = [rng.uniform(-6.0, -2.0) for _ in range(sources)]
        columns[f"fuse_{role}_ntokens"] = counts
        columns[f"fuse_mean_{role}_logps"] = means
        columns[f"fuse_{role}_logps"] = [m * n for m, n in zip(means, counts, strict=True)]
    return columns
