"""DARE (arXiv 2311.03099): drop each task-vector entry with probability 1 - density and rescale the rest.

Rescale: by default the paper's 1/density, unbiased (E[result] = tau);
`rescale_mode: l1_norm` is mergekit's L1 norm matching per tensor; `rescale: false` turns rescaling off.
Masks are seeded per (seed, tensor name, model index), so the merge does not depend on processing order.
`dare_linear` then sums like task arithmetic; `dare_ties` elects signs and takes the disjoint sum (mergekit's
default normalize is false for both).
"""

from __future__ import annotations

import torch

from polyfuse.merge.methods.base import DENSITY, MERGE_METHODS, TensorTask
from polyfuse.merge.methods.sparsify import dare_drop
from polyfuse.merge.methods.task_arithmetic import TaskVectorMerge, family_parameters


class _Dare(TaskVectorMerge):
    parameters = family_parameters(DENSITY, normalize=False, rescale=True, rescale_mode="paper")

    def sparsify(self, task: TensorTask, index: int, tau: torch.Tensor) -> torch.Tensor:
        rescale, mode = self.rescale_settings(task)
        density = float(self.model_param(task, index, "density"))
        return dare_drop(
            tau, density, generator=task.generator(index), rescale=rescale, mode=mode
        )


@MERGE_METHODS.register("dare_linear")
class DareLinear(_Dare):
    name = "dare_linear"
    description = "DARE + task arithmetic: random drop to density, rescale, weighted sum"


@MERGE_METHODS.register("dare_ties")
class DareTies(_Dare):
    name = "dare_ties"
    description = "DARE + TIES: random drop to density, rescale, sign election, disjoint merge"
    consensus = True
