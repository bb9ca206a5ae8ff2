"""Tensor pieces shared by the merge methods: magnitude trim (TIES, breadcrumbs, RSAF), random drop and
rescale (DARE, DELLA), and the weighted sum with optional TIES sign election and disjoint mean.

Every function takes and returns fp32 tensors and is pure apart from the warnings it logs, except that
`weighted_merge` without election sums into its first input. Random masks are
drawn on the CPU from the generator they are given and then moved to the tensor's device, so a seed gives the
same mask on every device.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from polyfuse.merge.methods.base import InvalidParameter

logger = logging.getLogger("polyfuse.merge")

RESCALE_MODES = ("paper", "l1_norm")
L1_RESCALE_EPS = 1e-7  # mergekit: no norm matching when either L1 norm is below this
SUM_DIVISOR_EPS = 1e-8  # normalize without sign election: a |sum w| below this divides by 1


def check_weight_sum(model_params: list[dict], method: str) -> None:
    """Weights used as shares (divided by their sum) cannot sum to 0: mergekit divides by zero there (NaN and
    Inf weights), so it is refused, naming the last model's weight."""
    total = sum(float(p["weight"]) for p in model_params)
    if model_params and abs(total) < SUM_DIVISOR_EPS:
        raise InvalidParameter("weight", f"the weights sum to {total:g}, but {method} divides by their sum; give "
                                         f"weights with a non-zero sum (or turn normalizing off)",
                               len(model_params) - 1)


def check_rescale_mode(mode: str) -> str:
    if mode not in RESCALE_MODES:
        raise InvalidParameter("rescale_mode", f"expected one of {', '.join(RESCALE_MODES)} (got {mode!r})")
    return mode


def keep_count(density: float, numel: int, name: str = "") -> int:
    """Entries a magnitude trim keeps for a density in (0, 1): floor(density * numel) as mergekit's int(), but at
    least 1 (as mergekit 0.1.5; polyfuse also warns)."""
    k = int(density * numel)
    if k < 1:
        logger.warning(
            "%s: density %g keeps 0 of %d entries; keeping the largest one instead",
            name or "tensor",
            density,
            numel,
        )
        k = 1
    return min(k, numel)


def magnitude_band_mask(tau: torch.Tensor, n_keep: int, n_top: int = 0) -> torch.Tensor:
    """Boolean mask keeping `n_keep` entries of `tau` by |tau|, after skipping the `n_top` largest.

    n_top = 0 is the TIES top-k; n_top > 0 is the breadcrumbs band. Uses `topk` (never a full sort) and picks the
    smaller of the kept and the dropped sides. Among exactly equal magnitudes the choice is torch's (deterministic
    on one device)."""
    flat = tau.abs().reshape(-1)
    n = flat.numel()
    n_drop_bottom = n - n_keep - n_top
    assert n_keep >= 0 and n_top >= 0 and n_drop_bottom >= 0, (n, n_keep, n_top)
    if n_top == 0 and n_drop_bottom < n_keep:
        mask = torch.ones(n, dtype=torch.bool, device=tau.device)
        if n_drop_bottom:
            mask[torch.topk(flat, n_drop_bottom, largest=False, sorted=False).indices] = False
        return mask.reshape(tau.shape)
    if n_top:
        flat = flat.clone()
        flat[torch.topk(flat, n_top, sorted=False).indices] = -1.0  # below every magnitude: never kept
    mask = torch.zeros(n, dtype=torch.bool, device=tau.device)
    if n_keep:
        mask[torch.topk(flat, n_keep, sorted=False).indices] = True
    return mask.reshape(tau.shape)


def rescale_masked(
    tau: torch.Tensor, mask: torch.Tensor, *, rescale: bool, mode: str, keep_prob: float | torch.Tensor
) -> torch.Tensor:
    """`mask * tau`, rescaled. mode "paper": divide by the keep probability (a scalar, or one per entry as in
    DELLA), so E[result] = tau; mode "l1_norm" (mergekit's `rescale: true`): scale by ||tau||_1 / ||mask*tau||_1,
    skipped when either norm is below 1e-7."""
    masked = tau * mask
    if not rescale:
        return masked
    if check_rescale_mode(mode) == "paper":
        return masked / keep_prob
    before = tau.abs().sum()
    after = masked.abs().sum()
    if before < L1_RESCALE_EPS or after < L1_RESCALE_EPS:
        return masked
    return masked * (before / after)


