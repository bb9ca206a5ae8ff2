"""Unpaired rows from scored samples (KTO, CGPO, FuseSFT): every judged response of the preference prompts is one
row, labelled desirable (D) or undesirable (U) on its own, so a source that is always right (or always wrong) on
a prompt still gives rows where the pair rules give none.

- Label: a verifier's verdict (correct: D, incorrect: U); a response no verifier judged, by its reward
  (`pairs.reward`) against `threshold` (at least: D). Neither: the response gives no row (counted).
- Which responses: those of the preference prompts (the SFT / preference split of the pair rules, the same
  prompts), from the models the pair rules use (`pairs.sources`, never the WRPO `target`); empty ones never.
- `source_allocation_weight`: CGPO's sampling weight of a row within its class, the user's per-source
  `allocation_weights` (polyfuse never invents one; without them CGPO samples uniformly, and warns).
- `kl_completion`, for the reference point z0 (a completion of another prompt, fixed here so that the
  log-prob stage scores it once): `rotation`, TRL's KTO rule (the rows written in a seeded shuffled order, each
  taking the completion of the row before it in its block of `kl_block` rows, the block being the training
  micro-batch), or `anchor`, CGPO's (seeded shuffle, the next row in cyclic order with another prompt).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field

from polyfuse.config import StrictModel
from polyfuse.data.schemas import SampleRow, UnpairedRow, assistant, response_text
from polyfuse.errors import ConfigError, DataError

KLRule = Literal["rotation", "anchor", "none"]


class UnpairedSettings(StrictModel):
    """`pairs.unpaired`: write every judged response of the preference prompts as a D / U row (`unpaired.jsonl`)."""

    threshold: float | None = Field(
        default=None, description="A response no verifier judged is desirable when its reward (pairs.reward) is at "
        "least this, else undesirable; None: only verifier-judged responses give rows.")
    kl_completion: KLRule = Field(
        default="anchor", description="The completion of another prompt each row is paired with for z0: rotation "
        "(TRL's KTO: shuffled rows, rotated by one in blocks of kl_block), anchor (CGPO: next row in a seeded cyclic "
        "order with another prompt) or none (FuseSFT, KTO's apo_zero_unpaired). A recipe sets it from its "
        "`upo` objective.")
    kl_block: int = Field(
        default=8, ge=2, description="rotation: the block the completions rotate in, which must be the training "
        "micro-batch (TRL requires it); a recipe takes upo.batch_size.")
    kl_seed: int = Field(default=42, description="Seed of the shuffle before the rotation or the anchors (CGPO: 42).")
    allocation_weights: dict[str, float] | None = Field(
        default=None, description="Source name -> CGPO's source_allocation_weight of its rows (finite, >= 0); "
        "None: none (CGPO then samples uniformly within each class).")

    def check_weights(self, models: Sequence[str]) -> None:
        """Every model whose rows are written needs a weight when weights are given."""
        if self.allocation_weights is None:
            return
        missing = [m for m in models if m not in self.allocation_weights]
        if missing:
            raise ConfigError(f"pairs.unpaired.allocation_weights: no weight for {', '.join(missing)} (it has "
                              f"{', '.join(self.allocation_weights) or 'none'})")
        bad = {k: v for k, v in self.allocation_weights.items() if not 0 <= v < float("inf")}
        if bad:
            raise ConfigError(f"pairs.unpaired.allocation_weights: weights must be finite and >= 0, got {bad}")


def shuffled_order(count: int, seed: int) -> list[int]:
    """The seeded row order KTO data is written in before the rotation (KTO-b), so blocks mix classes and
    prompts; training then reads the rows in this order."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return order


def kl_partners(prompt_ids: Sequence[str], block: int) -> list[int]:
    """For each row, the row whose completion is its KL completion: TRL's rotation by one inside each block
    of `block` consecutive rows (the first row of a block takes the block's last completion). A partner
    that shares the row's prompt is skipped for the next one back in the block (project decision KTO-b),
    unless every row of the block has that prompt; with distinct prompts this is TRL's rotation exactly."""
    partners = []
    for start in range(0, len(prompt_ids), block):
        size = min(block, len(prompt_ids) - start)
        for offset in range(size):
            candidates = [start + (offset - back) % size for back in range(1, size)]
            other = [c for c in candidates if prompt_ids[c] != prompt_ids[start + offset]]
            partners.append((other or candidates or [start + offset])[0])
    return partners


