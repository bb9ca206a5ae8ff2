"""Run reports: the gain of fusion with its 95% paired bootstrap interval (over the prompts for one run, over
seeds and prompts for several), in words, against the pivot and against SFT, with the training data that
explains a domain that did not improve; and `report.md` / `report.json` of a run, whose wall-time table covers
the toy world's build."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import scipy.stats
from rich.console import Console

from polyfuse.data import PreferenceRow, SFTRow, write_rows
from polyfuse.evaluation import EvalRecord, EvalResult, write_eval_report
from polyfuse.evaluation.report import accuracy_intervals, compare_labels, describe_gains
from polyfuse.evaluation.stats import AVERAGE
from polyfuse.pipeline.context import Context
from polyfuse.pipeline.summary import print_run_summary, write_run_report


def result(model: str, verdicts: dict[str, list[int]], bpb: float | None = None) -> EvalResult:
    return EvalResult(model=model, records=[
        EvalRecord(prompt_id=f"{domain}-{i}", domain=domain, verifier="v", response="r", correct=bool(ok), bpb=bpb)
        for domain, values in verdicts.items() for i, ok in enumerate(values)
    ])


RUN = {
    "src": result("src", {"arith": [1] * 8, "words": [0, 0]}),
    "pivot": result("pivot", {"arith": [1, 0, 0, 0, 0, 0, 0, 0], "words": [1, 1]}),
    "pivot+SFT": result("pivot+SFT", {"arith": [1, 1, 1, 1, 1, 1, 1, 0], "words": [1, 1]}),
}


def rows(comparison) -> dict:
    return {row.row: row for row in comparison.rows}


def test_one_run_gain_is_the_paired_bootstrap_over_prompts():
    found = rows(compare_labels([RUN], "pivot+SFT", "pivot"))
    assert found["arith"].diff.value == pytest.approx(75.0)
    pivot, sft = (np.array([1, 0, 0, 0, 0, 0, 0, 0.0]), np.array([1, 1, 1, 1, 1, 1, 1, 0.0]))
    scipy_ci = scipy.stats.bootstrap((sft, pivot), lambda a, b, axis=-1: a.mean(axis=axis) - b.mean(axis=axis),
                                     paired=True, vectorized=True, n_resamples=10_000, method="percentile",
                                     rng=np.random.default_rng(0)).confidence_interval
    assert (found["arith"].diff.low, found["arith"].diff.high) == pytest.approx((100 * scipy_ci.low, 100 * scipy_ci.high))
    assert (found["words"].diff.value, found["words"].diff.low, found["words"].diff.high) == (0.0, 0.0, 0.0)
    # the average over domains: the mean of the domains' means, its interval inside the domains' extremes
    average = found[AVERAGE]
    assert average.diff.value == pytest.approx(37.5) and 0 < average.diff.low < 37.5 < average.diff.high <= 50
    assert average.p == pytest.approx(2 / 2**6)  # 6 prompts SFT right and the pivot wrong, none the other way


def test_several_seeds_resample_seeds_then_prompts():
    second = {**RUN, "pivot+SFT": result("pivot+SFT", {"arith": [1, 1, 1, 1, 0, 0, 0, 0], "words": [1, 1]})}
    comparison = compare_labels([RUN, second], "pivot+SFT", "pivot")
    assert comparison.level == "seeds" and comparison.runs == 2
    assert rows(comparison)["arith"].diff.value == pytest.approx(56.25)  # gains of 75 and 37.5 points
    assert describe_gains([RUN, second], {"src"})[0].endswith(
        "(95% interval, paired bootstrap over 2 seeds and their held-out prompts).")


def test_findings_say_what_changed_with_intervals_and_why_a_domain_did_not():
    data = {"arith": {"SFT rows": 40, "pairs": 3}, "words": {"SFT rows": 2, "pairs": 0, "samples": 20,
                                                             "correct samples": 5}}
    arith = rows(compare_labels([RUN], "pivot+SFT", "pivot"))["arith"].diff
    average = rows(compare_labels([RUN], "pivot+SFT", "pivot"))[AVERAGE].diff
    lines = describe_gains([RUN], {"src"}, data)
    assert lines[0] == (f"**pivot+SFT** averages 93.8% against 56.2% for **pivot**: +37.5 points [{average.low:+.1f}, "
                        f"{average.high:+.1f}] (95% interval, paired bootstrap over 10 held-out prompts; McNemar p = 0.031).")
    assert lines[1] == "The best source on average, src, has 50.0%."
    assert f"- arith: 12.5 → 87.5 (+75.0 [{arith.low:+.1f}, {arith.high:+.1f}])." in lines
    assert ("- words: 100.0 → 100.0 (+0.0 [+0.0, +0.0]): no clear gain; its training data: SFT rows 2 (other domains "
            "40–40), pairs 0 (other domains 3–3), 25% of its 20 sampled responses were correct.") in lines
    assert describe_gains([{"pivot": RUN["pivot"]}], set()) == []  # nothing to compare


def test_findings_compare_against_sft_step_by_step_and_in_bits_per_byte():
    run = {
        "pivot": result("pivot", {"arith": [0, 0, 0, 0], "words": [1, 0]}, bpb=2.0),
        "pivot+SFT": result("pivot+SFT", {"arith": [1, 1, 0, 0], "words": [1, 0]}, bpb=1.5),
        "pivot+SFT+DPO": result("pivot+SFT+DPO", {"arith": [1, 1, 1, 0], "words": [1, 1]}, bpb=1.25),
    }
    lines = describe_gains([run], set())
    against = rows(compare_labels([run], "pivot+SFT+DPO", "pivot+SFT"))[AVERAGE]
    assert against.diff.value == pytest.approx(37.5)  # arith +25, words +50
    assert lines[1] == f"Against **pivot+SFT** (50.0%): +37.5 [{against.diff.low:+.1f}, {against.diff.high:+.1f}] points."
    assert lines[2] == "Gold bits per byte (lower is better): 2.000 → 1.250 (-0.750 [-0.750, -0.750])."
    assert lines[3].startswith("Step by step: pivot 25.0 → pivot+SFT 50.0 (+25.0 [") and "pivot+SFT+DPO 87.5 (+37.5 [" in lines[3]


def test_accuracy_intervals_are_the_item_bootstrap():
    found = accuracy_intervals(RUN["pivot+SFT"])
    assert found["arith"].value == pytest.approx(87.5) and found["words"].value == 100.0
    ci = scipy.stats.bootstrap((np.array([1, 1, 1, 1, 1, 1, 1, 0.0]),), np.mean, n_resamples=10_000,
                               method="percentile", rng=np.random.default_rng(0)).confidence_interval
    assert (found["arith"].low, found["arith"].high) == pytest.approx((100 * ci.low, 100 * ci.high))
    assert (found["words"].low, found["words"].high) == (100.0, 100.0)
    assert found[AVERAGE].value == pytest.approx(93.75)


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
    assert "pivot+SFT averages 93.8% against 56.2% for pivot: +37.5 points [" in printed.file.getvalue()
    assert all(f"│ {label} " in printed.file.getvalue() for label in RUN)  # one row per model
    text = path.read_text()
    assert "**pivot+SFT** averages 93.8% against 56.2% for **pivot**" in text
    assert "![accuracy](eval/accuracy.png)" in text
    assert "- arith: SFT rows 1" in text and "- words: pairs 1" in text and "- pair building: prompts 2" in text
    assert "| toy world (build or cache) | 3.2 s |" in text and "| prompts | 0.5 s (earlier run) |" in text
    assert "| **total, this run** | **12.5 s** |" in text
    report = json.loads((work / "report.json").read_text())
    assert report["domains"] == {"arith": {"SFT rows": 1}, "words": {"pairs": 1}} and report["wall_s"] == 12.5
