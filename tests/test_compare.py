"""`polyfuse compare` and experiment files: two real eval outputs compared end to end (table, experiment file,
PNG), the experiment file's shape and its recomputation, and bad inputs refused with exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from matplotlib.image import imread

from polyfuse.data import write_rows
from polyfuse.evaluation import EvalRecord, EvalResult, load_eval_report, write_eval_report
from polyfuse.evaluation.evidence import build_evidence, read_evidence, recompute, write_evidence
from polyfuse.evaluation.stats import AVERAGE, ItemScores

RUN_KEYS = {"method", "seed", "split", "domain", "correct", "bpb"}
COMPARISON_KEYS = {"a", "b", "domain", "diff", "ci95", "p"}


def test_compare_two_eval_outputs_end_to_end(polyfuse_cli, tiny_world, tmp_path):
    prompts = tiny_world.prompts("heldout", per_domain=8)
    write_rows(tmp_path / "prompts.jsonl", prompts)
    source = next(iter(tiny_world.source_paths.values()))
    for name, path in (("pivot", tiny_world.pivot_path), ("source", source)):
        done = polyfuse_cli("eval", "--model", f"{name}={path}", "--data", tmp_path / "prompts.jsonl",
                            "--out", tmp_path / name, "--max-new-tokens", "8", "-q")
        assert done.returncode == 0, done.stderr
    assert "Gold bits per byte" in done.stdout
    done = polyfuse_cli("compare", "--a", tmp_path / "source", "--b", tmp_path / "pivot", "--json", tmp_path / "e.json",
                        "--png", tmp_path / "diff.png")
    assert done.returncode == 0, done.stderr
    assert "source (A) vs pivot (B), 1 run; 95% paired bootstrap over items" in " ".join(done.stdout.split())
    for domain in tiny_world.domains:
        assert f"\n  {domain} " in done.stdout
    assert "\n  average " in done.stdout

    evidence = json.loads((tmp_path / "e.json").read_text())
    assert evidence["experiment"] == "source vs pivot" and evidence["items"] == dict.fromkeys(sorted(tiny_world.domains), 8)
    assert all(set(run) == RUN_KEYS and run["split"] == "test" for run in evidence["runs"])
    assert all(COMPARISON_KEYS <= set(c) for c in evidence["comparisons"])
    results = {label: r for folder in ("source", "pivot") for label, r in load_eval_report(tmp_path / folder).items()}
    for run in evidence["runs"]:  # the records, item by item, in one order for both methods
        records = {r.prompt_id: r for r in results[run["method"]].records if r.domain == run["domain"]}
        order = [r.prompt_id for r in results["source"].records if r.domain == run["domain"]]
        assert run["correct"] == "".join("1" if records[i].correct else "0" for i in order)
        assert run["bpb"] == pytest.approx([records[i].bpb for i in order])
    rows = {c["domain"]: c for c in evidence["comparisons"]}
    accuracy = {label: r.summary() for label, r in results.items()}
    for domain in tiny_world.domains:
        expected = 100 * (accuracy["source"]["per_domain"][domain]["accuracy"] - accuracy["pivot"]["per_domain"][domain]["accuracy"])
        assert rows[domain]["diff"] == pytest.approx(expected)
        assert rows[domain]["ci95"][0] <= rows[domain]["diff"] <= rows[domain]["ci95"][1]
    assert rows[AVERAGE]["diff"] == pytest.approx(100 * (accuracy["source"]["average"] - accuracy["pivot"]["average"]))
    bpb = {c["domain"]: c for c in evidence["bpb_comparisons"]}
    assert bpb[AVERAGE]["diff"] == pytest.approx(accuracy["source"]["average_bpb"] - accuracy["pivot"]["average_bpb"])
    assert imread(tmp_path / "diff.png").shape[0] > 100

    # anyone can recompute the file; a tampered file does not recompute
    again = polyfuse_cli("compare", "--recompute", tmp_path / "e.json")
    assert again.returncode == 0 and "no" not in again.stdout.split()
    evidence["comparisons"][0]["diff"] += 1.0
    (tmp_path / "bad.json").write_text(json.dumps(evidence))
    assert polyfuse_cli("compare", "--recompute", tmp_path / "bad.json").returncode == 1


def scores(rng: np.random.Generator, n: int, p: float) -> ItemScores:
    return ItemScores(rng.random(n) < p, rng.gamma(2.0, 0.5, n))


def test_experiment_file_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    methods = {method: {seed: {"arith": scores(rng, 40, p), "words": scores(rng, 25, p - 0.1)} for seed in (0, 1, 2)}
               for method, p in (("dpo", 0.7), ("sft", 0.6), ("pivot", 0.3))}
    evidence = build_evidence("gym-po", methods, [("dpo", "sft"), ("dpo", "pivot")], resamples=2000)
    path = write_evidence(tmp_path / "docs/evidence/gym-po.json", evidence)
    raw = json.loads(path.read_text())
    assert set(raw) == {"experiment", "items", "runs", "comparisons", "bpb_comparisons", "bootstrap", "protocol"}
    assert raw["protocol"] == {}  # free-form, for the reader: how the runs were made
    assert raw["items"] == {"arith": 40, "words": 25} and len(raw["runs"]) == 3 * 3 * 2
    assert all(set(r) == RUN_KEYS for r in raw["runs"]) and all(set(c) == COMPARISON_KEYS for c in raw["comparisons"])
    assert [(c["a"], c["b"], c["domain"]) for c in raw["comparisons"]] == [
        (a, b, d) for a, b in (("dpo", "sft"), ("dpo", "pivot")) for d in ("arith", "words", AVERAGE)]
    assert raw["bootstrap"] == {"level": None, "resamples": 2000, "seed": 0, "confidence": 0.95}
    first = raw["runs"][0]
    assert first["correct"] == "".join("1" if x else "0" for x in methods["dpo"][0]["arith"].correct)
    read = read_evidence(path)
    assert read == evidence and recompute(read) == read  # every interval recomputes from the runs alone
    evidence.protocol = {"chosen": {"dpo": {"learning_rate": 3e-5}}, "data": {"0": {"pairs": 1842}}}
    assert read_evidence(write_evidence(tmp_path / "with-protocol.json", evidence)) == evidence
    # the diff is the mean over seeds of the unweighted mean over domains, in points
    average = next(c for c in read.comparisons if c.b == "pivot" and c.domain == AVERAGE)
    by_seed = [np.mean([methods["dpo"][s][d].correct.mean() - methods["pivot"][s][d].correct.mean()
                        for d in ("arith", "words")]) for s in (0, 1, 2)]
    assert average.diff == pytest.approx(100 * np.mean(by_seed))


def eval_output(folder, models: dict[str, dict[str, list[int]]]) -> None:
    write_eval_report({label: EvalResult(model=label, records=[
        EvalRecord(prompt_id=f"{d}-{i}", domain=d, verifier="v", response="r", correct=bool(ok), bpb=1.0 + i)
        for d, values in verdicts.items() for i, ok in enumerate(values)]) for label, verdicts in models.items()}, folder)


@pytest.fixture
def outputs(tmp_path):
    eval_output(tmp_path / "one", {"m": {"x": [1, 0, 1], "y": [1, 1]}})
    eval_output(tmp_path / "work" / "eval", {"pivot": {"x": [0, 0, 1], "y": [0, 1]}, "pivot+SFT": {"x": [1, 1, 1], "y": [1, 1]}})
    eval_output(tmp_path / "fewer", {"m": {"x": [1, 0], "y": [1, 1]}})
    return tmp_path


def test_recipe_work_dirs_and_several_seeds(polyfuse_cli, outputs):
    done = polyfuse_cli("compare", "--a", outputs / "work:pivot+SFT", "--b", outputs / "work:pivot")
    assert done.returncode == 0, done.stderr
    assert "pivot+SFT (A) vs pivot (B)" in done.stdout and "+60.0" not in done.stdout  # x +66.7, y +50, average 58.3
    assert "+58.3" in done.stdout and "+66.7" in done.stdout
    done = polyfuse_cli("compare", "--a", outputs / "one", "--a", outputs / "one", "--b", outputs / "work:pivot",
                        "--b", outputs / "work:pivot", "--json", outputs / "two.json")
    assert done.returncode == 0, done.stderr
    assert "2 runs; 95% paired bootstrap over seeds, then items within each" in " ".join(done.stdout.split())
    assert json.loads((outputs / "two.json").read_text())["bootstrap"]["level"] == "seeds"


@pytest.mark.parametrize("args, message", [
    ([], "give the runs of both methods"),
    (["--a", "{o}/nowhere", "--b", "{o}/one"], "nowhere: not found"),
    (["--a", "{o}", "--b", "{o}/one"], "no eval output here"),
    (["--a", "{o}/work", "--b", "{o}/one"], "holds 2 models (pivot, pivot+SFT): name one as"),
    (["--a", "{o}/work:sft", "--b", "{o}/one"], "no model 'sft' in its eval output; it holds pivot, pivot+SFT"),
    (["--a", "{o}/fewer", "--b", "{o}/one"], "hold different items in domain 'x': 0 only in the first (e.g. -), 1 only in the second (e.g. x-2)"),
    (["--a", "{o}/one", "--a", "{o}/one", "--b", "{o}/one"], "method A has 2 runs and method B 1"),
    (["--a", "{o}/one", "--b", "{o}/work:pivot", "--json", "{o}/out.txt"], "out.txt: expected a .json file"),
    (["--a", "{o}/one", "--b", "{o}/work:pivot", "--png", "{o}/one/results.json/x.png"], "is a file, expected a folder"),
    (["--a", "{o}/one", "--b", "{o}/work:pivot", "--level", "bags"], "--level 'bags': expected auto, items or seeds"),
    (["--recompute", "{o}/e.json", "--a", "{o}/one"], "drop --a and --b"),
    (["--recompute", "{o}/missing.json"], "missing.json: experiment file not found"),
])
def test_bad_inputs_exit_2_with_one_line(polyfuse_cli, outputs, args, message):
    done = polyfuse_cli("compare", *[a.format(o=outputs) for a in args])
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in " ".join(done.stderr.split()) and "Traceback" not in done.stderr


def test_missing_records_and_bad_experiment_files_exit_2(polyfuse_cli, outputs):
    (outputs / "one" / "records" / "m.jsonl").unlink()
    done = polyfuse_cli("compare", "--a", outputs / "one", "--b", outputs / "work:pivot")
    assert done.returncode == 2 and "m.jsonl: missing (the per-item records of 'm')" in " ".join(done.stderr.split())
    evidence = {"experiment": "e", "items": {"x": 3}, "runs": [
        {"method": "a", "seed": 0, "split": "test", "domain": "x", "correct": "0110", "bpb": []}], "comparisons": []}
    (outputs / "e.json").write_text(json.dumps(evidence))
    done = polyfuse_cli("compare", "--recompute", outputs / "e.json")
    assert done.returncode == 2 and "runs.0: 'correct' has 4 items, 'items' says 3 for domain 'x'" in " ".join(done.stderr.split())
    evidence["runs"][0]["correct"] = "01a"
    (outputs / "e.json").write_text(json.dumps(evidence))
    done = polyfuse_cli("compare", "--recompute", outputs / "e.json")
    assert done.returncode == 2 and "runs.0.correct: String should match pattern" in " ".join(done.stderr.split())
