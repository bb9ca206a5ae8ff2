"""DELLA (arXiv 2406.11617): MagPrune — per row, keep entry j with probability (d - eps) + 2 eps q_j, where
q_j is its magnitude rank scaled to [0, 1] — then rescale the survivors (default the paper's 1/p per entry;
`rescale_mode: l1_norm` is mergekit's per-tensor norm matching), then TIES election and disjoint mean
(`della`) or a plain weighted sum (`della_linear`). d - eps > 0 and d + eps < 1 are required.
"""

from __future__ import annotations

import torch

from polyfuse.merge.methods.base import DENSITY, MERGE_METHODS, Param, TensorTask
from polyfuse.merge.methods.sparsify import check_epsilon, della_magprune
from polyfuse.merge.methods.task_arithmetic import TaskVectorMerge, family_parameters

EPSILON = Param("epsilon", 0.15, per_model=True, description="keep probabilities range over density ± epsilon, by "
                                                          "magnitude rank",
                explain="epsilon {v} = keep probabilities range over density ± {v}, by magnitude rank")


class _Della(TaskVectorMerge):
    parameters = family_parameters(DENSITY, EPSILON, normalize=False, rescale=True, rescale_mode="paper")

    @classmethod
    def check(cls, params, model_params) -> None:
        super().check(params, model_params)
        for i, given in enumerate(model_params):
            if 0 < given["density"] < 1:  # 0 and 1 need no keep probabilities (mergekit's rules)
                check_epsilon(given["density"], given["epsilon"], model=i)

    def sparsify(self, task: TensorTask, index: int, tau: torch.Tensor) -> torch.Tensor:
        rescale, mode = self.rescale_settings(task)
        return della_magprune(
            tau,
            float(self.model_param(task, index, "density")),
            float(self.model_param(task, index, "epsilon")),
            generator=task.generator(index),
            rescale=rescale,
            mode=mode,
            name=f"{task.name} (model {index})",
        )


@MERGE_METHODS.register("della")
class Della(_Della):
    name = "della"
    description = "DELLA: magnitude-ranked random drop, rescale, sign election, disjoint mean"
    consensus = True
    parameters = family_parameters(DENSITY, EPSILON, normalize=True, rescale=True, rescale_mode="paper")


@MERGE_METHODS.register("della_linear")
class DellaLinear(_Della):
    name = "della_linear"
    description = "DELLA + task arithmetic: magnitude-ranked random drop, rescale, weighted sum"
