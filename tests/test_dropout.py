"""Preference training disables dropout as TRL's DPOTrainer does, config-level attention dropout included:
on a model with dropout, DPO's step-0 loss is ln 2 on every pair (policy = reference: -log sigmoid(0)),
and the saved model keeps its own dropout rates."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from polyfuse.data import PreferenceRow
from polyfuse.models import ModelSpec, load_model
from polyfuse.trainers import PreferenceTrainConfig, train_preference
from polyfuse.trainers.model_setup import disable_dropout
from tiny_lm import build_tokenizer, sentence

RATE = 0.5


def build_dropout_model(folder, kind: str) -> str:
    """A tiny GPT-2 (dropout in nn.Dropout modules) or Llama (dropout only as the `attention_dropout`
    float that the attention kernel reads) with high dropout rates."""
    tokenizer = build_tokenizer()
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                            resid_pdrop=RATE, embd_pdrop=RATE, attn_pdrop=RATE, **ids)  # fmt: skip
        model = GPT2LMHeadModel(config)
    else:
        config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, attention_dropout=RATE, **ids)  # fmt: skip
        config._attn_implementation = "eager"
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def pairs(count: int) -> list[PreferenceRow]:
    rng = random.Random(5)
    return [PreferenceRow(id=f"p{i}", prompt=sentence(rng), chosen=sentence(rng, 3, 12), rejected=sentence(rng, 3, 12))
            for i in range(count)]  # fmt: skip


def first_loss(out) -> float:
    return json.loads((out / "polyfuse_training.json").read_text())["log_history"][0]["loss"]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_step_zero_dpo_loss_is_ln2_on_a_model_with_dropout(tmp_path, kind):
    spec = ModelSpec(path=build_dropout_model(tmp_path / kind, kind))
    config = PreferenceTrainConfig(batch_size=6, learning_rate=1e-3, warmup_ratio=0.0, seed=1)
    assert config.disable_dropout  # the preference default
    out = train_preference(spec, pairs(6), config, tmp_path / "off")
    history = json.loads((out / "polyfuse_training.json").read_text())["log_history"]
    # TRL's definition at step 0 (policy = M0): -log sigmoid(beta * 0) = ln 2, rewards 0.
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(history[0]["rewards/margins"]) < 1e-6
    # The saved model keeps its own dropout rates.
    saved = load_model(ModelSpec(path=str(out))).config
    rates = (saved.attn_pdrop, saved.resid_pdrop) if kind == "gpt2" else (saved.attention_dropout,)
    assert set(rates) == {RATE}

    # The test can fail: with dropout left on, the policy's log-probs are noisy and step 0 is not ln 2.
    kept = train_preference(spec, pairs(6), config.model_copy(update={"disable_dropout": False}), tmp_path / "on")
    assert abs(first_loss(kept) - math.log(2)) > 1e-3


def test_disable_dropout_reaches_modules_and_config_rates(tmp_path):
    model = load_model(ModelSpec(path=build_dropout_model(tmp_path / "llama", "llama")))
    model.train()
    ids = torch.tensor([[1, 9, 10, 11, 12, 13]])
    assert not torch.equal(model(ids).logits, model(ids).logits)  # attention dropout is on in train mode
    changed = disable_dropout(model).rates
    assert changed and all(v == RATE for v in changed.values())
    assert torch.equal(model(ids).logits, model(ids).logits)
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in model.model.layers)
