"""The on-policy / cross-tokenizer losses (`kd`, `gold`): the worked numbers of `methods/onpolicy-distillation.md`
(sections 0, 2.2, 2.3, 3.6, 4.4, 7), and TRL 1.16 run on the same inputs where it implements the same definition
(GKD's generalised JSD, the server distillation trainer's sparse KL with the tail, GOLD's ULD / hybrid loss)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from polyfuse.alignment import align_offsets
from polyfuse.objectives import DISTILL_OBJECTIVES
from polyfuse.objectives.distill import AlignedRow, DistillBatch, Projection, TeacherOutputs
from polyfuse.objectives.topk import generalized_jsd, sparse_divergence, student_prefix

TRL_TOLERANCE = 2e-6  # fp32


def objective(name: str, **settings):
    return DISTILL_OBJECTIVES.get(name).model_validate(settings)


def teacher_outputs(probs: np.ndarray, tokens: list[int], k: int | None = None) -> TeacherOutputs:
    """A teacher's wire answer from its full distributions [P, V]: the top-K (sorted) and the realised token."""
    logps = np.log(np.asarray(probs, np.float64))
    order = np.argsort(-logps, axis=1, kind="stable")[:, : k or logps.shape[1]]
    top = np.take_along_axis(logps, order, 1)
    return TeacherOutputs(token_ids=np.array(tokens), topk_ids=order.astype(np.int32), topk_logits=top.astype(np.float32),
                          std=np.zeros(len(tokens), np.float32), token_logps=logps[np.arange(len(tokens)), tokens].astype(np.float32),
                          topk_logprobs=top.astype(np.float32))


def run(loss, rows: list[AlignedRow], logits: torch.Tensor, projections: list[Projection | None]):
    """The collator's batching (each row's per-position targets concatenated in row order), then the loss."""
    built = [loss.targets(row) for row in rows]
    fields = {name: torch.cat([torch.tensor(b[name], dtype=loss.target_fields[name].dtype) for b in built])
              for name in loss.required_fields()}
    labels = torch.tensor([y for row in rows for y in row.labels])
    return loss(DistillBatch(logits, labels, projections, **fields))


def mean_over_groups(result) -> float:
    losses, metrics = result
    return float(losses.sum() / metrics["kd/groups"].sum())


# ---- section 0 and 2: divergences over a few buckets ------------------------------------------------------


def test_generalised_jsd_matches_the_spec_values_and_is_discontinuous_at_the_ends():
    teacher, student = torch.tensor([0.7, 0.2, 0.1]).log(), torch.tensor([0.4, 0.4, 0.2]).log()
    expected = {0: 0.183787, 0.1: 0.016518, 0.5: 0.046201, 0.9: 0.017100, 1: 0.192042}
    for beta, value in expected.items():
        assert generalized_jsd(student, teacher, beta).item() == pytest.approx(value, abs=1e-6)
    assert generalized_jsd(student, teacher, 1e-4).item() < 0.001  # -> 0 near beta 0, but beta 0 is the full KL


def test_generalised_jsd_equals_trl_gkd_on_full_vocabularies():
    from trl.experimental.gkd import GKDTrainer

    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(10, 50, generator=generator), torch.randn(10, 50, generator=generator) * 2  # [N, V]: batchmean / N
    worst = 0.0
    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        for tau in (1.0, 0.7):
            trl = GKDTrainer.generalized_jsd_loss(student, teacher, beta=beta, temperature=tau)
            ours = generalized_jsd(torch.log_softmax(student / tau, -1), torch.log_softmax(teacher / tau, -1), beta).mean()
            worst = max(worst, abs(trl.item() - ours.item()))
    assert worst < TRL_TOLERANCE, worst


