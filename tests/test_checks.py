"""Every model a recipe names, checked from its config and tokenizer files before the first stage (`polyfuse run
--check` does only that): a wrong reward-model head, a chat model without its template, a damaged GGUF, a
prompt no scorer can judge; each one line, exit code 2, in seconds, with no weight loaded and nothing written.
`polyfuse run` and the stage commands run the same checks."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from polyfuse.models import ModelSpec
from polyfuse.models.checks import check_model
from polyfuse.models.packaged import smollm2 as smollm2_gguf
from tiny_lm import build_tiny_model, build_tokenizer


@pytest.fixture(autouse=True)
def no_weights(monkeypatch):
    """Any attempt to load weights fails the test: the checks read config and tokenizer files only."""
    from transformers import PreTrainedModel

    def refuse(*args, **kwargs):
        raise AssertionError("a check loaded weights")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny causal LM, classifiers with one and two labels (config and tokenizer only: no weights are read),
    and chat-template variants of the tiny LM's tokenizer."""
    root = tmp_path_factory.mktemp("models")
    folders = {"lm": Path(build_tiny_model(root / "lm"))}
    for name, labels in (("rm", 1), ("classifier", 2)):
        folders[name] = root / name
        build_tokenizer().save_pretrained(folders[name])
        config = json.loads((folders["lm"] / "config.json").read_text())
        config.update(architectures=["LlamaForSequenceClassification"], id2label={str(i): f"LABEL_{i}" for i in range(labels)})
        (folders[name] / "config.json").write_text(json.dumps(config))
    for name, eos, template in (("chat-no-template", "<|end|>", None), ("base-no-template", "</s>", None),
                                ("broken-template", "</s>", "{{ raise_exception('only system turns') }}"),
                                ("no-prefix-template", "</s>",  # the prompt asks with "yes", the answer is after "no"
                                 "{% for m in messages %}{% if m['role'] == 'assistant' %}no {% endif %}{{ m['content'] }} "
                                 "{% endfor %}{% if add_generation_prompt %}yes {% endif %}")):
        folders[name] = root / name
        folders[name].mkdir()
        (folders[name] / "config.json").write_text((folders["lm"] / "config.json").read_text())
        tokenizer = build_tokenizer()
        tokenizer.eos_token, tokenizer.chat_template = eos, template
        tokenizer.save_pretrained(folders[name])
    return folders


def _recipe(tmp_path: Path, models: dict[str, Path], reward_model: str | Path | None = "rm", prompts=None,
            scorers=None, **sections) -> Path:
    prompts = prompts or [{"id": "q1", "prompt": "2 + 2 =", "domain": "math", "answer": "4"}]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in prompts))
    if scorers is None:
        scorers = [{"type": "math"}]
        if reward_model is not None:
            scorers.insert(0, {"type": "reward_model", "name": "rm", "model": {"name": "rm", "path": str(models.get(reward_model, reward_model))}})
    recipe = {"name": "check", "work_dir": str(tmp_path / "work"), "sources": [{"name": "a", "path": str(models["lm"])}],
              "pivot": {"name": "p", "path": str(models["lm"])}, "prompts": {"path": str(tmp_path / "prompts.jsonl")},
              "stages": ["prompts", "sample", "score"], "score": {"scorers": scorers}, **sections}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_check_passes_a_right_recipe_listing_what_it_checked(polyfuse_cli, models, tmp_path):
    result = polyfuse_cli("run", "--check", _recipe(tmp_path, models))
    assert result.returncode == 0, result.stderr
    assert "checked 3 models from their config and tokenizer files (no weights loaded)" in result.stdout
    assert f"✓ sources.0 (a): {models['lm']}: causal LM llama (LlamaForCausalLM), tokenizer of 31 tokens, chat template" \
        in result.stdout
    assert f"✓ score.scorers.0.model (rm): {models['rm']}: sequence classifier llama (LlamaForSequenceClassification), " \
           "1 output" in result.stdout
    assert "✓ prompts: every prompt is judged by score.scorers" in result.stdout
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize(("reward_model", "message"), [
    ("lm", "not a reward model: LlamaForCausalLM has no sequence-classification head, so transformers would put a "
           "new, untrained one with 2 outputs on it"),
    ("classifier", "a reward model needs num_labels=1, got 2 (LABEL_0, LABEL_1)"),
])
def test_check_catches_a_wrong_reward_model_head_in_seconds(polyfuse_cli, models, tmp_path, reward_model, message):
    started = time.perf_counter()
    result = polyfuse_cli("run", "--check", _recipe(tmp_path, models, reward_model))
    elapsed = time.perf_counter() - started
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: score.scorers.0.model (rm): {message}; a reward model is "
                                                  "a sequence classifier with one output (config.json: architectures "
                                                  "[*ForSequenceClassification], num_labels 1)"]
    assert f"✗ score.scorers.0.model (rm): {models[reward_model]}" in result.stdout
    assert elapsed < 30, f"--check took {elapsed:.1f}s"
    assert not (tmp_path / "work").exists()


