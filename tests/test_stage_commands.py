"""A stage's command is the stage: `polyfuse <stage>` on the files a recipe's stage read, with the section that
stage ran with as its `--config`, writes the same outputs, for every registered stage. One recipe on the tiny
toy world runs the thirteen stages of pairs (a tokenizer transplant and on-policy distillation among them); a
second the stages of unpaired rows (pairs' unpaired layout, their log-probs, the consensus step, `upo`: a recipe
trains with one of po or upo); each command then runs again outside them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from polyfuse.pipeline.context import STAGES, stage

pytestmark = pytest.mark.slow

RECIPE = """
name: every-stage
seed: 3
toyworld: {{preset: tiny, cache_dir: {cache}}}
sources:
{sources}
pivot: {{name: pivot, path: toyworld://pivot}}
prompts: {{toyworld: {{split: train, per_domain: 4}}}}
stages: [prompts, sample, score, pairs, transplant, sft, teacher, distill, onpolicy, merge, logprobs, po, eval]
sample: {{batch_size: 8, chunk_size: 5}}
score: {{scorers: [{{type: reward_model, name: rm, model: {{path: toyworld://reward_model}}}}], chunk_size: 16}}
pairs: {{reward: rm, gap_window: null, sft_fraction: 0.5}}
sft: {{epochs: 1, batch_size: 4, save_steps: 0}}
teacher: {{top_k: 4, chunk_size: 4}}
distill: {{epochs: 1, batch_size: 4, save_steps: 0}}
transplant: {{donor: llama-compare, k: 16}}
onpolicy: {{epochs: 1, batch_size: 4, save_steps: 0, objective_args: {{top_k: 4}}, sampling: {{max_new_tokens: 6}},
            max_length: 96}}
merge: {{merge_method: linear, models: [{{model: sft, parameters: {{weight: 0.5}}}},
                                        {{model: distill, parameters: {{weight: 0.5}}}}], dtype: float32}}
logprobs: {{chunk_size: 4}}
po: {{objective: infifpo, epochs: 1, batch_size: 4, save_steps: 0}}
eval: {{prompts: {{toyworld: {{split: heldout, per_domain: 2, seed: 0}}}}, models: [sources, pivot, transplant, sft, distill,
                                                                           onpolicy, merge, po],
        scorers: [{{type: toyworld}}], batch_size: 4, max_new_tokens: 6}}
"""


def digest(path: Path) -> str:
    """A file's bytes; a folder's data files (weights, shards, JSONL), by relative path."""
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    files = sorted(p for p in path.rglob("*") if p.suffix in (".safetensors", ".npz", ".jsonl"))
    return hashlib.sha256(b"".join(str(p.relative_to(path)).encode() + digest(p).encode() for p in files)).hexdigest()


@pytest.fixture(scope="module")
def run(tiny_world, tmp_path_factory):
    """The recipe, run once: (its context, the folder the commands write into)."""
    from polyfuse.pipeline.recipe import load_recipe
    from polyfuse.pipeline.runner import run_recipe
    from test_pipeline import tiny_world_sources

    root = tmp_path_factory.mktemp("every-stage")
    sources = "\n".join(f"  - {{name: {name}, path: toyworld://sources/{name}, sampling: {{n: 2, max_new_tokens: 6}}}}"
                        for name in tiny_world_sources())
    (root / "recipe.yaml").write_text(RECIPE.format(cache=tiny_world.root.parent, sources=sources))
    ctx = run_recipe(load_recipe(root / "recipe.yaml"), root / "work", quiet=True)
    return ctx, root / "commands"


def _config_file(name: str, config, folder: Path) -> Path:
    """The section the stage ran with, as its command's `--config` (without the keys only a recipe reads)."""
    path = folder / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = config.model_dump(mode="json", exclude=set(getattr(config, "recipe_only", ())))
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


UNPAIRED = "stages: [prompts, sample, score, pairs, sft, logprobs, consensus, upo]"


@pytest.fixture(scope="module")
def unpaired_run(run, tiny_world):
    """The recipe of unpaired rows on the same world: labelled by the reward model against its median reward there
    (the verifiers fail every response of the tiny world), then CGPO."""
    import statistics

    from polyfuse.data import SampleRow, read_rows
    from polyfuse.pipeline.recipe import load_recipe
    from polyfuse.pipeline.runner import run_recipe

    ctx, folder = run
    rewards = [r.rewards["rm"] for r in read_rows(ctx.output("score", "scored"), SampleRow)]
    body = (folder.parent / "recipe.yaml").read_text().split("stages:")[0] + UNPAIRED + (
        f"\nsample: {{batch_size: 8, chunk_size: 5}}\nscore: {{scorers: [{{type: reward_model, name: rm, model: "
        f"{{path: toyworld://reward_model}}}}], chunk_size: 16}}\npairs: {{reward: rm, gap_window: null, sft_fraction: "
        f"0.5, unpaired: {{threshold: {statistics.median(rewards)}}}}}\nsft: {{epochs: 1, batch_size: 4, save_steps: 0}}"
        f"\nlogprobs: {{chunk_size: 4}}\nconsensus: {{calibration_min_rows: 4}}\nupo: {{objective: cgpo, epochs: 1, "
        f"batch_size: 4, save_steps: 0}}\n")
    (folder.parent / "unpaired.yaml").write_text(body)
    return run_recipe(load_recipe(folder.parent / "unpaired.yaml"), folder.parent / "unpaired-work", quiet=True), folder


def test_the_recipes_ran_every_stage(run, unpaired_run):
    ctx, _ = run
    assert set(ctx.outputs) | set(unpaired_run[0].outputs) == set(STAGES.names()) == {
        "prompts", "sample", "score", "pairs", "transplant", "sft", "teacher", "distill", "onpolicy", "merge",
        "logprobs", "consensus", "po", "upo", "eval"}
    assert json.loads(Path(ctx.output("pairs", "report")).read_text())["pairs"] > 0
    report = json.loads(Path(unpaired_run[0].output("pairs", "report")).read_text())
    assert report["unpaired_desirable"] > 0 and report["unpaired_undesirable"] > 0


COMMANDS = {  # stage -> (the command, its options besides --config and -o), from what the recipe's stage read
    "prompts": ("prompts", lambda ctx: []),
    "sample": ("sample", lambda ctx: ["--prompts", ctx.output("prompts", "prompts")]),
    "score": ("score", lambda ctx: ["--samples", ctx.output("sample", "samples")]),
    "pairs": ("pairs", lambda ctx: ["--scored", ctx.output("score", "scored")]),
    "sft": ("train sft", lambda ctx: ["--data", ctx.output("pairs", "sft"), "--model", ctx.output("transplant", "model")]),
    "teacher": ("teacher", lambda ctx: ["--data", ctx.output("pairs", "sft")]),
    "distill": ("train distill", lambda ctx: ["--data", ctx.output("teacher", "sft"), "--teachers",
                                              ctx.output("teacher", "store"), "--model", ctx.output("sft", "model")]),
    "onpolicy": ("train onpolicy", lambda ctx: ["--prompts", ctx.output("prompts", "prompts"), "--model",
                                                ctx.output("distill", "model")]),
    "logprobs": ("logprobs", lambda ctx: ["--data", ctx.output("pairs", "preference")]),
    "po": ("train infifpo", lambda ctx: ["--data", ctx.output("logprobs", "preference"), "--model",
                                         ctx.output("merge", "model")]),
    "transplant": ("transplant", lambda ctx: ["--model", ctx.recipe.pivot.path, "--donor",
                                              next(s.path for s in ctx.recipe.sources if s.label == "llama-compare")]),
}


UNPAIRED_COMMANDS = {  # the stages of unpaired rows, from the second recipe
    "pairs": ("pairs", lambda ctx: ["--scored", ctx.output("score", "scored")]),
    "logprobs": ("logprobs", lambda ctx: ["--data", ctx.output("pairs", "unpaired")], "unpaired.jsonl"),
    "consensus": ("consensus", lambda ctx: ["--data", ctx.output("logprobs", "unpaired")]),
    "upo": ("train cgpo", lambda ctx: ["--data", ctx.output("consensus", "unpaired"), "--model",
                                       ctx.output("sft", "model")]),
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_stage_command_writes_what_the_recipe_stage_wrote(run, name, polyfuse_cli):
    check_command(run, name, COMMANDS[name], polyfuse_cli)


@pytest.mark.parametrize("name", sorted(UNPAIRED_COMMANDS))
def test_a_stage_command_of_unpaired_rows_writes_what_the_recipe_stage_wrote(unpaired_run, name, polyfuse_cli):
    ctx, folder = unpaired_run
    check_command((ctx, folder / "unpaired"), name, UNPAIRED_COMMANDS[name], polyfuse_cli)


def check_command(run, name, spec, polyfuse_cli):
    ctx, folder = run
    step = stage(name)
    command, options, *file_name = spec  # the output file, when it is not the stage's usual one
    out = folder / name / (file_name[0] if file_name else step.output or "out")
    config = _config_file(name, step.engine_config(ctx), folder / "configs")
    proc = polyfuse_cli(*command.split(), "-c", config, *options(ctx), "-o", out, "-q")
    assert proc.returncode == 0, proc.stderr
    recipe_outputs = {k: v for k, v in ctx.outputs[name].items() if Path(v).is_relative_to(ctx.work_dir / name)}
    assert recipe_outputs, name
    for key, path in recipe_outputs.items():
        mine = out.parent / Path(path).relative_to(ctx.work_dir / name) if step.output else out / Path(path).name
        assert digest(mine) == digest(Path(path)), (name, key)


def test_merge_command_writes_what_the_merge_stage_wrote(run, polyfuse_cli):
    ctx, folder = run
    config = stage("merge").engine_config(ctx)
    path = folder / "configs" / "merge.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True), sort_keys=False))
    proc = polyfuse_cli("merge", path, folder / "merge", "-q")
    assert proc.returncode == 0, proc.stderr
    assert digest(folder / "merge") == digest(Path(ctx.output("merge", "model")))


def test_eval_command_writes_what_the_eval_stage_wrote(run, polyfuse_cli, monkeypatch, tmp_path):
    """`polyfuse eval` on the models the stage evaluated, named as the stage named them, with the stage's
    settings as flags (its prompt draw is seed 0, the command's): the same prompts, the same results and the
    same per-prompt records (each generated response)."""
    from polyfuse.pipeline.stages.eval import eval_models

    ctx, folder = run
    section = ctx.recipe.eval
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "toyworld").symlink_to(ctx.recipe.toyworld.cache_dir)  # the command's default cache
    monkeypatch.setenv("POLYFUSE_CACHE", str(tmp_path / "cache"))
    models = [f"--model={label}={spec.path}" for label, spec in eval_models(ctx).items()]
    proc = polyfuse_cli("eval", *models, "--data", "toyworld", "--toy-preset", "tiny", "--per-domain", "2",
                        "--batch-size", section.batch_size, "--max-new-tokens", section.max_new_tokens,
                        "-o", folder / "eval", "-q")
    assert proc.returncode == 0, proc.stderr
    ours, theirs = folder / "eval", Path(ctx.output("eval", "results")).parent
    for name in ("results.json", "results.md", "prompts.jsonl", "records"):
        assert digest(ours / name) == digest(theirs / name), name
    assert list(json.loads((theirs / "results.json").read_text())) == [
        *(s.label for s in ctx.recipe.sources), "pivot", *(
            "pivot+TRANSPLANT" + tail for tail in ("", "+SFT", "+SFT+ULD", "+SFT+ULD+ONPOLICY-KD",
                                                  "+SFT+ULD+ONPOLICY-KD+MERGE(linear)",
                                                  "+SFT+ULD+ONPOLICY-KD+MERGE(linear)+INFIFPO"))]  # `label` hooks