def test_tail_bucket_numbers():
    valid = torch.ones(1, 2, dtype=torch.bool)
    teacher, student = torch.tensor([[0.6, 0.25]]).log(), torch.tensor([[0.5, 0.1]]).log()
    assert sparse_divergence(student, teacher, valid, 0).item() == pytest.approx(0.191341, abs=1e-6)
    assert sparse_divergence(student, teacher, valid, 0, tail=False).item() == pytest.approx(0.049888, abs=1e-6)
    one = valid[:, :1]
    assert sparse_divergence(student[:, :1], teacher[:, :1], one, 0, tail=False).item() == 0.0  # K = 1, no tail
    # The server path's supports (section 2.3): teacher top-1 A, sampled B.
    assert sparse_divergence(torch.tensor([[0.5, 0.1]]).log(), torch.tensor([[0.6, 0.25]]).log(), valid,
                             0.5).item() == pytest.approx(0.048358, abs=1e-6)
    assert sparse_divergence(torch.tensor([[0.1]]).log(), torch.tensor([[0.25]]).log(), one, 1).item() == pytest.approx(
        0.072460, abs=1e-6)
    assert sparse_divergence(torch.tensor([[0.5]]).log(), torch.tensor([[0.6]]).log(), one, 0).item() == pytest.approx(
        0.020136, abs=1e-6)


# ---- `kd` with one tokenizer against TRL's server distillation trainer ---------------------------------------


def _server_trainer(beta: float):
    from trl.experimental.server_distillation import ServerDistillationTrainer

    trainer = object.__new__(ServerDistillationTrainer)  # the loss methods read these three settings only
    trainer.beta, trainer.loss_add_tail, trainer.reverse_kl_top_1_mode = beta, True, "sampled"
    return trainer


@pytest.mark.parametrize("beta, k", [(0.0, 1), (0.0, 4), (0.5, 1), (1.0, 1)])
def test_kd_with_a_shared_vocabulary_equals_trl_server_distillation(beta, k):
    vocab, length = 11, 7
    generator = torch.Generator().manual_seed(int(beta * 10) + k)
    student_logits = torch.randn(length, vocab, generator=generator, requires_grad=True)
    teacher_probs = torch.softmax(torch.randn(length, vocab, generator=generator) * 2, -1)
    tokens = torch.multinomial(torch.softmax(student_logits.detach(), -1), 1, generator=generator).squeeze(-1)
    outputs = teacher_outputs(teacher_probs.double().numpy(), tokens.tolist(), k)
    row = AlignedRow(tokens.tolist(), [outputs], [[([j], [j]) for j in range(length)]], [None], [b"t"] * vocab)
    loss = objective("kd", beta=beta, top_k=k)
    losses, metrics = run(loss, [row], student_logits, [Projection.identity(vocab)])
    ours = losses.sum() / length

    student_logps = torch.log_softmax(student_logits, -1)[None]
    teacher_result = {"topk_logprobs": torch.from_numpy(outputs.topk_logprobs)[None],
                      "topk_token_ids": torch.from_numpy(outputs.topk_ids).long()[None],
                      "actual_logprobs": torch.from_numpy(outputs.token_logps)[None]}
    labels = tokens[None]
    trainer = _server_trainer(beta)
    if beta == 0:
        trl = trainer._compute_server_forward_kl_loss(teacher_result, student_logps, labels)
    else:
        trl = trainer._compute_server_sparse_top_1_divergence_loss(teacher_result, student_logps, labels, labels)
    assert abs(ours.item() - trl.item()) < TRL_TOLERANCE
    ours_grad, = torch.autograd.grad(ours, student_logits)
    trl_grad, = torch.autograd.grad(trl, student_logits)
    assert torch.allclose(ours_grad, trl_grad, atol=1e-6)
    assert metrics["kd/groups"].sum() == length


