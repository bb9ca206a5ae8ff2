"""FuseChat-3.0 pair rules on hand-made scored samples."""

from __future__ import annotations

import pytest

from polyfuse.data.schemas import SampleRow, response_text
from polyfuse.errors import ConfigError
from polyfuse.pairs import PairsConfig, build_pairs, sft_split


def sample(prompt, model, k, reward, correct=None):
    verdicts = {} if correct is None else {"check": correct}
    return SampleRow(
        id=f"{prompt}:{model}:{k}",
        prompt_id=prompt,
        model=model,
        sample_index=k,
        prompt="q " + prompt,
        response=f"{model}-{k}",
        rewards={"rm": reward},
        verdicts=verdicts,
    )


# One-prompt cases: sft_fraction 0 sends the prompt to preference optimisation, 1 to SFT.


@pytest.mark.parametrize("n, fraction, expected", [(24, 0.5, 12), (4000, 0.4, 1600), (5, 0.5, 3), (3, 0.1, 0),
                                                   (7, 1.0, 7), (1, 0.5, 1), (10, 0.25, 3)])
def test_split_is_exact_and_deterministic(n, fraction, expected):
    """round(fraction x prompts), half up, whatever the hashes: 18/6 for 0.5 of 24 was the old per-prompt draw."""
    ids = [f"prompt-{i}" for i in range(n)]
    first = sft_split(ids, fraction, 7)
    assert len(first) == expected and first <= set(ids)
    assert first == sft_split(list(reversed(ids)) + ids[:3], fraction, 7)  # order and repeats do not matter
    if 0 < expected < n:
        assert first != sft_split(ids, fraction, 8)  # another seed, another split


def test_split_ranks_by_hash_so_a_larger_fraction_keeps_the_smaller_ones_prompts():
    ids = [f"prompt-{i}" for i in range(50)]
    assert sft_split(ids, 0.2, 0) < sft_split(ids, 0.4, 0) < sft_split(ids, 0.9, 0)


def test_the_split_counts_are_in_the_report():
    rows = [sample(f"q{i}", "a", k, 0.1 * k, k == 0) for i in range(24) for k in range(2)]
    sft, pairs, report = build_pairs(rows, PairsConfig(reward="rm", sft_fraction=0.5, gap_window=None))
    assert (report["prompts"], report["sft_prompts"], report["po_prompts"]) == (24, 12, 12)
    assert len(sft) == 12 and len(pairs) == 12 and report["sft_fraction"] == 0.5


def test_sft_target_is_best_correct_over_all_sources():
    p = "q"
    rows = [sample(p, "a", 0, 0.9, False), sample(p, "a", 1, 0.5, True), sample(p, "b", 0, 0.7, True)]
    sft, pairs, report = build_pairs(rows, PairsConfig(reward="rm", sft_fraction=1.0))
    assert [r.sample_id for r in sft] == [f"{p}:b:0"]
    assert response_text(sft[0].completion) == "b-0"
    assert pairs == [] and report["sft_rows"] == 1


def test_sft_prompt_without_correct_answer_is_dropped():
    p = "q"
    rows = [sample(p, "a", 0, 0.9, False), sample(p, "b", 0, 0.7, False)]
    sft, _, report = build_pairs(rows, PairsConfig(reward="rm", sft_fraction=1.0))
    assert sft == [] and report["dropped_sft_all_fail"] == 1


def test_intra_source_pair_correct_beats_incorrect_and_window_filters():
    p = "q"
    rows = [
        # source a: best correct 0.55, worst incorrect 0.50 -> gap 0.05 inside [0.01, 0.1]
        sample(p, "a", 0, 0.55, True),
        sample(p, "a", 1, 0.60, False),
        sample(p, "a", 2, 0.50, False),
        # source b: gap 0.3 -> too large
        sample(p, "b", 0, 0.9, True),
        sample(p, "b", 1, 0.6, False),
        # source c: gap 0.005 -> too small
        sample(p, "c", 0, 0.505, True),
        sample(p, "c", 1, 0.5, False),
    ]
    _, pairs, report = build_pairs(rows, PairsConfig(reward="rm", sft_fraction=0.0))
    assert len(pairs) == 1
    pair = pairs[0]
    assert (pair.chosen_id, pair.rejected_id, pair.source) == (f"{p}:a:0", f"{p}:a:2", "a")
    assert pair.chosen_reward - pair.rejected_reward == pytest.approx(0.05)
    assert report["candidates_gap_too_large"] == 1 and report["candidates_gap_too_small"] == 1


