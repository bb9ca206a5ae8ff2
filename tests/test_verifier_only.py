"""Fusion from verifier verdicts alone, no reward model: a recipe on the tiny toy world builds SFT targets and
intra-source pairs, trains SFT then DPO on them; the same scored samples give cross-model pairs and WRPO
triples. Every row is checked against the verdicts and the tie rule (`shorter`)."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import pytest

from polyfuse.data import PreferenceRow, SampleRow, SFTRow, read_rows
from polyfuse.data.schemas import response_text
from polyfuse.scorers import SCORERS, ScorerSettings, Verifier

pytestmark = pytest.mark.slow


class CoinConfig(ScorerSettings):
    type: Literal["coin_test"] = "coin_test"
    salt: str  # required, so that no default verifier list picks this test verifier up


@SCORERS.register("coin_test")
class CoinVerifier(Verifier):
    """Half the responses pass, by a hash of their text. The tiny world's models are almost never right, so this
    stand-in for a real verifier gives the verifier-only rules both verdicts on real samples, deterministically."""

    Config = CoinConfig

    def check(self, row: SampleRow) -> tuple[bool, dict[str, Any]]:
        digest = hashlib.sha1((self.config.salt + row.response).encode()).digest()
        return digest[0] % 2 == 0, {}


@pytest.fixture(scope="module")
def work(tiny_world, tmp_path_factory) -> Path:
    from polyfuse.pipeline.recipe import load_recipe
    from polyfuse.pipeline.runner import run_recipe
    from test_pipeline import tiny_world_sources

    root = tmp_path_factory.mktemp("verifier-only")
    sources = "\n".join(f"  - {{name: {name}, path: toyworld://sources/{name}, sampling: {{n: 4, max_new_tokens: 6}}}}"
                        for name in tiny_world_sources())
    (root / "recipe.yaml").write_text(f"""
name: verifier-only
toyworld: {{preset: tiny, cache_dir: {tiny_world.root.parent}}}
sources:
{sources}
pivot: {{name: pivot, path: toyworld://pivot, sampling: {{n: 4, max_new_tokens: 6}}}}
prompts: {{toyworld: {{split: train, per_domain: 4}}}}
stages: [prompts, sample, score, pairs, sft, po]
sample: {{include_pivot: true, batch_size: 8}}
score: {{scorers: [{{type: coin_test, salt: v}}]}}
pairs: {{sft_fraction: 0.5, sources: {tiny_world_sources()}}}
sft: {{epochs: 1, batch_size: 4, save_steps: 0}}
po: {{objective: dpo, epochs: 1, batch_size: 4, save_steps: 0}}
""")
    run_recipe(load_recipe(root / "recipe.yaml"), root / "work", quiet=True)
    return root / "work"


def _by_prompt(work: Path) -> dict[str, list[SampleRow]]:
    groups: dict[str, list[SampleRow]] = defaultdict(list)
    for row in read_rows(work / "score/scored.jsonl", SampleRow):
        groups[row.prompt_id].append(row)
    return groups


def _shortest(rows: list[SampleRow]) -> SampleRow:
    return min(rows, key=lambda r: (len(r.response), r.sample_index))


def test_the_recipe_runs_from_verdicts_alone_and_splits_exactly(work):
    import json

    report = json.loads((work / "pairs/report.json").read_text())
    assert report["ranked_by"] == "verifiers alone" and report["prompts"] == 12
    assert (report["sft_prompts"], report["po_prompts"]) == (6, 6)  # 0.5 of 12, exactly
    assert (work / "po/model/model.safetensors").is_file()  # SFT then DPO trained on what the verdicts gave
    assert report["sft_rows"] > 0 and report["pairs"] > 0


def test_sft_targets_are_the_shortest_correct_source_response(work):
    groups = _by_prompt(work)
    rows = read_rows(work / "pairs/sft.jsonl", SFTRow)
    assert rows
    for row in rows:
        correct = [r for r in groups[row.id] if r.correct and r.model != "pivot" and r.response.strip()]
        assert response_text(row.completion) == _shortest(correct).response and row.reward is None


def test_intra_source_pairs_are_correct_over_incorrect_of_one_source(work):
    groups = _by_prompt(work)
    pairs = read_rows(work / "pairs/preference.jsonl", PreferenceRow)
    assert pairs
    for pair in pairs:
        assert (pair.chosen_correct, pair.rejected_correct) == (True, False)
        rows = [r for r in groups[pair.id] if r.model == pair.source and r.response.strip()]
        assert pair.chosen_id == _shortest([r for r in rows if r.correct]).id
        assert pair.rejected_id == _shortest([r for r in rows if r.correct is False]).id


def test_cross_model_pairs_and_wrpo_triples_from_the_same_verdicts(work, polyfuse_cli, tmp_path):
    groups = _by_prompt(work)
    scored = work / "score/scored.jsonl"
    proc = polyfuse_cli("pairs", "--set", "pair_rule=cross_model", "--set", "sft_fraction=0", "--scored", scored,
                        "-o", tmp_path / "cross")
    assert proc.returncode == 0, proc.stderr
    assert "pairs: 12 prompts split 0 SFT / 12 preference (sft_fraction 0)" in proc.stderr  # the split, in the log
    cross = read_rows(tmp_path / "cross/preference.jsonl", PreferenceRow)
    assert cross and any(p.source is None for p in cross)  # some pairs span two models
    for pair in cross:
        rows = [r for r in groups[pair.id] if r.response.strip()]
        assert pair.chosen_id == _shortest([r for r in rows if r.correct]).id
        assert pair.rejected_id == _shortest([r for r in rows if r.correct is False]).id
    proc = polyfuse_cli("pairs", "--set", "target=pivot", "--set", "sft_fraction=0", "--scored", scored,
                        "-o", tmp_path / "wrpo")
    assert proc.returncode == 0, proc.stderr
    triples = read_rows(tmp_path / "wrpo/preference.jsonl", PreferenceRow)
    assert triples
    for triple in triples:
        sources = [r for r in groups[triple.id] if r.model != "pivot" and r.correct and r.response.strip()]
        assert response_text(triple.chosen_source) == _shortest(sources).response  # y_ws
        pivot = [r for r in groups[triple.id] if r.model == "pivot" and r.response.strip()]
        assert triple.chosen_id == _shortest([r for r in pivot if r.correct]).id  # y_wt
        assert triple.rejected_id == _shortest([r for r in pivot if r.correct is False]).id  # y_l
