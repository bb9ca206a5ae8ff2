"""The layouts without padding or repeated prompts give the padded layout's numbers: prefix sharing for
preference pairs (the prompt once, responses behind a block mask) and packing for SFT / distillation
(sequences back to back, position ids restarting), on tiny Llama, Mistral, Qwen3 and GPT-2 models in
fp32, under sdpa and eager attention; a model that cannot take a layout is refused with its reason and
trains padded."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from polyfuse.data import PreferenceRow, SFTRow
from polyfuse.models import ModelSpec
from polyfuse.models.forward import forward_logps, pad_batch
from polyfuse.models.layouts import (
    SEGMENT_ATTENTION,
    attention_of,
    mask_dtype,
    mask_problem,
    pack_batch,
    shared_prompt_batch,
    shared_tokens,
)
from polyfuse.objectives import IGNORE_INDEX
from polyfuse.trainers import PreferenceTrainConfig, SFTTrainConfig, train_preference, train_sft
from polyfuse.trainers.collate import SequenceCollator, collator_for
from tiny_lm import build_tiny_model, sentence

VOCAB = 40
ARCHITECTURES = {
    "llama": dict(num_key_value_heads=2, intermediate_size=64),
    "mistral": dict(num_key_value_heads=2, intermediate_size=64, sliding_window=None),
    "qwen3": dict(num_key_value_heads=2, intermediate_size=64, head_dim=8),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=128),
}


def tiny(kind: str, attention: str = "sdpa"):
    common = {} if kind == "gpt2" else dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             max_position_embeddings=128)  # fmt: skip
    config = AutoConfig.for_model(kind, vocab_size=VOCAB, **common, **ARCHITECTURES[kind])
    config._attn_implementation = attention
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attention).eval()


def random_pairs(count: int, roles: int = 2, seed: int = 0) -> list[tuple[list[int], list[list[int]]]]:
    rng = random.Random(seed)
    ids = lambda low, high: [rng.randrange(1, VOCAB) for _ in range(rng.randint(low, high))]  # noqa: E731
    return [(ids(1, 12), [ids(1, 15) for _ in range(roles)]) for _ in range(count)]


def unshared(pairs) -> dict[str, torch.Tensor]:
    """The plain layout: one left-padded row per (pair, role), role by role."""
    roles = len(pairs[0][1])
    sequences = [(p, p + rs[r]) for r in range(roles) for p, rs in pairs]
    return pad_batch([s for _, s in sequences], [len(p) for p, _ in sequences], 0, side="left")


def reference_logps(model, pairs) -> torch.Tensor:
    """Each (pair, role)'s log-prob, one unpadded sequence at a time through the model's own forward."""
    out = []
    for r in range(len(pairs[0][1])):
        for prompt, responses in pairs:
            ids = torch.tensor([prompt + responses[r]])
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
            out.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(responses[r])[:, None]).sum())
    return torch.stack(out)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_shared_prompt_logps_equal_the_unshared_path(kind, attention):
    model = tiny(kind, attention)
    pairs = random_pairs(5, roles=3 if kind == "llama" else 2)
    with torch.no_grad():
        plain, plain_n, _ = forward_logps(model, unshared(pairs))
        shared_batch = shared_prompt_batch(pairs, 0, mask_dtype(model))
        shared, shared_n, _ = forward_logps(model, shared_batch)
        expected = reference_logps(model, pairs)
    assert torch.equal(shared_n, plain_n)
    assert torch.equal(plain_n, torch.tensor([len(rs[r]) for r in range(len(pairs[0][1])) for _, rs in pairs]))
    assert (shared - plain).abs().max().item() < 1e-5
    assert (shared - expected).abs().max().item() < 1e-5
    # Fewer positions than the unshared rows hold: each prompt once (plus its last token per extra role).
    real, repeated = shared_tokens(pairs)
    assert real == sum(len(p) + sum(len(r) for r in rs) + len(rs) - 1 for p, rs in pairs) and real < repeated
    # The test can fail: a plain causal mask (each response sees the responses before it) changes log-probs.
    ids = shared_batch["input_ids"]
    width = ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril() & (ids != 0)[:, None, None, :]
    causal |= torch.eye(width, dtype=torch.bool)
    if attention == "eager":
        causal = torch.zeros(causal.shape).masked_fill(~causal, torch.finfo(torch.float32).min)
    leaky = {**shared_batch, "attention_mask": causal}
    with torch.no_grad():
        wrong, _, _ = forward_logps(model, leaky)
    assert (wrong - plain).abs().max().item() > 1e-3


def test_shared_prompt_mask_by_hand():
    batch = shared_prompt_batch([([5, 6], [[7], [8, 9]])], pad_id=0)
    # prompt[:-1] = [5]; chosen block [6, 7]; rejected block [6, 8, 9]
    assert batch["input_ids"].tolist() == [[5, 6, 7, 6, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 1, 2, 3]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 7, IGNORE_INDEX, 8, 9]]
    assert batch["label_groups"].tolist() == [[-1, -1, 0, -1, 1, 1]]
    assert batch["attention_mask"][0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 0, 0, 1, 0, 0],
        [1, 0, 0, 1, 1, 0],
        [1, 0, 0, 1, 1, 1],
    ]


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_packed_logps_and_sft_loss_equal_the_padded_path(kind):
    model = tiny(kind)
    rng = random.Random(1)
    sequences = [[rng.randrange(1, VOCAB) for _ in range(rng.randint(3, 30))] for _ in range(6)]
    prompts = [rng.randint(1, len(s) - 1) for s in sequences]
    with torch.no_grad():
        padded, padded_n, _ = forward_logps(model, pad_batch(sequences, prompts, 0, side="left"))
        packed_batch = pack_batch(sequences, prompts)
        packed, packed_n, _ = forward_logps(model, packed_batch)
    assert torch.equal(packed_n, padded_n) and packed_batch["input_ids"].shape == (1, sum(map(len, sequences)))
    assert (packed - padded).abs().max().item() < 1e-5
    assert abs(packed.sum() / packed_n.sum() - padded.sum() / padded_n.sum()).item() < 1e-6  # SFT's token mean
    # The same under attention per packed sequence (no block-diagonal mask over the whole row).
    model.set_attn_implementation(SEGMENT_ATTENTION)
    with torch.no_grad():
        segments, segments_n, _ = forward_logps(model, packed_batch)
    assert torch.equal(segments_n, padded_n) and (segments - padded).abs().max().item() < 1e-5
    # The test can fail: without the restarting position ids the sequences see each other.
    joined = {**packed_batch, "position_ids": torch.arange(packed_batch["input_ids"].shape[1])[None]}
    with torch.no_grad():
        wrong, _, _ = forward_logps(model, joined)
    assert (wrong - padded).abs().max().item() > 1e-3


def test_a_model_that_cannot_take_the_mask_is_named_with_its_reason():
    model = tiny("mistral")
    model.config.sliding_window = 16
    assert "sliding-window attention (16 tokens)" in mask_problem(model, 40)
    assert mask_problem(model, 10) is None
    model.config._attn_implementation = "flash_attention_2"
    assert "'flash_attention_2' takes no custom 4D attention mask" in mask_problem(model, 10)


def test_collator_for_falls_back_to_padding_when_the_layouts_disagree():
    """A model that ignores position ids in its attention (here: the packing detection defeated by a
    custom mask function) gives other log-probs packed: the check on the first rows catches it."""
    model = tiny("llama")
    rng = random.Random(2)
    features = [{"completion_input_ids": [rng.randrange(1, VOCAB) for _ in range(12)], "completion_prompt_length": 4}
                for _ in range(3)]  # fmt: skip
    padded = SequenceCollator(0, ("completion",))
    collator, layout = collator_for(model, features, padded, padding_free=True)
    assert layout == "packed" and collator.padding_free and attention_of(model) == SEGMENT_ATTENTION
    model.set_attn_implementation("sdpa")
    original = model.model.forward

    def ignoring_positions(*args, position_ids=None, **kwargs):  # attention as if one sequence
        return original(*args, position_ids=None, **kwargs)

    model.model.forward = ignoring_positions
    collator, layout = collator_for(model, features, padded, padding_free=True)
    assert collator is padded and layout.startswith("padded (log-probs differ by")


@pytest.mark.slow
def test_training_with_and_without_padding_free_gives_the_same_model(tmp_path):
    """End to end, SFT (packed) and DPO (shared prompt) with plain SGD: the saved weights equal those of the
    padded layout, and the summary says which layout trained."""
    spec = ModelSpec(path=build_tiny_model(tmp_path / "pivot"))
    rng = random.Random(4)
    sft = [SFTRow(id=f"s{i}", prompt=sentence(rng), completion=sentence(rng, 1, 20)) for i in range(4)]
    pairs = [PreferenceRow(id=f"p{i}", prompt=sentence(rng), chosen=sentence(rng, 1, 15), rejected=sentence(rng, 1, 15))
             for i in range(4)]  # fmt: skip
    exact = dict(optim="sgd", learning_rate=0.5, lr_scheduler="constant", warmup_ratio=0.0, max_grad_norm=0.0, batch_size=4)
    for train, config, rows, fast in ((train_sft, SFTTrainConfig, sft, "packed"),
                                      (train_preference, PreferenceTrainConfig, pairs, "shared_prompt")):  # fmt: skip
        outs = {free: train(spec, rows, config(padding_free=free, **exact), tmp_path / f"{fast}-{free}") for free in (True, False)}
        layouts = {free: json.loads((out / "polyfuse_training.json").read_text())["layout"] for free, out in outs.items()}
        assert layouts == {True: fast, False: "padded"}
        from safetensors.torch import load_file

        a, b = (load_file(str(outs[free] / "model.safetensors")) for free in (True, False))
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
        before = load_file(str(tmp_path / "pivot" / "model.safetensors"))
        assert max((a[k] - before[k]).abs().max().item() for k in a) > 1e-3  # it trained