def anchor_partners(prompt_ids: Sequence[str], seed: int = 42) -> list[int]:
    """For each row, the row whose completion is its anchor (CGPO's `anchor_completion`): the rows are
    shuffled once with `seed`, and each row takes the next row in that cyclic order whose prompt differs, as
    the reference release's `make_mismatched_anchor_completions` (the same Python RNG, so the same anchors)."""
    if len(set(prompt_ids)) < 2:
        raise DataError("CGPO's anchor completions need rows of at least two distinct prompts")
    order = shuffled_order(len(prompt_ids), seed)
    position = {row: offset for offset, row in enumerate(order)}
    partners = []
    for row, prompt in enumerate(prompt_ids):
        start = position[row]
        following = (order[(start + k) % len(order)] for k in range(1, len(order)))
        partners.append(next(c for c in following if prompt_ids[c] != prompt))
    return partners


def with_kl_completions(rows: list[UnpairedRow], rule: KLRule, block: int, seed: int) -> list[UnpairedRow]:
    """The rows with their `kl_completion` by `rule`, in the order training reads them: shuffled with `seed`
    for `rotation` (the rotation then runs over blocks of `block` consecutive rows), as given otherwise."""
    if rule == "none":
        return [row.model_copy(update={"kl_completion": None}) for row in rows]
    if rule == "rotation":
        rows = [rows[i] for i in shuffled_order(len(rows), seed)]
        partners = kl_partners([row.prompt_id for row in rows], block)
    else:
        partners = anchor_partners([row.prompt_id for row in rows], seed)
    return [row.model_copy(update={"kl_completion": rows[p].completion}) for row, p in zip(rows, partners, strict=True)]


def rotation_mismatch(rows: Sequence[UnpairedRow], block: int) -> str | None:
    """Why the rows' KL completions are not the rotation in blocks of `block` in their order (None when they
    are): the first row whose `kl_completion` is not its partner's completion."""
    partners = kl_partners([row.prompt_id for row in rows], block)
    for row, partner in zip(rows, partners, strict=True):
        if row.kl_completion is None or response_text(row.kl_completion) != response_text(rows[partner].completion):
            return (f"row {row.id!r}'s kl_completion is not the completion of row {rows[partner].id!r}, its partner in "
                    f"the rotation by one in blocks of {block} rows")
    return None


def label_of(sample: SampleRow, reward: float | None, threshold: float | None) -> Literal["D", "U"] | None:
    """D / U by the verdict, else by the reward against the threshold; None when neither judges it."""
    if sample.correct is not None:
        return "D" if sample.correct else "U"
    if threshold is not None and reward is not None:
        return "D" if reward >= threshold else "U"
    return None


def build_unpaired(
    samples: list[SampleRow],
    settings: UnpairedSettings,
    prompts: set[str],
    models: Sequence[str],
    reward: Any,
) -> tuple[list[UnpairedRow], dict[str, int]]:
    """The unpaired rows of the samples of `prompts` from `models` (`reward(sample)`: its ranking reward or None),
    with their KL completions, and the counts for the report."""
    settings.check_weights(models)
    counts: Counter[str] = Counter()
    rows: list[UnpairedRow] = []
    for sample in samples:
        if sample.prompt_id not in prompts or sample.model not in models:
            continue
        if not sample.response.strip():
            counts["unpaired_dropped_empty"] += 1
            continue
        value = reward(sample)
        label = label_of(sample, value, settings.threshold)
        if label is None:
            counts["unpaired_dropped_unjudged"] += 1
            continue
        weights = settings.allocation_weights
        rows.append(UnpairedRow(
            id=sample.id, prompt=sample.prompt, completion=assistant(sample.response), label=label,
            prompt_id=sample.prompt_id, domain=sample.domain, source=sample.model, sample_id=sample.id, reward=value,
            correct=sample.correct, source_allocation_weight=None if weights is None else weights[sample.model],
        ))
    if rows:
        rows = with_kl_completions(rows, settings.kl_completion, settings.kl_block, settings.kl_seed)
    labels: dict[str, set[str]] = {}
    for row in rows:
        labels.setdefault(row.prompt_id, set()).add(row.label)
    counts.update({
        "unpaired_rows": len(rows),
        "unpaired_desirable": sum(row.label == "D" for row in rows),
        "unpaired_undesirable": sum(row.label == "U" for row in rows),
        "unpaired_prompts": len(labels),
        "unpaired_prompts_one_class": sum(len(kinds) == 1 for kinds in labels.values()),
        "fusesft_rows": sum(row.correct is not False for row in rows),
    })
    return rows, dict(counts)
