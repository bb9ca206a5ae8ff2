"""Karcher mean (mergekit `karcher`): the weighted Riemannian mean of the inputs' directions on the unit
hypersphere, scaled by their mean norm.

Every input counts 1/N (the base too, when the config names one: mergekit treats it as one more input).
u_i = v_i / ||v_i|| (inputs with ||v_i|| <= tol are left out of the direction); start from the normalised
weighted mean of the u_i (u_1 if it vanishes) and iterate up to `max_iter` times: the tangent
g = sum_i a_i theta_i / sin(theta_i) (u_i - cos(theta_i) m), theta_i = arccos(m . u_i) (terms with theta_i < tol
skipped); stop when ||g|| < tol, else m = cos(||g||) m + sin(||g||) g / ||g||, renormalised. The result is
(sum_i ||v_i|| / N) m.
"""

from __future__ import annotations

import torch

from polyfuse.merge.methods.base import MERGE_METHODS, MergeMethod, Param, TensorTask
from polyfuse.merge.methods.sphere import blend


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], max_iter: int, tol: float) -> torch.Tensor:
    """In place: the inputs are turned into their unit directions (the caller owns them)."""
    if len(tensors) == 1:
        return tensors[0]
    norms = [torch.linalg.vector_norm(t) for t in tensors]
    units = [t.zero_() if float(n) == 0.0 else t.div_(n) for t, n in zip(tensors, norms, strict=True)]
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return units[0].zero_()
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    chosen = [units[i] for i in valid]
    mean = torch.zeros_like(chosen[0])
    for alpha, unit in zip(weights, chosen, strict=True):
        mean += alpha * unit
    mean_norm = torch.linalg.vector_norm(mean)
    mean = chosen[0].clone() if float(mean_norm) < tol else mean.div_(mean_norm)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(weights, chosen, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if float(tangent_norm) < tol:
            break
        mean = blend(mean, tangent / tangent_norm, torch.cos(tangent_norm), torch.sin(tangent_norm))  # exp map
        unit_norm = torch.linalg.vector_norm(mean)
        if float(unit_norm) > tol:
            mean = mean / unit_norm
    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms, strict=True))
    return mean.mul_(scale)


@MERGE_METHODS.register("karcher")
class Karcher(MergeMethod):
    name = "karcher"
    description = "Karcher mean: the Riemannian mean of the inputs' directions, scaled by their mean norm"
    base_policy = "ignored"
    min_models = 1
    parameters = (
        Param("max_iter", 10, description="the most Riemannian mean iterations per tensor",
              explain="max_iter {v} = at most {v} Riemannian mean iterations per tensor"),
        Param("tol", 1e-5, description="the tangent norm to stop at; inputs with a smaller norm are left out",
              explain="tol {v} = stop when the tangent norm falls below {v}; inputs with a smaller norm are left out"),
    )

    def merge(self, task: TensorTask) -> torch.Tensor:
        task = task.to_fp32()
        n = len(task.models)
        return karcher_mean(task.models, [1.0 / n] * n, int(self.param(task, "max_iter")),
                            float(self.param(task, "tol")))
