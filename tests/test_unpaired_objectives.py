"""Unpaired objectives (KTO, CGPO, FuseSFT), CGPO's consensus and the unpaired row schema, against the
worked numbers of ../shared/methods/unpaired-objectives.md (sections 1.6, 2.11, 2.12, 3) and the formula
tests of the CGPO reference release (PayneDeng2/CGPO, tests/test_objective.py and test_consensus.py: their
inputs and expected values). TRL parity of `kto` is in test_kto_trl.py."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from polyfuse.data import UnpairedRow, read_rows, unpaired_columns
from polyfuse.errors import ConfigError, DataError
from polyfuse.objectives import (
    CGPO,
    COMPLETION,
    KL_COMPLETION,
    KTO,
    UNPAIRED_OBJECTIVES,
    ConsensusSettings,
    EntropyCalibration,
    FuseSFT,
    UnpairedBatch,
    align_to_pivot,
    build_consensus,
    calibration_prompts,
    cgpo_loss,
    check_disjoint,
    confidence_weights,
    fit_entropy_calibration,
    fusesft_loss,
    fusesft_row_weights,
    fusesft_weights,
    kto_loss,
    reference_scores,
    undesirable_coefficient,
)
from polyfuse.pairs import anchor_partners, kl_partners, shuffled_order


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def labels(text: str) -> torch.Tensor:
    return torch.tensor([c == "D" for c in text])


def batch_of(policy, ntokens=None, step=0, columns=None, label_text="DDUU", rank_mean=None) -> UnpairedBatch:
    """Policy scores per role (sums), with token counts (1 by default, so means equal sums)."""
    ntokens = ntokens or {role: torch.ones_like(v) for role, v in policy.items()}
    return UnpairedBatch(logps=policy, ntokens=ntokens, columns=columns or {}, step=step, total_steps=1000,
                         labels=labels(label_text), rank_mean=rank_mean)  # fmt: skip


# --- KTO: section 1.6 (beta 0.1, B = 4) ---------------------------------------------------------------------

POLICY, REFERENCE = t(-20.0, -35.0, -30.0, -18.0), t(-21.0, -34.5, -29.0, -18.4)
KL_POLICY, KL_REFERENCE = t(-40.0, -52.0, -61.0, -45.0), t(-40.3, -52.1, -60.8, -45.4)


def kto_batch(kl_reference=KL_REFERENCE, rank_mean=None) -> UnpairedBatch:
    return batch_of(
        {COMPLETION: POLICY.clone().requires_grad_(), KL_COMPLETION: KL_POLICY.clone()},
        columns={"ref_completion_logps": REFERENCE, "ref_kl_completion_logps": kl_reference},
        rank_mean=rank_mean,
    )


def test_kto_worked_example():
    batch = kto_batch()
    losses, metrics = KTO()(batch)
    torch.testing.assert_close(losses, t(0.478763, 0.516244, 0.471282, 0.506250), atol=1e-6, rtol=0)
    assert losses.mean().item() == pytest.approx(0.493135, abs=1e-6)
    losses.mean().backward()
    torch.testing.assert_close(batch.logps[COMPLETION].grad, t(-0.006239, -0.006243, 0.006229, 0.006249),
                               atol=1e-6, rtol=0)  # fmt: skip
    expected = {"kl": 0.15, "rewards/chosen": 0.025, "rewards/rejected": -0.030, "rewards/margins": 0.055,
                "logps/chosen": -27.5, "logps/rejected": -24.0}  # fmt: skip
    assert {k: pytest.approx(v.item(), abs=1e-9) for k, v in metrics.items()} == expected
    weighted, _ = KTO(desirable_weight=1.33)(kto_batch())
    assert weighted.mean().item() == pytest.approx(0.575223, abs=1e-6)


def test_kto_clamps_z0_at_zero_which_is_apo_zero():
    """+0.5 on every reference KL sum: the raw mean is -0.35, z0 = 0, and the loss is APO-zero's."""
    losses, metrics = KTO()(kto_batch(KL_REFERENCE + 0.5))
    assert metrics["kl"].item() == 0.0
    torch.testing.assert_close(losses, t(0.475021, 0.512497, 0.475021, 0.509999), atol=1e-6, rtol=0)
    assert losses.mean().item() == pytest.approx(0.493134, abs=1e-6)
    apo = KTO(loss_type="apo_zero_unpaired")
    assert apo.scored_roles() == (COMPLETION,) and apo.required_columns() == ("ref_completion_logps",)
    apo_losses, apo_metrics = apo(batch_of({COMPLETION: POLICY}, columns={"ref_completion_logps": REFERENCE}))
    torch.testing.assert_close(apo_losses, losses)
    assert apo_metrics["kl"].item() == 0.0


