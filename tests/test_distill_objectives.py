"""Explicit-fusion losses (FuseLLM, ULD) as pure tensor functions: hand-computed values and invariants, and
their targets built from plain arrays (no teacher store, model or tokenizer)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch.overrides import TorchFunctionMode

from polyfuse.errors import ConfigError, DataError
from polyfuse.objectives import (
    DISTILL_OBJECTIVES,
    OBJECTIVES,
    AlignedRow,
    DistillBatch,
    FuseLLMObjective,
    TeacherOutputs,
    TeacherVocabulary,
    ULDObjective,
    average_weights,
    avg_ce_weights,
    fuse_sparse,
    logit_std,
    min_ce_choice,
    soft_cross_entropy,
    student_uld_probs,
    teacher_uld_probs,
    token_cross_entropy,
    topk_entropy,
    uld_distance,
    uncertainty_weights,
)
from polyfuse.objectives.distill import STD_EPS

LN = math.log
INF = float("inf")


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(actual: torch.Tensor, expected, atol: float = 1e-5) -> bool:
    return torch.allclose(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# ---- standardisation ----------------------------------------------------------------------------------


def standardize_logits(logits, eps=STD_EPS):
    """The full-vocabulary z-score that ULD's targets reproduce from the stored std: `(l - mean) / (std + eps)`."""
    x = logits.float()
    return (x - x.mean(-1, keepdim=True)) / (logit_std(x)[..., None] + eps)


def test_standardize_hand_computed_uses_sample_std():
    # [1,2,3,4]: mean 2.5, sample std sqrt(((1.5^2 + 0.5^2) * 2) / 3) = sqrt(5/3) = 1.290994
    # z = [-1.5, -0.5, 0.5, 1.5] / 1.290994 = [-1.161895, -0.387298, 0.387298, 1.161895]
    assert close(logit_std(t([[1, 2, 3, 4]])), [1.290994])
    assert close(standardize_logits(t([[1, 2, 3, 4]])), [[-1.161895, -0.387298, 0.387298, 1.161895]])


def test_standardize_mean_zero_std_one_and_invariant_to_shift_and_positive_scale():
    logits = torch.randn(4, 500, generator=torch.Generator().manual_seed(0)) * 3 + 7
    z = standardize_logits(logits)
    assert z.dtype == torch.float32
    assert close(z.mean(-1), torch.zeros(4))
    assert close(z.std(-1), torch.ones(4))
    assert close(standardize_logits(logits * 4.5 - 20.0), z, atol=1e-4)
    assert close(standardize_logits(logits.bfloat16()), standardize_logits(logits.bfloat16().float()), atol=0)


# ---- ULD probabilities -------------------------------------------------------------------------------


