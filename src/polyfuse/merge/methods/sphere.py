"""Pieces the spherical methods share (slerp, nuslerp, karcher, multislerp): the SLERP weights of the two ends of
an arc and the in-place blend of two tensors.

Each works on Python floats (math, double precision) or on tensors (torch, per row), whichever the caller holds,
so every method keeps its own precision and mergekit's constants (norm floors, lerp thresholds), which differ
from method to method.
"""

from __future__ import annotations

import math

import torch

Scalar = float | torch.Tensor


def slerp_weights(t: float, cos: Scalar) -> tuple[Scalar, Scalar]:
    """(sin((1 - t) W) / sin W, sin(t W) / sin W) with W = arccos(cos): the weights of the arc's ends at t."""
    acos, sin = (torch.acos, torch.sin) if isinstance(cos, torch.Tensor) else (math.acos, math.sin)
    theta = acos(cos)
    sin_theta = sin(theta)
    return sin((1 - t) * theta) / sin_theta, sin(t * theta) / sin_theta


def blend(a: torch.Tensor, b: torch.Tensor, weight_a: Scalar, weight_b: Scalar) -> torch.Tensor:
    """weight_a * a + weight_b * b, formed in place in `a` (`b` is scaled in place too): the caller owns both."""
    return a.mul_(weight_a).add_(b.mul_(weight_b))