def test_pair_is_never_across_sources():
    p = "q"
    rows = [sample(p, "a", 0, 0.6, True), sample(p, "b", 0, 0.55, False)]
    _, pairs, report = build_pairs(rows, PairsConfig(reward="rm", sft_fraction=0.0))
    assert pairs == [] and report["dropped_po_no_pair"] == 1 and report["candidates_no_valid_pair"] == 2


def test_pair_choice_rules():
    p = "q"
    rows = [
        sample(p, "a", 0, 0.70, True),
        sample(p, "a", 1, 0.68, False),  # gap 0.02, chosen 0.70
        sample(p, "b", 0, 0.60, True),
        sample(p, "b", 1, 0.52, False),  # gap 0.08, chosen 0.60
    ]
    cfg = PairsConfig(reward="rm", sft_fraction=0.0, pair_choice="highest_chosen_score")
    assert build_pairs(rows, cfg)[1][0].source == "a"
    cfg = PairsConfig(reward="rm", sft_fraction=0.0, pair_choice="largest_gap")
    assert build_pairs(rows, cfg)[1][0].source == "b"
    picks = {
        build_pairs(rows, PairsConfig(reward="rm", sft_fraction=0.0, pair_choice="random"))[1][0].source
        for _ in range(3)
    }
    assert len(picks) == 1  # seeded: the same pick every time


def test_unverified_pairs_use_best_and_worst_reward_and_cross_model_rule():
    p = "q"
    rows = [sample(p, "a", 0, 0.30), sample(p, "a", 1, 0.35), sample(p, "b", 0, 0.9), sample(p, "b", 1, 0.1)]
    _, pairs, _ = build_pairs(
        rows, PairsConfig(reward="rm", sft_fraction=0.0, gap_window=None, pair_choice="largest_gap")
    )
    assert (pairs[0].chosen_id, pairs[0].rejected_id) == (f"{p}:b:0", f"{p}:b:1")
    _, pairs, _ = build_pairs(rows, PairsConfig(reward="rm", sft_fraction=0.0, pair_rule="cross_model"))
    assert (pairs[0].chosen_id, pairs[0].rejected_id, pairs[0].source) == (f"{p}:b:0", f"{p}:b:1", "b")


def test_wrpo_layout_takes_best_source_and_target_best_worst():
    p = "q"
    rows = [
        sample(p, "a", 0, 0.8),
        sample(p, "b", 0, 0.9),
        sample(p, "pivot", 0, 0.5),
        sample(p, "pivot", 1, 0.2),
        sample(p, "pivot", 2, 0.4),
    ]
    _, pairs, _ = build_pairs(rows, PairsConfig(reward="rm", sft_fraction=0.0, target="pivot"))
    pair = pairs[0]
    assert response_text(pair.chosen_source) == "b-0"
    assert (pair.chosen_id, pair.rejected_id) == (f"{p}:pivot:0", f"{p}:pivot:1")


def test_wrpo_source_response_is_verifier_correct_when_verified():
    p = "q"
    rows = [
        sample(p, "a", 0, 0.9, False),
        sample(p, "b", 0, 0.6, True),
        sample(p, "pivot", 0, 0.5, True),
        sample(p, "pivot", 1, 0.7, False),
    ]
    _, pairs, _ = build_pairs(rows, PairsConfig(reward="rm", sft_fraction=0.0, target="pivot"))
    assert response_text(pairs[0].chosen_source) == "b-0"
    assert (pairs[0].chosen_id, pairs[0].rejected_id) == (f"{p}:pivot:0", f"{p}:pivot:1")


def test_missing_reward_key_is_a_config_error():
    p = "q"
    rows = [sample(p, "a", 0, 0.8, True), sample(p, "a", 1, 0.7, False)]
    with pytest.raises(ConfigError, match="no reward 'armo'"):
        build_pairs(rows, PairsConfig(reward="armo", sft_fraction=0.0))


def test_window_bounds_are_validated():
    with pytest.raises(ValueError, match="above upper bound"):
        PairsConfig(reward="rm", gap_window=(0.2, 0.1))