def test_teacher_uld_probs_hand_computed_sorted_and_zero_padded():
    # no standardisation: softmax([2, 0]) = [e^2, 1] / (e^2 + 1) = [0.880797, 0.119203], sorted descending
    assert close(teacher_uld_probs(t([0, 2]), None, standardize=False), [0.880797, 0.119203])
    # std 2: [2, 0] / 2 = [1, 0] -> [0.731059, 0.268941]; tau 0.5 on top of it: [2, 0] -> [0.880797, 0.119203]
    assert close(teacher_uld_probs(t([2, 0]), t(2.0)), [0.731059, 0.268941])
    assert close(teacher_uld_probs(t([2, 0]), t(2.0), tau=0.5), [0.880797, 0.119203])
    # fewer than K entries (-inf padding) -> trailing zeros; a row of padding only -> all zeros
    padded = teacher_uld_probs(t([[-INF, 0, 2], [-INF, -INF, -INF]]), None, standardize=False)
    assert close(padded, [[0.880797, 0.119203, 0.0], [0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="std"):
        teacher_uld_probs(t([2, 0]), None)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_teacher_targets_from_topk_and_std_equal_student_probs_on_the_same_logits(tau):
    """The key consistency invariant: what the data builder stores for a teacher (top-K logits + one std)
    equals what the student computes online from its full logits."""
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(1)) * 4
    student = student_uld_probs(logits, k=10, tau=tau)
    teacher = teacher_uld_probs(logits.topk(10).values, logit_std(logits), tau=tau)
    assert close(student, teacher, atol=1e-7)
    # the definition spelled out: standardise over the full vocabulary, top-K, softmax / tau, sort
    reference = torch.softmax(standardize_logits(logits).topk(10).values / tau, -1)
    assert close(student, reference, atol=1e-6)
    assert close(student.sum(-1), torch.ones(6))
    assert torch.all(student[:, :-1] >= student[:, 1:])
    # as stored on disk (fp16 logits, fp32 std) the targets stay within fp16 rounding
    stored = teacher_uld_probs(logits.topk(10).values.half(), logit_std(logits), tau=tau)
    assert close(stored, student, atol=2e-3)


def test_uld_distance_hand_computed_and_zero_padding():
    # identical -> 0; |0.7-0.6| + |0.3-0.4| = 0.2
    s = t([[0.7, 0.3]])
    assert close(uld_distance(s, t([[[0.7, 0.3], [0.6, 0.4]]])), [[0.0, 0.2]])
    # K_s = 3 vs K_t = 2: |0.5-0.6| + |0.3-0.4| + |0.2-0| = 0.4; K_s = 2 vs K_t = 3 is symmetric
    assert close(uld_distance(t([[0.5, 0.3, 0.2]]), t([[[0.6, 0.4]]])), [[0.4]])
    assert close(uld_distance(t([[0.6, 0.4]]), t([[[0.5, 0.3, 0.2]]])), [[0.4]])


# ---- teacher weights ---------------------------------------------------------------------------------


def test_topk_entropy_hand_computed():
    # one entry: H = 0; uniform over 10: ln 10 = 2.302585
    # softmax([ln 3, 0]) = [0.75, 0.25]: H = 0.75*0.287682 + 0.25*1.386294 = 0.562335; -inf padding ignored
    logits = t([[3.0] + [-INF] * 9, [0.0] * 10, [LN(3), 0] + [-INF] * 8, [-INF] * 10])
    assert close(topk_entropy(logits), [0.0, 2.302585, 0.562335, 0.0])


def test_uncertainty_weights_hand_computed_masking_and_detach():
    # A one-hot (H = 0), B uniform over 10 (H = ln 10): softmax(0, -ln 10) = [0.909091, 0.090909]
    entropy = t([[0.0, LN(10), 0.5], [1.0, 1.0, 1.0], [0.3, 0.2, 0.1]]).requires_grad_()
    mask = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    weights = uncertainty_weights(entropy, mask)
    assert close(weights, [[0.909091, 0.090909, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.0, 0.0, 0.0]])
    assert not weights.requires_grad
    # tau_u = 2: softmax(0, -ln 10 / 2) = 1 / (1 + 10^-0.5) = 1 / 1.316228 = 0.759747
    assert close(
        uncertainty_weights(t([[0.0, LN(10)]]), torch.ones(1, 2, dtype=torch.bool), 2.0)[0, 0], 0.759747
    )


def test_average_weights():
    mask = torch.tensor([[True, True, False], [False, False, False], [True, False, False]])
    assert close(average_weights(mask), [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])


# ---- sparse soft targets and offline fusion ------------------------------------------------------------

# softmax([0, ln 2, ln 3, ln 4]) = [1, 2, 3, 4] / 10
Q_LOGITS = [0.0, LN(2), LN(3), LN(4)]


def test_soft_cross_entropy_hand_computed_and_one_hot_equals_ce():
    logits = t([Q_LOGITS, Q_LOGITS])
    # row 0: -(0.5 ln 0.4 + 0.5 ln 0.2) = 0.5 * (0.916291 + 1.609438) = 1.262864
    # row 1: one-hot on id 2 (padding id -1 with probability 0) -> -ln 0.3 = 1.203973
    ids = torch.tensor([[3, 1], [2, -1]])
    probs = t([[0.5, 0.5], [1.0, 0.0]])
    assert close(soft_cross_entropy(logits, ids, probs), [1.262864, 1.203973])
    ce = token_cross_entropy(logits, torch.tensor([3, 2]))
    assert close(ce, [0.916291, 1.203973])
    assert close(ce, F.cross_entropy(logits, torch.tensor([3, 2]), reduction="none"))


class _VocabSizedOutputs(TorchFunctionMode):
    """Records every torch call whose result is a new [N, V]-sized tensor."""

    def __init__(self, source: torch.Tensor):
        super().__init__()
        self.source, self.calls = source, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.numel() == self.source.numel() and out is not self.source:
            self.calls.append(func)
        return out


def test_soft_cross_entropy_gathers_at_a_262k_vocabulary():
    vocab = 262144
    logits = torch.zeros(2, vocab)
    # row 0 uniform: -sum p ln(1/V) = ln 262144 = 18 ln 2 = 12.476649 for any target summing to 1
    # row 1: exp(logit) of id V-1 is V-1 = the sum of the others -> q = 0.5; one-hot on it -> ln 2 = 0.693147
    logits[1, vocab - 1] = LN(vocab - 1)
    ids = torch.tensor([[vocab - 1, 0, 100], [vocab - 1, -1, -1]], dtype=torch.int32)  # as stored
    probs = t([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]])
    with _VocabSizedOutputs(logits) as mode:
        loss = soft_cross_entropy(logits, ids, probs)
    assert mode.calls == []  # no target, one-hot or scatter of vocabulary size
    assert close(loss, [12.476649, 0.693147], atol=1e-4)


