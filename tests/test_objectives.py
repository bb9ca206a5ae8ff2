"""Preference objectives and log-prob helpers as pure tensor functions: hand-computed values and invariants."""

from __future__ import annotations

import math

import pytest
import torch

from polyfuse.config import validate
from polyfuse.errors import ConfigError, DataError
from polyfuse.objectives import (
    DPO,
    IGNORE_INDEX,
    OBJECTIVES,
    LengthNormalizedDPO,
    PreferenceBatch,
    dpo_loss,
    sequence_logps,
    sft_token_loss,
)
from polyfuse.trainers import PreferenceTrainConfig

LN2 = math.log(2)


def batch_of(chosen, rejected, columns, chosen_n=(1.0,), rejected_n=(1.0,)) -> PreferenceBatch:
    t = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    return PreferenceBatch(
        logps={"chosen": t(chosen), "rejected": t(rejected)},
        ntokens={"chosen": t(chosen_n), "rejected": t(rejected_n)},
        columns={k: t(v) for k, v in columns.items()},
    )


def test_step_zero_dpo_is_ln2_with_zero_rewards_and_half_weight():
    chosen = torch.tensor([-12.5, -3.0, -40.0], requires_grad=True)
    rejected = torch.tensor([-20.0, -2.0, -41.5], requires_grad=True)
    losses, metrics = dpo_loss(chosen, rejected, chosen.detach().clone(), rejected.detach().clone(), beta=0.1)
    assert torch.allclose(losses, torch.full((3,), LN2))
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert torch.equal(metrics[name], torch.zeros(3))
    assert torch.equal(metrics["logps/chosen"], chosen.detach())
    losses.sum().backward()
    # dL/dS_w = -beta * sigma(0) = -0.05, dL/dS_l = +0.05
    assert torch.allclose(chosen.grad, torch.full((3,), -0.05))
    assert torch.allclose(rejected.grad, torch.full((3,), 0.05))


def test_dpo_hand_computed_with_and_without_label_smoothing():
    # h = (-10 - -11) - (-12 - -11) = 2, beta*h = 0.2
    batch = batch_of([-10.0], [-12.0], {"ref_chosen_logps": [-11.0], "ref_rejected_logps": [-11.0]})
    losses, metrics = DPO(beta=0.1)(batch)
    assert losses.item() == pytest.approx(0.598138869, abs=1e-7)  # ln(1 + e^-0.2)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.1)
    assert metrics["rewards/rejected"].item() == pytest.approx(-0.1)
    assert metrics["rewards/margins"].item() == pytest.approx(0.2)
    assert metrics["rewards/accuracies"].item() == 1.0
    # (1-e)*softplus(-0.2) + e*softplus(0.2) = softplus(-0.2) + e*0.2
    smoothed, _ = DPO(beta=0.1, label_smoothing=0.1)(batch)
    assert smoothed.item() == pytest.approx(0.618138869, abs=1e-7)


def test_dpo_is_stable_for_huge_margins():
    batch = batch_of(
        [-1.0, -5000.0],
        [-5000.0, -1.0],
        {"ref_chosen_logps": [-10.0, -10.0], "ref_rejected_logps": [-10.0, -10.0]},
    )
    losses, _ = DPO(beta=1.0)(batch)
    assert torch.isfinite(losses).all()
    assert losses[0].item() == pytest.approx(0.0, abs=1e-30)
    assert losses[1].item() == pytest.approx(4999.0)  # h = (-5000 + 10) - (-1 + 10)


def test_ln_dpo_hand_computed():
    # policy means: -20/10 = -2, -30/20 = -1.5; rewards 10*(-2 - -2.5) = 5 and 10*(-1.5 - -1.25) = -2.5
    batch = batch_of(
        [-20.0],
        [-30.0],
        {"ref_mean_chosen_logps": [-2.5], "ref_mean_rejected_logps": [-1.25]},
        chosen_n=[10.0],
        rejected_n=[20.0],
    )
    losses, metrics = LengthNormalizedDPO()(batch)
    assert LengthNormalizedDPO().beta == 10.0
    assert losses.item() == pytest.approx(math.log1p(math.exp(-7.5)), rel=1e-5)
    assert metrics["rewards/margins"].item() == pytest.approx(7.5)
    assert metrics["logps/chosen"].item() == pytest.approx(-2.0)