def test_the_stop_group_is_two_buckets_stop_or_not():
    """With one tokenizer every group is one token (the per-token loss), except the stop token: P_S(stop) against
    the teacher's P(end of turn), whatever the beta."""
    vocab, eos = 6, 5
    student_probs = np.array([[0.5, 0.2, 0.1, 0.1, 0.05, 0.05], [0.1, 0.1, 0.1, 0.1, 0.2, 0.4]])
    teacher_probs = np.array([[0.6, 0.1, 0.1, 0.1, 0.05, 0.05], [0.05, 0.05, 0.05, 0.05, 0.1, 0.7]])
    tokens = [0, eos]
    pivot_bytes = [b"a", b"b", b"c", b"d", b"e", None]
    row = AlignedRow(tokens, [teacher_outputs(teacher_probs, tokens, 2)], [[([0], [0]), ([1], [1])]], [None], pivot_bytes)
    logits = torch.tensor(student_probs).log().float()
    for beta in (0.0, 0.5, 1.0):
        losses, _ = run(objective("kd", beta=beta, top_k=2), [row], logits, [Projection.identity(vocab)])
        stop = generalized_jsd(torch.tensor([0.4, 0.6]).log(), torch.tensor([0.7, 0.3]).log(), beta)
        assert losses[1].item() == pytest.approx(stop.item(), abs=1e-6)
    first = run(objective("kd", beta=0, top_k=2), [row], logits, [Projection.identity(vocab)])[0][0]
    expected = sparse_divergence(torch.tensor([[0.5, 0.2]]).log(), torch.tensor([[0.6, 0.1]]).log(),
                                 torch.ones(1, 2, dtype=torch.bool), 0)
    assert first.item() == pytest.approx(expected.item(), abs=1e-6)


# ---- groups: the chain-rule merge ------------------------------------------------------------------------------


def test_bayesian_merge_reads_the_group_text_joint_probability_and_observed_reads_trl_positions():
    logps = torch.log_softmax(torch.randn(6, 5, generator=torch.Generator().manual_seed(3)), -1)
    labels = torch.tensor([1, 4, 2, 0, 3, 2])
    anchors, lead = torch.tensor([3, 5]), torch.tensor([2, 0])
    bayesian = student_prefix(logps, labels, anchors, lead)
    assert bayesian[0].item() == pytest.approx((logps[1, 4] + logps[2, 2]).item())
    assert bayesian[1].item() == 0
    observed = student_prefix(logps, labels, torch.tensor([1]), torch.tensor([2]), "observed")
    assert observed.item() == pytest.approx((logps[2, labels[1]] + logps[3, labels[2]]).item())  # token k at k+1


# ---- section 3.6: GOLD on "abc" -----------------------------------------------------------------------------

ABC_TEACHER = np.array([[0.6, 0.1, 0.2, 0.1], [0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1]])  # a b c d
ABC_STUDENT = np.array([[0.2, 0.5, 0.2, 0.1], [0.1, 0.1, 0.6, 0.2]])  # a ab c e


def _abc():
    teacher = teacher_outputs(ABC_TEACHER, [0, 1, 2])
    groups = align_offsets([(0, 2), (2, 3)], [(0, 1), (1, 2), (2, 3)])
    assert groups == [([0], [0, 1]), ([1], [2])]
    row = AlignedRow([1, 2], [teacher], [groups], [None], [b"a", b"ab", b"c", b"e"])
    matched = (np.array([0, 2]), np.array([0, 2]))  # a, c
    projection = Projection.from_entries(np.array([0, 2]), np.array([0, 2]), np.ones(2), (4, 4), matched)
    return row, torch.tensor(ABC_STUDENT).log().float(), projection


@pytest.mark.parametrize("beta, matched, total", [(0.0, -0.018286, 0.045857), (0.5, 0.020845, 0.065423),
                                                  (1.0, 0.194549, 0.152275)])
def test_gold_compat_on_abc(beta, matched, total):
    row, logits, projection = _abc()
    loss = objective("gold", mode="gold_compat", merge="bayesian", beta=beta, top_k=4)
    result = run(loss, [row], logits, [projection])
    assert result[1]["kd/matched"].mean().item() == pytest.approx(matched, abs=1e-6)
    assert result[1]["kd/unmatched"].mean().item() == pytest.approx(0.11, abs=1e-6)
    assert mean_over_groups(result) == pytest.approx(total, abs=1e-6)
    teacher_group = torch.tensor(loss.targets(row)["teacher_logps"][0][0]).exp()
    assert sorted(teacher_group.tolist(), reverse=True) == pytest.approx([0.42, 0.06, 0.06, 0.06, 0.0])  # K + realised