def test_avg_ce_weights_and_min_ce_choice():
    # exp(-[0, ln 2]) = [1, 0.5]; softmax = [1, e^-0.5] / (1 + e^-0.5) = [1, 0.606531] / 1.606531
    assert close(avg_ce_weights([0.0, LN(2)]), [0.622459, 0.377541])
    assert close(avg_ce_weights(t([2.0, 2.0, 2.0])), [1 / 3, 1 / 3, 1 / 3])
    assert min_ce_choice(t([1.0, 0.5, 0.7])) == 1
    assert min_ce_choice([0.5, 0.7, 0.5]) == 0  # tie -> lowest index (the pivot wins ties)


def test_fuse_sparse_union_support():
    # weights 0.75 / 0.25: id 5: 0.75*0.6 = 0.45; id 2: 0.75*0.4 + 0.25*0.5 = 0.425; id 9: 0.075; id 7: 0.05
    ids, probs = fuse_sparse(
        [torch.tensor([5, 2]), torch.tensor([2, 9, 7, -1])],
        [t([0.6, 0.4]), t([0.5, 0.3, 0.2, 0.0])],
        [0.75, 0.25],
    )
    assert ids.tolist() == [5, 2, 9, 7]  # by probability; the padding id -1 (probability 0) is dropped
    assert close(probs, [0.45, 0.425, 0.075, 0.05])
    assert close(probs.sum(), 1.0)
    # a probability tie is ordered by id
    ids, probs = fuse_sparse(
        [torch.tensor([4]), torch.tensor([1])], [t([1.0]), t([1.0])], avg_ce_weights([1.0, 1.0])
    )
    assert ids.tolist() == [1, 4] and close(probs, [0.5, 0.5])


# ---- targets from the teachers' outputs -----------------------------------------------------------------


def outputs(token_ids, topk_ids, topk_logits, std=None, token_logps=None) -> TeacherOutputs:
    n = len(token_ids)
    return TeacherOutputs(
        token_ids=np.array(token_ids, dtype=np.int32),
        topk_ids=np.array(topk_ids, dtype=np.int32),
        topk_logits=np.array(topk_logits, dtype=np.float32),
        std=np.array(std if std is not None else [1.0] * n, dtype=np.float32),
        token_logps=np.array(token_logps if token_logps is not None else [0.0] * n, dtype=np.float32),
    )


def test_uld_targets_from_aligned_outputs_hand_computed():
    # Teacher A: response position 0 <- its 0; the group ([1, 2], [1]) pairs first tokens: 1 <- its 1; 2 has none.
    # Its 0: l/(std + eps) = [ln 3, 0] -> sorted probs [0.75, 0.25], zero-padded to K = 3; the entropy is of the
    # raw logits: softmax([ln 3 / 2, 0]) = [0.633975, 0.366025] -> H 0.656806. Its 1: [0, -inf] -> [1, 0], H 0.
    # Teacher B was too long for the row: no target.
    teacher_a = outputs([1, 2], [[0, 1], [0, 1]], [[LN(3) / 2, 0.0], [0.0, -INF]], std=[0.5, 0.5])
    row = AlignedRow(labels=[10, 11, 12], examples=[teacher_a, None], groups=[[([0], [0]), ([1, 2], [1])], None],
                     vocabularies=[None, None], pivot_bytes=None)
    targets = ULDObjective(top_k=3, weighting="uncertainty").targets(row)
    assert close(t(targets["teacher_probs"]), [[[0.75, 0.25, 0], [0, 0, 0]], [[1, 0, 0], [0, 0, 0]], [[0, 0, 0]] * 2])
    assert targets["teacher_mask"] == [[True, False], [True, False], [False, False]]
    assert close(t(targets["teacher_entropy"]), [[0.656806, 0], [0, 0], [0, 0]])
    assert list(ULDObjective(top_k=3).targets(row)) == ["teacher_probs", "teacher_mask"]  # only what it reads


