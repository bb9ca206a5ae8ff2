"""SFT targets and preference pairs from scored samples: FuseChat-3.0's rules, WRPO's layout and InfiFPO's
cross-model rule, ranked by a reward model, by verifier verdicts alone, or by both; what the papers leave
open is in docs/design.md.

Rules, per prompt:
- Split: the prompts are ranked by `hash(seed, prompt id)` and the first `round(sft_fraction * n)` (half up)
  go to SFT, the rest to preference optimisation (PO): exactly that many, and the same prompts on every rerun.
- Ranking: verifier-correct responses always beat incorrect ones (when a verifier ran); within the correct
  and within the incorrect ones the reward model (`reward`) ranks, as FuseChat-3.0 does. Without `reward`
  the verdicts alone rank, and `tie_break` picks among equals (`shorter`: the fewest characters; `random`:
  seeded by the seed and the sample id); with a reward it picks among equal rewards.
- SFT target: the best verifier-correct response of every source (all responses when no verifier ran,
  which needs a reward). No correct response: the prompt is dropped (`all_fail`).
- Intra-source pair (FuseChat-3.0 default): for each source, chosen = its best correct response,
  rejected = its worst incorrect one (without verifiers: highest vs lowest reward of distinct samples).
  With a reward, kept only if `gap_window[0] <= reward gap <= gap_window[1]`. A verifier-correct response
  always beats an incorrect one: the window only filters, it never swaps roles.
- Cross-model pair (`pair_rule: cross_model`, InfiFPO): the same ranking over all models, no window.
- One pair per PO prompt, chosen among the qualifying sources by `pair_choice`: `random` (seeded by the
  prompt id and seed; keeps source diversity; the default), `highest_chosen_score` or
  `largest_gap` (both rank by reward; ties to the first source in config order).
Counts for every filter go to the report.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Literal

from pydantic import Field, model_validator

from polyfuse.config import StrictModel
from polyfuse.data.schemas import PreferenceRow, SampleRow, SFTRow, assistant, stable_id
from polyfuse.errors import ConfigError
from polyfuse.pairs.unpaired import UnpairedSettings, build_unpaired


class PairsConfig(StrictModel):
    """`polyfuse pairs --config` and a recipe's `pairs` section: what ranks the responses, the pair rule and
    the SFT / preference split."""

    reward: str | None = Field(
        default=None, description="The reward scorer whose scores rank the responses within the verifier-correct "
        "and within the incorrect ones (FuseChat-3.0); None: the verifier verdicts alone rank them (correct over "
        "incorrect), `tie_break` picking among equals.")
    tie_break: Literal["shorter", "random"] = Field(
        default="shorter", description="Which of equally ranked responses is taken: the shortest (fewest characters, "
        "then the lowest sample index), or one at random, seeded by `seed` and the sample id.")
    gap_window: tuple[float, float] | None = Field(
        default=(0.01, 0.1), description="Keep pairs whose reward gap lies in [low, high]; None: any gap. Needs "
        "`reward`; ignored without one.")
    sft_fraction: float = Field(default=0.4, ge=0.0, le=1.0, description="Share of the prompts that give SFT rows "
                                "(exactly round(fraction x prompts), half up); the rest give pairs.")
    pair_rule: Literal["intra_source", "cross_model"] = Field(
        default="intra_source", description="Pairs from one source's responses (FuseChat-3.0) or across models (InfiFPO).")
    pair_choice: Literal["random", "highest_chosen_score", "largest_gap"] = Field(
        default="random", description="Which valid pair a prompt keeps when it has several (the last two rank by reward).")
    sources: list[str] | None = Field(default=None, description="Models that may give SFT targets and pairs; default all.")
    target: str | None = Field(default=None, description="WRPO: the SFT pivot whose samples give y_wt and y_l.")
    seed: int = Field(default=0, description="Seed of the SFT / preference split and of the random choices.")
    unpaired: UnpairedSettings | None = Field(
        default=None, description="Also write every judged response of the preference prompts as a desirable / "
        "undesirable row (unpaired.jsonl: KTO, CGPO, FuseSFT); None: not. A recipe whose stages include `upo` "
        "sets it.")

    @model_validator(mode="after")
    def _consistent(self) -> PairsConfig:
        if self.gap_window is not None and self.gap_window[0] > self.gap_window[1]:
            raise ValueError(f"gap_window lower bound {self.gap_window[0]} is above upper bound {self.gap_window[1]}")
        if self.reward is None and self.pair_choice != "random":
            raise ValueError(f"pair_choice {self.pair_choice!r} ranks pairs by reward, and no reward is given; set "
                             "`reward` to a reward scorer or use pair_choice: random")
        if self.unpaired is not None and self.unpaired.threshold is not None and self.reward is None:
            raise ValueError("unpaired.threshold labels responses by their reward, and no reward is given; set "
                             "`reward` to a reward scorer or leave the threshold out (the verifiers label)")
        return self


def sft_split(prompt_ids: Iterable[str], fraction: float, seed: int) -> set[str]:
    """The prompts that give SFT rows: every distinct prompt ranked by `hash(seed, id)`, the first
    `round(fraction * n)` (half up). A pure function of the ids and the seed, so reruns agree."""
    ranked = sorted(set(prompt_ids), key=lambda p: (stable_id("split", seed, p), p))
    return set(ranked[: int(fraction * len(ranked) + 0.5)])


class _Ranking:
    """How the responses of one run are ranked: verdict first, then the reward (when given), then the tie rule."""

    def __init__(self, config: PairsConfig, samples: list[SampleRow]):
        self.key = config.reward
        self.tie_break = config.tie_break
        self.seed = config.seed
        self.position = {row.id: i for i, row in enumerate(samples)}

    def reward(self, row: SampleRow) -> float | None:
        if self.key is None:
            return None
        if self.key not in row.rewards:
            raise ConfigError(f"pairs.reward: sample {row.id} has no reward {self.key!r} (has: {sorted(row.rewards)})")
        return row.rewards[self.key]

    def _pick(self, rows: list[SampleRow]) -> SampleRow:
        if self.tie_break == "random":
            return min(rows, key=lambda r: stable_id("tie", self.seed, r.id))
        return min(rows, key=lambda r: (len(r.response), r.sample_index, self.position[r.id]))

    def best(self, rows: list[SampleRow]) -> SampleRow:
        top = max((self.reward(r) or 0.0) for r in rows)
        return self._pick([r for r in rows if (self.reward(r) or 0.0) == top])

    def worst(self, rows: list[SampleRow]) -> SampleRow:
        bottom = min((self.reward(r) or 0.0) for r in rows)
        return self._pick([r for r in rows if (self.reward(r) or 0.0) == bottom])

    def judged(self, rows: list[SampleRow]) -> bool:
        """Whether anything ranks these rows: a verdict on one of them, or a reward."""
        return self.key is not None or any(r.correct is not None for r in rows)

    def sft_pool(self, rows: list[SampleRow]) -> list[SampleRow]:
        """The candidates for a best response: the non-empty verifier-correct rows when any row was verified,
        else every non-empty row when a reward ranks them, else none."""
        rows = [r for r in rows if r.response.strip()]
        if any(r.correct is not None for r in rows):
            return [r for r in rows if r.correct]
        return rows if self.key is not None else []

    def pair(self, rows: list[SampleRow]) -> tuple[SampleRow, SampleRow] | None:
        """(chosen, rejected) from one candidate set: correct vs incorrect when verified, else best vs worst
        reward. Empty responses never enter a pair, and neither does a pair of two identical texts."""
        rows = [r for r in rows if r.response.strip()]
        if any(r.correct is not None for r in rows):
            good = [r for r in rows if r.correct]
            bad = [r for r in rows if r.correct is False]
            if not good or not bad:
                return None
            chosen, rejected = self.best(good), self.worst(bad)
        elif self.key is None or len(rows) < 2:
            return None
        else:
            chosen, rejected = self.best(rows), self.worst(rows)
        return (chosen, rejected) if chosen.response != rejected.response else None

    def gap(self, pair: tuple[SampleRow, SampleRow]) -> float | None:
        return None if self.key is None else self.reward(pair[0]) - self.reward(pair[1])


def _pair_row(prompt_id: str, chosen: SampleRow, rejected: SampleRow, ranking: _Ranking) -> PreferenceRow:
    return PreferenceRow(
        id=prompt_id, prompt=chosen.prompt, chosen=assistant(chosen.response), rejected=assistant(rejected.response),
        domain=chosen.domain, source=chosen.model if chosen.model == rejected.model else None,
        chosen_id=chosen.id, rejected_id=rejected.id, chosen_reward=ranking.reward(chosen),
        rejected_reward=ranking.reward(rejected), chosen_correct=chosen.correct, rejected_correct=rejected.correct,
    )


def _check_rankable(samples: list[SampleRow], config: PairsConfig) -> None:
    """Refuse samples that nothing ranks: a named reward that no sample has, or neither a reward nor a verdict."""
    if not samples:
        return
    if config.reward is not None and not any(config.reward in r.rewards for r in samples):
        if any(config.reward in r.verdicts for r in samples):
            raise ConfigError(f"pairs.reward: {config.reward!r} is a verifier's verdict, not a reward; verdicts always "
                              "rank (correct over incorrect): leave pairs.reward out to rank by them alone")
        available = sorted({k for r in samples for k in r.rewards})
        raise ConfigError(
            f"pairs.reward: no reward {config.reward!r} in any sample; the samples have: "
            f"{', '.join(available) or 'no rewards (score them first: polyfuse score)'}"
        )
    if config.reward is None and not any(r.verdicts for r in samples):
        rewards = sorted({k for r in samples for k in r.rewards})
        hint = f"set pairs.reward to one of: {', '.join(rewards)}" if rewards else "score them with a verifier first"
        raise ConfigError(f"pairs: no reward is set and no sample has a verifier verdict, so nothing ranks the "
                          f"responses; {hint}")


def pair_models(samples: list[SampleRow], config: PairsConfig) -> list[str]:
    """The models whose responses give SFT targets, pairs and unpaired rows, in sample order: `sources` (default
    all), never the WRPO `target`."""
    order = list(dict.fromkeys(r.model for r in samples))
    return [m for m in order if m in set(config.sources or order) and m != config.target]


def unpaired_rows(samples: list[SampleRow], config: PairsConfig) -> tuple[list, dict]:
    """The unpaired rows (`polyfuse.pairs.unpaired`) of the preference prompts of the split `build_pairs` makes,
    and their counts."""
    if config.unpaired is None:
        return [], {}
    _check_rankable(samples, config)
    prompt_ids = {row.prompt_id for row in samples}
    ranking = _Ranking(config, samples)
    return build_unpaired(samples, config.unpaired, prompt_ids - sft_split(prompt_ids, config.sft_fraction, config.seed),
                          pair_models(samples, config), ranking.reward)


def build_pairs(samples: list[SampleRow], config: PairsConfig) -> tuple[list[SFTRow], list[PreferenceRow], dict]:
    """SFT rows, preference rows and the counts report (see the module docstring for the rules)."""
    _check_rankable(samples, config)
    by_prompt: dict[str, list[SampleRow]] = defaultdict(list)
    for row in samples:
        by_prompt[row.prompt_id].append(row)
    order = list(dict.fromkeys(r.model for r in samples))
    allowed = set(pair_models(samples, config))
    ranking = _Ranking(config, samples)
    sft_prompts = sft_split(by_prompt, config.sft_fraction, config.seed)
    counts: Counter[str] = Counter()
    sft_rows: list[SFTRow] = []
    pair_rows: list[PreferenceRow] = []
    for prompt_id, rows in by_prompt.items():
        counts["prompts"] += 1
        sources = [r for r in rows if r.model in allowed]
        if prompt_id in sft_prompts:
            counts["sft_prompts"] += 1
            pool = ranking.sft_pool(sources)
            if not pool:
                counts["dropped_sft_all_fail" if ranking.judged(sources) else "dropped_unjudged"] += 1
                continue
            best = ranking.best(pool)
            sft_rows.append(SFTRow(
                id=prompt_id, prompt=best.prompt, completion=assistant(best.response), domain=best.domain,
                source=best.model, sample_id=best.id, reward=ranking.reward(best),
            ))
            continue
        counts["po_prompts"] += 1
        if not ranking.judged(rows):
            counts["dropped_unjudged"] += 1
            continue
        if config.target is not None:
            pair = _wrpo_triple(prompt_id, rows, sources, config.target, ranking)
            if pair is None:
                counts["dropped_po_no_pair"] += 1
            else:
                pair_rows.append(pair)
            continue
        groups = [sources] if config.pair_rule == "cross_model" else [
            [r for r in sources if r.model == m] for m in order if m in allowed
        ]
        qualifying = []
        for group in groups:
            ranked = ranking.pair(group) if group else None
            if ranked is None:
                counts["candidates_no_valid_pair"] += 1
                continue
            gap = ranking.gap(ranked)
            if config.pair_rule == "intra_source" and config.gap_window is not None and gap is not None:
                if gap < config.gap_window[0]:
                    counts["candidates_gap_too_small"] += 1
                    continue
                if gap > config.gap_window[1]:
                    counts["candidates_gap_too_large"] += 1
                    continue
            qualifying.append((ranked, gap))
        if not qualifying:
            counts["dropped_po_no_pair"] += 1
            continue
        if config.pair_choice == "random":
            (chosen, rejected), _ = random.Random(stable_id("pick", config.seed, prompt_id)).choice(qualifying)
        elif config.pair_choice == "highest_chosen_score":
            (chosen, rejected), _ = max(qualifying, key=lambda q: ranking.reward(q[0][0]))
        else:
            (chosen, rejected), _ = max(qualifying, key=lambda q: q[1])
        pair_rows.append(_pair_row(prompt_id, chosen, rejected, ranking))
    counts["sft_rows"] = len(sft_rows)
    counts["pairs"] = len(pair_rows)
    counts["samples"] = len(samples)
    counts["verified_correct"] = sum(1 for r in samples if r.correct)
    report: dict = dict(sorted(counts.items()))
    report["ranked_by"] = f"verifiers, then reward {config.reward!r}" if config.reward else "verifiers alone"
    report["tie_break"] = config.tie_break
    report["sft_fraction"] = config.sft_fraction
    return sft_rows, pair_rows, report


def _wrpo_triple(prompt_id: str, rows: list[SampleRow], sources: list[SampleRow], target: str,
                 ranking: _Ranking) -> PreferenceRow | None:
    """WRPO layout: chosen_source = best source response (y_ws; among the verifier-correct ones when verified,
    like the SFT target); chosen / rejected = the target's best and worst samples (y_wt, y_l)."""
    target_rows = [r for r in rows if r.model == target]
    pool = ranking.sft_pool(sources)
    ranked = ranking.pair(target_rows) if len(target_rows) >= 2 else None
    if not pool or ranked is None:
        return None
    y_ws = ranking.best(pool)
    row = _pair_row(prompt_id, *ranked, ranking)
    return PreferenceRow.model_validate({**row.model_dump(), "chosen_source": assistant(y_ws.response), "source": y_ws.model})
