"""Passthrough (mergekit `passthrough`): the one input's tensor, times its per-model `scale`.

Used for layer stacking with `slices:` (frankenmerges, depth up-scaling), where each output layer comes from
one model, and for copying or rescaling one model. `scale` is mergekit's optional per-model factor; polyfuse
writes its "no scale" default as 1.0, which gives the same tensor bit for bit.
"""

from __future__ import annotations

import torch

from polyfuse.merge.methods.base import MERGE_METHODS, MergeMethod, Param, TensorTask


@MERGE_METHODS.register("passthrough")
class Passthrough(MergeMethod):
    name = "passthrough"
    description = "passthrough: the single input's tensor (times its scale)"
    base_policy = "ignored"
    min_models = 1
    max_models = 1
    parameters = (Param("scale", 1.0, per_model=True, description="the factor this model's tensors are multiplied by",
                        explain="scale {v} = this model's tensors are multiplied by {v}"),)

    def merge(self, task: TensorTask) -> torch.Tensor:
        task = task.to_fp32()
        scale = float(self.model_param(task, 0, "scale"))
        tensor = task.models[0]
        return tensor if scale == 1.0 else tensor.mul_(scale)
