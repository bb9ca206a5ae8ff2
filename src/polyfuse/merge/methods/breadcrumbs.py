"""Model Breadcrumbs (arXiv 2312.06795): per tensor keep the middle band of |tau| — drop the top `gamma`
fraction (outliers) and the smallest entries, keeping floor(density * n) — then task arithmetic
(`breadcrumbs`) or TIES election (`breadcrumbs_ties`).

Unlike mergekit, a tensor with gamma * n < 1 keeps its middle band (mergekit zeroes the whole delta there).
"""

from __future__ import annotations

import torch

from polyfuse.merge.methods.base import (
    DENSITY,
    MERGE_METHODS,
    InvalidParameter,
    Param,
    TensorTask,
    percent,
)
from polyfuse.merge.methods.sparsify import magnitude_trim
from polyfuse.merge.methods.task_arithmetic import TaskVectorMerge, family_parameters

GAMMA = Param("gamma", 0.01, per_model=True, description="the fraction of largest task-vector entries dropped as outliers",
              explain=lambda v: f"gamma {v} = also drop the largest {percent(v)} of each task vector's entries as "
                                f"outliers (only when density < 1)")


class _Breadcrumbs(TaskVectorMerge):
    parameters = family_parameters(DENSITY, GAMMA, normalize=False, rescale=False, rescale_mode="l1_norm")

    @classmethod
    def check(cls, params, model_params) -> None:
        super().check(params, model_params)
        for i, given in enumerate(model_params):
            if not 0 <= given["gamma"] <= 1:
                raise InvalidParameter("gamma", f"must be between 0 and 1, the fraction of largest entries dropped "
                                                f"(got {given['gamma']})", i)

    def sparsify(self, task: TensorTask, index: int, tau: torch.Tensor) -> torch.Tensor:
        rescale, mode = self.rescale_settings(task)
        return magnitude_trim(
            tau,
            float(self.model_param(task, index, "density")),
            gamma=float(self.model_param(task, index, "gamma")),
            name=task.name,
            rescale=rescale,
            mode=mode,
        )


@MERGE_METHODS.register("breadcrumbs")
class Breadcrumbs(_Breadcrumbs):
    name = "breadcrumbs"
    description = "Model Breadcrumbs: drop outliers and small entries, weighted sum"


@MERGE_METHODS.register("breadcrumbs_ties")
class BreadcrumbsTies(_Breadcrumbs):
    name = "breadcrumbs_ties"
    description = "Model Breadcrumbs + TIES: drop outliers and small entries, sign election, disjoint merge"
    consensus = True
