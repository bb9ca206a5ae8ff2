"""SLERP between the base (t = 0) and the one other model (t = 1), over the flattened tensor in fp32.

u = v / ||v|| (skipped when ||v|| <= 1e-8); if |u0 . u1| > 0.9995 it falls back to lerp; otherwise
th = sin((1-t) W) / sin W * v0 + sin(t W) / sin W * v1 with W = arccos(u0 . u1), on the unnormalised tensors.
"""

from __future__ import annotations

import torch

from polyfuse.merge.methods.base import MERGE_METHODS, InvalidParameter, MergeMethod, Param, TensorTask
from polyfuse.merge.methods.sphere import blend, slerp_weights

NORM_EPS = 1e-8
DOT_THRESHOLD = 0.9995


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """The interpolated tensor, formed in place in `v0` (`v1` is scaled in place too): the caller owns both."""
    a = v0.reshape(-1)
    b = v1.reshape(-1)
    norm_a = float(torch.linalg.vector_norm(a))
    norm_b = float(torch.linalg.vector_norm(b))
    dot = float(torch.dot(a, b)) / (
        (norm_a if norm_a > NORM_EPS else 1.0) * (norm_b if norm_b > NORM_EPS else 1.0)
    )
    if abs(dot) > DOT_THRESHOLD:
        return blend(v0, v1, 1 - t, t)
    return blend(v0, v1, *slerp_weights(t, max(-1.0, min(1.0, dot))))


@MERGE_METHODS.register("slerp")
class Slerp(MergeMethod):
    name = "slerp"
    description = "SLERP: spherical interpolation from the base (t = 0) to the other model (t = 1)"
    min_models = 1
    max_models = 1
    parameters = (Param("t", description="the position between the base (t = 0) and the other model (t = 1)",
                        explain="t {v} = position between the base (t = 0) and the other model (t = 1)"),)

    @classmethod
    def check(cls, params, model_params) -> None:
        """mergekit has no rule for t outside [0, 1] (its formula extrapolates past either model): refused."""
        if not 0 <= params["t"] <= 1:
            raise InvalidParameter("t", f"must be between 0 (the base) and 1 (the other model) (got {params['t']})")

    def merge(self, task: TensorTask) -> torch.Tensor:
        task = task.to_fp32()
        assert task.base is not None and len(task.models) == 1, (
            "slerp needs the base and exactly one other model"
        )
        return slerp(float(self.param(task, "t")), task.base, task.models[0])