def test_gold_plain_uld_and_the_non_negative_hybrid_on_abc():
    row, logits, projection = _abc()
    plain = objective("gold", mode="gold_compat", merge="bayesian", match="none", top_k=4)
    none = Projection.from_entries(np.array([0]), np.array([0]), np.ones(1), (4, 4), (np.array([], int), np.array([], int)))
    assert mean_over_groups(run(plain, [row], logits, [none])) == pytest.approx(0.3, abs=1e-6)
    for beta, matched in [(0.0, 0.109684), (0.5, 0.030024), (1.0, 0.140471)]:
        result = run(objective("gold", beta=beta, top_k=4), [row], logits, [projection])
        assert result[1]["kd/matched"].mean().item() == pytest.approx(matched, abs=1e-6)
        assert mean_over_groups(result) == pytest.approx(0.5 * matched + 0.5 * 0.11, abs=1e-6)


# ---- section 4.4: X-Token's multi-digit example --------------------------------------------------------------


def test_pkl_and_the_gold_partition_on_the_multi_digit_example():
    # student ("201", "2", "0", "x"), teacher ("2", "0", "1", "x"); W: "201" -> 3 pieces, the rest exact.
    pieces = np.array([0.9, 0.09, 0.009]) / 0.999
    assert pieces == pytest.approx([0.900901, 0.090090, 0.009009], abs=1e-6)
    student_ids, teacher_ids = np.array([0, 0, 0, 1, 2, 3]), np.array([0, 1, 2, 0, 1, 3])
    weights = np.concatenate([pieces, np.ones(3)])
    exact = (np.array([1, 2, 3]), np.array([0, 1, 3]))
    projection = Projection.from_entries(student_ids, teacher_ids, weights, (4, 4), exact)
    row = AlignedRow([0], [teacher_outputs(np.array([[0.7, 0.1, 0.05, 0.15]]), [0])], [[([0], [0])]], [None],
                     [b"201", b"2", b"0", b"x"])
    logits = torch.tensor([[0.5, 0.2, 0.1, 0.2]]).log()
    assert run(objective("kd", top_k=4), [row], logits, [projection])[0].item() == pytest.approx(0.091398, abs=1e-6)
    partition = objective("gold", mode="gold_compat", merge="bayesian", beta=0, top_k=4, matched_weight=1,
                          unmatched_weight=1)
    _, metrics = run(partition, [row], logits, [projection])
    assert metrics["kd/matched"].item() == pytest.approx(0.833782, abs=1e-6)
    assert metrics["kd/unmatched"].item() == pytest.approx(0.45, abs=1e-6)
    assert metrics["loss/kd"].item() == pytest.approx(1.283782, abs=1e-6)


def test_a_teacher_id_no_student_token_reaches_joins_the_tail():
    # teacher ("a", "b", "zz"): no student token projects onto "zz", so its mass is in both tails.
    projection = Projection.from_entries(np.array([0, 1]), np.array([0, 1]), np.ones(2), (2, 3),
                                         (np.array([0, 1]), np.array([0, 1])))
    row = AlignedRow([0], [teacher_outputs(np.array([[0.5, 0.2, 0.3]]), [0])], [[([0], [0])]], [None], [b"a", b"b"])
    logits = torch.tensor([[0.6, 0.4]]).log()
    losses, _ = run(objective("kd", top_k=3), [row], logits, [projection])
    expected = generalized_jsd(torch.tensor([0.6, 0.4, 1e-7]).log(), torch.tensor([0.5, 0.2, 0.3]).log(), 0)
    assert math.isfinite(losses.item()) and losses.item() == pytest.approx(expected.item(), abs=1e-5)


# ---- GOLD against TRL's ULDLoss ------------------------------------------------------------------------------

STUDENT_VOCAB = {"a": 0, "ab": 1, "c": 2, "e": 3, "bc": 4, "d": 5, "</s>": 6}
TEACHER_VOCAB = {"a": 0, "b": 1, "c": 2, "d": 3, "cd": 4, "x": 5, "<eos>": 6, "y": 7}
# "abcdabc": student ab|c|d|a|bc, teacher a|b|cd|a|b|c; both end with their EOS (no span).
STUDENT_TOKENS, STUDENT_SPANS = [1, 2, 5, 0, 4, 6], [(0, 2), (2, 3), (3, 4), (4, 5), (5, 7), None]
TEACHER_TOKENS, TEACHER_SPANS = [0, 1, 4, 0, 1, 2, 6], [(0, 1), (1, 2), (2, 4), (4, 5), (5, 6), (6, 7), None]