def magnitude_trim(
    tau: torch.Tensor,
    density: float,
    *,
    name: str = "",
    gamma: float = 0.0,
    rescale: bool = False,
    mode: str = "l1_norm",
) -> torch.Tensor:
    """Keep the top `density` fraction of |tau| (TIES trim); with `gamma` > 0 first drop the top `gamma` fraction
    as outliers (Model Breadcrumbs: keep floor(d*n) entries after the floor(gamma*n) largest; when d + gamma > 1
    fewer outliers are dropped). density >= 1 returns tau untouched, density <= 0 drops it (mergekit's rules)."""
    n = tau.numel()
    if density >= 1 or n == 0:
        return tau
    if density <= 0:
        return torch.zeros_like(tau)
    n_keep = keep_count(density, n, name)
    n_top = int(gamma * n)
    n_top = max(0, min(n_top, n - n_keep))
    mask = magnitude_band_mask(tau, n_keep, n_top)
    return rescale_masked(tau, mask, rescale=rescale, mode=mode, keep_prob=n_keep / n)


def bernoulli_mask(
    prob: float | torch.Tensor, shape: torch.Size, generator: torch.Generator | None
) -> torch.Tensor:
    """Boolean mask with P(True) = prob elementwise, drawn on the CPU (device-independent for a seed)."""
    return torch.rand(shape, generator=generator, dtype=torch.float32) < (
        prob.cpu() if isinstance(prob, torch.Tensor) else prob
    )


def dare_drop(
    tau: torch.Tensor,
    density: float,
    *,
    generator: torch.Generator | None = None,
    mask: torch.Tensor | None = None,
    rescale: bool = True,
    mode: str = "paper",
) -> torch.Tensor:
    """DARE: keep each entry with probability `density` (or where the given `mask` is set), then rescale by 1/d
    ("paper") or by L1 norm matching ("l1_norm"). density >= 1 returns tau untouched; density <= 0 drops it."""
    if density >= 1:
        return tau
    if density <= 0:
        return torch.zeros_like(tau)
    return random_drop(tau, density, generator, mask, rescale=rescale, mode=mode)


def check_epsilon(density: float, epsilon: float, name: str = "", model: int | None = None) -> None:
    """DELLA's keep probabilities density +- epsilon must lie in (0, 1) (mergekit raises there too)."""
    if epsilon < 0 or not (density - epsilon > 0 and density + epsilon < 1):
        raise InvalidParameter("epsilon", f"{name + ': ' if name else ''}density {density} and epsilon {epsilon} "
                                          f"need epsilon >= 0, density - epsilon > 0 and density + epsilon < 1",
                               model)


def della_keep_probabilities(
    tau: torch.Tensor, density: float, epsilon: float, name: str = ""
) -> torch.Tensor:
    """DELLA MagPrune keep probabilities: per row (the first dimension; a 1-D tensor is one row), rank |tau|
    ascending, q = (rank - 1)/(n - 1) (0.5 for a row of one entry), p = (d - eps) + 2 eps q.
    Requires d - eps > 0 and d + eps < 1. Equal magnitudes are ranked by position (stable sort)."""
    check_epsilon(density, epsilon, name)
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau.reshape(tau.shape[0], -1)
    n = rows.shape[1]
    if n == 1:
        q = torch.full_like(rows, 0.5)
    else:
        order = torch.argsort(rows.abs(), dim=1, stable=True)
        positions = (torch.arange(n, device=tau.device, dtype=torch.float32) / (n - 1)).expand_as(rows)
        q = torch.empty_like(rows).scatter_(1, order, positions)
    return ((density - epsilon) + 2 * epsilon * q).reshape(tau.shape)