def test_ln_dpo_equals_dpo_fed_with_means():
    gen = torch.Generator().manual_seed(0)
    sums_w, sums_l = -torch.rand(6, generator=gen) * 100, -torch.rand(6, generator=gen) * 100
    n_w, n_l = torch.randint(1, 200, (6,), generator=gen), torch.randint(1, 200, (6,), generator=gen)
    ref_w, ref_l = -torch.rand(6, generator=gen) * 3, -torch.rand(6, generator=gen) * 3
    ln_batch = PreferenceBatch(
        logps={"chosen": sums_w, "rejected": sums_l},
        ntokens={"chosen": n_w, "rejected": n_l},
        columns={"ref_mean_chosen_logps": ref_w, "ref_mean_rejected_logps": ref_l},
    )
    dpo_batch = PreferenceBatch(
        logps={"chosen": sums_w / n_w, "rejected": sums_l / n_l},
        ntokens={"chosen": torch.ones(6), "rejected": torch.ones(6)},
        columns={"ref_chosen_logps": ref_w, "ref_rejected_logps": ref_l},
    )
    ln_losses, ln_metrics = LengthNormalizedDPO(beta=2.0, label_smoothing=0.2)(ln_batch)
    losses, metrics = DPO(beta=2.0, label_smoothing=0.2)(dpo_batch)
    assert torch.allclose(ln_losses, losses)
    for name in metrics:
        assert torch.allclose(ln_metrics[name], metrics[name])


@pytest.mark.parametrize("objective", [DPO(), LengthNormalizedDPO()])
def test_gradients_reach_only_the_policy(objective):
    refs = {name: torch.tensor([-5.0, -7.0], requires_grad=True) for name in objective.columns}
    chosen = torch.tensor([-4.0, -9.0], requires_grad=True)
    rejected = torch.tensor([-6.0, -6.5], requires_grad=True)
    batch = PreferenceBatch(
        logps={"chosen": chosen, "rejected": rejected},
        ntokens={"chosen": torch.tensor([2.0, 3.0]), "rejected": torch.tensor([1.0, 4.0])},
        columns=refs,
    )
    losses, metrics = objective(batch)
    losses.sum().backward()
    assert all(ref.grad is None for ref in refs.values())
    assert chosen.grad is not None and rejected.grad is not None
    assert all(not m.requires_grad for m in metrics.values())
    # DPO's gradient: dL/dlp_w = -beta * sigma(-margin); with LN, lp = S/n, so dL/dS_w gets a 1/n_w factor
    per_token = isinstance(objective, LengthNormalizedDPO)
    expected = (
        -objective.beta
        * torch.sigmoid(-metrics["rewards/margins"])
        / (batch.ntokens["chosen"] if per_token else 1)
    )
    assert torch.allclose(chosen.grad, expected)


def test_missing_column_is_a_data_error():
    batch = batch_of([-1.0], [-2.0], {"ref_chosen_logps": [-1.0]})
    with pytest.raises(DataError, match="ref_rejected_logps"):
        DPO()(batch)


def test_registry_and_config_build_objectives():
    assert {"dpo", "ln_dpo"} <= set(OBJECTIVES.names())
    assert PreferenceTrainConfig(objective="ln_dpo").build_objective() == LengthNormalizedDPO(beta=10.0)
    config = PreferenceTrainConfig(objective="dpo", beta=0.01, objective_args={"label_smoothing": 0.1})
    assert config.build_objective() == DPO(beta=0.01, label_smoothing=0.1)
    with pytest.raises(ConfigError, match="unknown preference objective 'nope'"):
        PreferenceTrainConfig(objective="nope")
    with pytest.raises(ConfigError, match="label_smoothing"):
        validate(PreferenceTrainConfig, {"objective_args": {"label_smoothing": 0.7}})
    with pytest.raises(ConfigError, match="unknown key"):
        validate(PreferenceTrainConfig, {"objective_args": {"gamma": 1.0}, "betta": 0.1})


def test_sequence_logps_hand_computed_and_masked():
    logits = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [2.0, -1.0], [5.0, 5.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 0, IGNORE_INDEX]])
    sums, counts = sequence_logps(logits, labels)
    # token 1 from logits[0] = (0, 0): ln 1/2; token 0 from logits[1] = (1, 0): 1 - ln(e + 1)
    expected = math.log(0.5) + 1 - math.log(math.e + 1)
    assert sums.item() == pytest.approx(expected, abs=1e-6)
    assert counts.tolist() == [2]


def test_sequence_logps_upcasts_low_precision_logits():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 7, generator=gen).bfloat16()
    labels = torch.randint(0, 7, (2, 5), generator=gen)
    labels[:, :2] = IGNORE_INDEX
    sums, counts = sequence_logps(logits, labels)
    assert sums.dtype == torch.float32
    reference = torch.log_softmax(logits.double(), -1)[:, :-1].gather(
        -1, labels[:, 1:].clamp(min=0)[..., None]
    )[..., 0]
    reference = (reference * (labels[:, 1:] != IGNORE_INDEX)).sum(-1)
    assert torch.allclose(sums.double(), reference, atol=1e-5)
    assert counts.tolist() == [3, 3]


def test_sft_token_loss_is_mean_over_all_scored_tokens():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 6, 5, generator=gen)
    labels = torch.randint(0, 5, (2, 6), generator=gen)
    labels[0, :4] = IGNORE_INDEX  # row 0 scores 2 tokens, row 1 scores 5
    labels[1, 0] = IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 5), labels[:, 1:].reshape(-1), reduction="mean"
    )
    assert sft_token_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    assert sft_token_loss(logits, labels, num_items=14).item() == pytest.approx(expected.item() / 2, rel=1e-6)