def test_an_instruct_gguf_as_reward_model_is_refused_before_the_first_stage(polyfuse_cli, models, tmp_path):
    """The first hour's mistake: an instruct GGUF given as the reward model. `run` refuses it before any stage
    (no work folder, no stage folder); `--check` says the same; so does the `score` command."""
    recipe = _recipe(tmp_path, models, smollm2_gguf())
    expected = ("error: score.scorers.0.model (rm): not a reward model: a GGUF file holds a language model (llama) and "
                "no reward head")
    for args in (("run", recipe), ("run", "--check", recipe)):
        result = polyfuse_cli(*args)
        assert result.returncode == 2 and result.stderr.startswith(expected), result.stderr
        assert not (tmp_path / "work").exists()
    score = tmp_path / "score.yaml"
    score.write_text(yaml.safe_dump({"scorers": [{"type": "reward_model", "model": {"path": str(smollm2_gguf())}}]}))
    (tmp_path / "samples.jsonl").write_text(json.dumps({"id": "s", "prompt": "hi", "prompt_id": "p", "model": "m",
                                                        "sample_index": 0, "response": "ok"}) + "\n")
    result = polyfuse_cli("score", "-c", score, "--samples", tmp_path / "samples.jsonl", "-o", tmp_path / "out")
    assert result.returncode == 2 and "scorers.0.model (SmolLM2-135M-Instruct.Q4_1): not a reward model" in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_same_gguf_as_a_source_passes_with_its_chat_template():
    check = check_model(ModelSpec(path=str(smollm2_gguf())), where="sources.0")
    assert check.problems == [] and check.found == ["GGUF llama, 272 tensors", "chat template"]


def test_a_chat_model_without_its_template_is_an_error_a_base_model_without_one_is_not(models):
    check = check_model(ModelSpec(path=str(models["chat-no-template"])), where="sources.0")
    assert check.problems == [
        "no chat template, but its end-of-sequence token '<|end|>' ends a chat turn: a chat model whose template is "
        "missing (a GGUF without tokenizer.chat_template, a folder without chat_template.jinja or a chat_template in "
        "tokenizer_config.json); polyfuse would prompt it in its plain 'User: ... Assistant:' format. Add the model's "
        "chat template"]
    base = check_model(ModelSpec(path=str(models["base-no-template"])))
    assert base.problems == [] and base.found[-1] == "no chat template (polyfuse's plain format)"
    # a merge input is never prompted: no template needed
    assert check_model(ModelSpec(path=str(models["chat-no-template"])), chat=False).problems == []


def test_a_chat_template_that_fails_on_a_conversation_is_an_error(models):
    check = check_model(ModelSpec(path=str(models["broken-template"])))
    assert check.problems == ["its chat template fails on a user/assistant conversation: only system turns"]


