"""Stage `pairs`: SFT targets and preference pairs from scored samples: FuseChat-3.0's rules,
WRPO's layout and InfiFPO's cross-model rule; what the papers leave open is in docs/design.md.

Rules, per prompt:
- Split: a prompt goes to SFT when `hash(seed, prompt id) < sft_fraction`, else to preference
  optimisation (PO). The split is a pure function of the id and the seed, so reruns agree.
- SFT target: the highest-reward response among the verifier-correct ones of every source (all
  responses when no verifier ran). No correct response: the prompt is dropped (`all_fail`).
- Intra-source pair (FuseChat-3.0 default): for each source, chosen = its highest-reward correct
  response, rejected = its lowest-reward incorrect one (without verifiers: highest vs lowest reward of
  distinct samples). Kept only if `gap_window[0] <= reward gap <= gap_window[1]`. A verifier-correct
  response always beats an incorrect one: the window only filters, it never swaps roles.
- Cross-model pair (`pair_rule: cross_model`, InfiFPO): best vs worst over all models, no window.
- One pair per PO prompt, chosen among the qualifying sources by `pair_choice`: `random` (seeded by the
  prompt id and seed; keeps source diversity; the default), `highest_chosen_score` or
  `largest_gap` (ties to the first source in config order).
Counts for every filter go to `report.json`.
"""

from __future__ import annotations

import random
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from polyfuse.config import StrictModel
from polyfuse.data.io import read_rows, write_json, write_rows
from polyfuse.data.schemas import PreferenceRow, SampleRow, SFTRow, assistant, stable_id
from polyfuse.errors import ConfigError
from polyfuse.pipeline.context import STAGES, Context, Stage


class PairsConfig(StrictModel):
    reward: str = Field(description="Name of the reward scorer whose scores rank responses.")
    gap_window: tuple[float, float] | None = Field(
        default=(0.01, 0.1), description="Keep pairs whose reward gap lies in [low, high]; None: any gap.")
    sft_fraction: float = Field(default=0.4, ge=0.0, le=1.0, description="Share of the prompts that give SFT rows; the rest give pairs.")
    pair_rule: Literal["intra_source", "cross_model"] = Field(
        default="intra_source", description="Pairs from one source's responses (FuseChat-3.0) or across models (InfiFPO).")
    pair_choice: Literal["random", "highest_chosen_score", "largest_gap"] = Field(
        default="random", description="Which valid pair a prompt keeps when it has several.")
    sources: list[str] | None = Field(default=None, description="Models that may give SFT targets and pairs; default all.")
    target: str | None = Field(default=None, description="WRPO: the SFT pivot whose samples give y_wt and y_l.")
    seed: int = Field(default=0, description="Seed of the SFT / preference split and the random pair choice.")

    @model_validator(mode="after")
    def _window_order(self) -> PairsConfig:
        if self.gap_window is not None and self.gap_window[0] > self.gap_window[1]:
            raise ValueError(f"gap_window lower bound {self.gap_window[0]} is above upper bound {self.gap_window[1]}")
        return self


def in_sft_split(prompt_id: str, fraction: float, seed: int) -> bool:
    return int(stable_id("split", seed, prompt_id), 16) / 16**16 < fraction


def _reward(row: SampleRow, key: str) -> float:
    if key not in row.rewards:
        raise ConfigError(f"pairs.reward: sample {row.id} has no reward {key!r} (has: {sorted(row.rewards)})")
    return row.rewards[key]


def _best(rows: list[SampleRow], key: str) -> SampleRow:
    return max(rows, key=lambda r: (_reward(r, key), -r.sample_index))


def _worst(rows: list[SampleRow], key: str) -> SampleRow:
    return min(rows, key=lambda r: (_reward(r, key), r.sample_index))


def _verified_pool(rows: list[SampleRow]) -> list[SampleRow]:
    """The verifier-correct rows when any row was verified, else all rows: the candidates for a best response."""
    return [r for r in rows if r.correct] if any(r.correct is not None for r in rows) else rows


def _ranked_pair(rows: list[SampleRow], key: str) -> tuple[SampleRow, SampleRow] | None:
    """(chosen, rejected) from one candidate set: correct vs incorrect when verified, else best vs worst.
    Empty responses never enter a pair, and neither does a pair of two identical texts (no preference)."""
    rows = [r for r in rows if r.response.strip()]
    verified = [r for r in rows if r.correct is not None]
    if verified:
        good = [r for r in rows if r.correct]
        bad = [r for r in rows if r.correct is False]
        if not good or not bad:
            return None
        chosen, rejected = _best(good, key), _worst(bad, key)
        return (chosen, rejected) if chosen.response != rejected.response else None
    if len(rows) < 2:
        return None
    chosen, rejected = _best(rows, key), _worst(rows, key)
    return (chosen, rejected) if chosen.response != rejected.response else None


def _pair_row(prompt_id: str, chosen: SampleRow, rejected: SampleRow, key: str) -> PreferenceRow:
    return PreferenceRow(
        id=prompt_id, prompt=chosen.prompt, chosen=assistant(chosen.response), rejected=assistant(rejected.response),
        domain=chosen.domain, source=chosen.model if chosen.model == rejected.model else None,
        chosen_id=chosen.id, rejected_id=rejected.id, chosen_reward=_reward(chosen, key),
        rejected_reward=_reward(rejected, key), chosen_correct=chosen.correct, rejected_correct=rejected.correct,
    )


