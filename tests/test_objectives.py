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
    IPO,
    OBJECTIVES,
    WRPO,
    InfiFPO,
    InfiFPOIPO,
    InfiFPOWRPO,
    LengthNormalizedDPO,
    PreferenceBatch,
    clip_to_pivot,
    dpo_loss,
    fuse_references,
    fused_reference,
    infifpo_loss,
    sequence_logps,
    wrpo_alpha,
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


def sft_token_loss(logits, labels, num_items=None):
    """SFT's loss as the SFT trainer forms it: minus the summed response-token log-probs (`sequence_logps`),
    divided by the response tokens of the optimiser step (`num_items`), or of this batch."""
    sums, counts = sequence_logps(logits, labels)
    return -sums.sum() / (counts.sum() if num_items is None else num_items)


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


# --- IPO, WRPO, InfiFPO and its variants ----------------------------------------------------------------

WRPO_ROLES = ("chosen_source", "chosen", "rejected")
FUSION_SETTINGS = [
    {"fusion": fusion, "clip": clip, "max_margin": granularity}
    for fusion in ("max_margin", "average", "confidence", "none")
    for clip in (True, False)
    for granularity in ("per_example", "per_response")
    if fusion == "max_margin" or granularity == "per_example"
]


def random_batch(roles=("chosen", "rejected"), sources=3, pairs=6, seed=0, step=0, total_steps=100):
    """Policy sums and counts per role, and every ref_* / fuse_* column (means and sums) for those roles;
    M0's and the sources' counts differ, as different tokenizers' would."""
    gen = torch.Generator().manual_seed(seed)
    logps, ntokens, columns = {}, {}, {}
    for role in roles:
        counts = torch.randint(5, 50, (pairs,), generator=gen).float()
        source_counts = torch.randint(5, 60, (pairs, sources), generator=gen).float()
        ref_means = -torch.rand(pairs, generator=gen) * 2
        source_means = -torch.rand(pairs, sources, generator=gen) * 2
        logps[role] = -torch.rand(pairs, generator=gen) * 2 * counts
        ntokens[role] = counts
        columns |= {
            f"ref_{role}_logps": ref_means * counts,
            f"ref_mean_{role}_logps": ref_means,
            f"fuse_{role}_logps": source_means * source_counts,
            f"fuse_mean_{role}_logps": source_means,
        }
    return PreferenceBatch(logps, ntokens, columns, step=step, total_steps=total_steps)


def with_columns(batch: PreferenceBatch, **columns: torch.Tensor) -> PreferenceBatch:
    return PreferenceBatch(batch.logps, batch.ntokens, batch.columns | columns, batch.step, batch.total_steps)


def only_roles(batch: PreferenceBatch, roles: tuple[str, ...]) -> PreferenceBatch:
    """The batch restricted to `roles` (e.g. a WRPO batch seen as the (y_wt, y_l) pair)."""
    columns = {k: v for k, v in batch.columns.items() if any(k.endswith(f"_{r}_logps") for r in roles)}
    return PreferenceBatch(
        {r: batch.logps[r] for r in roles},
        {r: batch.ntokens[r] for r in roles},
        columns,
        batch.step,
        batch.total_steps,
    )


def assert_same_outputs(left, right, names=None):
    (left_losses, left_metrics), (right_losses, right_metrics) = left, right
    assert torch.equal(left_losses, right_losses)
    for name in names if names is not None else right_metrics:
        assert torch.equal(left_metrics[name], right_metrics[name]), name


DPO_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/rejected",
)


def test_ipo_hand_computed_on_means_and_sums():
    # means: -20/10 = -2 and -30/10 = -3; h = (-2 - -2.5) - (-3 - -1.5) = 2; (h - 1/(2*0.1))^2 = (2 - 5)^2 = 9
    batch = batch_of(
        [-20.0],
        [-30.0],
        {
            "ref_mean_chosen_logps": [-2.5],
            "ref_mean_rejected_logps": [-1.5],
            "ref_chosen_logps": [-19.0],
            "ref_rejected_logps": [-31.0],
        },
        chosen_n=[10.0],
        rejected_n=[10.0],
    )
    losses, metrics = IPO()(batch)
    assert losses.item() == pytest.approx(9.0, abs=1e-5)
    assert metrics["rewards/margins"].item() == pytest.approx(0.2, abs=1e-6)
    # sums: h = (-20 + 19) - (-30 + 31) = -2; beta 0.5 targets 1: (-2 - 1)^2 = 9
    losses, _ = IPO(length_normalize=False, beta=0.5)(batch)
    assert losses.item() == pytest.approx(9.0, abs=1e-5)
    assert IPO().required_columns() == ("ref_mean_chosen_logps", "ref_mean_rejected_logps")
    assert IPO(length_normalize=False).required_columns() == ("ref_chosen_logps", "ref_rejected_logps")