PIVOT_BYTES = [None, b"a", b"b", b"c", b"d", b"e", b"f", b"g", b"h", b"i"]


def fusellm_row(ce_a: float = 1.0) -> AlignedRow:
    """Pivot labels [5, 7, 9, 6]. Teacher A (CE `ce_a`), one-to-one on all four, top-2 logits mapped by
    to_pivot: 0: its token 0 -> 5 agrees, top [5, unmapped] -> {5: 1}; 1: token 1 -> 7 agrees, logits
    [ln 2, 0] / T 0.5 -> {7: 0.8, 8: 0.2}; 2: token 3 -> 8, but its bytes "i" are the label's, so it agrees,
    top [8, 8] keeps the first -> {8: 1}; 3: token 2 "x" -> unmapped, no agreement -> one-hot {6: 1}.
    Teacher B: too long. Teacher C (CE 2), aligned at 0 only: {5: 0.5, 6: 0.5}, one-hot elsewhere."""
    teacher_a = outputs([0, 1, 3, 2], [[0, 2], [1, 3], [3, 4], [2, 0]], [[LN(3), 0], [LN(2), 0], [0, -1], [0, 0]],
                        token_logps=[-ce_a] * 4)
    teacher_c = outputs([0], [[0, 1]], [[0.0, 0.0]], token_logps=[-2.0])
    vocab_a = TeacherVocabulary([b"e", b"g", b"x", b"i", b"y"], np.array([5, 7, -1, 8, 8], dtype=np.int32))
    vocab_c = TeacherVocabulary([b"e", b"f"], np.array([5, 6], dtype=np.int32))
    return AlignedRow(labels=[5, 7, 9, 6], examples=[teacher_a, None, teacher_c],
                      groups=[[([j], [j]) for j in range(4)], None, [([0], [0])]],
                      vocabularies=[vocab_a, None, vocab_c], pivot_bytes=PIVOT_BYTES)


def test_fusellm_targets_from_aligned_outputs_hand_computed():
    min_ce = FuseLLMObjective(top_k=2, temperature=0.5)
    targets = min_ce.targets(fusellm_row())  # CE 1 < 2: A
    assert targets["target_ids"] == [[5], [7, 8], [8], [6]]
    assert close(t([p + [0] * (2 - len(p)) for p in targets["target_probs"]]), [[1, 0], [0.8, 0.2], [1, 0], [1, 0]])
    targets = min_ce.targets(fusellm_row(ce_a=3.0))  # CE 3 > 2: C
    assert targets == {"target_ids": [[5, 6], [7], [9], [6]], "target_probs": [[0.5, 0.5], [1.0], [1.0], [1.0]]}
    # AvgCE: w = softmax([e^-1, e^-2]) = [0.557875, 0.442125] over the union of supports
    targets = FuseLLMObjective(top_k=2, temperature=0.5, fusion="avg_ce").targets(fusellm_row())
    assert targets["target_ids"] == [[5, 6], [7, 8], [8, 9], [6]]
    expected = [[0.778938, 0.221062], [0.888425, 0.111575], [0.557875, 0.442125], [1.0, 0.0]]
    assert close(t([p + [0] * (2 - len(p)) for p in targets["target_probs"]]), expected)
    alone = dataclasses.replace(fusellm_row(), examples=[None, None, None])  # no teacher: the labels, one-hot
    assert min_ce.targets(alone) == {"target_ids": [[5], [7], [9], [6]], "target_probs": [[1.0]] * 4}


# ---- registered objectives -----------------------------------------------------------------------------


