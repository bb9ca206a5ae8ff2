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


# A real model's architecture cut to 2 layers of width 64 (head_dim 64, which vLLM's CPU attention supports).
TWIN_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "head_dim": 64}
TWIN_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                        "generation_config.json")


def random_twin(folder: Path, label: str, seed: int = 0) -> Path:
    """A random-weight model of `folder`'s architecture (`TWIN_SHAPE`) saved with `folder`'s real tokenizer files,
    cached once per machine in the polyfuse cache: for tests of a cross-tokenizer mechanism (top-K through an
    engine, on-policy teachers of another vocabulary) that need the real vocabulary, not the real weights. The
    weights are drawn with standard deviation 0.2 (not the usual 0.02) so a position's top tokens stand apart
    by more than the engines' rounding: top-K ids compare without ties."""
    import hashlib
    import json
    import shutil
    import tempfile

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from polyfuse.config import cache_root

    source = json.loads((folder / "config.json").read_text())
    key = hashlib.sha256(json.dumps([source, TWIN_SHAPE, seed, (folder / "tokenizer.json").stat().st_size],
                                    sort_keys=True).encode()).hexdigest()[:16]
    out = cache_root() / "twins" / f"{label}-{key}"
    if (out / "model.safetensors").exists():
        return out
    config = AutoConfig.from_pretrained(folder)
    for name, value in TWIN_SHAPE.items():
        setattr(config, name, value)
    if getattr(config, "layer_types", None):  # keep both attention kinds (Gemma-3: sliding, then full)
        config.layer_types = config.layer_types[-TWIN_SHAPE["num_hidden_layers"]:]
    if getattr(config, "query_pre_attn_scalar", None):
        config.query_pre_attn_scalar = TWIN_SHAPE["head_dim"]
    config.initializer_range = 0.2
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    model.save_pretrained(building)
    for name in TWIN_TOKENIZER_FILES:
        if (folder / name).exists():
            shutil.copyfile(folder / name, building / name)
    try:
        building.rename(out)  # whole or absent; another process may have won the race
    except OSError:
        shutil.rmtree(building, ignore_errors=True)
    return out


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
