"""FuseChat-3.0 pair rules on hand-made scored samples."""

from __future__ import annotations

import pytest

from polyfuse.data.schemas import SampleRow, response_text
from polyfuse.errors import ConfigError
from polyfuse.pipeline.stages.pairs import PairsConfig, build_pairs, in_sft_split


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


def po_prompt(seed=0):
    """A prompt id that the split sends to preference optimisation at sft_fraction 0.5."""
    return next(p for p in (f"p{i}" for i in range(100)) if not in_sft_split(p, 0.5, seed))


def sft_prompt(seed=0):
    return next(p for p in (f"p{i}" for i in range(100)) if in_sft_split(p, 0.5, seed))


def test_split_is_deterministic_and_close_to_fraction():
    ids = [f"prompt-{i}" for i in range(4000)]
    first = [in_sft_split(i, 0.4, 7) for i in ids]
    assert first == [in_sft_split(i, 0.4, 7) for i in ids]
    assert abs(sum(first) / len(ids) - 0.4) < 0.03
    assert first != [in_sft_split(i, 0.4, 8) for i in ids]


def test_sft_target_is_best_correct_over_all_sources():
    p = sft_prompt()
    rows = [sample(p, "a", 0, 0.9, False), sample(p, "a", 1, 0.5, True), sample(p, "b", 0, 0.7, True)]
    sft, pairs, report = build_pairs(rows, PairsConfig(reward="rm", sft_fraction=0.5))
    assert [r.sample_id for r in sft] == [f"{p}:b:0"]
    assert response_text(sft[0].completion) == "b-0"
    assert pairs == [] and report["sft_rows"] == 1


def test_sft_prompt_without_correct_answer_is_dropped():
    p = sft_prompt()
    rows = [sample(p, "a", 0, 0.9, False), sample(p, "b", 0, 0.7, False)]
    sft, _, report = build_pairs(rows, PairsConfig(reward="rm", sft_fraction=0.5))
    assert sft == [] and report["dropped_sft_all_fail"] == 1


def test_intra_source_pair_correct_beats_incorrect_and_window_filters():
    p = po_prompt()
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
    _, pairs, report = build_pairs(rows, PairsConfig(reward="rm", sft_fraction=0.5))
    assert len(pairs) == 1
    pair = pairs[0]
    assert (pair.chosen_id, pair.rejected_id, pair.source) == (f"{p}:a:0", f"{p}:a:2", "a")
    assert pair.chosen_reward - pair.rejected_reward == pytest.approx(0.05)
    assert report["candidates_gap_too_large"] == 1 and report["candidates_gap_too_small"] == 1


def test_pair_is_never_across_sources():
    p = po_prompt()
    rows = [sample(p, "a", 0, 0.6, True), sample(p, "b", 0, 0.55, False)]
    _, pairs, report = build_pairs(rows, PairsConfig(reward="rm", sft_fraction=0.5))
    assert pairs == [] and report["dropped_po_no_pair"] == 1 and report["candidates_no_valid_pair"] == 2


def test_pair_choice_rules():
    p = po_prompt()
    rows = [
        sample(p, "a", 0, 0.70, True),
        sample(p, "a", 1, 0.68, False),  # gap 0.02, chosen 0.70
        sample(p, "b", 0, 0.60, True),
        sample(p, "b", 1, 0.52, False),  # gap 0.08, chosen 0.60
    ]
    cfg = PairsConfig(reward="rm", sft_fraction=0.5, pair_choice="highest_chosen_score")
    assert build_pairs(rows, cfg)[1][0].source == "a"
    cfg = PairsConfig(reward="rm", sft_fraction=0.5, pair_choice="largest_gap")
    assert build_pairs(rows, cfg)[1][0].source == "b"
    picks = {
        build_pairs(rows, PairsConfig(reward="rm", sft_fraction=0.5, pair_choice="random"))[1][0].source
        for _ in range(3)
    }
    assert len(picks) == 1  # seeded: the same pick every time