def uld_batch(**overrides) -> DistillBatch:
    """Row 0: student [0.7, 0.3] (raw logits ln 0.7, ln 0.3; K = 2, no standardisation), label 0 ->
    CE = -ln 0.7 = 0.356675; teacher A [1, 0] (H 0) -> ULD 0.6, teacher B [0.5, 0.5] (H ln 10) -> ULD 0.4.
    Row 1: logits [0, 0], label 1 -> CE = ln 2 = 0.693147; no teacher aligned (its targets are NaN garbage)."""
    fields = {
        "logits": t([[LN(0.7), LN(0.3)], [0.0, 0.0]]),
        "labels": torch.tensor([0, 1]),
        "teacher_probs": t([[[1.0, 0.0], [0.5, 0.5]], [[math.nan, math.nan], [math.nan, math.nan]]]),
        "teacher_mask": torch.tensor([[True, True], [False, False]]),
        "teacher_entropy": t([[0.0, LN(10)], [0.0, 0.0]]),
    }
    return DistillBatch(**(fields | overrides))


UNIFORM_ULD = {"top_k": 2, "standardize": False}


def test_uld_objective_hand_computed_average_and_uncertainty():
    # average: kd = (0.6 + 0.4) / 2 = 0.5 -> loss 0.356675 + 0.5 = 0.856675; row 1 CE only
    loss, metrics = ULDObjective(**UNIFORM_ULD)(uld_batch())
    assert close(loss, [0.856675, 0.693147])
    assert close(metrics["loss/ce"], [0.356675, 0.693147])
    assert close(metrics["loss/kd"], [0.5, 0.0])
    assert close(metrics["kd/uld"], [0.5, 0.0])
    assert close(metrics["kd/teachers_aligned"], [2.0, 0.0])
    # uncertainty: kd = 0.909091*0.6 + 0.090909*0.4 = 0.581818; lambda 0.5 -> 0.356675 + 0.290909 = 0.647584
    loss, _ = ULDObjective(**UNIFORM_ULD, weighting="uncertainty", lambda_kd=0.5)(uld_batch())
    assert close(loss, [0.647584, 0.693147])


def test_uncertainty_weights_turn_the_uld_pull_from_the_median_to_the_confident_teacher():
    # Why uncertainty weighting can cost accuracy on gold texts (docs/results.md, gym distillation): ULD is an L1
    # distance between sorted vectors, so d kd / d P_s[j] = sum_i w_i sign(P_s[j] - P_i[j]). Student [0.7, 0.3]
    # between A [1, 0] (H 0) and B [0.5, 0.5] (H ln 10): average weights [0.5, 0.5] cancel (the weighted median:
    # no pull at all); uncertainty weights [0.909091, 0.090909] give g = [-0.818182, +0.818182], and through the
    # softmax (dP0/dl0 = 0.7*0.3 = 0.21, dP1/dl0 = -0.21) d kd / d l = [-0.343636, +0.343636] toward A's shape;
    # lambda_kd scales it. Row 1 (no teacher aligned) is CE only: softmax - one-hot = [0.5, -0.5].
    def gradient(weighting: str, lambda_kd: float = 1.0) -> torch.Tensor:
        logits = t([[LN(0.7), LN(0.3)], [0.0, 0.0]]).requires_grad_()
        loss, _ = ULDObjective(**UNIFORM_ULD, weighting=weighting, lambda_kd=lambda_kd)(uld_batch(logits=logits))
        loss.sum().backward()
        return logits.grad

    ce = t([[-0.3, 0.3], [0.5, -0.5]])  # softmax - one-hot: CE's own gradient
    assert close(gradient("average"), ce)
    assert close(gradient("uncertainty") - ce, [[-0.343636, 0.343636], [0.0, 0.0]])
    assert close(gradient("uncertainty", lambda_kd=0.1) - ce, [[-0.034364, 0.034364], [0.0, 0.0]])


def test_uld_pairwise_weights_are_one_under_both_weightings():
    # one teacher (B): ULD 0.4 with weight 1 -> 0.356675 + 0.4 = 0.756675
    pairwise = uld_batch(
        teacher_probs=t([[[0.5, 0.5]], [[0.0, 0.0]]]),
        teacher_mask=torch.tensor([[True], [False]]),
        teacher_entropy=t([[LN(10)], [0.0]]),
    )
    for weighting in ("average", "uncertainty"):
        loss, _ = ULDObjective(**UNIFORM_ULD, weighting=weighting)(pairwise)
        assert close(loss, [0.756675, 0.693147])