def test_a_template_whose_prompt_does_not_start_the_conversation_is_a_warning(polyfuse_cli, models, tmp_path):
    check = check_model(ModelSpec(path=str(models["no-prefix-template"])), where="sources.0")
    assert check.problems == [] and check.warnings == [
        "its chat template does not render the prompt as the start of the conversation, so polyfuse prompts and "
        "scores this model in its plain 'User: ... Assistant:' format"]
    recipe = _recipe(tmp_path, models)
    recipe.write_text(recipe.read_text().replace(f"path: {models['lm']}", f"path: {models['no-prefix-template']}", 1))
    result = polyfuse_cli("run", "--check", recipe)
    assert result.returncode == 0
    assert "warning: sources.0 (a): its chat template does not render the prompt as the start" in result.stderr


def test_a_missing_chat_template_where_required_stops_run_check(polyfuse_cli, models, tmp_path):
    recipe = _recipe(tmp_path, models)
    data = yaml.safe_load(recipe.read_text())
    data["sources"][0]["path"] = str(models["chat-no-template"])
    recipe.write_text(yaml.safe_dump(data))
    result = polyfuse_cli("run", "--check", recipe)
    assert result.returncode == 2
    assert result.stderr.startswith("error: sources.0 (a): no chat template, but its end-of-sequence token '<|end|>'")


def test_a_damaged_gguf_is_refused_from_its_header(tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    whole = smollm2_gguf().read_bytes()
    for name, content in (("cut-in-metadata.gguf", whole[:1_000_000]), ("cut-in-tensors.gguf", whole[:-1000]),
                          ("garbage.gguf", b"GGUF" + bytes(range(200)))):
        (tmp_path / name).write_bytes(content)
        check = check_model(ModelSpec(path=str(tmp_path / name)))
        assert len(check.problems) == 1
        assert check.problems[0].startswith(f"{tmp_path / name}: not a readable GGUF file, truncated or damaged (ValueError: ")
    writer = GGUFWriter(str(tmp_path / "rwkv.gguf"), "rwkv6")  # a real GGUF of an architecture transformers cannot load
    writer.add_tensor("x", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    check = check_model(ModelSpec(path=str(tmp_path / "rwkv.gguf")), chat=False)
    assert check.found == ["GGUF rwkv6, 1 tensors"]
    assert check.problems[0].startswith(f"{tmp_path / 'rwkv.gguf'}: transformers' GGUF loader does not support the "
                                        "architecture 'rwkv6' (it reads ")


def test_a_classifier_given_as_a_source_is_refused(models):
    check = check_model(ModelSpec(path=str(models["rm"])), where="sources.0")
    assert check.problems == ["it is a sequence classifier (LlamaForSequenceClassification), not a language model that "
                              "generates; a reward model goes under score.scorers as {type: reward_model, model: {path: ...}}"]


def test_an_unknown_model_type_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "llama9", "architectures": ["Llama9ForCausalLM"]}))
    check = check_model(ModelSpec(path=str(tmp_path / "m")))
    assert len(check.problems) == 1 and check.problems[0].startswith(
        "cannot read its config: The checkpoint you are trying to load has model type `llama9`")


@pytest.mark.parametrize(("prompts", "scorers", "message"), [
    ([{"id": "q1", "prompt": "2 + 2 =", "domain": "math", "answer": "4"}, {"id": "q2", "prompt": "3 + 3 =", "domain": "math"}],
     [{"type": "math"}], "1 of 2 prompts cannot be judged by score.scorers and would be scored as nothing; the first, "
                         "id 'q2' (domain 'math'): math needs the row's `answer`."),
    ([{"id": "q1", "prompt": "Write a poem", "domain": "poetry"}], [{"type": "math"}, {"type": "code"}],
     "1 of 1 prompts cannot be judged by score.scorers and would be scored as nothing; the first, id 'q1' (domain "
     "'poetry'): math judges the domains math only; code judges the domains code only."),
])
def test_a_prompt_no_scorer_can_judge_is_reported_before_sampling(polyfuse_cli, models, tmp_path, prompts, scorers, message):
    recipe = _recipe(tmp_path, models, prompts=prompts, scorers=scorers)
    result = polyfuse_cli("run", recipe)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: prompts: {message} Give such prompts what a scorer needs"), result.stderr
    assert not (tmp_path / "work").exists()
    judged = [{**row, "answer": "4"} for row in prompts]  # a reward model judges every domain
    rm = [{"type": "reward_model", "model": {"path": str(models["rm"])}}, *scorers]
    assert polyfuse_cli("run", "--check", _recipe(tmp_path, models, prompts=judged, scorers=rm)).returncode == 0


