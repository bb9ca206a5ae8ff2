"""The real-model walkthrough (docs/real-models.md): recipes/real-infifpo-verifier.yaml, InfiFPO from verifier
verdicts alone with SmolLM2-135M-Instruct as pivot and Gemma-3-270M + SmolLM2 as sources, all from the GGUF files
of their PyPI packages (`packaged://`). The recipe runs end to end, cut down, with vLLM sampling as written."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import engine_env
from polyfuse.data import PreferenceRow, PromptRow, SampleRow, SFTRow, read_rows, write_rows
from polyfuse.errors import UserError
from polyfuse.models.gguf import resolve_model_path
from polyfuse.models.packaged import gemma3, packaged_model, smollm2
from polyfuse.pipeline.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "real-infifpo-verifier.yaml"
DATA = ROOT / "recipes" / "data"


def test_packaged_paths_name_the_installed_gguf_files():
    recipe = load_recipe(RECIPE)
    assert [s.path for s in recipe.sources] == [str(gemma3()), str(smollm2())]
    assert recipe.pivot.path == str(smollm2()) and recipe.pivot.path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert [s.backend.type for s in recipe.sources] == ["vllm", "vllm"] and recipe.pairs.reward is None


def test_an_unknown_packaged_model_is_refused_in_one_line(polyfuse_cli, tmp_path):
    with pytest.raises(UserError, match=r"here\.yaml: packaged://smollm3: unknown packaged model; expected one of "
                                        r"packaged://smollm2, packaged://gemma3, packaged://qwen-coder"):
        packaged_model("smollm3", "here.yaml")
    result = polyfuse_cli("run", RECIPE, "--check", "--set", "sources.0.path=packaged://gemma4", "--work-dir", tmp_path / "w")
    assert result.returncode == 2 and "real-infifpo-verifier.yaml: packaged://gemma4: unknown packaged model" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "w").exists()


def test_the_shipped_prompts_are_what_their_script_makes(monkeypatch):
    """The recipe's prompt files are reproducible: the script regenerates them row for row."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # as `python bench/real_math_prompts.py` runs it
    script = importlib.import_module("real_math_prompts")
    for split, seed in script.SPLITS.items():
        shipped = read_rows(DATA / f"real-math-{split}.jsonl", PromptRow)
        assert shipped == script.prompts(seed) and len(shipped) == 24
        assert {r.domain for r in shipped} == {"math"} and all(r.answer.lstrip("-").isdigit() for r in shipped)
    train, test = (read_rows(DATA / f"real-math-{split}.jsonl", PromptRow) for split in script.SPLITS)
    assert not {str(r.prompt) for r in train} & {str(r.prompt) for r in test}  # held out


CUT = ["prompts.path={prompts}", "sources.0.sampling.max_new_tokens=12", "sources.1.sampling.max_new_tokens=12",
       "sft.epochs=1", "po.epochs=1", "sft.warmup_ratio=0", "po.warmup_ratio=0",  # one step: a warm-up would make its lr 0
       "eval.prompts.limit=3", "eval.models=[pivot, po]", "eval.max_new_tokens=6"]
# Six prompts on which the 24-prompt walkthrough drew correct and incorrect answers (docs/real-models.md), so
# that both halves of the exact split give rows; most of the recipe's prompts get no correct answer at all.
PROMPTS = ["rg-basic_arithmetic-1000-0", "rg-gcd-1000-0", "rg-gcd-1000-1", "rg-gcd-1000-4", "rg-gcd-1000-5", "rg-gcd-1000-6"]


@pytest.mark.slow
def test_the_walkthrough_recipe_runs_cut_down_on_the_real_gguf_models(warm_vllm, tmp_path):
    """Six prompts, 12 tokens, one step of SFT and of InfiFPO: every stage's output is there, the pairs come
    from the verdicts alone (chosen correct, rejected not), and the trained pivot differs from SmolLM2."""
    prompts = [r for r in read_rows(DATA / "real-math-train.jsonl", PromptRow) if r.id in PROMPTS]
    write_rows(tmp_path / "prompts.jsonl", prompts)
    overrides = [item for key in CUT for item in ("--set", key.format(prompts=tmp_path / "prompts.jsonl"))]
    # The venv need not hold the model packages: their files are located here and named directly.
    overrides += ["--set", f"sources.0.path={gemma3()}", "--set", f"sources.1.path={smollm2()}",
                  "--set", f"pivot.path={smollm2()}"]
    result = warm_vllm.run(["-m", "polyfuse", "run", RECIPE, "--work-dir", tmp_path / "work", "--quiet", *overrides],
                           cwd=ROOT, env=engine_env(VLLM_ENABLE_V1_MULTIPROCESSING="0"), timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]
    check_cut_down_run(tmp_path / "work")


def check_cut_down_run(work: Path) -> None:
    samples = read_rows(work / "sample" / "samples.jsonl", SampleRow)
    assert len(samples) == 6 * 4 * 2 and {s.model for s in samples} == {"gemma3", "smollm2"}
    manifest = json.loads((work / "sample" / "manifest.json").read_text())
    assert [m["backend"]["type"] for m in manifest["config"]["section"]["models"]] == ["vllm", "vllm"]
    scored = {s.id: s for s in read_rows(work / "score" / "scored.jsonl", SampleRow)}
    assert len(scored) == len(samples) and all(set(s.verdicts) == {"math"} and not s.rewards for s in scored.values())

    report = json.loads((work / "pairs" / "report.json").read_text())
    assert report["ranked_by"] == "verifiers alone" and report["tie_break"] == "shorter"
    sft = read_rows(work / "pairs" / "sft.jsonl", SFTRow)
    pairs = read_rows(work / "logprobs" / "preference.jsonl", PreferenceRow)
    assert sft and pairs and not {r.id for r in sft} & {r.id for r in pairs}  # row ids are prompt ids
    assert all(scored[r.sample_id].verdicts["math"] for r in sft)
    for pair in pairs:  # correct over incorrect, each with M0's and both sources' log-probs
        assert scored[pair.chosen_id].verdicts["math"] and not scored[pair.rejected_id].verdicts["math"]
        assert pair.ref_chosen_logps is not None and len(pair.fuse_chosen_logps) == 2

    pivot = load_file(Path(resolve_model_path(str(smollm2()), "pivot")) / "model.safetensors")
    trained = {}
    for stage in ("sft", "po"):
        folder = work / stage / "model"
        trained[stage] = {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
        assert trained[stage].keys() == pivot.keys()
    assert any(not trained["sft"][k].equal(pivot[k]) for k in pivot)
    assert any(not trained["po"][k].equal(trained["sft"][k]) for k in pivot)  # InfiFPO's step moved the SFT model
    results = json.loads((work / "eval" / "results.json").read_text())
    assert set(results) == {"pivot", "pivot+SFT+INFIFPO"}
