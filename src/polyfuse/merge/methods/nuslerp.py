"""NuSLERP (mergekit `nuslerp`): SLERP between two models, with the mix set by their weights, optionally
around a base and per row.

t = w_2 / (w_1 + w_2) (0.5 when the sum is below 1e-6). With a base, th = th0 + slerp(t, th_1 - th0, th_2 - th0);
without, th = slerp(t, th_1, th_2). `nuslerp_flatten` (default true) treats the tensor as one vector; otherwise
each vector along the last dimension (or, with `nuslerp_row_wise`, along the first) is interpolated on its own.
slerp: u = v / max(||v||, 1e-7), cos = clamp(u0 . u1, -1, 1); where 1 - cos^2 <= 1e-16 it is lerp, else
(sin((1-t) W) v0 + sin(t W) v1) / sin W with W = arccos(cos), on the unnormalised vectors.
"""

from __future__ import annotations

import torch

from polyfuse.merge.methods.base import MERGE_METHODS, WEIGHT, MergeMethod, Param, TensorTask
from polyfuse.merge.methods.sphere import blend, slerp_weights

NORM_FLOOR = 1e-7
COLINEAR_EPS = 1e-8


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, flatten: bool = False) -> torch.Tensor:
    """The interpolated tensor, formed in place in `v0` (the caller owns both)."""
    shape = v0.shape
    if flatten:
        a, b = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        a, b = v0.transpose(dim, -1), v1.transpose(dim, -1)
    else:
        a, b = v0, v1
    norm_a = torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    norm_b = torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    cos = ((a * b).sum(dim=-1, keepdim=True) / (norm_a * norm_b)).clamp(-1, 1)
    colinear = (1 - cos.square()) <= COLINEAR_EPS**2
    arc_a, arc_b = slerp_weights(t, torch.where(colinear, 0, cos))
    out = blend(a, b, torch.where(colinear, 1 - t, arc_a), torch.where(colinear, t, arc_b))
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


@MERGE_METHODS.register("nuslerp")
class NuSlerp(MergeMethod):
    name = "nuslerp"
    description = "NuSLERP: SLERP between two models by their weights, around the base when one is given"
    base_policy = "optional"
    min_models = 2
    max_models = 2
    parameters = (
        WEIGHT,
        Param("nuslerp_row_wise", False, description="interpolate each column vector on its own (when not flattened)",
              explain="nuslerp_row_wise {v} = interpolate each column vector on its own (when not flattened)"),
        Param("nuslerp_flatten", True, description="true: the whole tensor is one vector; false: per row",
              explain="nuslerp_flatten {v} = true: the whole tensor is one vector; false: per row"),
    )

    def merge(self, task: TensorTask) -> torch.Tensor:
        task = task.to_fp32()
        weights = [float(self.model_param(task, i, "weight")) for i in range(2)]
        total = sum(weights)
        t = 0.5 if abs(total) < 1e-6 else weights[1] / total
        first, second = task.models
        if task.base is not None:
            first.sub_(task.base)
            second.sub_(task.base)
        out = nuslerp(t, first, second, dim=0 if self.param(task, "nuslerp_row_wise") else -1,
                      flatten=bool(self.param(task, "nuslerp_flatten")))
        return out.add_(task.base) if task.base is not None else out
