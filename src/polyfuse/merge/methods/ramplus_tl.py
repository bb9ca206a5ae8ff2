"""RAM+ tensor-local (mergekit `ramplus_tl`, arXiv 2601.13572): RAM with each model's unique changes scaled up
by how much of what it changes is shared.

Per model and tensor: rho_i = (entries i changes that others change too) / max(entries only i changes,
epsilon), lambda_i = 1 + r * clamp(rho_i, 0, alpha); unique changes are multiplied by lambda_i, shared ones
averaged as in RAM. Defaults r = 0.1, alpha = 0.2, epsilon = 1e-5.
"""

from __future__ import annotations

import torch

from polyfuse.merge.methods.base import MERGE_METHODS, MergeMethod, Param, TensorTask
from polyfuse.merge.methods.ram import CHANGE_EPSILON, changed_masks, ram_delta


@MERGE_METHODS.register("ramplus_tl")
class RamPlusTensorLocal(MergeMethod):
    name = "ramplus_tl"
    description = "RAM+ (tensor-local): RAM with unique changes scaled by 1 + r * clamp(shared / unique, 0, alpha)"
    min_models = 1
    parameters = (
        Param("r", 0.1, description="unique changes are scaled by 1 + r * clamp(shared / unique, 0, alpha)",
              explain="r {v} = unique changes are scaled by 1 + {v} * clamp(shared / unique, 0, alpha)"),
        Param("alpha", 0.2, description="the cap of the shared / unique ratio",
              explain="alpha {v} = the cap of the shared / unique ratio"),
        CHANGE_EPSILON,
    )

    def merge(self, task: TensorTask) -> torch.Tensor:
        task = task.to_fp32()
        epsilon = float(self.param(task, "epsilon"))
        r, alpha = float(self.param(task, "r")), float(self.param(task, "alpha"))
        taus = task.deltas()
        masks, counts = changed_masks(taus, epsilon)
        overlap = counts > 1
        scales = []
        for mask in masks:
            shared = (mask & overlap).sum()
            unique = (mask & ~overlap).sum()
            rho = shared / unique.clamp(min=epsilon)
            scales.append(float(1 + r * rho.clamp(min=0, max=alpha)))
        return ram_delta(taus, masks, counts, scales).add_(task.base)