def test_an_eval_prompt_no_verifier_judges_stops_the_run_before_its_first_stage(polyfuse_cli, models, tmp_path):
    (tmp_path / "held.jsonl").write_text(json.dumps({"id": "h1", "prompt": "6 * 7 =", "domain": "math"}) + "\n")
    recipe = _recipe(tmp_path, models, stages=["prompts", "sample", "score", "eval"],
                     eval={"prompts": {"path": str(tmp_path / "held.jsonl")}, "models": ["pivot"]})
    result = polyfuse_cli("run", recipe)
    assert result.returncode == 2
    assert result.stderr.startswith("error: eval.prompts: 1 of 1 prompts cannot be judged by the verifiers of "
                                    "eval.scorers and would be scored as nothing; the first, id 'h1' (domain 'math'): "
                                    "math needs the row's `answer`."), result.stderr


def test_a_bad_prompts_file_leaves_nothing_behind(polyfuse_cli, models, tmp_path):
    recipe = _recipe(tmp_path, models)
    (tmp_path / "prompts.jsonl").write_text('{"id": "q1", "prompt": "2 + 2 =", "answer": "4"}\n{"id": "q2"}\n')
    result = polyfuse_cli("run", recipe)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: prompts: {tmp_path / 'prompts.jsonl'}:2: field 'prompt': missing"
    assert not (tmp_path / "work").exists()  # no recipe.resolved.yaml, no prompts/manifest.json


def test_a_merge_input_path_is_checked_before_the_first_stage(polyfuse_cli, models, tmp_path):
    merge = {"merge_method": "linear", "models": [{"model": "pivot", "parameters": {"weight": 0.5}},
                                                  {"model": str(tmp_path / "none"), "parameters": {"weight": 0.5}}]}
    recipe = _recipe(tmp_path, models, stages=["prompts", "merge"], merge=merge)
    result = polyfuse_cli("run", "--check", recipe)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: merge (none): {tmp_path / 'none'}: no such folder"


def test_a_model_named_in_several_sections_is_checked_once_where_it_is_named_first(models, tmp_path):
    """The sections that copy the sources (sample, teacher, logprobs) name no model twice; the pivot, a model of
    its own name on the same folder, is listed (and checked) on its own line."""
    from polyfuse.models.checks import models_in
    from polyfuse.pipeline.recipe import load_recipe

    recipe = load_recipe(_recipe(tmp_path, models, stages=["prompts", "sample", "score", "pairs", "teacher", "logprobs"],
                                 sample={"include_pivot": True}, pairs={"reward": "rm"}, teacher={},
                                 logprobs={"sources": True}))
    sections = {name: getattr(recipe, name) for name in recipe.stages}
    found = [(where, spec.label, task) for where, spec, task in models_in({"sources": recipe.sources, "pivot": recipe.pivot,
                                                                           **sections})]
    assert found == [("sources.0", "a", "causal-lm"), ("pivot", "p", "causal-lm"),
                     ("score.scorers.0.model", "rm", "sequence-classification")]


def test_an_eval_gold_answer_math_verify_cannot_read_stops_the_run_before_its_first_stage(polyfuse_cli, models, tmp_path):
    """eval's own pre-model checks run with the recipe's, not after training (an empty gold answer too)."""
    rows = [{"id": "h1", "prompt": "6 * 7 =", "domain": "math", "answer": "42"},
            {"id": "h2", "prompt": "2 + 3 =", "domain": "math", "answer": "   "}]
    (tmp_path / "held.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = _recipe(tmp_path, models, stages=["prompts", "sample", "score", "eval"],
                     eval={"prompts": {"path": str(tmp_path / "held.jsonl")}, "models": ["pivot"]})
    result = polyfuse_cli("run", "--check", recipe)
    assert result.returncode == 2
    assert "error: eval.prompts: " in result.stderr and "h2" in result.stderr and "empty gold answer" in result.stderr
    assert not (tmp_path / "work").exists()