def build_pairs(samples: list[SampleRow], config: PairsConfig) -> tuple[list[SFTRow], list[PreferenceRow], dict]:
    """SFT rows, preference rows and the counts report (see module docstring for the rules)."""
    by_prompt: dict[str, list[SampleRow]] = defaultdict(list)
    for row in samples:
        by_prompt[row.prompt_id].append(row)
    order = list(dict.fromkeys(r.model for r in samples))
    allowed = set(config.sources or order) - ({config.target} if config.target else set())
    key = config.reward
    if samples and not any(key in r.rewards for r in samples):
        available = sorted({k for r in samples for k in r.rewards})
        raise ConfigError(
            f"pairs.reward: no reward {key!r} in any sample; the samples have: "
            f"{', '.join(available) or 'no rewards (score them first: polyfuse score)'}"
        )
    counts: Counter[str] = Counter()
    sft_rows: list[SFTRow] = []
    pair_rows: list[PreferenceRow] = []
    for prompt_id, rows in by_prompt.items():
        counts["prompts"] += 1
        sources = [r for r in rows if r.model in allowed]
        if in_sft_split(prompt_id, config.sft_fraction, config.seed):
            counts["sft_prompts"] += 1
            pool = _verified_pool(sources)
            if not pool:
                counts["dropped_sft_all_fail"] += 1
                continue
            best = _best(pool, key)
            sft_rows.append(SFTRow(
                id=prompt_id, prompt=best.prompt, completion=assistant(best.response), domain=best.domain,
                source=best.model, sample_id=best.id, reward=_reward(best, key),
            ))
            continue
        counts["po_prompts"] += 1
        if config.target is not None:
            pair = _wrpo_triple(prompt_id, rows, sources, config, counts)
            if pair is not None:
                pair_rows.append(pair)
            continue
        groups = [sources] if config.pair_rule == "cross_model" else [
            [r for r in sources if r.model == m] for m in order if m in allowed
        ]
        qualifying = []
        for group in groups:
            ranked = _ranked_pair(group, key) if group else None
            if ranked is None:
                counts["candidates_no_valid_pair"] += 1
                continue
            gap = _reward(ranked[0], key) - _reward(ranked[1], key)
            if config.pair_rule == "intra_source" and config.gap_window is not None:
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
            (chosen, rejected), _ = max(qualifying, key=lambda q: _reward(q[0][0], key))
        else:
            (chosen, rejected), _ = max(qualifying, key=lambda q: q[1])
        pair_rows.append(_pair_row(prompt_id, chosen, rejected, key))
    counts["sft_rows"] = len(sft_rows)
    counts["pairs"] = len(pair_rows)
    counts["samples"] = len(samples)
    counts["verified_correct"] = sum(1 for r in samples if r.correct)
    return sft_rows, pair_rows, dict(sorted(counts.items()))


def _wrpo_triple(prompt_id, rows, sources, config, counts) -> PreferenceRow | None:
    """WRPO layout: chosen_source = best source response (y_ws; among the verifier-correct ones when verified,
    like the SFT target); chosen / rejected = the target's best and worst samples (y_wt, y_l)."""
    key = config.reward
    target = [r for r in rows if r.model == config.target]
    pool = _verified_pool(sources)
    if not pool or len(target) < 2:
        counts["dropped_po_no_pair"] += 1
        return None
    y_ws = _best(pool, key)
    ranked = _ranked_pair(target, key)
    if ranked is None:
        counts["dropped_po_no_pair"] += 1
        return None
    row = _pair_row(prompt_id, *ranked, key)
    return PreferenceRow.model_validate(
        {**row.model_dump(), "chosen_source": assistant(y_ws.response), "source": y_ws.model}
    )


def run_pairs(samples: list[SampleRow], config: PairsConfig, out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    sft_rows, pair_rows, report = build_pairs(samples, config)
    paths = {"sft": out_dir / "sft.jsonl", "preference": out_dir / "preference.jsonl", "report": out_dir / "report.json"}
    write_rows(paths["sft"], sft_rows)
    write_rows(paths["preference"], pair_rows)
    write_json(paths["report"], report)
    for kind, rows, prompts in (("SFT rows", sft_rows, "sft_prompts"), ("preference pairs", pair_rows, "po_prompts")):
        if report.get(prompts) and not rows:
            reasons = ", ".join(f"{k} {v}" for k, v in report.items() if k.startswith(("dropped", "candidates")))
            warnings.warn(f"pairs: 0 {kind} from {report[prompts]} prompts ({reasons}); see {paths['report']}", stacklevel=2)
    return paths


@STAGES.register("pairs")
class PairsStage(Stage):
    name = "pairs"
    position = 40
    section = PairsConfig
    seeded = True
    needs = ("score",)

    def check(self, recipe) -> None:
        from polyfuse.scorers import SCORERS

        rewards = [c.name or c.type for c in recipe.score.scorers if SCORERS.get(c.type).kind == "reward"]
        if recipe.pairs.reward not in rewards:
            raise ValueError(f"pairs.reward: {recipe.pairs.reward!r} is not a reward scorer of the score stage; "
                             f"its reward scorers: {', '.join(rewards) or 'none (add a reward_model scorer)'}")
        for fraction, stage, rows in ((0.0, "sft", "SFT rows"), (1.0, "po", "preference pairs")):
            if recipe.pairs.sft_fraction == fraction and stage in recipe.stages:
                raise ValueError(f"pairs.sft_fraction is {fraction:g}: no prompt gives {rows}, but the recipe runs "
                                 f"'{stage}'")

    def inputs(self, ctx: Context) -> dict[str, str]:
        return {"scored": ctx.output("score", "scored")}

    def run(self, ctx: Context, folder: Path) -> dict[str, str]:
        samples = read_rows(ctx.output("score", "scored"), SampleRow)
        return {k: str(v) for k, v in run_pairs(samples, ctx.recipe.pairs, folder).items()}
