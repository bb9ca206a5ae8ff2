"""Run reports: the gain of fusion with its noise (paired 95% intervals over prompts for one run, the
standard deviation over seeds for several), in words, with the training data that explains a domain that did
not improve; and `report.md` / `report.json` of a run, whose wall-time table covers the toy world's build."""

from __future__ import annotations

import io
import json
import math

import pytest
from rich.console import Console

from polyfuse.data import PreferenceRow, SFTRow, write_rows
from polyfuse.evaluation import EvalRecord, EvalResult, write_eval_report
from polyfuse.evaluation.report import describe_gains, gains
from polyfuse.pipeline.context import Context
from polyfuse.pipeline.summary import print_run_summary, write_run_report


def result(model: str, verdicts: dict[str, list[int]]) -> EvalResult:
    return EvalResult(model=model, records=[
        EvalRecord(prompt_id=f"{domain}-{i}", domain=domain, verifier="v", response="r", correct=bool(ok))
        for domain, values in verdicts.items() for i, ok in enumerate(values)
    ])


RUN = {
    "src": result("src", {"arith": [1] * 8, "words": [0, 0]}),
    "pivot": result("pivot", {"arith": [1, 0, 0, 0, 0, 0, 0, 0], "words": [1, 1]}),
    "pivot+SFT": result("pivot+SFT", {"arith": [1, 1, 1, 1, 1, 1, 1, 0], "words": [1, 1]}),
}


def test_one_run_paired_gain_by_hand():
    # arith: differences 0, 1, 1, 1, 1, 1, 1, 0: mean 0.75, sample variance 1.5 / 7, variance of the mean / 8
    found = gains([RUN], "pivot", "pivot+SFT")
    assert found["arith"].points == pytest.approx(75.0)
    assert found["arith"].noise == pytest.approx(100 * 1.96 * math.sqrt(1.5 / 7 / 8))  # 32.1
    assert (found["words"].points, found["words"].noise) == (0.0, 0.0)
    # the average over domains: the mean of the domains' means, variance (1.5 / 56 + 0) / 2**2
    assert found["average"].points == pytest.approx(37.5)
    assert found["average"].noise == pytest.approx(100 * 1.96 * math.sqrt(1.5 / 56 / 4))  # 16.0
    assert found["arith"].clear and not found["words"].clear


def test_several_seeds_give_mean_and_standard_deviation():
    second = {**RUN, "pivot+SFT": result("pivot+SFT", {"arith": [1, 1, 1, 1, 0, 0, 0, 0], "words": [1, 1]})}
    found = gains([RUN, second], "pivot", "pivot+SFT")
    assert found["arith"].points == pytest.approx(56.25)  # gains of 75 and 37.5 points
    assert found["arith"].noise == pytest.approx(math.sqrt(2 * 18.75**2))  # their standard deviation
    assert str(found["arith"]) == "+56.2 ± 26.5"


def test_findings_say_what_changed_and_why_a_domain_did_not():
    data = {"arith": {"SFT rows": 40, "pairs": 3}, "words": {"SFT rows": 2, "pairs": 0, "samples": 20,
                                                             "correct samples": 5}}
    lines = describe_gains([RUN], {"src"}, data)
    assert lines[0] == ("**pivot+SFT** averages 93.8% against 56.2% for **pivot**: +37.5 ± 16.0 points "
                        "(95% interval over 10 held-out prompts, paired).")
    assert lines[1] == "The best source on average, src, has 50.0%."
    assert "- arith: 12.5 → 87.5 (+75.0 ± 32.1)." in lines
    assert ("- words: 100.0 → 100.0 (+0.0 ± 0.0): no clear gain; its training data: SFT rows 2 (other domains "
            "40–40), pairs 0 (other domains 3–3), 25% of its 20 sampled responses were correct.") in lines
    assert describe_gains([{"pivot": RUN["pivot"]}], set()) == []  # nothing to compare


def test_run_report_covers_the_whole_run(tmp_path):
    from polyfuse.pipeline.recipe import Recipe

    recipe = Recipe.model_validate({
        "name": "toy", "sources": [{"name": "src", "path": "s"}], "pivot": {"name": "pivot", "path": "p"},
        "prompts": {"path": "prompts.jsonl"}, "stages": ["prompts", "eval"],
        "eval": {"prompts": {"path": "prompts.jsonl"}, "models": ["sources", "pivot"], "scorers": [{"type": "math"}]},
    })
    work = tmp_path / "work"
    write_eval_report(RUN, work / "eval", sources={"src"})
    write_rows(work / "pairs" / "sft.jsonl", [SFTRow(id="a", prompt="1+1", completion="2", domain="arith")])
    write_rows(work / "pairs" / "preference.jsonl", [PreferenceRow(id="b", prompt="q", chosen="x", rejected="y",
                                                                   domain="words")])
    (work / "pairs" / "report.json").write_text('{"prompts": 2}')
    (work / "run.json").write_text(json.dumps({"wall_s": 12.5, "steps": {
        "toy world (build or cache)": {"wall_s": 3.25}, "prompts": {"wall_s": 0.5, "skipped": True},
        "eval": {"wall_s": 8.0}}}))
    ctx = Context(recipe=recipe, work_dir=work, outputs={
        "eval": {"results": str(work / "eval/results.json"), "chart": str(work / "eval/accuracy.png")},
        "pairs": {"sft": str(work / "pairs/sft.jsonl"), "preference": str(work / "pairs/preference.jsonl"),
                  "report": str(work / "pairs/report.json")},
    })
    path = write_run_report(ctx)  # what `run_recipe` ends with
    printed = Console(file=io.StringIO(), width=120)
    print_run_summary(ctx, printed)  # what `polyfuse run` ends with
    assert "Accuracy (%)" in printed.file.getvalue() and f"report: {path}" in printed.file.getvalue()
    assert all(f"│ {label} " in printed.file.getvalue() for label in RUN)  # one row per model
    text = path.read_text()
    assert "**pivot+SFT** averages 93.8% against 56.2% for **pivot**" in text
    assert "![accuracy](eval/accuracy.png)" in text
    assert "- arith: SFT rows 1" in text and "- words: pairs 1" in text and "- pair building: prompts 2" in text
    assert "| toy world (build or cache) | 3.2 s |" in text and "| prompts | 0.5 s (earlier run) |" in text
    assert "| **total, this run** | **12.5 s** |" in text
    report = json.loads((work / "report.json").read_text())
    assert report["domains"] == {"arith": {"SFT rows": 1}, "words": {"pairs": 1}} and report["wall_s"] == 12.5