def test_wrpo_alpha_schedule():
    assert [wrpo_alpha(t, 100, 0.1) for t in (0, 50, 100)] == pytest.approx([0.0, 0.05, 0.1])
    assert wrpo_alpha(0, 100, 0.1, dynamic=False) == 0.1
    assert wrpo_alpha(30, 100, 0.1, dynamic=False) == 0.1


def test_wrpo_hand_computed_with_per_response_accuracies():
    # D(ws) = 10, D(wt) = 2, D(l) = 3 at t = 50 of 100: alpha 0.05, u = 0.01*(0.5 + 1.9 - 3) = -0.006
    t = lambda v: torch.tensor([v])  # noqa: E731
    batch = PreferenceBatch(
        logps={"chosen_source": t(-20.0), "chosen": t(-28.0), "rejected": t(-27.0)},
        ntokens={role: t(1.0) for role in WRPO_ROLES},
        columns={
            "ref_chosen_source_logps": t(-30.0),
            "ref_chosen_logps": t(-30.0),
            "ref_rejected_logps": t(-30.0),
        },
        step=50,
        total_steps=100,
    )
    losses, metrics = WRPO()(batch)
    assert losses.item() == pytest.approx(math.log1p(math.exp(0.006)), abs=1e-6)
    assert metrics["wrpo/alpha"].item() == pytest.approx(0.05)
    assert metrics["rewards/accuracies_source"].item() == 1.0  # 0.1 > 0.03
    assert metrics["rewards/accuracies_target"].item() == 0.0  # 0.02 < 0.03
    assert metrics["rewards/accuracies"].item() == 0.0  # weighted 0.024 < 0.03
    assert metrics["rewards/chosen"].item() == pytest.approx(0.024, abs=1e-6)


@pytest.mark.parametrize("wrpo", [WRPO(), WRPO(dynamic=False, alpha_max=0.0)])
def test_wrpo_at_alpha_zero_is_dpo_on_target_and_rejected(wrpo):
    batch = random_batch(WRPO_ROLES, step=0)
    assert_same_outputs(wrpo(batch), DPO(beta=wrpo.beta)(only_roles(batch, ("chosen", "rejected"))))


def test_infifpo_fusion_none_is_dpo_and_ln_dpo_exactly():
    batch = random_batch()
    assert_same_outputs(InfiFPO(fusion="none", beta=0.3)(batch), LengthNormalizedDPO(beta=0.3)(batch))
    assert_same_outputs(InfiFPO(fusion="none", length_normalize=False, beta=0.3)(batch), DPO(beta=0.3)(batch))


def test_infifpo_ipo_fusion_none_is_ipo_exactly():
    batch = random_batch()
    assert_same_outputs(InfiFPOIPO(fusion="none")(batch), IPO()(batch))
    assert_same_outputs(
        InfiFPOIPO(fusion="none", length_normalize=False)(batch), IPO(length_normalize=False)(batch)
    )


@pytest.mark.parametrize("settings", FUSION_SETTINGS)
@pytest.mark.parametrize("length_normalize", [True, False])
def test_infifpo_wrpo_at_alpha_zero_is_infifpo_on_target_and_rejected(settings, length_normalize):
    batch = random_batch(WRPO_ROLES, step=0)
    variant = InfiFPOWRPO(length_normalize=length_normalize, **settings)
    plain = InfiFPO(length_normalize=length_normalize, **settings)
    assert_same_outputs(variant(batch), plain(only_roles(batch, ("chosen", "rejected"))), DPO_METRICS)


def test_infifpo_wrpo_max_margin_weighs_both_chosen_responses_by_alpha():
    # M0 = 0 everywhere; source 1 is best on y_wt, source 2 on y_ws (values on y_l equal, no clipping)
    pivot = dict.fromkeys(WRPO_ROLES, torch.zeros(1))
    sources = {
        "chosen_source": torch.tensor([[0.5, 2.0]]),
        "chosen": torch.tensor([[1.0, 0.5]]),
        "rejected": torch.tensor([[-1.0, -1.0]]),
    }
    for alpha, expected in ((0.0, 1), (0.2, 1), (0.5, 2), (1.0, 2)):
        references, metrics = fuse_references(pivot, sources, {"chosen_source": alpha, "chosen": 1 - alpha})
        assert metrics[f"fusion/selected/{expected}"].item() == 1.0
        assert references["chosen"].item() == sources["chosen"][0, expected - 1].item()