def test_uld_with_lambda_zero_and_fusellm_with_ce_weight_one_are_exactly_ce():
    logits = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([3, 0, 63, 17, 17])
    ce = token_cross_entropy(logits, labels)
    assert close(ce, F.cross_entropy(logits, labels, reduction="none"))
    teachers = DistillBatch(
        logits=logits,
        labels=labels,
        teacher_probs=torch.softmax(torch.randn(5, 2, 10), -1).sort(-1, descending=True).values,
        teacher_mask=torch.tensor([[True, False]] * 5),
    )
    assert torch.equal(ULDObjective(lambda_kd=0.0)(teachers)[0], ce)
    target = DistillBatch(
        logits=logits,
        labels=labels,
        target_ids=torch.randint(0, 64, (5, 10)),
        target_probs=torch.full((5, 10), 0.1),
    )
    assert torch.equal(FuseLLMObjective(ce_weight=1.0)(target)[0], ce)


def test_fusellm_objective_hand_computed():
    # CE(label 3) = -ln 0.4 = 0.916291; soft CE = 1.262864 (above); 0.9*0.916291 + 0.1*1.262864 = 0.950948
    batch = DistillBatch(
        logits=t([Q_LOGITS]),
        labels=torch.tensor([3]),
        target_ids=torch.tensor([[3, 1, -1]]),
        target_probs=t([[0.5, 0.5, 0]]),
    )
    loss, metrics = FuseLLMObjective()(batch)
    assert close(loss, [0.950948])
    assert close(metrics["loss/ce"], [0.916291]) and close(metrics["loss/kd"], [1.262864])


def test_gradients_reach_logits_through_standardisation_not_teachers():
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(3, 50, generator=gen) * 2).requires_grad_()
    teacher_probs = torch.softmax(torch.randn(3, 2, 10, generator=gen), -1).sort(-1, descending=True).values
    teacher_probs.requires_grad_()
    batch = DistillBatch(
        logits=logits.bfloat16(),
        labels=torch.tensor([1, 2, 3]),
        teacher_probs=teacher_probs,
        teacher_mask=torch.tensor([[True, True], [True, False], [False, True]]),
        teacher_entropy=torch.rand(3, 2, generator=gen).requires_grad_(),
    )
    loss, _ = ULDObjective(weighting="uncertainty")(batch)
    assert loss.dtype == torch.float32  # fp32 losses from bf16 logits
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert teacher_probs.grad is None and batch.teacher_entropy.grad is None
    # the ULD term alone reaches logits outside the top-K only through the std
    for standardize, reaches in ((True, True), (False, False)):
        x = logits.detach().clone().requires_grad_()
        uld_distance(student_uld_probs(x, standardize=standardize), teacher_probs.detach()).sum().backward()
        outside = torch.ones_like(x, dtype=torch.bool).scatter(-1, x.topk(10).indices, False)
        assert torch.isfinite(x.grad).all()
        assert bool((x.grad[outside] != 0).any()) is reaches


def test_registry_configs_and_required_fields():
    assert DISTILL_OBJECTIVES.get("uld") is ULDObjective
    assert DISTILL_OBJECTIVES.get("fusellm") is FuseLLMObjective
    assert "uld" not in OBJECTIVES  # a separate family from the preference objectives
    with pytest.raises(ConfigError, match="unknown distillation objective 'kl'"):
        DISTILL_OBJECTIVES.get("kl")
    uld = ULDObjective()
    assert (uld.lambda_kd, uld.top_k, uld.tau, uld.standardize, uld.weighting, uld.tau_u) == (
        1.0,
        10,
        1.0,
        True,
        "average",
        1.0,
    )
    assert uld.required_fields() == ("teacher_probs", "teacher_mask")
    assert ULDObjective(weighting="uncertainty").required_fields() == (
        "teacher_probs",
        "teacher_mask",
        "teacher_entropy",
    )
    fusellm = FuseLLMObjective()
    assert (fusellm.ce_weight, fusellm.fusion, fusellm.top_k) == (0.9, "min_ce", 10)
    assert fusellm.required_fields() == ("target_ids", "target_probs")
    for bad in ({"weighting": "entropy"}, {"lambda_kd": -1}, {"unknown": 1}):
        with pytest.raises(ValidationError):
            ULDObjective.model_validate(bad)
    with pytest.raises(ValidationError):
        FuseLLMObjective(ce_weight=1.5)
    with pytest.raises(DataError, match="teacher_entropy"):
        ULDObjective(weighting="uncertainty")(uld_batch(teacher_entropy=None))