def test_kto_clamps_after_the_mean_over_ranks():
    """Rank means +0.15 (this one) and -0.05 (another): z0 = clamp(0.05) = 0.05, not mean(0.15, 0) = 0.075;
    with -0.35 on the other rank, z0 = clamp(-0.1) = 0, not 0.075."""
    for other, expected in ((-0.05, 0.05), (-0.35, 0.0)):
        _, metrics = KTO()(kto_batch(rank_mean=lambda z0, other=other: (z0 + other) / 2))
        assert metrics["kl"].item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("w_d", "w_u", "text"), [(1.0, 1.0, "DDUU"), (1.33, 1.0, "DDDU"), (1.0, 0.5, "DUUU")])
def test_kto_step_zero_is_half_per_row(w_d, w_u, text):
    """Policy = reference: z0 = 0 and every row loses 0.5, so L = 0.5 (w_D n_D + w_U n_U) / n."""
    zeros = torch.zeros(4, dtype=torch.float64)
    losses, _ = kto_loss(REFERENCE, REFERENCE, labels(text), 0.1, KL_REFERENCE, KL_REFERENCE, w_d, w_u)
    n_d = text.count("D")
    assert losses.mean().item() == pytest.approx(0.5 * (w_d * n_d + w_u * (4 - n_d)) / 4, abs=1e-12)
    assert kto_loss(zeros, zeros, labels(text), 0.1)[1]["kl"].item() == 0.0


def test_kl_partners_are_trls_rotation_and_skip_the_same_prompt():
    distinct = [str(i) for i in range(10)]
    # Blocks of 4: (x1,y4), (x2,y1), (x3,y2), (x4,y3); the last block of 2 swaps.
    assert kl_partners(distinct, 4) == [3, 0, 1, 2, 7, 4, 5, 6, 9, 8]
    # Row 1 shares a prompt with row 0, so it takes row 3 (the next one back, cyclically); the others rotate.
    assert kl_partners(["a", "a", "b", "c"], 4) == [3, 3, 1, 2]
    # A block with one prompt only: the plain rotation (a matched row, the case KTO-b shuffles away).
    assert kl_partners(["a", "a", "a"], 4) == [2, 0, 1]
    assert kl_partners(["a"], 4) == [0]
    order = shuffled_order(10, seed=7)
    assert sorted(order) == list(range(10)) and order == shuffled_order(10, 7) != shuffled_order(10, 8)


# --- CGPO: the reference release's formula tests ------------------------------------------------------------


def test_reference_assignments():
    pivot, consensus, d_u = t(-1, -2, -3, -4), t(-5, -6, -7, -8), labels("DUDU")
    assert reference_scores(d_u, pivot, consensus, "label_conditional").tolist() == [-1, -6, -3, -8]
    assert reference_scores(d_u, pivot, None, "policy_anchored").tolist() == [-1, -2, -3, -4]
    assert reference_scores(d_u, None, consensus, "consensus_anchored").tolist() == [-5, -6, -7, -8]
    with pytest.raises(ValueError, match="no_source_guidance"):
        CGPO(reference="no_source_guidance")  # a system control, not a reference assignment
    assert CGPO(reference="policy_anchored").required_columns() == (
        "ref_mean_completion_logps", "ref_mean_kl_completion_logps")
    assert CGPO(reference="consensus_anchored").required_columns() == (
        "aligned_consensus", "ref_mean_kl_completion_logps")


