"""TIES (arXiv 2306.01708): trim each task vector to its top `density` fraction by magnitude, elect a sign per
entry from the weighted sum (mergekit; the paper sums unweighted), and average the agreeing entries."""

from __future__ import annotations

import torch

from polyfuse.merge.methods.base import DENSITY, MERGE_METHODS, TensorTask
from polyfuse.merge.methods.sparsify import magnitude_trim
from polyfuse.merge.methods.task_arithmetic import TaskVectorMerge, family_parameters


@MERGE_METHODS.register("ties")
class Ties(TaskVectorMerge):
    name = "ties"
    description = "TIES: magnitude trim to density, sign election, disjoint mean"
    consensus = True
    parameters = family_parameters(DENSITY, normalize=True, rescale=False, rescale_mode="l1_norm")

    def sparsify(self, task: TensorTask, index: int, tau: torch.Tensor) -> torch.Tensor:
        rescale, mode = self.rescale_settings(task)
        density = float(self.model_param(task, index, "density"))
        return magnitude_trim(tau, density, name=task.name, rescale=rescale, mode=mode)