def _uld_loss(merge: str, beta: float, hybrid: bool = True):
    from trl.experimental.gold.gold_trainer import ULDLoss

    config = SimpleNamespace(
        uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
        uld_teacher_temperature=1.0, uld_skip_student_eos=True, uld_skip_teacher_eos=True, use_extended_uld=True,
        uld_token_merge_strategy=merge, uld_use_hybrid_loss=hybrid, uld_hybrid_matched_weight=None,
        uld_hybrid_unmatched_weight=None, beta=beta)
    vocabulary = lambda table: SimpleNamespace(get_vocab=lambda: dict(table))  # noqa: E731
    return ULDLoss(config, vocabulary(STUDENT_VOCAB), vocabulary(TEACHER_VOCAB))


def _string_projection() -> Projection:
    shared = sorted(set(STUDENT_VOCAB) & set(TEACHER_VOCAB))
    student, teacher = np.array([STUDENT_VOCAB[s] for s in shared]), np.array([TEACHER_VOCAB[s] for s in shared])
    return Projection.from_entries(student, teacher, np.ones(len(shared)), (7, 8), (student, teacher))


def _gold_case(seed: int):
    """Random logits with a one-token prompt on each side (TRL layout: logits at t predict token t+1)."""
    generator = torch.Generator().manual_seed(seed)
    student_logits = torch.randn(1, 1 + len(STUDENT_TOKENS), 7, generator=generator) * 2
    teacher_logits = torch.randn(1, 1 + len(TEACHER_TOKENS), 8, generator=generator) * 2
    groups = align_offsets(STUDENT_SPANS, TEACHER_SPANS) + [([5], [6])]  # the data builder pairs the EOS too
    return student_logits, teacher_logits, groups


def _trl_layout(tokens, spans, prompt_token):
    ids = torch.tensor([[prompt_token, *tokens]])
    labels = ids.clone()
    labels[0, 0] = -100
    end = max(s[1] for s in spans if s)
    offsets = torch.tensor([[(0, 0), *[s or (end, end) for s in spans]]])
    return ids, labels, offsets


