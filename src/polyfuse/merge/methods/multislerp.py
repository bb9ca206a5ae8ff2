"""Multi-SLERP (mergekit `multislerp`): barycentric interpolation of K models on a hypersphere.

Per tensor (flattened; task vectors when a base is given): u_i = v_i / (||v_i|| + eps); the weighted mean
m = sum_i w_i u_i (weights normalised to sum 1 by default) is normalised; the weighted tangent vectors
sum_i w_i (u_i - (u_i . m) m) are mapped back with the exponential map (m cos|g| + g sin|g| / |g|,
|g| = ||g|| + eps), and the result is scaled by sum_i w_i ||v_i||, then the base is added back.
If ||m|| < eps, two models fall back to w_1 v_1 + w_2 v_2 and more models are an error. One model is
returned as it is (mergekit does not subtract the base then either).
"""

from __future__ import annotations

import math

import torch

from polyfuse.errors import UserError
from polyfuse.merge.methods.base import MERGE_METHODS, WEIGHT, MergeMethod, Param, TensorTask
from polyfuse.merge.methods.sparsify import check_weight_sum
from polyfuse.merge.methods.sphere import blend


@MERGE_METHODS.register("multislerp")
class MultiSlerp(MergeMethod):
    name = "multislerp"
    description = "Multi-SLERP: weighted interpolation of several models on the hypersphere"
    base_policy = "optional"
    min_models = 1
    parameters = (
        WEIGHT,
        Param("normalize_weights", True, description="divide the weights by their sum",
              explain="normalize_weights {v} = true: weights are divided by their sum"),
        Param("eps", 1e-8, description="guards the norms against division by zero",
              explain="eps {v} = guards the norms against division by zero"),
    )

    @classmethod
    def check(cls, params, model_params) -> None:
        if params["normalize_weights"] and len(model_params) > 1:
            check_weight_sum(model_params, "multislerp with normalize_weights: true")

    def merge(self, task: TensorTask) -> torch.Tensor:
        task = task.to_fp32()
        models = task.models
        if len(models) == 1:
            return models[0]
        base = task.base
        if base is not None:
            for model in models:
                model.sub_(base)
        eps = float(self.param(task, "eps"))
        weights = torch.tensor([float(self.model_param(task, i, "weight")) for i in range(len(models))])
        if self.param(task, "normalize_weights"):
            weights = weights / weights.sum()
        flat = [m.reshape(-1) for m in models]
        norms = torch.stack([torch.linalg.vector_norm(v) for v in flat])
        scales = weights / (norms + eps)
        mean = torch.zeros_like(flat[0])
        for v, s in zip(flat, scales, strict=True):
            mean.add_(v, alpha=float(s))
        mean_norm = torch.linalg.vector_norm(mean)
        if mean_norm < eps:
            if len(models) == 2:
                out = blend(models[0], models[1], float(weights[0]), float(weights[1]))
                return out.add_(base) if base is not None else out
            raise UserError(f"multislerp: {task.name}: the weighted sum of the input tensors is zero (antipodal "
                            f"inputs with balancing weights); use different weights")
        mean.div_(mean_norm)
        tangent = torch.zeros_like(mean)
        for v, s, norm, w in zip(flat, scales, norms, weights, strict=True):
            dot = float(torch.dot(v, mean) / (norm + eps))
            tangent.add_(v, alpha=float(s)).sub_(mean, alpha=float(w) * dot)
        tangent_norm = float(torch.linalg.vector_norm(tangent)) + eps
        out = mean.mul_(math.cos(tangent_norm)).add_(tangent, alpha=math.sin(tangent_norm) / tangent_norm)
        out = out.mul_(float((norms * weights).sum())).reshape(models[0].shape)
        return out.add_(base) if base is not None else out
