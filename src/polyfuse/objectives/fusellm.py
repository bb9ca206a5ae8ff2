"""FuseLLM / FuseChat (arXiv 2401.10491, 2408.07990): `lambda*CE + (1-lambda)*soft CE` against one
fused sparse target in the pivot's vocabulary, built offline per training row.

Per candidate (each teacher aligned to the pivot), the aligned source distribution is mapped into the pivot
vocabulary where a one-to-one group's tokens agree, else one-hot on the pivot's token y_j; then MinCE (the
candidate with the lowest CE on this example) or AvgCE (`softmax(exp(-CE))`-weighted union) fuses them
into one (ids, probs) list per position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field

from polyfuse.lazy import lazy_import
from polyfuse.objectives.distill import (
    DISTILL_OBJECTIVES,
    AlignedRow,
    DistillBatch,
    DistillObjective,
    Groups,
    TargetField,
    TeacherOutputs,
    TeacherVocabulary,
    log_probs_at,
    token_cross_entropy,
)

np = lazy_import("numpy")
torch = lazy_import("torch")


def soft_cross_entropy(
    logits: torch.Tensor, target_ids: torch.Tensor, target_probs: torch.Tensor
) -> torch.Tensor:
    """`-sum_m p_m log q_theta(id_m)` [N] against sparse targets [N, M]. Padding entries have probability 0;
    their ids may be anything (e.g. -1) and are read as id 0."""
    target_probs = target_probs.detach().float()
    ids = target_ids.masked_fill(target_probs == 0, 0)
    return -(target_probs * log_probs_at(logits, ids)).sum(-1)


def min_ce_choice(ce: torch.Tensor | Sequence[float]) -> int:
    """MinCE: the candidate with the lowest CE [T]; ties go to the lowest index (the pivot is candidate 0,
    so a source must strictly beat it)."""
    return int(torch.as_tensor(ce).argmin())


def avg_ce_weights(ce: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """AvgCE weights [T] as in the released FuseLLM code: `softmax_k(exp(-CE_k))`. The double exponential
    keeps them close to uniform (exp(-CE) is in (0, 1])."""
    return torch.softmax(torch.exp(-torch.as_tensor(ce, dtype=torch.float32)), dim=-1)


def fuse_sparse(
    ids: Sequence[torch.Tensor], probs: Sequence[torch.Tensor], weights: torch.Tensor | Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sum_k w_k P_k` over the union of the candidates' supports, for one position. Returns (ids int64,
    probs fp32) sorted by probability descending, ties by ascending id, so truncating keeps the largest
    entries; zero-probability entries (padding) are dropped. Sums to `sum_k w_k` (1 with `avg_ce_weights`)."""
    weights = torch.as_tensor(weights, dtype=torch.float32)
    all_ids = torch.cat([i.long() for i in ids])
    all_probs = torch.cat([w * p.float() for w, p in zip(weights, probs, strict=True)])
    support, inverse = torch.unique(all_ids, return_inverse=True)  # ascending ids
    fused = all_probs.new_zeros(len(support)).index_add_(0, inverse, all_probs)
    order = fused.sort(descending=True, stable=True).indices
    support, fused = support[order], fused[order]
    keep = fused > 0
    return support[keep], fused[keep]


def candidate_distributions(labels: list[int], example: TeacherOutputs, groups: Groups,
                            vocabulary: TeacherVocabulary, pivot_bytes: list[bytes | None], top_k: int,
                            temperature: float = 1.0) -> list[tuple[list[int], list[float]]]:
    """Per pivot response position: the candidate's distribution mapped into the pivot vocabulary where a
    one-to-one group's tokens agree, else one-hot on the pivot's own token (the label, not FuseLLM's
    off-by-one current token)."""
    out: list[tuple[list[int], list[float]]] = [([y], [1.0]) for y in labels]
    for left, right in groups:
        if len(left) != 1 or len(right) != 1:
            continue
        j, k = left[0], right[0]
        source_token = int(example.token_ids[k])
        source_bytes = vocabulary.token_bytes[source_token]
        same_text = source_bytes is not None and source_bytes == pivot_bytes[labels[j]]
        if not (same_text or vocabulary.to_pivot[source_token] == labels[j]):
            continue
        mapped = vocabulary.to_pivot[example.topk_ids[k][:top_k]]
        logits = example.topk_logits[k][:top_k].astype(np.float64)
        ids, kept = [], []
        for position, pivot_id in enumerate(mapped.tolist()):
            if pivot_id < 0 or pivot_id in ids:  # unmapped (exact map), or a duplicate: keep the first
                continue
            ids.append(pivot_id)
            kept.append(logits[position] / temperature)
        if ids:
            weights = np.exp(np.array(kept) - max(kept))
            out[j] = (ids, (weights / weights.sum()).tolist())
    return out


