"""CGPO's source consensus, built offline from sequence-level scalars only (no vocabulary alignment):

1. per source, fit the mean and population std of its normalised completion entropy Hbar on a calibration
   split of prompts held out from training (Eq. 10);
2. per completion, confidence weights `w_i = f + (1 - N*f) * softmax_i(-zeta_i / T)` from the calibrated
   entropies `zeta_i = clip((Hbar_i - mu_i) / sd_i, -z, z)`: the more confident source weighs more, every
   weight is at least the floor f and they sum to 1;
3. the consensus `C_S = sum_i w_i * l_i` of the sources' per-token mean log-probs;
4. the prompt-level shift `delta(x) = mean_y l_0 - mean_y C_S` over every row of the prompt, so the aligned
   consensus `Ctilde = C_S + delta` has M0's per-prompt mean and keeps the sources' differences (Eq. 13).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from polyfuse.config import StrictModel
from polyfuse.errors import ConfigError, DataError
from polyfuse.lazy import lazy_import

torch = lazy_import("torch")

logger = logging.getLogger(__name__)

SINGLETON_WARNING = 0.10  # CGPO-c: warn when more prompts than this have a single row


class ConsensusSettings(StrictModel):
    """How the aligned consensus is built (the reference release's defaults)."""

    aggregation: Literal["calibrated_entropy", "mean"] = Field(
        default="calibrated_entropy", description="Entropy-calibrated weights, or the plain mean of the sources (ablation)."
    )
    temperature: float = Field(default=0.8, gt=0, description="T of the softmax over -zeta.")
    weight_floor: float = Field(default=0.02, ge=0, lt=1, description="Smallest weight of a source; below 1/N.")
    z_clip: float = Field(default=5.0, ge=0, description="Clip of the calibrated entropies; 0: no clip.")
    baseline_alignment: bool = Field(default=True, description="Shift the consensus to M0's mean per prompt.")
    calibration_fraction: float = Field(default=0.05, gt=0, lt=1, description="Share of prompts held out for calibration.")
    calibration_min_rows: int = Field(default=500, ge=1, description="Fewest rows of the calibration split.")
    calibration_seed: int = Field(default=0, description="Seed of the calibration split.")


@dataclass(frozen=True)
class EntropyCalibration:
    """Per-source mean and population std (floored at eps) of Hbar over the calibration rows."""

    mean: torch.Tensor
    std: torch.Tensor


@dataclass(frozen=True)
class Consensus:
    """The consensus columns of every training row (the reference release's names) and a summary to log."""

    source_consensus: torch.Tensor  # C_S [R]
    baseline_shift: torch.Tensor  # delta(x) [R]
    aligned_consensus: torch.Tensor  # Ctilde [R]
    source_weights: torch.Tensor  # w [R, N]
    calibrated_entropies: torch.Tensor  # zeta [R, N]
    summary: dict[str, float]


def _finite_matrix(name: str, values: torch.Tensor) -> None:
    if values.ndim != 2 or 0 in values.shape:
        raise DataError(f"{name} must be one value per row and source, got shape {tuple(values.shape)}")
    if not torch.isfinite(values).all():
        raise DataError(f"{name} has non-finite values (row {int((~torch.isfinite(values)).any(-1).nonzero()[0])})")


def fit_entropy_calibration(entropies: torch.Tensor, eps: float = 1e-6) -> EntropyCalibration:
    """mu_i and sd_i = max(popstd_i, eps) over the calibration rows' Hbar [R, N]."""
    _finite_matrix("calibration entropies", entropies)
    return EntropyCalibration(entropies.mean(0), entropies.std(0, unbiased=False).clamp_min(eps))


def confidence_weights(
    entropies: torch.Tensor,
    calibration: EntropyCalibration,
    temperature: float = 0.8,
    floor: float = 0.02,
    z_clip: float = 5.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(zeta, w) [R, N] from the rows' Hbar [R, N]: calibrated entropies and per-row convex source weights."""
    _finite_matrix("source entropies", entropies)
    sources = entropies.shape[1]
    if calibration.mean.shape != (sources,):
        raise DataError(f"the calibration has {calibration.mean.numel()} sources, the rows {sources}")
    if not floor < 1 / sources:
        raise ConfigError(f"weight_floor {floor} must be below 1/N = {1 / sources:.4g} with {sources} sources")
    zeta = (entropies - calibration.mean) / calibration.std
    if z_clip > 0:
        zeta = zeta.clamp(-z_clip, z_clip)
    return zeta, floor + (1 - sources * floor) * torch.softmax(-zeta / temperature, dim=-1)


def align_to_pivot(
    prompt_ids: Sequence[str], pivot: torch.Tensor, consensus: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Ctilde, delta) [R]: the consensus shifted, per prompt over all its rows, to M0's mean score there."""
    if not len(prompt_ids) == len(pivot) == len(consensus):
        raise DataError(f"{len(prompt_ids)} prompt ids for {len(pivot)} M0 scores and {len(consensus)} consensus values")
    groups: dict[str, list[int]] = {}
    for row, prompt in enumerate(prompt_ids):
        groups.setdefault(prompt, []).append(row)
    shift = torch.empty_like(consensus)
    for rows in groups.values():
        index = torch.tensor(rows)
        shift[index] = pivot[index].mean() - consensus[index].mean()
    return consensus + shift, shift


def calibration_prompts(
    prompt_ids: Sequence[str], fraction: float = 0.05, min_rows: int = 500, seed: int = 0
) -> list[str]:
    """The prompts held out for calibration (CGPO-b): whole prompts in a seeded order until they are at
    least `fraction` of the prompts and hold at least `min_rows` rows; at least one prompt stays for training."""
    rows: dict[str, int] = {}
    for prompt in prompt_ids:
        rows[prompt] = rows.get(prompt, 0) + 1
    order = sorted(rows)
    random.Random(seed).shuffle(order)
    wanted, held, count = math.ceil(fraction * len(order)), [], 0
    for prompt in order:
        if len(held) >= wanted and count >= min_rows:
            break
        held.append(prompt)
        count += rows[prompt]
    if len(held) == len(order):
        raise DataError(
            f"a calibration split of at least {min_rows} rows would take all {len(prompt_ids)} rows "
            f"({len(order)} prompts); lower calibration_min_rows"
        )
    return held


def check_disjoint(calibration_prompt_ids: Sequence[str], training_prompt_ids: Sequence[str]) -> None:
    """The calibration split must share no prompt with the training rows."""
    shared = sorted(set(calibration_prompt_ids) & set(training_prompt_ids))
    if shared:
        raise DataError(
            f"the calibration split overlaps training: {len(shared)} prompts in both (e.g. {shared[0]!r}); "
            "calibration prompts must be held out of training"
        )


def build_consensus(
    prompt_ids: Sequence[str],
    pivot: torch.Tensor,
    scores: torch.Tensor,
    entropies: torch.Tensor | None,
    calibration_entropies: torch.Tensor | None,
    settings: ConsensusSettings,
) -> Consensus:
    """The consensus columns of the training rows from M0's scores `pivot` [R], the sources' per-token mean
    log-probs `scores` [R, N] and normalised entropies [R, N], with the calibration fitted on
    `calibration_entropies` [C, N] (the entropies are unused by the `mean` aggregation)."""
    _finite_matrix("source scores", scores)
    if settings.aggregation == "mean":
        weights = torch.full_like(scores, 1 / scores.shape[1])
        zeta = torch.zeros_like(scores)
    else:
        if entropies is None or calibration_entropies is None:
            raise DataError("the calibrated consensus needs the sources' entropies of the training and calibration rows")
        zeta, weights = confidence_weights(
            entropies,
            fit_entropy_calibration(calibration_entropies),
            settings.temperature,
            settings.weight_floor,
            settings.z_clip,
        )
    consensus = (weights * scores).sum(-1)
    if settings.baseline_alignment:
        aligned, shift = align_to_pivot(prompt_ids, pivot, consensus)
    else:
        aligned, shift = consensus.clone(), torch.zeros_like(consensus)
    summary = consensus_summary(prompt_ids, weights, zeta, shift, settings)
    return Consensus(consensus, shift, aligned, weights, zeta, summary)


def consensus_summary(
    prompt_ids: Sequence[str],
    weights: torch.Tensor,
    zeta: torch.Tensor,
    shift: torch.Tensor,
    settings: ConsensusSettings,
) -> dict[str, float]:
    """What CGPO-h logs about a consensus: each source's mean weight and the weights' 5/50/95th percentiles,
    the share of clipped zeta, the mean |delta|, and the share of single-row prompts (warned above 10%:
    their aligned consensus is M0's score, so the sources say nothing there)."""
    sizes: dict[str, int] = {}
    for prompt in prompt_ids:
        sizes[prompt] = sizes.get(prompt, 0) + 1
    singletons = sum(size == 1 for size in sizes.values()) / len(sizes)
    if settings.baseline_alignment and singletons > SINGLETON_WARNING:
        logger.warning(
            "CGPO consensus: %.0f%% of prompts have a single row, whose aligned consensus is M0's own score; "
            "keep at least two candidates per prompt", 100 * singletons,
        )
    quantiles = torch.quantile(weights.double().flatten(), torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
    clipped = (zeta.abs() >= settings.z_clip).double().mean() if settings.z_clip > 0 else torch.tensor(0.0)
    return {
        **{f"source_weight/{i}": float(w) for i, w in enumerate(weights.mean(0))},
        **{f"source_weight/p{q}": float(v) for q, v in zip((5, 50, 95), quantiles, strict=True)},
        "zeta_clipped": float(clipped),
        "mean_abs_shift": float(shift.abs().mean()),
        "singleton_prompts": singletons,
    }