# The InfiXAI/InfiFPO README pair, three sources, policy = M0 at step 0.
M0_SUMS, M0_COUNTS = (-16.809629440307617, -35.141197204589844), (241.0, 252.0)
M0_MEANS = (-0.06974949687719345, -0.13944919407367706)
SOURCE_MEANS = (
    (-0.2378779649734497, -0.2621479332447052, -0.3679310381412506),
    (-0.25559499859809875, -0.2677876949310303, -0.3368484675884247),
)
SOURCE_SUMS = (
    (-67.31946563720703, -74.1878662109375, -104.12448120117188),
    (-75.14492797851562, -78.72958374023438, -99.033447265625),
)


def worked_example_batch() -> PreferenceBatch:
    t = lambda v: torch.tensor([v], dtype=torch.float32)  # noqa: E731
    roles = ("chosen", "rejected")
    columns = {}
    for i, role in enumerate(roles):
        columns |= {
            f"ref_{role}_logps": t(M0_SUMS[i]),
            f"ref_mean_{role}_logps": t(M0_MEANS[i]),
            f"fuse_{role}_logps": t(SOURCE_SUMS[i]),
            f"fuse_mean_{role}_logps": t(SOURCE_MEANS[i]),
        }
    return PreferenceBatch(
        logps={role: t(M0_SUMS[i]) for i, role in enumerate(roles)},
        ntokens={role: t(M0_COUNTS[i]) for i, role in enumerate(roles)},
        columns=columns,
    )


@pytest.mark.parametrize(
    ("settings", "ref_margin", "u", "loss", "weight", "selected"),
    [
        ({"fusion": "none"}, 0.0697, 0.0, 0.6931, 0.500, None),
        ({}, 0.2671, -0.4935, 0.9700, 0.621, "fusion/selected/3"),
        ({"max_margin": "per_response"}, 0.2671, -0.4935, 0.9700, 0.621, "fusion/selected_rejected/3"),
        ({"fusion": "average"}, 0.2170, -0.3682, 0.8941, 0.591, None),
        ({"fusion": "confidence"}, 0.2129, -0.3579, 0.8880, 0.589, None),
        ({"fusion": "average", "clip": False}, -0.0026, 0.1807, 0.6069, 0.455, None),
        ({"fusion": "confidence", "clip": False}, 0.0032, 0.1663, 0.6135, 0.459, None),
        ({"clip": False}, 0.0697, 0.0, 0.6931, 0.500, "fusion/selected/0"),
        ({"length_normalize": False}, 82.2238, -6.3892, 6.3909, 0.998, "fusion/selected/3"),
        (
            {"length_normalize": False, "clip": False, "fusion": "average"},
            2.4254,
            1.5906,
            0.1855,
            0.169,
            None,
        ),
    ],
)
def test_infifpo_worked_example(settings, ref_margin, u, loss, weight, selected):
    objective = InfiFPO(**settings)
    assert objective.beta == (2.5 if objective.length_normalize else 0.1)
    losses, metrics = objective(worked_example_batch())
    assert losses.item() == pytest.approx(loss, abs=1e-4)
    assert metrics["fusion/ref_margin"].item() == pytest.approx(ref_margin, abs=1e-4)
    assert metrics["rewards/margins"].item() == pytest.approx(u, abs=1e-4)
    assert metrics["fusion/weight"].item() == pytest.approx(weight, abs=1e-3)
    assert metrics["fusion/pivot_margin"].item() == pytest.approx(
        0.0697 if objective.length_normalize else 18.3316, abs=1e-4
    )
    if selected is not None:
        assert metrics[selected].item() == 1.0
    if objective.clip and objective.fusion != "none":
        # every source is below M0 on y_w (all floored) and below it on y_l (none capped)
        assert torch.equal(metrics["fusion/clipped_chosen"], torch.ones(1, 3))
        assert torch.equal(metrics["fusion/clipped_rejected"], torch.zeros(1, 3))


