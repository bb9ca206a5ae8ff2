"""The unpaired trainer (`polyfuse train cgpo|fusesft`, a recipe's `upo`) on a tiny random Llama: CGPO's class
sampler, its step-0 losses against the formulas, FuseSFT's weighted loss against a naive forward, the refusals
before any model is loaded, and the stage's commands and recipe checks. KTO against TRL: test_kto_trl.py."""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import pytest
import torch

from polyfuse.data import UnpairedRow, response_text, write_rows
from polyfuse.data.io import write_metadata
from polyfuse.errors import DataError
from polyfuse.logprobs import compute_reference_logps
from polyfuse.models import ModelSpec, encode, load_model, load_tokenizer
from polyfuse.objectives import fusesft_row_weights
from polyfuse.trainers import UnpairedTrainConfig, train_unpaired
from polyfuse.trainers.unpaired import ClassBalancedSampler
from tiny_lm import build_tiny_model, sentence

QUIET = dict(save_steps=0, logging_steps=1, lr_scheduler="constant", warmup_ratio=0.0, max_length=64)


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return ModelSpec(path=build_tiny_model(tmp_path_factory.mktemp("pivot")))


def rows_of(count: int, seed: int = 0, per_prompt: int = 2) -> list[UnpairedRow]:
    rng = random.Random(seed)
    prompts = [sentence(rng) for _ in range(count // per_prompt)]
    return [UnpairedRow(id=f"u{i}", prompt=prompts[i // per_prompt], prompt_id=f"p{i // per_prompt}",
                        completion=sentence(rng, 1, 12), label="DU"[i % 2], reward=rng.random(),
                        correct=i % 2 == 0) for i in range(count)]  # fmt: skip


def logged(out) -> list[dict]:
    return [e for e in json.loads((out / "polyfuse_training.json").read_text())["log_history"] if "loss" in e]


# --- CGPO's class sampler ----------------------------------------------------------------------------------------


def test_class_sampler_draws_half_of_each_class_per_micro_batch_in_proportion_to_the_weights():
    labels = [True] * 3 + [False] * 7
    weights = [1.0, 3.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0]
    sampler = ClassBalancedSampler(labels, weights, per_class=2, seed=42)
    assert sampler.steps == 4 and len(sampler) == 16  # the larger class (7 rows) fills ceil(7 / 2) micro-batches
    drawn = list(sampler)
    for start in range(0, len(drawn), 4):
        assert [labels[i] for i in drawn[start : start + 4]] == [True, True, False, False]
    assert drawn == list(ClassBalancedSampler(labels, weights, 2, 42))  # seeded
    assert list(sampler) != drawn  # the next epoch draws anew
    sampler.set_epoch(0)
    assert list(sampler) == drawn  # ... as a resumed run's first epoch does
    counts: Counter[int] = Counter()
    many = ClassBalancedSampler(labels, weights, per_class=500, seed=0)
    for _ in range(10):  # ten epochs of one micro-batch of 500 + 500
        counts.update(list(many))
    assert counts[2] == 0  # weight 0: never drawn
    desirable = counts[0] + counts[1]
    assert counts[1] / desirable == pytest.approx(0.75, abs=0.02)  # 3 : 1 within the class, binomial sd 0.006
    undesirable = sum(counts[i] for i in range(3, 10))
    assert counts[8] / undesirable == pytest.approx(0.2, abs=0.02) and desirable == undesirable == 5000


# --- CGPO's trainer ------------------------------------------------------------------------------------------------


def with_consensus(spec, rows: list[UnpairedRow], offset: float) -> list[UnpairedRow]:
    """M0's columns (the trainer's own engine), anchors of the next prompt, and an aligned consensus `offset` above
    M0's score on every row."""
    model, tokenizer = load_model(spec), load_tokenizer(spec)
    rows = [row.model_copy(update={"kl_completion": rows[(i + 2) % len(rows)].completion}) for i, row in enumerate(rows)]
    scored = compute_reference_logps(model, tokenizer, rows)
    return [row.model_copy(update={"aligned_consensus": row.ref_mean_completion_logps + offset}) for row in scored]


@pytest.mark.parametrize(("warmup", "expected"), [
    (100, 1.2 * 0.5),  # c(0) = 0: only the desirable class counts, every row at 0.5 (policy = M0, z0 = 0)
    (0, 1.2 * 0.5 + 1.0 * (1 - 1 / (1 + math.exp(-0.08 * 0.5)))),  # U rows: r = -0.5 against the consensus
])
def test_cgpo_first_step_loss_is_the_formula_at_the_initial_policy(spec, tmp_path, warmup, expected):
    rows = with_consensus(spec, rows_of(12), offset=0.5)
    config = UnpairedTrainConfig(objective="cgpo", objective_args={"undesirable_warmup_steps": warmup}, batch_size=4,
                                 learning_rate=1e-3, epochs=1, **QUIET)  # fmt: skip
    with pytest.warns(UserWarning, match="sampled uniformly"):
        out = train_unpaired(spec, rows, config, tmp_path / "cgpo")
    first = logged(out)[0]
    assert first["loss"] == pytest.approx(expected, abs=1e-6)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6) and first["cgpo/u_coefficient"] == (0.0 if warmup else 1.0)
    assert len(logged(out)) == 3  # 6 rows per class, 2 per class per micro-batch
    summary = json.loads((out / "polyfuse_training.json").read_text())
    assert summary["sampling"] == {"weights": "uniform"} and summary["kl_completion"] == {"assigned": "with the data"}


def test_cgpo_and_kto_refuse_rows_they_cannot_train_on_before_loading_a_model(tmp_path):
    missing = ModelSpec(path=str(tmp_path / "no-model"))  # never loaded: the rows are refused first
    rows = rows_of(8)
    with pytest.raises(DataError, match=r"has no 'aligned_consensus', which objective 'cgpo' needs: build CGPO's"):
        train_unpaired(missing, rows, UnpairedTrainConfig(objective="cgpo", batch_size=2), tmp_path / "a")
    only_d = [r.model_copy(update={"label": "D", "aligned_consensus": -1.0}) for r in rows]
    with pytest.raises(DataError, match=r"and the rows have no undesirable \(U\) one"):
        train_unpaired(missing, only_d, UnpairedTrainConfig(objective="cgpo", batch_size=2), tmp_path / "b")
    zero = [r.model_copy(update={"aligned_consensus": -1.0, "source_allocation_weight": 0.0 if r.label == "U" else 1.0})
            for r in rows]  # fmt: skip
    with pytest.raises(DataError, match=r"source_allocation_weight of every undesirable \(U\) row is 0"):
        train_unpaired(missing, zero, UnpairedTrainConfig(objective="cgpo", batch_size=2), tmp_path / "c")
    shifted = [r.model_copy(update={"kl_completion": rows[(i + 1) % 8].completion}) for i, r in enumerate(rows)]
    with pytest.raises(DataError, match=r"kto compares each row with the KL completions of its micro-batch.*kl_block: 4"):
        train_unpaired(missing, shifted, UnpairedTrainConfig(objective="kto", batch_size=4), tmp_path / "d")
    with pytest.raises(ValueError, match="batch_size 3: cgpo's micro-batch is half desirable"):
        UnpairedTrainConfig(objective="cgpo", batch_size=3)
    with pytest.raises(ValueError, match="batch_size 1: kto's KL completions rotate within each micro-batch"):
        UnpairedTrainConfig(objective="kto", batch_size=1)
    assert UnpairedTrainConfig(objective="kto", batch_size=1, objective_args={"loss_type": "apo_zero_unpaired"})
    data = tmp_path / "rows.jsonl"
    write_rows(data, rows)
    write_metadata(data, {"consensus": {"calibration": {"prompts": ["p1", "p9"]}}})
    with pytest.raises(DataError, match=r"rows\.jsonl: 1 prompts of the training rows are in the consensus step's "
                                        r"calibration split \(e\.g\. 'p1'\)"):
        train_unpaired(missing, rows, UnpairedTrainConfig(objective="kto", batch_size=2), tmp_path / "e", data_path=data)
    assert not any(tmp_path.glob("[a-e]"))


def test_kto_without_kl_completions_gets_trls_rotation_of_shuffled_rows(spec, tmp_path):
    config = UnpairedTrainConfig(objective="kto", batch_size=4, learning_rate=1e-3, epochs=1, seed=3, **QUIET)
    out = train_unpaired(spec, rows_of(8), config, tmp_path / "kto")
    summary = json.loads((out / "polyfuse_training.json").read_text())
    assert summary["kl_completion"] == {"assigned": "rotation", "block": 4, "seed": 3}
    assert logged(out)[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # step 0: z0 = 0, every row 0.5


# --- FuseSFT -----------------------------------------------------------------------------------------------------------


def test_fusesft_loss_is_the_reward_weighted_mean_token_nll_per_prompt(spec, tmp_path):
    rows = rows_of(12, per_prompt=3)
    rows[5] = rows[5].model_copy(update={"correct": None})  # unverified: kept, weighed by its reward
    config = UnpairedTrainConfig(objective="fusesft", objective_args={"temperature": 0.5}, batch_size=12, shuffle=False,
                                 learning_rate=1e-3, epochs=1, **QUIET)  # fmt: skip
    out = train_unpaired(spec, rows, config, tmp_path / "fusesft")
    weights = fusesft_row_weights([r.prompt_id for r in rows], [r.reward for r in rows], 0.5, [r.correct for r in rows])
    model, tokenizer = load_model(spec), load_tokenizer(spec)
    total = 0.0
    for row, weight in zip(rows, weights.tolist(), strict=True):
        encoded = encode(tokenizer, row.prompt, response_text(row.completion))
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([encoded.input_ids])).logits[0].double()
        start = len(encoded.prompt_ids)
        nll = -torch.log_softmax(logits[start - 1 : -1], -1).gather(-1, torch.tensor(encoded.response_ids)[:, None]).mean()
        total += weight * nll.item()
    prompts = len({r.prompt_id for r in rows})
    assert logged(out)[0]["loss"] == pytest.approx(total / prompts, abs=1e-5)
    summary = json.loads((out / "polyfuse_training.json").read_text())
    assert summary["fusesft_rows"] == sum(w > 0 for w in weights.tolist()) == 7  # 6 verified-correct + 1 unverified


# --- Commands and recipes ----------------------------------------------------------------------------------------------


def test_every_unpaired_objective_is_a_train_command_with_its_config(polyfuse_cli):
    listed = polyfuse_cli("train", "--help")
    assert listed.returncode == 0 and all(name in listed.stdout for name in ("kto", "cgpo", "fusesft"))
    shown = polyfuse_cli("config", "show", "kto")
    assert shown.returncode == 0 and "loss_type: kto" in shown.stdout and "desirable_weight: 1.0" in shown.stdout
    assert "undesirable_warmup_steps: 100" in polyfuse_cli("config", "show", "cgpo").stdout
    assert "calibration_min_rows: 500" in polyfuse_cli("config", "show", "consensus").stdout


def test_the_recipe_fills_and_checks_the_unpaired_rows_of_its_objective():
    from polyfuse.errors import ConfigError
    from polyfuse.pipeline.demo import recipe_path
    from polyfuse.pipeline.recipe import load_recipe

    cgpo = load_recipe(recipe_path("cgpo-toy.yaml"))
    assert cgpo.pairs.unpaired.kl_completion == "anchor"
    no_consensus = "stages=[prompts, sample, score, pairs, sft, logprobs, upo, eval]"
    kto = load_recipe(recipe_path("cgpo-toy.yaml"), ["upo.objective=kto", "upo.batch_size=6", no_consensus])
    assert (kto.pairs.unpaired.kl_completion, kto.pairs.unpaired.kl_block) == ("rotation", 6)
    apo = load_recipe(recipe_path("cgpo-toy.yaml"), ["upo.objective=kto", "upo.objective_args={loss_type: apo_zero_unpaired}",
                                                     no_consensus])  # fmt: skip
    assert apo.pairs.unpaired.kl_completion == "none"
    with pytest.raises(ConfigError, match="kl_block is 3 and upo.batch_size 6"):
        load_recipe(recipe_path("cgpo-toy.yaml"), ["upo.objective=kto", "upo.batch_size=6", "pairs.unpaired.kl_block=3",
                                                   no_consensus])  # fmt: skip
    with pytest.raises(ConfigError, match="stage 'upo' needs the stage 'consensus' to run before it"):
        load_recipe(recipe_path("cgpo-toy.yaml"), [no_consensus])
    with pytest.raises(ConfigError, match=r"a recipe trains with pairs \(po\) or with unpaired rows \(upo\), not both"):
        load_recipe(recipe_path("cgpo-toy.yaml"), ["stages=[prompts, sample, score, pairs, po, upo]", "po={objective: dpo}"])
