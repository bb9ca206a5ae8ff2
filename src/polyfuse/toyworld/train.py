"""Model construction and the compact training loops of the toy world.

Training sequences are made by `polyfuse.models.encode`, so the text a toy model learns is exactly
what polyfuse's sampler renders and its trainers score (own template, end-of-turn included). The
language models learn the answer tokens only; the reward model learns a logit per (prompt, response)
with a binary cross-entropy on verifier labels, read at the last token like transformers'
sequence classifiers do. AdamW, linear warmup then cosine decay, gradient clipping at 1.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator

import torch
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForCausalLM,
    MistralForSequenceClassification,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3ForSequenceClassification,
)

from polyfuse.data import PromptRow
from polyfuse.models import encode
from polyfuse.toyworld.config import LoraRecipe, ModelRecipe

MAX_POSITIONS = 128
_CLASSES = {
    "llama": (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, Qwen3ForSequenceClassification),
    "mistral": (MistralConfig, MistralForCausalLM, MistralForSequenceClassification),
    "gpt2": (GPT2Config, GPT2LMHeadModel, GPT2ForSequenceClassification),
}


def make_model(recipe: ModelRecipe, tokenizer, classifier: bool = False):
    """A freshly initialised model of the recipe's architecture sized for `tokenizer`. No dropout
    (GPT-2 has 0.1 by default): these models underfit a short run, and dropout made GPT-2 miss
    the 80% mark on arithmetic for some seeds."""
    config_cls, lm_cls, cls_cls = _CLASSES[recipe.architecture]
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    if classifier:
        special.update(num_labels=1)
    if recipe.architecture == "gpt2":
        config = config_cls(vocab_size=len(tokenizer), n_embd=recipe.hidden_size, n_layer=recipe.layers,
                            n_head=recipe.heads, n_inner=2 * recipe.hidden_size, n_positions=MAX_POSITIONS,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **special)
    else:
        config = config_cls(vocab_size=len(tokenizer), hidden_size=recipe.hidden_size,
                            intermediate_size=2 * recipe.hidden_size, num_hidden_layers=recipe.layers,
                            num_attention_heads=recipe.heads, num_key_value_heads=recipe.heads,
                            head_dim=recipe.hidden_size // recipe.heads,  # Qwen3 defaults to 128
                            max_position_embeddings=MAX_POSITIONS, **special)
    model = (cls_cls if classifier else lm_cls)(config)
    if not classifier:
        model.loss_type = "ForCausalLM"  # transformers cannot tell it from the name GPT2LMHeadModel, and warns
        model.generation_config.update(**{k: v for k, v in special.items() if k.endswith("token_id")})
    return model


def with_lora(model, lora: LoraRecipe, seed: int):
    """`model` wrapped in a LoRA adapter on every linear layer of its blocks (peft's "all-linear": not the
    head, not the embeddings), initialised from `seed`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules="all-linear",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _lr_at(step: int, steps: int, peak: float) -> float:
    warmup = max(1, min(50, steps // 10))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _padded(seqs: list[list[int]], value: int) -> torch.Tensor:
    """Every sequence right-padded with `value` to the longest, as one table built once: a step's batch is
    rows of it (`_batch`), not a tensor built from Python lists every step."""
    table = torch.full((len(seqs), max(map(len, seqs))), value, dtype=torch.long)
    for i, seq in enumerate(seqs):
        table[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return table


def _batch(lengths: torch.Tensor, batch: list[int], *tables: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The attention mask of the sequences `batch` (their lengths in `lengths`), right-padded to their longest,
    then those rows of each padded table cut to that width: the same tensors as padding the batch itself."""
    index = torch.tensor(batch)
    width = int(lengths[index].max())
    mask = (torch.arange(width) < lengths[index, None]).long()
    return mask, *(table[:, :width][index] for table in tables)


def lm_examples(tokenizer, rows: list[PromptRow]) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per row: labels are -100 on the prompt, the response ids elsewhere."""
    out = []
    for row in rows:
        enc = encode(tokenizer, row.prompt, row.answer)
        out.append((enc.input_ids, [-100] * len(enc.prompt_ids) + enc.response_ids))
    return out


def _batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless shuffled epochs of indices."""
    rng = random.Random(seed)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for start in range(0, n - min(batch_size, n) + 1, min(batch_size, n)):
            yield order[start : start + batch_size]


def _fit(model, recipe: ModelRecipe, n: int, loss_of: Callable[[list[int]], torch.Tensor], seed: int,
         advance: Callable[[], None] | None) -> float:
    """Run `recipe.steps` optimiser steps on batches of example indices; returns the last loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    loss = torch.tensor(float("nan"))
    for step, batch in zip(range(recipe.steps), _batches(n, recipe.batch_size, seed), strict=False):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, recipe.steps, recipe.learning_rate)
        loss = loss_of(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if advance is not None:
            advance()
    model.eval()
    return float(loss.detach())


def train_lm(model, tokenizer, recipe: ModelRecipe, rows: list[PromptRow], seed: int,
             advance: Callable[[], None] | None = None) -> float:
    """Teach `model` the answers of `rows` (loss on the response tokens only)."""
    examples = lm_examples(tokenizer, rows)
    lengths = torch.tensor([len(ids) for ids, _ in examples])
    ids = _padded([ids for ids, _ in examples], tokenizer.pad_token_id)
    labels = _padded([labels for _, labels in examples], -100)

    def loss_of(batch: list[int]) -> torch.Tensor:
        mask, batch_ids, batch_labels = _batch(lengths, batch, ids, labels)
        return model(input_ids=batch_ids, attention_mask=mask, labels=batch_labels).loss

    return _fit(model, recipe, len(examples), loss_of, seed, advance)


def train_reward_model(model, tokenizer, recipe: ModelRecipe, examples: list[tuple[PromptRow, str, bool]],
                       seed: int, advance: Callable[[], None] | None = None) -> float:
    """Teach a one-logit classifier to score (prompt, response) pairs by their verifier label."""
    encoded = [encode(tokenizer, row.prompt, response).input_ids for row, response, _ in examples]
    lengths = torch.tensor([len(ids) for ids in encoded])
    ids = _padded(encoded, tokenizer.pad_token_id)
    targets = torch.tensor([float(label) for _, _, label in examples])

    def loss_of(batch: list[int]) -> torch.Tensor:
        mask, batch_ids = _batch(lengths, batch, ids)
        logits = model(input_ids=batch_ids, attention_mask=mask).logits[:, 0]
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, targets[batch])

    return _fit(model, recipe, len(encoded), loss_of, seed, advance)