def test_class_means_are_separate():
    """beta 1, all zeros, labels (D, D, U), weights 1: each class term is 0.5, whatever the class sizes."""
    losses, metrics = cgpo_loss(torch.zeros(3), torch.zeros(3), labels("DDU"), 0.0, 1.0, 1.0, 1.0, 1.0)
    assert metrics["cgpo/desirable_term"].item() == pytest.approx(0.5)
    assert metrics["cgpo/undesirable_term"].item() == pytest.approx(0.5)
    assert losses.mean().item() == pytest.approx(1.0)
    # One class missing: it contributes 0; the other is still a class mean.
    losses, metrics = cgpo_loss(torch.zeros(2), torch.zeros(2), labels("DD"), 0.0, 1.0, 1.2, 1.0, 1.0)
    assert metrics["cgpo/undesirable_term"].item() == 0.0 and losses.mean().item() == pytest.approx(0.6)


def test_gradient_descent_raises_d_and_lowers_u():
    policy = torch.zeros(2, requires_grad=True)
    losses, _ = cgpo_loss(policy, torch.zeros(2), labels("DU"), 0.0, 1.0, 1.2, 1.0, 1.0)
    losses.mean().backward()
    assert policy.grad[0] < 0 < policy.grad[1]


def test_lower_consensus_raises_the_undesirable_loss():
    def u_loss(consensus: float) -> float:
        reference = reference_scores(labels("U"), t(-1.0), t(consensus), "label_conditional")
        return cgpo_loss(t(-1.0), reference, labels("U"), 0.0, 1.0, 1.2, 1.0, 1.0)[0].mean().item()

    assert u_loss(-2.0) > u_loss(-0.5)


