"""InfiFPO (arXiv 2505.13878): DPO against a reference fused from the sources' sequence log-probs, so the
pivot learns from sources with other tokenizers without aligning vocabularies. What polyfuse decided
where the paper is silent: docs/design.md ("InfiFPO and the WRPO / IPO family").

The reference is built per pair in log space: length-normalise (every model over its own tokens: a
tokenizer that splits a text finer gives it a lower sum whatever its quality), clip each source against
the initial pivot M0 (a floor on chosen responses, a ceiling on the rejected one), then fuse. Reference
and source values are constants; only the policy's log-probs carry gradients. The launch scripts'
undocumented `ref_offset` is deliberately absent: the paper's loss has no such term.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import Field, model_validator

from polyfuse.lazy import lazy_import
from polyfuse.objectives.base import OBJECTIVES, PreferenceBatch, PreferenceObjective, logps_column
from polyfuse.objectives.dpo import dpo_loss
from polyfuse.objectives.ipo import ipo_loss
from polyfuse.objectives.wrpo import WRPO_ROLES, wrpo_alpha, wrpo_loss

torch = lazy_import("torch")

Fusion = Literal["max_margin", "average", "confidence", "none"]
MaxMargin = Literal["per_example", "per_response"]
REJECTED = "rejected"


def clip_to_pivot(
    pivot: torch.Tensor, sources: torch.Tensor, chosen: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sources' values [B, N] floored (chosen response) or capped (rejected) at M0's [B], and a 0/1 mask
    of the values that moved."""
    bound = pivot[:, None]
    worse = sources < bound if chosen else sources > bound
    return torch.where(worse, bound, sources), worse.float()


def confidence_fuse(values: torch.Tensor, eps: float) -> torch.Tensor:
    """`sum_i w_i*c_i` with `w_i ∝ 1/(-c_i + eps)` over the last dimension (the paper's "SoftMax" is this
    plain ratio): a source that finds the response more likely weighs more."""
    confidence = 1 / (eps - values)
    return (confidence / confidence.sum(-1, keepdim=True) * values).sum(-1)


def _one_hot_metrics(prefix: str, choice: torch.Tensor, candidates: int) -> dict[str, torch.Tensor]:
    return {f"{prefix}/{i}": (choice == i).float() for i in range(candidates)}


