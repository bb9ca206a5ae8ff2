"""Sparse teacher targets over aligned groups: what the `kd` (KL / JSD, X-Token P-KL) and `gold` (GOLD's hybrid,
H-KL) objectives share. Spec: `methods/onpolicy-distillation.md`, section 6.

One loss item is one **aligned group**: the text between two consecutive byte boundaries that the student's and
the teacher's tokens share (`polyfuse.alignment.align_offsets`). Each side's group vector is the chain-rule
("bayesian") merge of its tokens: the distribution at the group's last position, scaled by the realised
probabilities of the group's earlier tokens, so the realised entry is the joint probability of the group's text.
GOLD's "observed" merge (TRL's default: the distribution after the group's first token, scaled by the next
positions' probabilities of the later tokens) is kept for `gold` in TRL-compatibility mode only.

The teacher side is sparse and constant: its top-K log-probs (what a server returns) merged offline per group
(`group_targets`), never a vocabulary-sized vector; the tail bucket `1 - sum` makes the K entries a proper
distribution (TRL's `loss_top_k`). The student side is its own dense log-softmax at the group's anchor position,
read in the teacher's vocabulary through the projection W (`projected_logps`).

Target fields, per pivot response position and teacher (a group's targets sit at its anchor position: the last
pivot token of the group, or for the observed merge the position after its first):
`group` (0 none, 1 text group, 2 the stop token's group), `group_lead` (the group's other pivot tokens),
`teacher_ids` / `teacher_logps` (the merged support, -inf padded) and `teacher_realised` (the log joint
probability of the group's text under the teacher; for the stop group, of its end-of-turn token).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from polyfuse.errors import DataError
from polyfuse.lazy import lazy_import
from polyfuse.objectives.distill import AlignedRow, DistillBatch, Projection, TargetField, TeacherOutputs

np = lazy_import("numpy")
torch = lazy_import("torch")

Merge = Literal["bayesian", "observed"]
Support = Literal["topk", "topk_realised", "top1", "realised"]
NO_GROUP, TEXT_GROUP, STOP_GROUP = 0, 1, 2
LOG_EPS = math.log(1e-8)  # TRL GOLD's probability clamp, in the compatibility mode only
TAIL_CAP = -1e-7  # TRL: logsumexp of the support is clamped here, so the tail is at least ~1e-7

GROUP_FIELDS = {
    "group": TargetField("int8"),  # [T]: 0 none, 1 a text group is anchored here, 2 the stop group
    "group_lead": TargetField("long"),  # [T]: the group's pivot tokens other than the anchor
    "teacher_ids": TargetField("long"),  # [T, S]: the support's teacher ids (teacher vocabulary)
    "teacher_logps": TargetField("float32"),  # [T, S]: their merged log-probs, -inf for none
    "teacher_realised": TargetField("float32"),  # [T]: log P_teacher(the group's text)
}
# [T]: each teacher's weight at its anchors when several teachers are mixed at each position (on-policy
# `mix`); a batch without it weighs every group 1.
GROUP_WEIGHT = "group_weight"
WEIGHT_FIELDS = {GROUP_WEIGHT: TargetField("float32")}


def teacher_metric(teacher: int) -> str:
    """The metric of one teacher's group losses (the trainer names it after the teacher: `kd/loss/<name>`)."""
    return f"kd/teacher{teacher}"


def group_weight(batch: DistillBatch, teacher: int, anchors: torch.Tensor) -> torch.Tensor | float:
    """Teacher `teacher`'s weights [G] at `anchors`, or 1 when the batch has none."""
    weights = batch.targets.get(GROUP_WEIGHT)
    return 1.0 if weights is None else weights.detach()[anchors, teacher].float()


# ---- divergences over a few buckets ----------------------------------------------------------------------