# Synthetic LN values, beta 2.5, policy = M0 = (-1.0, -1.2): source 1 keeps its margin 0.7; source 2
# (-0.6, -0.7) clips to (-0.6, -1.2) on its rejected side.
SYNTHETIC_M0 = (torch.tensor([-1.0]), torch.tensor([-1.2]))
SYNTHETIC_SOURCES = (torch.tensor([[-0.8, -0.6]]), torch.tensor([[-1.5, -0.7]]))


@pytest.mark.parametrize(
    ("settings", "policy_rejected", "ref_margin", "loss"),
    [
        ({}, -1.2, 0.7, 1.5019),
        ({"max_margin": "per_response"}, -1.2, 0.9, 1.9102),
        ({"fusion": "average"}, -1.2, 0.65, 1.4062),
        ({"fusion": "confidence"}, -1.2, 0.6476, 1.4017),
        ({}, -1.5, 0.7, 0.9741),  # policy margin 0.5: u = 2.5*(0.5 - 0.7) = -0.5
    ],
)
def test_infifpo_synthetic_cases(settings, policy_rejected, ref_margin, loss):
    losses, metrics = infifpo_loss(
        torch.tensor([-1.0]),
        torch.tensor([policy_rejected]),
        *SYNTHETIC_M0,
        *SYNTHETIC_SOURCES,
        2.5,
        **settings,
    )
    assert losses.item() == pytest.approx(loss, abs=1e-4)
    assert metrics["fusion/ref_margin"].item() == pytest.approx(ref_margin, abs=1e-4)
    # source 2's y_l value -0.7 is above M0's -1.2 and is capped; source 1's y_w value is above M0's
    assert metrics["fusion/clipped_chosen"].tolist() == [[0.0, 0.0]]
    assert metrics["fusion/clipped_rejected"].tolist() == [[0.0, 1.0]]
    if settings == {}:
        assert [metrics[f"fusion/selected/{i}"].item() for i in range(3)] == [0.0, 1.0, 0.0]


def test_infifpo_synthetic_fallback_to_m0():
    sources = (torch.tensor([[-1.1, -1.3]]), torch.tensor([[-1.0, -0.9]]))
    for settings in ({}, {"max_margin": "per_response"}, {"fusion": "average"}, {"fusion": "confidence"}):
        losses, metrics = infifpo_loss(
            torch.tensor([-1.0]), torch.tensor([-1.2]), *SYNTHETIC_M0, *sources, 2.5, **settings
        )
        assert losses.item() == pytest.approx(LN2, abs=1e-6)
        assert metrics["fusion/ref_margin"].item() == pytest.approx(0.2, abs=1e-6)
    _, _, metrics = fused_reference(*SYNTHETIC_M0, *sources)
    assert metrics["fusion/selected/0"].item() == 1.0


def test_infifpo_ipo_hand_computed():
    # synthetic case: per-example reference margin 0.7, policy margin 0.2: (0.2 - 0.7 - 1/(2*0.1))^2 = 30.25
    batch = PreferenceBatch(
        logps={"chosen": torch.tensor([-1.0]), "rejected": torch.tensor([-1.2])},
        ntokens={"chosen": torch.ones(1), "rejected": torch.ones(1)},
        columns={
            "ref_mean_chosen_logps": SYNTHETIC_M0[0],
            "ref_mean_rejected_logps": SYNTHETIC_M0[1],
            "fuse_mean_chosen_logps": SYNTHETIC_SOURCES[0],
            "fuse_mean_rejected_logps": SYNTHETIC_SOURCES[1],
        },
    )
    losses, metrics = InfiFPOIPO()(batch)
    assert losses.item() == pytest.approx(30.25, abs=1e-4)
    assert metrics["fusion/selected/1"].item() == 1.0


def test_max_margin_ties_go_to_the_lowest_index():
    # every margin is exactly 0.5: M0 (candidate 0) wins; then sources 1 and 2 tie at 0.75 above M0's 0.25
    pivot_w, pivot_l = torch.tensor([-1.0, -1.0]), torch.tensor([-1.5, -1.25])
    sources_w, sources_l = torch.tensor([[-0.5, -0.25]] * 2), torch.tensor([[-1.0, -0.75]] * 2)
    _, _, metrics = fused_reference(pivot_w, pivot_l, sources_w, sources_l, clip=False)
    assert metrics["fusion/selected/0"].tolist() == [1.0, 0.0]
    assert metrics["fusion/selected/1"].tolist() == [0.0, 1.0]
    assert metrics["fusion/selected/2"].tolist() == [0.0, 0.0]
    # torch.argmax returns the first maximum on wide rows too (the rule relies on it)
    assert torch.argmax(torch.tensor([0.0] + [1.0] * 300)).item() == 1


