"""TIES (arXiv 2306.01708): trim each task vector to its top `density` fraction by magnitude, elect a sign per
entry from the weighted sum (mergekit; the paper sums unweighted), and average the agreeing entries."""

from __future__ import annotations

import torch

from polyfuse.merge.methods.base import MERGE_METHODS, TensorTask
from polyfuse.merge.methods.sparsify import magnitude_trim
from polyfuse.merge.methods.task_arithmetic import TaskVectorMerge


@MERGE_METHODS.register("ties")
class Ties(TaskVectorMerge):
    name = "ties"
    description = "TIES: magnitude trim to density, sign election, disjoint mean"
    consensus = True
    defaults = {**TaskVectorMerge.defaults, "normalize": True, "rescale": False, "rescale_mode": "l1_norm"}
    model_defaults = {"weight": None, "density": 1.0}

    def sparsify(self, task: TensorTask, index: int, tau: torch.Tensor) -> torch.Tensor:
        rescale, mode = self.rescale_settings(task)
        density = float(self.model_param(task, index, "density"))
        return magnitude_trim(tau, density, name=task.name, rescale=rescale, mode=mode)