@pytest.mark.parametrize("merge", ["observed", "bayesian"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gold_compat_equals_trl_uld_loss_on_full_teacher_distributions(merge, beta):
    worst = 0.0
    for seed in range(3):
        student_logits, teacher_logits, groups = _gold_case(seed)
        s_ids, s_labels, s_offsets = _trl_layout(STUDENT_TOKENS, STUDENT_SPANS, 3)
        t_ids, t_labels, t_offsets = _trl_layout(TEACHER_TOKENS, TEACHER_SPANS, 7)
        trl = _uld_loss(merge, beta)(student_logits, teacher_logits, s_labels, t_labels, s_ids, t_ids, s_offsets, t_offsets)
        teacher = teacher_outputs(torch.softmax(teacher_logits[0, :-1], -1).double().numpy(), TEACHER_TOKENS)
        pivot_bytes = [b"a", b"ab", b"c", b"e", b"bc", b"d", None]
        row = AlignedRow(STUDENT_TOKENS, [teacher], [groups], [None], pivot_bytes)
        loss = objective("gold", mode="gold_compat", merge=merge, beta=beta, top_k=8)
        ours = mean_over_groups(run(loss, [row], student_logits[0, :-1], [_string_projection()]))
        worst = max(worst, abs(ours - trl.item()))
    assert worst < TRL_TOLERANCE, worst


@pytest.mark.parametrize("seed", [7, 8, 9])
@pytest.mark.parametrize("merge", ["observed", "bayesian"])
def test_gold_compat_equals_trl_hybrid_on_a_sparse_top_k_teacher(merge, seed):
    """K < |V_T|: TRL's own merge and hybrid functions on the teacher that is zero outside what the wire carries
    (its top-K and the realised token at each position)."""
    from trl.experimental.gold.gold_trainer import ULDLoss

    student_logits, teacher_logits, groups = _gold_case(seed)
    uld = _uld_loss(merge, 0.5)
    teacher_probs = torch.softmax(teacher_logits[0, :-1], -1)
    top = teacher_probs.topk(3, -1)
    sparse = torch.zeros_like(teacher_probs).scatter(-1, top.indices, top.values)  # the teacher TRL would see
    realised = torch.tensor(TEACHER_TOKENS)[:, None]
    sparse = sparse.scatter(-1, realised, teacher_probs.gather(-1, realised))
    shift = 1 if merge == "observed" else 0  # observed: logits at a token's own position (predicting the next)
    text = len(STUDENT_TOKENS) - 1, len(TEACHER_TOKENS) - 1
    student_probs = torch.softmax(student_logits[0, shift : shift + text[0]], -1)
    teacher_dense = sparse[shift : shift + text[1]]
    s_groups, t_groups = ULDLoss._align_by_byte_offsets(STUDENT_SPANS[:-1], TEACHER_SPANS[:-1])
    student_aligned = uld._merge_probabilities_with_alignment_groups(student_probs, s_groups, STUDENT_TOKENS[:-1])
    teacher_aligned = uld._merge_probabilities_with_alignment_groups(teacher_dense, t_groups, TEACHER_TOKENS[:-1])
    trl = uld._compute_hybrid_uld_loss(student_aligned, teacher_aligned)

    teacher = teacher_outputs(teacher_probs.double().numpy(), TEACHER_TOKENS, 3)
    row = AlignedRow(STUDENT_TOKENS, [teacher], [groups], [None], [b"a", b"ab", b"c", b"e", b"bc", b"d", None])
    loss = objective("gold", mode="gold_compat", merge=merge, beta=0.5, top_k=3)
    ours = mean_over_groups(run(loss, [row], student_logits[0, :-1], [_string_projection()]))
    assert abs(ours - trl.item()) < TRL_TOLERANCE


def test_hybrid_matched_part_is_a_divergence_and_gradients_are_finite():
    """Random groups: polyfuse's hybrid matched part is >= 0, TRL's unnormalised one can be negative."""
    student_logits, teacher_logits, groups = _gold_case(11)
    teacher = teacher_outputs(torch.softmax(teacher_logits[0, :-1], -1).double().numpy(), TEACHER_TOKENS, 4)
    row = AlignedRow(STUDENT_TOKENS, [teacher], [groups], [None], [b"a", b"ab", b"c", b"e", b"bc", b"d", None])
    logits = student_logits[0, :-1].clone().requires_grad_()
    lowest = {}
    for mode in ("hybrid", "gold_compat"):
        for beta in (0.0, 0.5, 1.0):
            losses, metrics = run(objective("gold", mode=mode, beta=beta, top_k=4, merge="bayesian"), [row], logits,
                                  [_string_projection()])
            lowest[mode] = min(lowest.get(mode, 1.0), metrics["kd/matched"].min().item())
            grad, = torch.autograd.grad(losses.sum(), logits)
            assert torch.isfinite(grad).all()
    assert lowest["hybrid"] >= 0 > lowest["gold_compat"]


def test_bad_settings_and_missing_inputs_are_one_clear_line():
    from polyfuse.errors import ConfigError, DataError

    with pytest.raises(ConfigError, match="observed"):
        objective("gold", merge="observed")
    with pytest.raises(ConfigError, match="both"):
        objective("gold", matched_weight=0.5)
    row, logits, projection = _abc()
    with pytest.raises(DataError, match="top_k 5 is larger than the 4 log-probs"):
        objective("kd", top_k=5).targets(row)
    without = AlignedRow(row.labels, [TeacherOutputs(**{k: v for k, v in vars(row.examples[0]).items()
                                                         if k != "topk_logprobs"})], row.groups, [None], row.pivot_bytes)
    with pytest.raises(DataError, match="normalised top-K log-probs"):
        objective("kd").targets(without)
    with pytest.raises(DataError, match="no vocabulary projection"):
        run(objective("kd", top_k=4), [row], logits, [])
