"""SFT and preference training on a tiny random Llama: gradient-accumulation invariance against a direct
full-batch step, LoRA, the step-0 invariant end to end, dropping, saving and data checks."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import TrainerCallback

from polyfuse.data import PreferenceRow, SFTRow, response_text
from polyfuse.errors import DataError
from polyfuse.logprobs import compute_reference_logps
from polyfuse.models import ModelSpec, encode, load_model, load_tokenizer
from polyfuse.trainers import (
    PreferenceTrainConfig,
    SFTTrainConfig,
    tokenize_pairs,
    train_preference,
    train_sft,
)
from tiny_lm import build_tiny_model, sentence, source_columns

# Plain SGD, constant lr, no clipping: the update is exactly -lr * gradient, so any change in how the loss
# is normalised shows up in the parameters (Adam's first step would hide a uniform scale error).
EXACT_STEP = dict(
    optim="sgd", learning_rate=0.5, lr_scheduler="constant", warmup_ratio=0.0, max_grad_norm=0.0
)


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return ModelSpec(path=build_tiny_model(tmp_path_factory.mktemp("pivot")))


def saved_params(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def sgd_step(model, loss: torch.Tensor, lr: float) -> dict[str, torch.Tensor]:
    loss.backward()
    return {name: (p - lr * p.grad).detach() for name, p in model.named_parameters()}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def response_logps(model, tokenizer, prompt, response) -> tuple[torch.Tensor, int]:
    """Sum of log-probs of the response tokens of one unpadded sequence, and their count."""
    encoded = encode(tokenizer, prompt, response_text(response))
    ids = torch.tensor([encoded.input_ids])
    start = len(encoded.prompt_ids)
    logits = model(input_ids=ids).logits[0, start - 1 : -1]
    return -F.cross_entropy(logits, ids[0, start:], reduction="sum"), ids.shape[1] - start


def sft_rows(count: int, seed: int = 0) -> list[SFTRow]:
    rng = random.Random(seed)
    rows = [SFTRow(id=f"s{i}", prompt=sentence(rng), completion=sentence(rng, 1, 20)) for i in range(count)]
    rows[0] = SFTRow(
        id="s0",
        prompt=[{"role": "user", "content": "one two"}],
        completion=[{"role": "assistant", "content": "three"}],
    )
    return rows


def pair_rows(count: int, seed: int = 0) -> list[PreferenceRow]:
    rng = random.Random(seed)
    return [
        PreferenceRow(
            id=f"p{i}", prompt=sentence(rng), chosen=sentence(rng, 1, 15), rejected=sentence(rng, 1, 15)
        )
        for i in range(count)
    ]


def test_sft_gradient_accumulation_equals_full_batch(spec, tmp_path):
    rows = sft_rows(4)
    micro = train_sft(
        spec, rows, SFTTrainConfig(batch_size=1, grad_accum=4, **EXACT_STEP), tmp_path / "micro"
    )
    full = train_sft(spec, rows, SFTTrainConfig(batch_size=4, grad_accum=1, **EXACT_STEP), tmp_path / "full")

    model, tokenizer = load_model(spec), load_tokenizer(spec)
    scored = [response_logps(model, tokenizer, r.prompt, r.completion) for r in rows]
    token_mean = -sum(s for s, _ in scored) / sum(n for _, n in scored)
    expected = sgd_step(model, token_mean, EXACT_STEP["learning_rate"])
    assert max_difference(saved_params(micro), saved_params(full)) < 1e-6
    assert max_difference(saved_params(full), expected) < 1e-6

    # The test can fail: averaging per-row means instead (the classic accumulation bug) moves the weights.
    model.zero_grad()
    row_mean = (
        -sum(s / n for s, n in [response_logps(model, tokenizer, r.prompt, r.completion) for r in rows]) / 4
    )
    wrong = sgd_step(model, row_mean, EXACT_STEP["learning_rate"])
    assert max_difference(saved_params(micro), wrong) > 1e-4


@pytest.mark.parametrize(("objective", "beta"), [("dpo", 1.0), ("ln_dpo", 10.0)])
def test_preference_gradient_accumulation_equals_full_batch(spec, tmp_path, objective, beta):
    model, tokenizer = load_model(spec), load_tokenizer(spec)
    # References offset from the pivot so that each pair gets its own weight sigma(-u) at step 0.
    rows = []
    for row, offset in zip(
        compute_reference_logps(model, tokenizer, pair_rows(4)), [1.5, -2.0, 0.5, 3.0], strict=True
    ):
        total = row.ref_chosen_logps + offset
        rows.append(
            row.model_copy(
                update={"ref_chosen_logps": total, "ref_mean_chosen_logps": total / row.ref_chosen_ntokens}
            )
        )
    config = dict(objective=objective, beta=beta, **EXACT_STEP)
    micro = train_preference(
        spec, rows, PreferenceTrainConfig(batch_size=1, grad_accum=4, **config), tmp_path / "micro"
    )
    full = train_preference(
        spec, rows, PreferenceTrainConfig(batch_size=4, grad_accum=1, **config), tmp_path / "full"
    )

    losses = []
    for row in rows:
        (s_w, n_w), (s_l, n_l) = (
            response_logps(model, tokenizer, row.prompt, r) for r in (row.chosen, row.rejected)
        )
        if objective == "dpo":
            h = (s_w - row.ref_chosen_logps) - (s_l - row.ref_rejected_logps)
        else:
            h = (s_w / n_w - row.ref_mean_chosen_logps) - (s_l / n_l - row.ref_mean_rejected_logps)
        losses.append(F.softplus(-beta * h))
    expected = sgd_step(model, torch.stack(losses).mean(), EXACT_STEP["learning_rate"])
    assert max_difference(saved_params(micro), saved_params(full)) < 1e-6
    assert max_difference(saved_params(full), expected) < 1e-6
    assert max_difference(saved_params(full), dict(model.named_parameters())) > 1e-3  # it did train


def test_step_zero_is_ln2_with_references_computed_before_training(spec, tmp_path):
    rows = pair_rows(6, seed=3)
    long_row = PreferenceRow(id="long", prompt="the cat", chosen=" ".join(["dog"] * 60), rejected="no")
    out = tmp_path / "dpo"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run")
    config = PreferenceTrainConfig(
        batch_size=6, epochs=2, max_length=48, learning_rate=1e-3, warmup_ratio=0.0
    )
    train_preference(spec, rows + [long_row], config, out)

    summary = json.loads((out / "polyfuse_training.json").read_text())
    first = summary["log_history"][0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(first[name]) < 1e-5
    assert {"logps/chosen", "logps/rejected", "rewards/accuracies"} <= first.keys()
    assert summary["log_history"][1]["rewards/margins"] > 0  # one step on the same pairs separates them
    assert summary["dropped"] == ["long"] and summary["examples"] == 6
    # Saved atomically: a complete folder replaced the old one, nothing left beside it.
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dpo"]
    assert load_model(ModelSpec(path=str(out))).config.num_hidden_layers == 2


class TrainableNames(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]


def test_lora_trains_only_adapters_and_saves_merged_weights(spec, tmp_path):
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    config = SFTTrainConfig(batch_size=2, learning_rate=1e-2, warmup_ratio=0.0, lora=lora)
    spy = TrainableNames()
    out = train_sft(spec, sft_rows(4, seed=5), config, tmp_path / "lora", callbacks=[spy])

    assert spy.names and all("lora_" in n for n in spy.names)
    assert not (out / "adapter_config.json").exists()
    before, after = saved_params_of(spec), dict(load_model(ModelSpec(path=str(out))).named_parameters())
    assert before.keys() == after.keys()
    for name in before:
        changed = not torch.equal(before[name], after[name].detach())
        assert changed == any(m in name for m in ("q_proj", "v_proj")), name


def saved_params_of(spec) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in load_model(spec).named_parameters()}


def test_reference_counts_must_match_the_trainers_tokens(spec):
    tokenizer = load_tokenizer(spec)
    row = PreferenceRow(id="x", prompt="the cat", chosen="a dog", rejected="no", ref_chosen_ntokens=99)
    with pytest.raises(
        DataError, match="row 'x': the chosen response has 3 tokens .* ref_chosen_ntokens is 99"
    ):
        tokenize_pairs(tokenizer, [row], ("chosen", "rejected"), 64)
    features, dropped = tokenize_pairs(
        tokenizer, [row.model_copy(update={"ref_chosen_ntokens": 3})], ("chosen", "rejected"), 64
    )
    assert dropped == [] and features[0]["ref_chosen_ntokens"] == 3
    assert (
        features[0]["chosen_input_ids"][features[0]["chosen_prompt_length"] :]
        == encode(tokenizer, "the cat", "a dog").response_ids
    )


def test_wrpo_alpha_follows_completed_optimiser_steps(spec, tmp_path):
    """alpha(t) = alpha_max * t / T with t counted after gradient accumulation: 3 optimiser steps of 2
    micro-batches each give alpha 0, 1/3 and 2/3 of alpha_max, the same for both micro-batches of a step."""
    rng = random.Random(7)
    rows = [row.model_copy(update={"chosen_source": sentence(rng, 1, 15)}) for row in pair_rows(6, seed=7)]
    config = PreferenceTrainConfig(
        objective="wrpo", objective_args={"alpha_max": 0.3}, batch_size=1, grad_accum=2, learning_rate=1e-3,
        warmup_ratio=0.0, shuffle=False,
    )
    out = train_preference(spec, rows, config, tmp_path / "wrpo")
    history = json.loads((out / "polyfuse_training.json").read_text())["log_history"]
    alphas = [entry["wrpo/alpha"] for entry in history if "wrpo/alpha" in entry]
    assert alphas == pytest.approx([0.0, 0.1, 0.2])
    assert {"rewards/accuracies_source", "rewards/accuracies_target", "rewards/accuracies"} <= history[0].keys()


def test_infifpo_with_lora_reads_source_columns_and_trains_only_adapters(spec, tmp_path):
    rng = random.Random(11)
    rows = [row.model_copy(update=source_columns(rng, sources=3)) for row in pair_rows(6, seed=11)]
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    config = PreferenceTrainConfig(objective="infifpo", batch_size=3, learning_rate=1e-2, warmup_ratio=0.0, lora=lora)
    spy = TrainableNames()
    out = train_preference(spec, rows, config, tmp_path / "infifpo", callbacks=[spy], source_names=["a", "b", "c"])
    assert spy.names and all("lora_" in n for n in spy.names)
    summary = json.loads((out / "polyfuse_training.json").read_text())
    first = summary["log_history"][0]
    assert summary["sources"] == ["a", "b", "c"] and summary["objective"]["beta"] == 2.5
    picked = {k.removeprefix("fusion/selected/"): v for k, v in first.items() if k.startswith("fusion/selected/")}
    assert picked.keys() == {"M0", "a", "b", "c"} and sum(picked.values()) == pytest.approx(1.0)
    assert first["fusion/ref_margin"] >= first["fusion/pivot_margin"] - 1e-6  # clipping: never below M0's margin
    with pytest.raises(DataError, match="fuse_mean_chosen_logps"):
        train_preference(spec, pair_rows(2), config, tmp_path / "no-sources")


def test_trainer_args_pass_any_trainingarguments_option_and_refuse_what_polyfuse_sets(tmp_path):
    from polyfuse.config import validate
    from polyfuse.errors import ConfigError

    config = SFTTrainConfig(batch_size=3, warmup_ratio=0.25, trainer_args={"adam_beta2": 0.95, "neftune_noise_alpha": 5.0})
    args = config.training_arguments(tmp_path / "out")
    assert (args.adam_beta2, args.neftune_noise_alpha) == (0.95, 5.0)
    assert (args.per_device_train_batch_size, args.learning_rate, args.seed) == (3, 1e-5, 42)
    assert args.get_warmup_steps(100) == 25  # warmup_ratio is transformers 5's fractional warmup_steps
    assert args.output_dir == str(tmp_path / ".out.work") and args.save_total_limit is None
    for given, message in (({"per_device_train_batch_size": 2}, "polyfuse's key 'batch_size'"),
                           ({"learning_rate": 1.0}, "polyfuse's key 'learning_rate'"),
                           ({"output_dir": "x"}, "cannot be set here"),
                           ({"adam_beta3": 0.9}, "not an option of transformers' TrainingArguments; did you mean adam_beta")):  # fmt: skip
        with pytest.raises(ConfigError, match=f"trainer_args: .*{message}"):
            validate(SFTTrainConfig, {"trainer_args": given})
    with pytest.raises(ConfigError, match="trainer_args: transformers refuses"):
        SFTTrainConfig(trainer_args={"logging_strategy": "sometimes"}).training_arguments(tmp_path / "bad")