def della_magprune(
    tau: torch.Tensor,
    density: float,
    epsilon: float,
    *,
    generator: torch.Generator | None = None,
    mask: torch.Tensor | None = None,
    rescale: bool = True,
    mode: str = "paper",
    name: str = "",
) -> torch.Tensor:
    """DELLA: drop with the MagPrune keep probabilities, then rescale by 1/p per entry ("paper") or by L1 norm
    matching ("l1_norm"). density >= 1 returns tau untouched, density <= 0 drops it (mergekit's rules)."""
    if density >= 1:
        return tau
    if density <= 0:
        return torch.zeros_like(tau)
    probs = della_keep_probabilities(tau, density, epsilon, name)
    return random_drop(tau, probs, generator, mask, rescale=rescale, mode=mode)


def random_drop(
    tau: torch.Tensor,
    keep_prob: float | torch.Tensor,
    generator: torch.Generator | None,
    mask: torch.Tensor | None,
    *,
    rescale: bool,
    mode: str,
) -> torch.Tensor:
    """Keep each entry with `keep_prob` (a scalar for DARE, one per entry for DELLA) or where the given
    `mask` is set, then rescale the survivors."""
    if mask is None:
        mask = bernoulli_mask(keep_prob, tau.shape, generator)
    mask = mask.to(device=tau.device, dtype=torch.bool)
    return rescale_masked(tau, mask, rescale=rescale, mode=mode, keep_prob=keep_prob)


def weighted_merge(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    elect_weighted: bool = True,
    divisor_floor: float | None = None,
) -> torch.Tensor:
    """sum_i w_i delta_i, normalised or not, with or without TIES sign election.

    Without election the sum is formed in place in deltas[0] (the caller owns the deltas: `TensorTask`'s rule), so
    no extra tensor is needed; the divisor is sum_i w_i, replaced by 1 when |.| < 1e-8. With election: s = +1 where
    sum_i w_i delta_i >= 0 (sum_i delta_i when not `elect_weighted`, as SCE does), else -1; model i takes part
    in an entry where sign(w_i delta_i) == s (zeros never agree); the divisor is sum_i w_i [takes part], a zero
    one replaced by 1 (or, with `divisor_floor`, clamped to at least that)."""
    assert deltas and len(deltas) == len(weights), (len(deltas), len(weights))
    if not consensus:
        mixed = deltas[0].mul_(float(weights[0]))
        for delta, weight in zip(deltas[1:], weights[1:], strict=True):
            mixed.add_(delta, alpha=float(weight))
        if normalize:
            total = float(sum(float(w) for w in weights))
            mixed /= total if abs(total) >= SUM_DIVISOR_EPS else 1.0
        return mixed

    mixed = torch.zeros_like(deltas[0])
    election = torch.zeros_like(deltas[0])
    # each w_i delta_i rounded before it is summed, as mergekit does: where the weighted deltas cancel exactly, a
    # fused multiply-add (`add_(delta, alpha=w)`) leaves a residue of either sign and elects the other sign
    for delta, weight in zip(deltas, weights, strict=True):
        election.add_(delta * float(weight) if elect_weighted else delta)
    elected_sign = torch.where(election >= 0, 1.0, -1.0)
    del election
    divisor = torch.zeros_like(deltas[0]) if normalize else None
    for delta, weight in zip(deltas, weights, strict=True):
        weight = float(weight)
        if weight == 0:  # w delta = 0 never agrees: no part in the sum nor the divisor
            continue
        agreement = delta * elected_sign  # sign(w delta) == s  <=>  w * agreement > 0
        keep = (agreement > 0 if weight > 0 else agreement < 0).to(delta.dtype)
        del agreement
        mixed.addcmul_(delta, keep, value=weight)
        if divisor is not None:
            divisor.add_(keep, alpha=weight)
    if divisor is not None:
        if divisor_floor is None:
            divisor[divisor == 0] = 1.0
        else:
            divisor.clamp_(min=divisor_floor)
        mixed /= divisor
    return mixed