def fuse_references(
    pivot: Mapping[str, torch.Tensor],
    sources: Mapping[str, torch.Tensor] | None,
    chosen_weights: Mapping[str, float],
    *,
    clip: bool = True,
    fusion: Fusion = "max_margin",
    max_margin: MaxMargin = "per_example",
    eps: float = 1e-6,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The fused reference F(y) [B] of every role, and the `fusion/*` metrics.

    `pivot` maps each role to M0's values [B] and `sources` to the N sources' values [B, N] (both per-token
    means with LN, sums without; `sources` is unused with fusion "none"). The role "rejected" is y_l; the
    others are chosen responses, and `chosen_weights` gives their weights in a margin
    `sum_r w_r*c(y_r) - c(y_l)` (one chosen role with weight 1 for InfiFPO; alpha and 1-alpha for the WRPO
    variant).

    - "none": F = M0.
    - "average" / "confidence": per response, over the N (clipped) sources; M0 enters only through clipping.
    - "max_margin", "per_example": one candidate per pair, the largest margin among M0 (candidate 0) and the
      sources; ties go to the lowest index, so a source must strictly beat M0.
    - "max_margin", "per_response": the largest candidate on each chosen response, the smallest on y_l.
    """
    pivot = {role: values.detach() for role, values in pivot.items()}

    def margin(values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return sum(weight * values[role] for role, weight in chosen_weights.items()) - values[REJECTED]

    metrics = {"fusion/pivot_margin": margin(pivot)}
    if fusion == "none":
        references = pivot
    else:
        candidates = {}
        for role, values in pivot.items():
            candidates[role] = sources[role].detach()
            if clip:
                candidates[role], metrics[f"fusion/clipped_{role}"] = clip_to_pivot(
                    values, candidates[role], chosen=role != REJECTED
                )
        if fusion == "average":
            references = {role: values.mean(-1) for role, values in candidates.items()}
        elif fusion == "confidence":
            references = {role: confidence_fuse(values, eps) for role, values in candidates.items()}
        else:
            candidates = {
                role: torch.cat([pivot[role][:, None], values], -1) for role, values in candidates.items()
            }
            count = candidates[REJECTED].shape[-1]
            if max_margin == "per_example":
                choice = margin(candidates).argmax(-1)  # the first maximum
                choices = dict.fromkeys(candidates, choice)
                metrics |= _one_hot_metrics("fusion/selected", choice, count)
            else:
                choices = {
                    role: values.argmin(-1) if role == REJECTED else values.argmax(-1)
                    for role, values in candidates.items()
                }
                for role, choice in choices.items():
                    metrics |= _one_hot_metrics(f"fusion/selected_{role}", choice, count)
            references = {
                role: values.gather(-1, choices[role][:, None]).squeeze(-1)
                for role, values in candidates.items()
            }
    metrics["fusion/ref_margin"] = margin(references)
    return references, metrics


def fused_reference(
    pivot_chosen: torch.Tensor,
    pivot_rejected: torch.Tensor,
    sources_chosen: torch.Tensor | None,
    sources_rejected: torch.Tensor | None,
    *,
    clip: bool = True,
    fusion: Fusion = "max_margin",
    max_margin: MaxMargin = "per_example",
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """`(F_w, F_l, fusion metrics)` for a (chosen, rejected) pair: `fuse_references` with one chosen role."""
    sources = None if fusion == "none" else {"chosen": sources_chosen, REJECTED: sources_rejected}
    references, metrics = fuse_references(
        {"chosen": pivot_chosen, REJECTED: pivot_rejected},
        sources,
        {"chosen": 1.0},
        clip=clip,
        fusion=fusion,
        max_margin=max_margin,
        eps=eps,
    )
    return references["chosen"], references[REJECTED], metrics


def infifpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    pivot_chosen: torch.Tensor,
    pivot_rejected: torch.Tensor,
    sources_chosen: torch.Tensor | None,
    sources_rejected: torch.Tensor | None,
    beta: float,
    *,
    clip: bool = True,
    fusion: Fusion = "max_margin",
    max_margin: MaxMargin = "per_example",
    eps: float = 1e-6,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair `softplus(-u)`, `u = beta*[(lp(pi,y_w) - lp(pi,y_l)) - (F_w - F_l)]` (Eq. 13): DPO with the
    fused reference. `fusion/weight` is sigma(-u), the paper's preference disparity coefficient."""
    ref_chosen, ref_rejected, fusion_metrics = fused_reference(
        pivot_chosen,
        pivot_rejected,
        sources_chosen,
        sources_rejected,
        clip=clip,
        fusion=fusion,
        max_margin=max_margin,
        eps=eps,
    )
    losses, metrics = dpo_loss(chosen_logps, rejected_logps, ref_chosen, ref_rejected, beta)
    return losses, metrics | fusion_metrics | {"fusion/weight": torch.sigmoid(-metrics["rewards/margins"])}


class FusedReferenceObjective(PreferenceObjective):
    """The reference-fusion settings shared by InfiFPO and its variants, and the columns they imply:
    M0's (`ref_*`) and, unless fusion is off, the sources' (`fuse_*`), means with LN and sums without."""

    length_normalize: bool = Field(default=True, description="Per-token mean log-probs, each model over its own tokens.")
    clip: bool = Field(default=True, description="Floor each source at M0 on chosen responses, cap it on rejected ones.")
    fusion: Fusion = Field(default="max_margin", description="How the sources make one reference; none: M0 alone (DPO).")
    max_margin: MaxMargin = Field(default="per_example", description="max_margin picks one candidate per pair or per response.")
    confidence_eps: float = Field(default=1e-6, gt=0, description="eps of the confidence weights 1 / (-c + eps).")

    def required_columns(self) -> tuple[str, ...]:
        prefixes = ("ref",) if self.fusion == "none" else ("ref", "fuse")
        return tuple(logps_column(p, role, self.length_normalize) for p in prefixes for role in self.roles)

    def policy_values(self, batch: PreferenceBatch) -> dict[str, torch.Tensor]:
        return {role: batch.policy_logps(role, self.length_normalize) for role in self.roles}

    def precomputed_values(self, batch: PreferenceBatch, prefix: str) -> dict[str, torch.Tensor] | None:
        """M0's (`ref`) or the sources' (`fuse`) values per role; no sources with fusion "none"."""
        if prefix == "fuse" and self.fusion == "none":
            return None
        return {role: batch.column(logps_column(prefix, role, self.length_normalize)) for role in self.roles}

    def references(
        self, batch: PreferenceBatch, chosen_weights: Mapping[str, float]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return fuse_references(
            self.precomputed_values(batch, "ref"),
            self.precomputed_values(batch, "fuse"),
            chosen_weights,
            clip=self.clip,
            fusion=self.fusion,
            max_margin=self.max_margin,
            eps=self.confidence_eps,
        )


@OBJECTIVES.register("infifpo")
class InfiFPO(FusedReferenceObjective):
    """InfiFPO: DPO against a reference fused from the sources' sequence log-probs, so sources with other
    tokenizers teach the pivot without aligning vocabularies. beta defaults to 2.5 with length normalisation
    and 0.1 without."""

    beta: float | None = Field(default=None, gt=0, description="None: 2.5 with length_normalize, else 0.1.")

    @model_validator(mode="after")
    def _default_beta(self) -> InfiFPO:
        if self.beta is None:
            self.beta = 2.5 if self.length_normalize else 0.1
        return self

    def __call__(self, batch: PreferenceBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy = self.policy_values(batch)
        pivot = self.precomputed_values(batch, "ref")
        sources = self.precomputed_values(batch, "fuse") or dict.fromkeys(self.roles)
        return infifpo_loss(
            policy["chosen"],
            policy[REJECTED],
            pivot["chosen"],
            pivot[REJECTED],
            sources["chosen"],
            sources[REJECTED],
            self.beta,
            clip=self.clip,
            fusion=self.fusion,
            max_margin=self.max_margin,
            eps=self.confidence_eps,
        )


@OBJECTIVES.register("infifpo_wrpo")
class InfiFPOWRPO(InfiFPO):
    """InfiFPO-WRPO (Eq. 20): WRPO against the fused reference, roles as WRPO's.

    Both chosen responses get the floor clip and y_l the ceiling. Max-margin per example (not published;
    polyfuse's choice) maximises `alpha*c_i(y_ws) + (1-alpha)*c_i(y_wt) - c_i(y_l)` at the current alpha,
    M0 being candidate 0; at alpha = 0 it is `infifpo`'s per-example max-margin. The betas are not
    published either: polyfuse uses InfiFPO's, 2.5 with LN and 0.1 without."""

    roles = WRPO_ROLES

    alpha_max: float = Field(default=0.1, ge=0, le=1, description="Final weight of the source response y_ws against y_wt.")
    dynamic: bool = Field(default=True, description="Raise alpha linearly from 0 to alpha_max over the run; false: alpha_max throughout.")

    def __call__(self, batch: PreferenceBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        alpha = wrpo_alpha(batch.step, batch.total_steps, self.alpha_max, self.dynamic)
        references, fusion_metrics = self.references(batch, {"chosen_source": alpha, "chosen": 1 - alpha})
        policy = self.policy_values(batch)
        losses, metrics = wrpo_loss(
            *(policy[role] for role in self.roles),
            *(references[role] for role in self.roles),
            self.beta,
            alpha,
        )
        return losses, metrics | fusion_metrics | {
            "fusion/weight": torch.sigmoid(-metrics["rewards/margins"])
        }


@OBJECTIVES.register("infifpo_ipo")
class InfiFPOIPO(FusedReferenceObjective):
    """InfiFPO-IPO (Eq. 22): `([lp(pi,y_w) - F_w] - [lp(pi,y_l) - F_l] - 1/(2*beta))^2`. Its beta is not
    published: polyfuse uses IPO's default, 0.1."""

    beta: float = Field(default=0.1, gt=0, description="Regularisation: the target margin is 1 / (2 beta).")

    def __call__(self, batch: PreferenceBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        references, fusion_metrics = self.references(batch, {"chosen": 1.0})
        policy = self.policy_values(batch)
        losses, metrics = ipo_loss(
            policy["chosen"], policy[REJECTED], references["chosen"], references[REJECTED], self.beta
        )
        return losses, metrics | fusion_metrics
