"""Arcee Fusion (mergekit `arcee_fusion`): keep only the other model's changes that matter most.

Importance per entry = |th1 - th0| * KL(softmax(th1) || softmax(th0)), the KL taken along the last dimension
(per row; a 1-D tensor is one row), with 1e-8 added to both distributions. The threshold is
median + 1.5 (q3 - q1) of the importances, read from the sorted values at index int(q (n - 1)); entries at or
above it take th1, the rest keep th0. Tensors of more than 1M entries estimate the quantiles from 1M entries
drawn with replacement, seeded per tensor in polyfuse (mergekit draws from the global torch generator).
"""

from __future__ import annotations

import torch

from polyfuse.merge.methods.base import MERGE_METHODS, MergeMethod, TensorTask

QUANTILE_SAMPLE = 1_000_000
PROBABILITY_EPS = 1e-8
QUARTILES = torch.tensor([0.25, 0.5, 0.75])


def importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(other, dim=-1).add_(PROBABILITY_EPS)
    q = torch.softmax(base, dim=-1).add_(PROBABILITY_EPS)
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    del p, q
    return (other - base).abs_().mul_(kl)


def fusion_threshold(scores: torch.Tensor, generator: torch.Generator) -> float:
    flat = scores.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        flat = flat[torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator)]
    ordered = torch.sort(flat).values
    q1, median, q3 = ordered[(QUARTILES * (ordered.numel() - 1)).long()]
    return float(median + 1.5 * (q3 - q1))


@MERGE_METHODS.register("arcee_fusion")
class ArceeFusion(MergeMethod):
    name = "arcee_fusion"
    description = "Arcee Fusion: the other model's entries whose change is an importance outlier"
    min_models = 1
    max_models = 1

    def merge(self, task: TensorTask) -> torch.Tensor:
        task = task.to_fp32()
        base, other = task.base, task.models[0]
        scores = importance(other, base)
        keep = scores >= fusion_threshold(scores, task.generator(0))
        del scores
        return other.sub_(base).mul_(keep).add_(base)