def test_undesirable_warmup():
    assert [undesirable_coefficient(s, 5, 10) for s in (4, 5, 10, 15, 30)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert [undesirable_coefficient(s, 0, 100) for s in (0, 50, 100)] == [0.0, 0.5, 1.0]
    assert undesirable_coefficient(0, 0, 0) == 1.0  # the no_curriculum ablation


# --- CGPO: sections 2.11 and 2.12 ---------------------------------------------------------------------------

PROMPTS = ["p1", "p1", "p2", "p2"]
CALIBRATION = t(0.20, 0.40, 0.30, 0.50, 0.25, 0.45, 0.35, 0.65).reshape(4, 2)
ENTROPIES = t(0.22, 0.60, 0.40, 0.45, 0.28, 0.40, 0.60, 0.50).reshape(4, 2)
SCORES = t(-0.80, -1.10, -1.50, -0.90, -0.60, -0.70, -1.30, -1.60).reshape(4, 2)
PIVOT = t(-0.70, -1.20, -0.50, -1.10)


def test_consensus_worked_example():
    calibration = fit_entropy_calibration(CALIBRATION)
    torch.testing.assert_close(calibration.mean, t(0.275, 0.5))
    torch.testing.assert_close(calibration.std, t(0.055902, 0.093541), atol=1e-6, rtol=0)
    result = build_consensus(PROMPTS, PIVOT, SCORES, ENTROPIES, CALIBRATION, ConsensusSettings())
    zeta = t(-0.983870, 1.069045, 2.236068, -0.534522, 0.089443, -1.069045, 5.0, 0.0).reshape(4, 2)
    weights = t(0.911505, 0.088495, 0.049161, 0.950839, 0.202681, 0.797319, 0.021850, 0.978150).reshape(4, 2)
    close = dict(atol=1e-6, rtol=0)
    torch.testing.assert_close(result.calibrated_entropies, zeta, **close)
    torch.testing.assert_close(result.source_weights, weights, **close)
    torch.testing.assert_close(result.source_consensus, t(-0.826549, -0.929497, -0.679732, -1.593445), **close)
    torch.testing.assert_close(result.baseline_shift, t(-0.071977, -0.071977, 0.336589, 0.336589), **close)
    torch.testing.assert_close(result.aligned_consensus, t(-0.898526, -1.001474, -0.343143, -1.256857), **close)
    assert result.summary["zeta_clipped"] == 0.125  # row 4's 5.81 for source A
    assert result.summary["mean_abs_shift"] == pytest.approx((0.071977 + 0.336589) / 2, abs=1e-6)
    assert result.summary["singleton_prompts"] == 0.0
    assert result.summary["source_weight/0"] == pytest.approx(weights[:, 0].mean().item(), abs=1e-6)
    mean = build_consensus(PROMPTS, PIVOT, SCORES, None, None, ConsensusSettings(aggregation="mean",
                                                                                  baseline_alignment=False))
    torch.testing.assert_close(mean.aligned_consensus, t(-0.95, -1.20, -0.65, -1.45))
    torch.testing.assert_close(mean.source_consensus, mean.aligned_consensus)


CGPO_LOSSES = {("label_conditional", 0): 0.598860, ("label_conditional", 50): 0.846527,
               ("label_conditional", 100): 1.094194, ("policy_anchored", 100): 1.094610,
               ("consensus_anchored", 100): 1.093694}  # fmt: skip


@pytest.mark.parametrize(("reference", "step"), list(CGPO_LOSSES))
def test_cgpo_worked_example_through_the_objective(reference, step):
    """Section 2.12 from sums and counts (the policy's per-token means are S/n), columns as UnpairedRow names."""
    counts = t(10.0, 20.0, 8.0, 4.0)
    policy = t(-0.55, -1.45, -0.48, -1.20) * counts
    anchor_counts = t(5.0, 7.0, 9.0, 3.0)
    columns = {
        "ref_mean_completion_logps": PIVOT,
        "aligned_consensus": t(-0.898526, -1.001474, -0.343143, -1.256857),
        "ref_mean_kl_completion_logps": t(-1.95, -2.05, -1.80, -2.45),
    }
    batch = batch_of({COMPLETION: policy, KL_COMPLETION: t(-1.90, -2.10, -1.70, -2.40) * anchor_counts},
                     {COMPLETION: counts, KL_COMPLETION: anchor_counts}, step, columns, "DUDU")  # fmt: skip
    losses, metrics = CGPO(reference=reference)(batch)
    assert losses.mean().item() == pytest.approx(CGPO_LOSSES[reference, step], abs=1e-6)
    assert metrics["kl"].item() == pytest.approx(0.0375, abs=1e-12)
    assert metrics["cgpo/u_coefficient"].item() == step / 100
    u_term = {"label_conditional": 0.495334, "consensus_anchored": 0.495334, "policy_anchored": 0.495750}[reference]
    assert metrics["cgpo/undesirable_term"].item() == pytest.approx(u_term * step / 100, abs=2e-6)
    assert metrics["cgpo/desirable_term"].item() == pytest.approx(CGPO_LOSSES[reference, 100] - u_term, abs=2e-6)
    if reference == "label_conditional":
        assert metrics["cgpo/beta_margin_abs_max"].item() == pytest.approx(0.08 * 0.486026, abs=1e-7)
        assert metrics["rewards/chosen"].item() == pytest.approx(0.08 * (0.15 + 0.02) / 2, abs=1e-7)


def test_cgpo_at_pi0_is_w_d_times_a_half_and_u_rows_wait_for_the_warmup():
    policy = PIVOT.clone().requires_grad_()
    columns = {"ref_mean_completion_logps": PIVOT, "aligned_consensus": PIVOT - 0.3,
               "ref_mean_kl_completion_logps": t(-1, -2, -3, -4)}  # fmt: skip
    batch = batch_of({COMPLETION: policy, KL_COMPLETION: t(-1, -2, -3, -4)}, step=0, columns=columns, label_text="DUDU")
    losses, metrics = CGPO()(batch)
    assert losses.mean().item() == pytest.approx(0.6, abs=1e-12) and metrics["kl"].item() == 0.0
    losses.mean().backward()
    assert policy.grad[0] < 0 and policy.grad[2] < 0 and policy.grad[1] == 0 == policy.grad[3]


def test_cgpo_z0_is_not_clamped_unless_asked():
    columns = {"ref_mean_completion_logps": PIVOT, "aligned_consensus": PIVOT,
               "ref_mean_kl_completion_logps": t(-1, -1, -1, -1)}  # fmt: skip
    batch = batch_of({COMPLETION: PIVOT, KL_COMPLETION: t(-1.2, -1.2, -1.2, -1.2)}, columns=columns)
    assert CGPO()(batch)[1]["kl"].item() == pytest.approx(-0.2)
    assert CGPO(z0_clamp_min=0.0)(batch)[1]["kl"].item() == 0.0
    assert CGPO()(batch_of(batch.logps, columns=columns, rank_mean=lambda z: (z + 0.6) / 2))[1]["kl"].item() == (
        pytest.approx(0.2))


def test_anchor_partners_come_from_another_prompt():
    prompts = ["a", "a", "b", "c"]
    anchors = anchor_partners(prompts, seed=7)
    assert all(prompts[anchor] != prompt for anchor, prompt in zip(anchors, prompts, strict=True))
    assert anchors == anchor_partners(prompts, seed=7)
    many = [str(i % 5) for i in range(40)]
    assert anchor_partners(many, 42) != anchor_partners(many, 43)
    with pytest.raises(DataError, match="two distinct prompts"):
        anchor_partners(["a", "a"], seed=0)


# --- Consensus: the reference release's formula tests, and the split ----------------------------------------


def test_weights_are_a_floored_simplex_favouring_confident_sources():
    entropies = t(0.1, 0.5, 0.9, 0.8, 0.5, 0.2).reshape(2, 3)
    calibration = EntropyCalibration(t(0.5, 0.5, 0.5), t(0.2, 0.2, 0.2))
    _, weights = confidence_weights(entropies, calibration, temperature=0.8, floor=0.02)
    torch.testing.assert_close(weights.sum(-1), t(1.0, 1.0))
    assert (weights >= 0.02).all() and weights[0, 0] > weights[0, 2] and weights[1, 2] > weights[1, 0]
    with pytest.raises(ConfigError, match="weight_floor 0.34 must be below 1/N"):
        confidence_weights(entropies, calibration, floor=0.34)


def test_consensus_stays_within_the_sources():
    scores = t(-1.0, -3.0, -5.0, -2.0).reshape(2, 2)
    calibration = fit_entropy_calibration(t(0.0, 1.0, 1.0, 0.0).reshape(2, 2))
    _, weights = confidence_weights(t(0.1, 0.9, 0.8, 0.2).reshape(2, 2), calibration, temperature=1.0, floor=0.0)
    consensus = (weights * scores).sum(-1)
    assert (consensus >= scores.min(-1).values).all() and (consensus <= scores.max(-1).values).all()


def test_alignment_matches_pivot_means_and_keeps_differences():
    pivot, consensus = t(-1.0, -3.0, -2.0, -4.0), t(-5.0, -8.0, -10.0, -11.0)
    aligned, shift = align_to_pivot(["a", "a", "b", "b"], pivot, consensus)
    assert shift.tolist() == [4.5, 4.5, 7.5, 7.5]
    assert aligned[:2].mean() == pivot[:2].mean() and aligned[2:].mean() == pivot[2:].mean()
    assert aligned[0] - aligned[1] == consensus[0] - consensus[1]


def test_a_constant_entropy_source_uses_the_eps_scale():
    assert fit_entropy_calibration(t(0.2, 0.7, 0.2, 0.8, 0.2, 0.9).reshape(3, 2), eps=1e-4).std[0].item() == 1e-4


def test_singleton_prompts_get_m0_and_are_warned_about(caplog):
    prompts = ["p1", "p1", "p2", "p3"]
    with caplog.at_level(logging.WARNING):
        result = build_consensus(prompts, PIVOT, SCORES, ENTROPIES, CALIBRATION, ConsensusSettings())
    assert result.aligned_consensus[2:].tolist() == PIVOT[2:].tolist()
    assert result.summary["singleton_prompts"] == pytest.approx(2 / 3)
    assert "67% of prompts have a single row" in caplog.text


def test_calibration_split_holds_out_whole_prompts():
    prompts = [f"p{i // 3}" for i in range(300)]  # 100 prompts of 3 rows
    held = calibration_prompts(prompts, fraction=0.05, min_rows=30, seed=1)
    assert len(held) == 10  # 5 prompts are 5%, but 30 rows need 10 prompts
    assert held == calibration_prompts(list(reversed(prompts)), 0.05, 30, seed=1) != calibration_prompts(prompts, 0.05, 30, 2)
    assert len(calibration_prompts(prompts, fraction=0.2, min_rows=1, seed=1)) == 20
    training = [p for p in prompts if p not in set(held)]
    check_disjoint(held, training)
    with pytest.raises(DataError, match=r"^the calibration split overlaps training: 1 prompts in both \(e.g. 'p7'\)"):
        check_disjoint(["p7", "zz"], training + ["p7"])
    with pytest.raises(DataError, match="would take all 300 rows"):
        calibration_prompts(prompts, min_rows=500)


# --- FuseSFT: section 3 --------------------------------------------------------------------------------------


def test_fusesft_worked_weights_and_loss():
    rewards = t(0.20, 0.15, 0.10)
    for tau, expected in ((1.0, (0.724541, 0.212900, 0.062559)), (0.5, (0.914246, 0.078939, 0.006816)),
                          (2.0, (0.544688, 0.295260, 0.160052))):  # fmt: skip
        torch.testing.assert_close(fusesft_weights(rewards, tau), t(*expected), atol=1e-6, rtol=0)
    losses, _ = fusesft_loss(t(0.80, 1.10, 0.95), fusesft_weights(rewards))
    assert losses.sum().item() == pytest.approx(0.873254, abs=1e-6)
    torch.testing.assert_close(fusesft_weights(t(0.3, 0.3, 0.3, 0.3)), torch.full((4,), 0.25, dtype=torch.float64))
    torch.testing.assert_close(fusesft_weights(rewards, 1e-3), t(1.0, 0.0, 0.0))  # tau -> 0: best response


def test_fusesft_weights_per_prompt_drop_failed_candidates_and_count_each_prompt_once():
    prompts = ["a", "b", "a", "a", "b", "c"]
    rewards = [0.20, 0.5, 0.15, 0.9, 0.1, 0.3]
    passed = [True, None, True, False, True, False]
    weights = fusesft_row_weights(prompts, rewards, 1.0, passed)
    torch.testing.assert_close(weights[[0, 2]], fusesft_weights(t(0.20, 0.15)))
    torch.testing.assert_close(weights[[1, 4]], fusesft_weights(t(0.5, 0.1)))
    assert weights[3] == 0 and weights[5] == 0  # failed; prompt c has no candidate left
    objective = FuseSFT()
    nll = t(1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
    batch = batch_of({COMPLETION: -nll * 4}, {COMPLETION: torch.full((6,), 4.0, dtype=torch.float64)},
                     columns={"fusesft_weight": weights}, label_text="DDDUDU")  # fmt: skip
    losses, _ = objective(batch)
    prompt_a = weights[0] * 1.0 + weights[2] * 3.0
    prompt_b = weights[1] * 2.0 + weights[4] * 5.0
    items = objective.items(batch.columns, 6)
    assert items.item() == pytest.approx(2.0)  # prompts a and b
    assert (losses.sum() / items).item() == pytest.approx(((prompt_a + prompt_b) / 2).item())
    with pytest.raises(DataError, match="has no reward"):
        fusesft_row_weights(["a"], [None])


# --- Every objective ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "objective",
    [KTO(), KTO(loss_type="apo_zero_unpaired"), CGPO(), CGPO(reference="policy_anchored"),
     CGPO(reference="consensus_anchored"), FuseSFT()],
    ids=lambda o: f"{type(o).__name__}-{getattr(o, 'loss_type', getattr(o, 'reference', ''))}",
)  # fmt: skip
def test_columns_are_row_fields_and_gradients_reach_only_the_policy(objective):
    assert set(objective.required_columns()) <= set(UnpairedRow.model_fields)
    assert set(objective.scored_roles()) <= {"completion", "kl_completion"} <= set(UnpairedRow.model_fields)
    generator = torch.Generator().manual_seed(0)
    policy = {role: (-torch.rand(6, generator=generator, dtype=torch.float64) * 20).requires_grad_()
              for role in objective.scored_roles()}  # fmt: skip
    columns = {name: torch.rand(6, generator=generator, dtype=torch.float64).requires_grad_()
               for name in objective.required_columns()}  # fmt: skip
    batch = batch_of(policy, {r: torch.full((6,), 5.0, dtype=torch.float64) for r in policy}, 60, columns, "DUDDUU")
    losses, metrics = objective(batch)
    (losses.sum() / objective.items(batch.columns, 6)).backward()
    assert policy[COMPLETION].grad.abs().sum() > 0
    assert all(v.grad is None for v in columns.values())
    assert KL_COMPLETION not in policy or policy[KL_COMPLETION].grad is None
    assert all(torch.isfinite(v).all() and not v.requires_grad for v in metrics.values())


def test_registry_builds_every_objective_with_its_defaults():
    assert UNPAIRED_OBJECTIVES.names() == ["cgpo", "fusesft", "kto"]
    cgpo, kto = UNPAIRED_OBJECTIVES.get("cgpo")(), UNPAIRED_OBJECTIVES.get("kto")()
    assert (cgpo.beta, cgpo.desirable_weight, cgpo.undesirable_weight, cgpo.undesirable_warmup_steps) == (
        0.08, 1.2, 1.0, 100)
    assert (cgpo.reference, cgpo.z0_clamp_min, kto.beta, kto.loss_type) == ("label_conditional", None, 0.1, "kto")
    assert UNPAIRED_OBJECTIVES.get("fusesft")().temperature == 1.0
    with pytest.raises(ValueError, match="beta"):
        UNPAIRED_OBJECTIVES.get("cgpo")(beta=0)


# --- Unpaired rows ------------------------------------------------------------------------------------------


def test_unpaired_rows_read_trl_labels_and_group_by_prompt(tmp_path):
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "1", "prompt": "Hi", "completion": "Hello!", "label": True},
        {"id": "2", "prompt": "Hi", "completion": "Go away.", "label": False},
        {"id": "3", "prompt": [{"role": "user", "content": "Hi"}], "completion": "Hey", "label": "D",
         "prompt_id": "greeting", "source_allocation_weight": 0.5},
    ]))  # fmt: skip
    rows = read_rows(path, UnpairedRow)
    assert [r.label for r in rows] == ["D", "U", "D"]
    assert rows[0].prompt_id == rows[1].prompt_id != "greeting" == rows[2].prompt_id


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"label": "X"}, "field 'label': must be 'D' (desirable) or 'U' (undesirable), or TRL's true / false; got 'X'"),
        ({"label": 1}, "field 'label': must be 'D'"),
        ({"completion": " "}, "completion is empty"),
        ({"source_allocation_weight": -1.0}, "field 'source_allocation_weight': Input should be greater than or equal to 0"),
        ({"fuse_completion_entropy": [0.5, 1.5]}, "field 'fuse_completion_entropy.1'"),
        ({"fuse_mean_completion_logps": [-1.0], "fuse_completion_entropy": [0.5, 0.4]}, "the per-source columns differ"),
    ],
)
def test_malformed_unpaired_rows_are_one_line_naming_file_line_and_key(tmp_path, change, message):
    path = tmp_path / "rows.jsonl"
    row = {"id": "1", "prompt": "Hi", "completion": "Hello!", "label": "D"}
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "id": "2", **change}) + "\n")
    with pytest.raises(DataError) as err:
        read_rows(path, UnpairedRow)
    assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value) and "\n" not in str(err.value)


def test_a_missing_entropy_column_names_the_row_and_what_needs_it():
    rows = [UnpairedRow(id=str(i), prompt="Hi", completion="Hello", label="D", fuse_mean_completion_logps=[-1.0],
                        fuse_completion_entropy=None if i else [0.4]) for i in range(3)]  # fmt: skip
    assert unpaired_columns(rows, ["fuse_mean_completion_logps"], "x") == {"fuse_mean_completion_logps": [[-1.0]] * 3}
    with pytest.raises(DataError) as err:
        unpaired_columns(rows, ["fuse_mean_completion_logps", "fuse_completion_entropy"], "the CGPO consensus")
    assert str(err.value) == (
        "row '1' (and 1 other rows) has no 'fuse_completion_entropy', which the CGPO consensus needs: each source's "
        "normalised token entropy over the completion, from scoring the rows with every source"
    )