def test_a_reward_no_sample_has_is_refused_even_when_no_pair_would_need_it():
    p = "q"
    rows = [sample(p, "a", 0, 0.8, False), sample(p, "a", 1, 0.7, False)]  # all fail: no reward is ever read
    with pytest.raises(ConfigError, match="no reward 'armo' in any sample; the samples have: rm"):
        build_pairs(rows, PairsConfig(reward="armo", sft_fraction=1.0))


def test_identical_or_empty_responses_never_make_a_pair():
    p = "q"
    twins = [sample(p, "a", 0, 0.9), sample(p, "a", 1, 0.1)]
    twins[1] = twins[1].model_copy(update={"response": twins[0].response})
    empty = [sample(p, "b", 0, 0.9), sample(p, "b", 1, 0.1)]
    empty[1] = empty[1].model_copy(update={"response": "  "})
    config = PairsConfig(reward="rm", sft_fraction=0.0, gap_window=None)
    _, pairs, report = build_pairs(twins + empty, config)
    assert pairs == [] and report["candidates_no_valid_pair"] == 2


def test_preference_rows_with_no_preference_are_invalid_data(tmp_path):
    from polyfuse.data.io import read_rows
    from polyfuse.data.schemas import PreferenceRow
    from polyfuse.errors import DataError

    path = tmp_path / "pairs.jsonl"
    path.write_text('{"id": "1", "prompt": "q", "chosen": "yes", "rejected": "no"}\n'
                    '{"id": "2", "prompt": "q", "chosen": "same", "rejected": "same"}\n')
    with pytest.raises(DataError, match=r"pairs\.jsonl:2: .*chosen and rejected are the same response"):
        read_rows(path, PreferenceRow)
    path.write_text('{"id": "1", "prompt": "q", "chosen": [{"role": "assistant", "content": ""}], "rejected": "no"}\n')
    with pytest.raises(DataError, match=r"pairs\.jsonl:1: .*chosen response is empty"):
        read_rows(path, PreferenceRow)
    path.write_text('{"id": "1", "prompt": " ", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(DataError, match=r"pairs\.jsonl:1: field 'prompt': .*prompt is empty"):
        read_rows(path, PreferenceRow)


def test_zero_pairs_is_a_warning_that_says_why(tmp_path):
    from polyfuse.pairs import run_pairs

    p = "q"
    rows = [sample(p, "a", 0, 0.50), sample(p, "a", 1, 0.49)]  # gap 0.01, below the window
    with pytest.warns(UserWarning, match=r"0 preference pairs from 1 prompts \(.*candidates_gap_too_small 1"):
        run_pairs(rows, PairsConfig(reward="rm", sft_fraction=0.0, gap_window=(0.1, 1.0)), tmp_path)


# ---- verifier-only ranking: no reward model --------------------------------------------------------------


def verified(prompt, model, k, response, correct):
    return SampleRow(id=f"{prompt}:{model}:{k}", prompt_id=prompt, model=model, sample_index=k, prompt="q " + prompt,
                     response=response, verdicts={"check": correct})


def test_verifier_only_sft_target_is_the_shortest_correct_response_over_all_sources():
    rows = [verified("q", "a", 0, "wrong!", False), verified("q", "a", 1, "right, long", True),
            verified("q", "b", 0, "right", True), verified("q", "b", 1, "right", True)]
    sft, _, report = build_pairs(rows, PairsConfig(sft_fraction=1.0))
    assert [r.sample_id for r in sft] == ["q:b:0"]  # shortest correct; equal lengths: the lowest sample index
    assert sft[0].reward is None and report["ranked_by"] == "verifiers alone" and report["tie_break"] == "shorter"


def test_verifier_only_intra_source_pairs_are_correct_over_incorrect_with_the_tie_rule():
    rows = [verified("q", "a", 0, "yes indeed", True), verified("q", "a", 1, "yes", True),
            verified("q", "a", 2, "no no no", False), verified("q", "a", 3, "no", False),
            verified("q", "b", 0, "yes", True), verified("q", "b", 1, "yes", True)]  # b: nothing incorrect
    _, pairs, report = build_pairs(rows, PairsConfig(sft_fraction=0.0))
    pair = pairs[0]
    assert (pair.chosen_id, pair.rejected_id, pair.source) == ("q:a:1", "q:a:3", "a")
    assert (pair.chosen_correct, pair.rejected_correct, pair.chosen_reward) == (True, False, None)
    assert report["candidates_no_valid_pair"] == 1  # source b
    # the gap window needs a reward: without one it filters nothing (a window this narrow would drop any gap)
    assert build_pairs(rows, PairsConfig(sft_fraction=0.0, gap_window=(5.0, 6.0)))[1] == pairs


def test_random_tie_break_is_seeded_and_reaches_every_equal_response():
    rows = [verified("q", "a", k, "yes" + " " * k, True) for k in range(6)] + [verified("q", "a", 9, "no", False)]
    picks = {seed: build_pairs(rows, PairsConfig(sft_fraction=0.0, tie_break="random", seed=seed))[1][0].chosen_id
             for seed in range(20)}
    assert picks == {seed: build_pairs(rows, PairsConfig(sft_fraction=0.0, tie_break="random", seed=seed))[1][0].chosen_id
                     for seed in range(20)}  # the same seed, the same pick
    assert len(set(picks.values())) > 2  # and not always the same response
    shorter = build_pairs(rows, PairsConfig(sft_fraction=0.0))[1][0]
    assert shorter.chosen_id == "q:a:0" and shorter.rejected_id == "q:a:9"


def test_verifier_only_cross_model_pair_and_wrpo_triple():
    rows = [verified("q", "a", 0, "right but long", True), verified("q", "b", 0, "wrong", False),
            verified("q", "b", 1, "right", True), verified("q", "pivot", 0, "ok", True),
            verified("q", "pivot", 1, "nope", False), verified("q", "pivot", 2, "nah", False)]
    _, pairs, _ = build_pairs(rows, PairsConfig(sft_fraction=0.0, pair_rule="cross_model", sources=["a", "b"]))
    assert (pairs[0].chosen_id, pairs[0].rejected_id, pairs[0].source) == ("q:b:1", "q:b:0", "b")
    _, triples, _ = build_pairs(rows, PairsConfig(sft_fraction=0.0, target="pivot"))
    triple = triples[0]
    assert response_text(triple.chosen_source) == "right" and triple.source == "b"  # y_ws: shortest correct source
    assert (triple.chosen_id, triple.rejected_id) == ("q:pivot:0", "q:pivot:2")  # y_wt, y_l (shorter of the two wrong)


def test_with_a_reward_the_verdict_gates_and_the_reward_ranks_within_each_group():
    """FuseChat-3.0: correctness first; the reward model only orders the correct and the incorrect answers."""
    rows = [sample("q", "a", 0, 0.2, True), sample("q", "a", 1, 0.6, True), sample("q", "a", 2, 0.9, False),
            sample("q", "a", 3, 0.1, False)]
    _, pairs, report = build_pairs(rows, PairsConfig(reward="rm", sft_fraction=0.0, gap_window=None))
    assert (pairs[0].chosen_id, pairs[0].rejected_id) == ("q:a:1", "q:a:3")
    assert report["ranked_by"] == "verifiers, then reward 'rm'"


def test_prompts_nothing_judges_are_counted_not_ranked():
    rows = [verified("q", "a", 0, "yes", True), verified("q", "a", 1, "no", False),
            *[SampleRow(id=f"u:a:{k}", prompt_id="u", model="a", sample_index=k, prompt="q u", response=f"r{k}")
              for k in range(2)]]
    _, pairs, report = build_pairs(rows, PairsConfig(sft_fraction=0.0))
    assert [p.id for p in pairs] == ["q"] and report["dropped_unjudged"] == 1


@pytest.mark.parametrize("rows, config, message", [
    ([SampleRow(id="x:a:0", prompt_id="x", model="a", sample_index=0, prompt="q", response="r", rewards={"rm": 1.0})],
     {}, "no reward is set and no sample has a verifier verdict.*set pairs.reward to one of: rm"),
    ([verified("x", "a", 0, "r", True)], {"reward": "check"}, "'check' is a verifier's verdict, not a reward"),
])
def test_what_cannot_rank_is_refused(rows, config, message):
    with pytest.raises(ConfigError, match=message):
        build_pairs(rows, PairsConfig(**config))


def test_rules_that_need_a_reward_refuse_to_run_without_one():
    with pytest.raises(ValueError, match="pair_choice 'largest_gap' ranks pairs by reward, and no reward is given"):
        PairsConfig(pair_choice="largest_gap")