def fusellm_targets(labels: list[int], per_candidate: list[list[tuple[list[int], list[float]]] | None],
                    cross_entropies: list[float | None], fusion: Literal["min_ce", "avg_ce"]) -> dict[str, Any]:
    """The fused sparse target of every position: MinCE picks one candidate per example, AvgCE mixes all."""
    available = [c for c, dists in enumerate(per_candidate) if dists is not None]
    if not available:
        return {"target_ids": [[y] for y in labels], "target_probs": [[1.0] for _ in labels]}
    ce = torch.tensor([cross_entropies[c] for c in available], dtype=torch.float64)
    if fusion == "min_ce":
        chosen = per_candidate[available[min_ce_choice(ce)]]
        return {"target_ids": [ids for ids, _ in chosen], "target_probs": [probs for _, probs in chosen]}
    weights = avg_ce_weights(ce)
    target_ids, target_probs = [], []
    for j in range(len(labels)):
        ids, probs = fuse_sparse(
            [torch.tensor(per_candidate[c][j][0]) for c in available],
            [torch.tensor(per_candidate[c][j][1], dtype=torch.float64) for c in available],
            weights,
        )
        target_ids.append(ids.tolist())
        target_probs.append(probs.tolist())
    return {"target_ids": target_ids, "target_probs": target_probs}


@DISTILL_OBJECTIVES.register("fusellm")
class FuseLLMObjective(DistillObjective):
    """FuseLLM / FuseChat: `L_n = ce_weight * CE_n + (1 - ce_weight) * soft CE_n` against the fused sparse
    target. The fusion (`min_ce` or `avg_ce`), its top-K, the vocabulary map and the temperature are
    applied offline, when the targets are built (`targets`)."""

    target_fields = {
        "target_ids": TargetField("long", sparse=True),  # per position: the fused target's ids (pivot vocabulary)
        "target_probs": TargetField("float32", sparse=True),  # their probabilities, summing to 1
    }

    ce_weight: float = Field(default=0.9, ge=0, le=1)
    fusion: Literal["min_ce", "avg_ce"] = "min_ce"
    top_k: int = Field(default=10, ge=1)
    vocab_map: Literal["exact", "mined"] = Field(
        default="mined", description="Source ids into the pivot vocabulary: exact strings, or MinED."
    )
    temperature: float = Field(default=1.0, gt=0, description="T of softmax(logits / T) over the kept entries.")

    def vocabulary_map(self) -> Literal["exact", "mined"]:
        return self.vocab_map

    def targets(self, row: AlignedRow) -> dict[str, Any]:
        per_candidate = [
            None if example is None else candidate_distributions(
                row.labels, example, groups, vocabulary, row.pivot_bytes, self.top_k, self.temperature)
            for example, groups, vocabulary in zip(row.examples, row.groups, row.vocabularies, strict=True)
        ]
        cross_entropies = [None if example is None else example.cross_entropy for example in row.examples]
        return fusellm_targets(row.labels, per_candidate, cross_entropies, self.fusion)

    def __call__(self, batch: DistillBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = batch.logits.float()  # one fp32 copy shared by both terms
        ce = token_cross_entropy(logits, batch.labels)
        kd = soft_cross_entropy(logits, batch.require("target_ids"), batch.require("target_probs"))
        metrics = {"loss/ce": ce.detach(), "loss/kd": kd.detach()}
        return self.ce_weight * ce + (1 - self.ce_weight) * kd, metrics