@pytest.mark.parametrize("length_normalize", [True, False])
def test_clipped_margins_are_at_least_m0_and_max_margin_orders(length_normalize):
    batch = random_batch(sources=4, pairs=64, seed=3)
    kind = "mean_" if length_normalize else ""
    pivot_w, pivot_l = batch.column(f"ref_{kind}chosen_logps"), batch.column(f"ref_{kind}rejected_logps")
    sources_w, sources_l = (
        batch.column(f"fuse_{kind}chosen_logps"),
        batch.column(f"fuse_{kind}rejected_logps"),
    )
    clipped_w, floored = clip_to_pivot(pivot_w, sources_w, chosen=True)
    clipped_l, capped = clip_to_pivot(pivot_l, sources_l, chosen=False)
    assert ((clipped_w - clipped_l) >= (pivot_w - pivot_l)[:, None]).all()
    assert 0 < floored.mean() < 1 and 0 < capped.mean() < 1  # the data exercises both branches
    margins = {}
    for granularity in ("per_example", "per_response"):
        _, _, metrics = fused_reference(pivot_w, pivot_l, sources_w, sources_l, max_margin=granularity)
        margins[granularity] = metrics["fusion/ref_margin"]
    assert (margins["per_example"] >= pivot_w - pivot_l).all()
    assert (margins["per_response"] >= margins["per_example"]).all()


@pytest.mark.parametrize("settings", [s for s in FUSION_SETTINGS if s["clip"] and s["fusion"] != "none"])
def test_sources_worse_than_m0_on_both_sides_give_dpo(settings):
    batch = random_batch()
    worse = {
        "fuse_mean_chosen_logps": batch.column("ref_mean_chosen_logps")[:, None] - torch.rand(6, 3),
        "fuse_mean_rejected_logps": batch.column("ref_mean_rejected_logps")[:, None] + torch.rand(6, 3),
    }
    losses, metrics = InfiFPO(beta=2.5, **settings)(with_columns(batch, **worse))
    dpo_losses, dpo_metrics = LengthNormalizedDPO(beta=2.5)(batch)
    assert torch.allclose(losses, dpo_losses, rtol=0, atol=1e-6)
    assert torch.allclose(metrics["rewards/margins"], dpo_metrics["rewards/margins"], rtol=0, atol=1e-6)
    if settings["fusion"] == "max_margin" and settings["max_margin"] == "per_example":
        assert torch.equal(losses, dpo_losses)
        assert torch.equal(metrics["fusion/selected/0"], torch.ones(6))


@pytest.mark.parametrize("settings", FUSION_SETTINGS)
@pytest.mark.parametrize("length_normalize", [True, False])
def test_one_source_equal_to_m0_gives_dpo(settings, length_normalize):
    batch = random_batch()
    kind = "mean_" if length_normalize else ""
    same = {
        f"fuse_{kind}{role}_logps": batch.column(f"ref_{kind}{role}_logps")[:, None]
        for role in ("chosen", "rejected")
    }
    losses, _ = InfiFPO(beta=0.5, length_normalize=length_normalize, **settings)(with_columns(batch, **same))
    dpo = LengthNormalizedDPO(beta=0.5) if length_normalize else DPO(beta=0.5)
    assert torch.allclose(losses, dpo(batch)[0], rtol=0, atol=1e-7)


GRADIENT_OBJECTIVES = [
    IPO(),
    IPO(length_normalize=False),
    WRPO(),
    InfiFPOIPO(),
    InfiFPOWRPO(),
    InfiFPOWRPO(length_normalize=False, max_margin="per_response"),
    *(InfiFPO(length_normalize=ln, **s) for s in FUSION_SETTINGS for ln in (True, False)),
]


@pytest.mark.parametrize("objective", GRADIENT_OBJECTIVES, ids=repr)
def test_new_objectives_send_gradients_only_to_the_policy(objective):
    batch = random_batch(objective.roles, step=50)
    columns = {name: value.clone().requires_grad_() for name, value in batch.columns.items()}
    logps = {role: value.clone().requires_grad_() for role, value in batch.logps.items()}
    losses, metrics = objective(PreferenceBatch(logps, batch.ntokens, columns, batch.step, batch.total_steps))
    assert losses.shape == (6,)
    losses.sum().backward()
    assert all(column.grad is None for column in columns.values())
    assert all(not metric.requires_grad for metric in metrics.values())
    for role, value in logps.items():
        assert torch.isfinite(value.grad).all() and value.grad.abs().sum() > 0, role