def tail_bucket(logps: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Append the (S+1)-th bucket `log(1 - sum exp(logps))` over the valid entries, as TRL's `_add_tail_bucket`:
    the support's logsumexp is capped at -1e-7 first, so the tail stays finite. Returns (logps, valid)."""
    support = torch.where(valid, logps, float("-inf"))
    total = torch.logsumexp(support, dim=-1, keepdim=True).clamp(max=TAIL_CAP)
    tail = torch.log(-torch.expm1(total))
    return torch.cat([support, tail], -1), torch.cat([valid, torch.ones_like(valid[..., :1])], -1)


def jsd_terms(student: torch.Tensor, teacher: torch.Tensor, beta: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-bucket terms of the generalised JSD (GKD, arXiv 2306.13649) between log-prob vectors: beta = 0 gives
    KL(T||S), beta = 1 gives KL(S||T), otherwise `beta KL(T||M) + (1-beta) KL(S||M)` with
    `M = beta T + (1-beta) S`, as TRL computes it (`_jsd_divergence`); invalid buckets give 0."""
    if valid is None:
        valid = torch.ones_like(student, dtype=torch.bool)
    ls, lt = torch.where(valid, student, 0.0), torch.where(valid, teacher, 0.0)
    ps, pt = torch.where(valid, student.exp(), 0.0), torch.where(valid, teacher.exp(), 0.0)
    if beta == 0:
        return torch.nan_to_num(pt * (lt - ls), nan=0.0)
    if beta == 1:
        return torch.nan_to_num(ps * (ls - lt), nan=0.0)
    mixture = torch.where(valid, torch.log(((1 - beta) * ps + beta * pt).clamp_min(torch.finfo(ps.dtype).tiny)), 0.0)
    return beta * torch.nan_to_num(pt * (lt - mixture), nan=0.0) + (1 - beta) * torch.nan_to_num(ps * (ls - mixture), nan=0.0)


def generalized_jsd(student: torch.Tensor, teacher: torch.Tensor, beta: float,
                    valid: torch.Tensor | None = None) -> torch.Tensor:
    """The generalised JSD [...] summed over the last axis (`jsd_terms`)."""
    return jsd_terms(student, teacher, beta, valid).sum(-1)


def sparse_divergence(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor, beta: float,
                      tail: bool = True) -> torch.Tensor:
    """Generalised JSD [G] between two sparse supports [G, S] (log-probs of the same ids on both sides): with the
    tail bucket each side is its S entries plus `1 - sum` (not renormalised); without it both sides are
    renormalised inside the support, so one entry always gives 0 (TRL's `loss_add_tail=False`)."""
    if tail:
        student, _ = tail_bucket(student, valid)
        teacher, valid = tail_bucket(teacher, valid)
    else:
        student = torch.where(valid, student, float("-inf"))
        teacher = torch.where(valid, teacher, float("-inf"))
        student = student - torch.logsumexp(student, -1, keepdim=True)
        teacher = teacher - torch.logsumexp(teacher, -1, keepdim=True)
    return generalized_jsd(student, teacher, beta, valid)


def sorted_l1(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """ULD's distance [G]: the L1 between both vectors sorted in descending order and zero-padded, with the
    student dense [G, V] and the teacher sparse [G, S] (its entries outside the S are 0). Only the student's S
    largest entries can meet a nonzero teacher entry; the rest add their mass."""
    width = min(teacher_probs.shape[-1], student_probs.shape[-1])
    top = student_probs.topk(width, dim=-1).values
    teacher = teacher_probs.sort(dim=-1, descending=True).values
    rest = student_probs.sum(-1) - top.sum(-1)
    return (top - teacher[..., :width]).abs().sum(-1) + teacher[..., width:].sum(-1) + rest


# ---- the student side --------------------------------------------------------------------------------------


def student_prefix(logps: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor, lead: torch.Tensor,
                   merge: Merge = "bayesian", clamp: bool = False) -> torch.Tensor:
    """log of the scalar factor [G] of each group's merged vector: bayesian, the sum of the realised log-probs of
    the `lead` tokens before the anchor; observed, the log-prob at each of the `lead` positions after the anchor of
    the token before it (TRL's off-by-one reading). `clamp`: each probability at least 1e-8, as TRL GOLD."""
    prefix = torch.zeros(len(anchors), dtype=logps.dtype, device=logps.device)
    for j in range(1, int(lead.max()) + 1 if len(lead) else 1):
        use = lead >= j
        if merge == "bayesian":
            at = (anchors - j).clamp(min=0)
            term = logps[at, labels[at]]
        else:
            at = (anchors + j).clamp(max=len(labels) - 1)
            term = logps[at, labels[(at - 1).clamp(min=0)]]
        prefix = prefix + torch.where(use, term.clamp(min=LOG_EPS) if clamp else term, 0.0)
    return prefix


def projected_logps(logps: torch.Tensor, ids: torch.Tensor, projection: Projection) -> torch.Tensor:
    """`log (W^T p)[id]` [G, S] for the student's log-probs [G, V_S] at each group's teacher ids [G, S]: a gather
    of W's columns (rows of the CSR W^T) and one log-sum-exp per entry, never a vocabulary-sized projection.
    An id that no student token projects onto (or beyond W) gives -inf."""
    g, s = ids.shape
    crow, cols, values = (projection.weights_t.crow_indices(), projection.weights_t.col_indices(),
                          projection.weights_t.values())
    inside = (ids >= 0) & (ids < len(crow) - 1)
    flat = torch.where(inside, ids, 0).reshape(-1)
    starts = crow[flat]
    counts = torch.where(inside.reshape(-1), crow[flat + 1] - starts, 0)
    segment = torch.repeat_interleave(torch.arange(g * s, device=ids.device), counts)
    within = torch.arange(len(segment), device=ids.device) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    entry = starts[segment] + within
    terms = values[entry].log().to(logps.dtype) + logps[segment // s, cols[entry]]
    peak = torch.full((g * s,), float("-inf"), dtype=logps.dtype, device=logps.device)
    peak = peak.scatter_reduce(0, segment, terms.detach(), reduce="amax")
    shifted = (terms - peak[segment]).exp()
    total = torch.zeros_like(peak).index_add(0, segment, shifted)
    found = counts > 0
    out = torch.where(found, torch.where(found, total, 1.0).log() + torch.where(found, peak, 0.0), float("-inf"))
    return out.reshape(g, s)


# ---- the teacher side, built offline per row -----------------------------------------------------------------


def _consecutive(indices: list[int]) -> bool:
    return indices == list(range(indices[0], indices[0] + len(indices)))


def _is_stop(row: AlignedRow, pivot: list[int]) -> bool:
    """The end-of-turn group: pivot tokens without text (`AlignedRow.pivot_bytes`; the data builder pairs the
    first special token after the text on both sides)."""
    return row.pivot_bytes is not None and all(row.pivot_bytes[row.labels[j]] is None for j in pivot)


def _lookup(example: TeacherOutputs, position: int, token: int) -> float:
    """log p of `token` at one teacher position, from what the wire carries there (its top-K and its realised
    token); TRL's clamp (1e-8) when it is neither."""
    hit = np.flatnonzero(example.topk_ids[position] == token)
    if len(hit):
        return max(float(example.topk_logprobs[position, hit[0]]), LOG_EPS)
    return max(float(example.token_logps[position]), LOG_EPS) if example.token_ids[position] == token else LOG_EPS


def group_targets(row: AlignedRow, support: Support, top_k: int, merge: Merge = "bayesian",
                  stop_groups: bool = True) -> dict[str, Any]:
    """The `GROUP_FIELDS` of one row. `support`: the teacher entries each group keeps, `topk` (its top-K),
    `topk_realised` (plus the base position's realised token when it is not among them: everything the wire
    carries), `top1` (its top-1, left out when it is the realised token, which `teacher_realised` carries) or
    `realised` (none besides the realised text). `stop_groups`: the end-of-turn group is kept (bayesian only;
    GOLD drops EOS).

    With `topk`, a group of several tokens on either side keeps none of the teacher's top-K: its entries rank
    candidates for the group's last teacher piece, which W cannot pair with the student's candidates for its own
    last piece (W weighs a student token's first piece); such a group is compared on its realised text alone
    (`kd`, docs/design.md)."""
    n, teachers = len(row.labels), len(row.examples)
    width = {"topk": top_k, "topk_realised": top_k + 1, "top1": 1, "realised": 0}[support]
    top_k = min(top_k, width)
    kind = np.zeros((n, teachers), np.int8)
    lead = np.zeros((n, teachers), np.int64)
    ids = np.zeros((n, teachers, width), np.int64)
    logps = np.full((n, teachers, width), -np.inf, np.float32)
    realised = np.zeros((n, teachers), np.float32)
    for t, (example, groups) in enumerate(zip(row.examples, row.groups, strict=True)):
        if example is None or not groups:
            continue
        if example.topk_logprobs is None:
            raise DataError("the teacher outputs have no normalised top-K log-probs (`topk_logprobs`): sparse KL "
                            "targets need them; a teacher store written before it recorded each position's "
                            "logsumexp lacks them: rerun `polyfuse teacher`")
        topk_ids, topk_logps = example.topk_ids, example.topk_logprobs.astype(np.float64)
        if top_k > topk_ids.shape[1]:
            raise DataError(f"top_k {top_k} is larger than the {topk_ids.shape[1]} log-probs the teacher returned "
                            "per position: lower top_k, or ask the teacher for more")
        positions = len(example.token_ids)
        for pivot, teacher in groups:
            if not pivot or not teacher or not _consecutive(pivot) or not _consecutive(teacher):
                continue
            stop = _is_stop(row, pivot)
            if stop and not stop_groups:
                continue
            if merge == "bayesian" or stop:
                anchor, base = pivot[-1], teacher[-1]
                prefix = float(example.token_logps[teacher[:-1]].astype(np.float64).sum())
            else:  # observed: the distribution after the first token, the later tokens read one position on
                anchor, base = pivot[0] + 1, teacher[0] + 1
                if pivot[-1] + 1 >= n or teacher[-1] + 1 >= positions:
                    continue
                prefix = sum(_lookup(example, k + 1, int(example.token_ids[k])) for k in teacher[1:])
            kind[anchor, t] = STOP_GROUP if stop else TEXT_GROUP
            lead[anchor, t] = len(pivot) - 1
            realised[anchor, t] = float(example.token_logps[base]) + prefix
            if stop or width == 0 or (support == "topk" and (len(pivot) > 1 or len(teacher) > 1)):
                continue
            ids[anchor, t, :top_k] = topk_ids[base, :top_k]
            logps[anchor, t, :top_k] = topk_logps[base, :top_k] + prefix
            realised_token = example.token_ids[base]
            if support == "top1" and topk_ids[base, 0] == realised_token:
                logps[anchor, t, 0] = -np.inf  # the realised entry carries it
            if support == "topk_realised" and realised_token not in topk_ids[base, :top_k]:
                ids[anchor, t, top_k], logps[anchor, t, top_k] = realised_token, realised[anchor, t]
    return {"group": kind.tolist(), "group_lead": lead.tolist(), "teacher_ids": ids.tolist(),
            "teacher_logps": logps.tolist(), "teacher_realised": realised.tolist()}