def test_unverified_pairs_use_best_and_worst_reward_and_cross_model_rule():
    p = po_prompt()
    rows = [sample(p, "a", 0, 0.30), sample(p, "a", 1, 0.35), sample(p, "b", 0, 0.9), sample(p, "b", 1, 0.1)]
    _, pairs, _ = build_pairs(
        rows, PairsConfig(reward="rm", sft_fraction=0.5, gap_window=None, pair_choice="largest_gap")
    )
    assert (pairs[0].chosen_id, pairs[0].rejected_id) == (f"{p}:b:0", f"{p}:b:1")
    _, pairs, _ = build_pairs(rows, PairsConfig(reward="rm", sft_fraction=0.5, pair_rule="cross_model"))
    assert (pairs[0].chosen_id, pairs[0].rejected_id, pairs[0].source) == (f"{p}:b:0", f"{p}:b:1", "b")


def test_wrpo_layout_takes_best_source_and_target_best_worst():
    p = po_prompt()
    rows = [
        sample(p, "a", 0, 0.8),
        sample(p, "b", 0, 0.9),
        sample(p, "pivot", 0, 0.5),
        sample(p, "pivot", 1, 0.2),
        sample(p, "pivot", 2, 0.4),
    ]
    _, pairs, _ = build_pairs(rows, PairsConfig(reward="rm", sft_fraction=0.5, target="pivot"))
    pair = pairs[0]
    assert response_text(pair.chosen_source) == "b-0"
    assert (pair.chosen_id, pair.rejected_id) == (f"{p}:pivot:0", f"{p}:pivot:1")


def test_wrpo_source_response_is_verifier_correct_when_verified():
    p = po_prompt()
    rows = [
        sample(p, "a", 0, 0.9, False),
        sample(p, "b", 0, 0.6, True),
        sample(p, "pivot", 0, 0.5, True),
        sample(p, "pivot", 1, 0.7, False),
    ]
    _, pairs, _ = build_pairs(rows, PairsConfig(reward="rm", sft_fraction=0.5, target="pivot"))
    assert response_text(pairs[0].chosen_source) == "b-0"
    assert (pairs[0].chosen_id, pairs[0].rejected_id) == (f"{p}:pivot:0", f"{p}:pivot:1")


def test_missing_reward_key_is_a_config_error():
    p = po_prompt()
    rows = [sample(p, "a", 0, 0.8, True), sample(p, "a", 1, 0.7, False)]
    with pytest.raises(ConfigError, match="no reward 'armo'"):
        build_pairs(rows, PairsConfig(reward="armo", sft_fraction=0.5))


def test_window_bounds_are_validated():
    with pytest.raises(ValueError, match="above upper bound"):
        PairsConfig(reward="rm", gap_window=(0.2, 0.1))


def test_a_reward_no_sample_has_is_refused_even_when_no_pair_would_need_it():
    p = sft_prompt()
    rows = [sample(p, "a", 0, 0.8, False), sample(p, "a", 1, 0.7, False)]  # all fail: no reward is ever read
    with pytest.raises(ConfigError, match="no reward 'armo' in any sample; the samples have: rm"):
        build_pairs(rows, PairsConfig(reward="armo", sft_fraction=0.5))


def test_identical_or_empty_responses_never_make_a_pair():
    p = po_prompt()
    twins = [sample(p, "a", 0, 0.9), sample(p, "a", 1, 0.1)]
    twins[1] = twins[1].model_copy(update={"response": twins[0].response})
    empty = [sample(p, "b", 0, 0.9), sample(p, "b", 1, 0.1)]
    empty[1] = empty[1].model_copy(update={"response": "  "})
    config = PairsConfig(reward="rm", sft_fraction=0.5, gap_window=None)
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
    from polyfuse.pipeline.stages.pairs import run_pairs

    p = po_prompt()
    rows = [sample(p, "a", 0, 0.50), sample(p, "a", 1, 0.49)]  # gap 0.01, below the window
    with pytest.warns(UserWarning, match=r"0 preference pairs from 1 prompts \(.*candidates_gap_too_small 1"):
        run_pairs(rows, PairsConfig(reward="rm", sft_fraction=0.5, gap_window=(0.1, 1.0)), tmp_path)