def test_pure_loss_functions_treat_references_as_constants():
    def leaf(*values):
        return torch.tensor(values, requires_grad=True)

    policy_w, policy_l = leaf(-1.0, -2.0), leaf(-1.5, -1.0)
    refs = [
        leaf(-1.2, -1.8),
        leaf(-1.4, -1.1),
        leaf([-0.9, -2.0], [-1.0, -1.5]),
        leaf([-1.6, -1.3], [-0.5, -1.2]),
    ]
    for settings in ({}, {"max_margin": "per_response"}, {"fusion": "confidence"}, {"fusion": "average"}):
        losses, _ = infifpo_loss(policy_w, policy_l, *refs, 2.5, **settings)
        losses.sum().backward()
    assert all(ref.grad is None for ref in refs)
    assert policy_w.grad.abs().min() > 0 and policy_l.grad.abs().min() > 0


def test_infifpo_metrics_shapes_and_names():
    losses, metrics = InfiFPO()(random_batch(sources=3))
    assert {f"fusion/selected/{i}" for i in range(4)} <= set(metrics)
    assert metrics["fusion/clipped_chosen"].shape == (6, 3)
    assert torch.equal(sum(metrics[f"fusion/selected/{i}"] for i in range(4)), torch.ones(6))
    assert torch.allclose(metrics["fusion/weight"], torch.sigmoid(-metrics["rewards/margins"]))
    _, per_response = InfiFPO(max_margin="per_response")(random_batch(sources=3))
    assert {"fusion/selected_chosen/0", "fusion/selected_rejected/3"} <= set(per_response)
    _, wrpo_metrics = InfiFPOWRPO()(random_batch(WRPO_ROLES, step=50))
    assert wrpo_metrics["wrpo/alpha"][0].item() == pytest.approx(0.05)
    assert {"fusion/clipped_chosen_source", "rewards/accuracies_source", "rewards/accuracies_target"} <= set(
        wrpo_metrics
    )


def test_infifpo_required_columns_follow_settings():
    assert InfiFPO().required_columns() == (
        "ref_mean_chosen_logps",
        "ref_mean_rejected_logps",
        "fuse_mean_chosen_logps",
        "fuse_mean_rejected_logps",
    )
    assert InfiFPO(length_normalize=False, fusion="none").required_columns() == (
        "ref_chosen_logps",
        "ref_rejected_logps",
    )
    assert "fuse_chosen_source_logps" in InfiFPOWRPO(length_normalize=False).required_columns()
    assert DPO().required_columns() == DPO.columns
    assert WRPO().required_columns() == ("ref_chosen_source_logps", "ref_chosen_logps", "ref_rejected_logps")


def test_new_objectives_config_defaults_and_validation():
    assert {"ipo", "wrpo", "infifpo", "infifpo_wrpo", "infifpo_ipo"} <= set(OBJECTIVES.names())
    assert (IPO().beta, WRPO().beta, InfiFPOIPO().beta, InfiFPOIPO(length_normalize=False).beta) == (
        0.1,
        0.01,
        0.1,
        0.1,
    )
    assert (InfiFPO().beta, InfiFPO(length_normalize=False).beta, InfiFPO(beta=1.0).beta) == (2.5, 0.1, 1.0)
    assert (InfiFPOWRPO().beta, InfiFPOWRPO(length_normalize=False).beta) == (2.5, 0.1)
    config = PreferenceTrainConfig(objective="infifpo", objective_args={"length_normalize": False})
    assert config.build_objective() == InfiFPO(length_normalize=False, beta=0.1)
    assert PreferenceTrainConfig(objective="infifpo", beta=5.0).build_objective().beta == 5.0
    with pytest.raises(ConfigError, match="fusion"):
        validate(PreferenceTrainConfig, {"objective": "infifpo", "objective_args": {"fusion": "geometric"}})
    with pytest.raises(ConfigError, match="max_margin"):
        validate(
            PreferenceTrainConfig, {"objective": "infifpo_ipo", "objective_args": {"max_margin": "per_token"}}
        )
    with pytest.raises(ConfigError, match="ref_offset"):
        validate(PreferenceTrainConfig, {"objective": "infifpo", "objective_args": {"ref_offset": 5.0}})
    with pytest.raises(ConfigError, match="alpha_max"):
        validate(PreferenceTrainConfig, {"objective": "wrpo", "objective_args": {"alpha_max": 1.5}})
