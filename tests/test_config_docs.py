"""`polyfuse config show STAGE` and docs/configs.md: the annotated YAML is generated from the config classes
and is valid YAML holding every key with its default; every documented example validates against its
stage's config, so the docs cannot drift from the code."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Literal

import pytest
import yaml
from pydantic import Field

from polyfuse.cli.config_docs import stage_config, stage_config_yaml, stage_names
from polyfuse.config import StrictModel, _description, _model_in, annotated_yaml, validate

DOCS = Path(__file__).parents[1] / "docs" / "configs.md"
EXAMPLES_REQUIRED = ["prompts", "sample", "score", "pairs", "logprobs", "consensus", "teacher", "sft", "distill",
                     "onpolicy", "transplant", "po", "upo", "eval"]


class Inner(StrictModel):
    """An inner block."""

    k: int = Field(default=3, ge=1, description="A count.")


class Outer(StrictModel):
    """The outer config."""

    name: str = Field(description="Its name.")
    mode: Literal["a", "b"] = Field(default="a", description="A or B.")
    inner: Inner = Field(default_factory=Inner)
    extra: Inner | None = None


def test_annotated_yaml_by_hand():
    assert annotated_yaml(Outer) == (
        "# The outer config.\n"
        "# name: str, required. Its name.\n"
        "name:\n"
        "# mode: one of a, b, default a. A or B.\n"
        "mode: a\n"
        "# inner: mapping. An inner block.\n"
        "inner:\n"
        "  # k: int (>= 1), default 3. A count.\n"
        "  k: 3\n"
        "# extra: mapping | null, default null. An inner block.\n"
        "extra: null\n"
        "# extra:\n"
        "#   # k: int (>= 1), default 3. A count.\n"
        "#   k: 3\n"
    )


def _examples() -> list[tuple[str, dict]]:
    """`# config: STAGE` YAML blocks of docs/configs.md (a stage may have several)."""
    blocks = re.findall(r"```yaml\n# config: (\S+)\n(.*?)```", DOCS.read_text(), flags=re.S)
    return [(stage, yaml.safe_load(body)) for stage, body in blocks]


def test_the_docs_have_one_example_per_stage_and_each_validates():
    examples = _examples()
    assert sorted({stage for stage, _ in examples}) == sorted(EXAMPLES_REQUIRED)
    for stage, values in examples:
        config = validate(stage_config(stage, recipe=stage == "eval"), values, source=f"docs/configs.md: {stage}")
        assert config.model_dump(exclude_unset=True).keys() == values.keys()


@pytest.mark.parametrize("stage", stage_names())
def test_config_show_is_yaml_with_every_key_and_its_default(stage):
    model = stage_config(stage)
    text = stage_config_yaml(stage)
    values = yaml.safe_load(text) or {}
    keys = [name for name in model.model_fields if name not in getattr(model, "recipe_only", ())]
    assert list(values) == keys  # a command's config: without the keys only a recipe reads
    for name, field in model.model_fields.items():
        if name not in keys:
            continue
        assert re.search(rf"^# {name}: ", text, flags=re.M), name  # each key's comment: type, default, meaning
        if not field.is_required() and _model_in(field.annotation) is None:
            default = field.get_default(call_default_factory=True)
            assert values[name] == (list(default) if isinstance(default, tuple) else default), name
    if stage != "prompts" and not any(f.is_required() for f in model.model_fields.values()):  # prompts: a path or
        # the toy world. The printed defaults are a valid config as they are (an objective's: for `train NAME`).
        trainer = next((c for c in (stage_config("po"), stage_config("upo")) if issubclass(model, c)), model)
        validate(trainer, values, source=stage)


def test_every_key_of_every_stage_is_described():
    missing, seen = [], set()

    def walk(model):
        if model in seen:
            return
        seen.add(model)
        for name, field in model.model_fields.items():
            nested = _model_in(field.annotation)
            if nested is not None:
                walk(nested)
            elif not _description(model, name):
                missing.append(f"{model.__name__}.{name}")

    for stage in stage_names():
        walk(stage_config(stage))
        walk(stage_config(stage, recipe=True))
    assert missing == []


def _commented_blocks(text: str, key: str) -> list[dict]:
    """The commented-out `# KEY:` blocks of `config show`'s output, each uncommented and read as YAML."""
    lines, blocks = text.splitlines(), []
    for i, line in enumerate(lines):
        if (found := re.fullmatch(rf"( *)# {key}:", line)) is not None:
            indent = found.group(1)
            inside = f"{indent}#   "
            body = [line, *itertools.takewhile(lambda x, inside=inside: x.startswith(inside), lines[i + 1:])]
            blocks.append(yaml.safe_load("\n".join(x[len(indent) + 2:] for x in body))[key])
    return blocks


def test_config_show_lists_every_backend_with_its_options_and_defaults():
    from polyfuse.sampling import BACKENDS
    from polyfuse.sampling.openai_backend import OpenAISettings
    from polyfuse.sampling.vllm_backend import VllmSettings
    from polyfuse.scorers import SCORERS

    text = stage_config_yaml("sample")
    assert yaml.safe_load(text)["models"][0]["backend"] == "transformers"  # the default, as a value
    assert re.search(r"^    # backend: mapping, default transformers\. ", text, flags=re.M)
    blocks = _commented_blocks(text, "backend")  # one per backend type, every key with its default
    assert [b["type"] for b in blocks] == BACKENDS.names() and {"openai", "transformers", "vllm"} <= set(BACKENDS.names())
    for block in blocks:  # each registered backend's own keys and defaults (a new backend is checked the same way)
        defaults = BACKENDS.get(block["type"]).Config.model_fields
        assert set(block) == set(defaults), block["type"]
    openai, vllm = (next(b for b in blocks if b["type"] == name) for name in ("openai", "vllm"))
    assert vllm["tensor_parallel_size"] == 1 and "    #   tensor_parallel_size: 1" in text.splitlines()
    assert vllm == VllmSettings().model_dump(mode="json")
    assert openai["base_url"] is None and "    #   base_url:" in text.splitlines()  # required: no default
    served = {**openai, "base_url": "http://127.0.0.1:8000/v1"}
    assert OpenAISettings.model_validate(served).model_dump(mode="json") == served
    logprobs = stage_config_yaml("logprobs")  # the section's own backend is off (null); each type commented out
    assert yaml.safe_load(logprobs)["backend"] is None
    assert [b["type"] for b in _commented_blocks(logprobs, "backend")] == BACKENDS.names() * 3
    # eval's optional list of scorers: every registered scorer type (tests register their own too), not the base
    # class's keys alone
    scorers = [s["type"] for s in _commented_blocks(stage_config_yaml("eval"), "scorers")[0]]
    assert scorers == SCORERS.names() and {"code", "math", "reward_model", "toyworld"} <= set(scorers)


@pytest.mark.parametrize("stage", ["sample", "logprobs", "teacher", "sft", "distill", "po"])
def test_a_section_copied_from_config_show_recipe_validates_in_a_recipe(stage):
    """`config show STAGE --recipe` shows the keys a recipe fills (its sources, its seed) commented out, and
    leaves out those a recipe must not give (logprobs' pivot): the printed section is a valid recipe section,
    and the recipe fills the rest."""
    from polyfuse.pipeline.context import STAGES
    from polyfuse.pipeline.recipe import Recipe

    text = stage_config_yaml(stage, recipe=True)
    section = yaml.safe_load(text)
    fills = STAGES.get(stage)().recipe_fills()
    assert set(section) == set(STAGES.get(stage).section.model_fields) - set(fills)
    for key, words in fills.items():
        if words is None:  # not the recipe's to give: not shown at all
            assert not re.search(rf"^#? ?{key}:", text, flags=re.M), key
        else:  # described, with where its value comes from, and commented out
            assert re.search(rf"^# {key}: .*, in a recipe default ", text, flags=re.M) and f"\n# {key}:" in text
    recipe = validate(Recipe, {
        "name": "t", "seed": 5, "sources": [{"name": "a", "path": "a"}, {"name": "b", "path": "b"}],
        "pivot": {"name": "p", "path": "p"}, "prompts": {"path": "p.jsonl"}, "score": {"scorers": [{"type": "math"}]},
        "pairs": {"reward": "rm"}, "teacher": {}, "stages": ["prompts"], stage: section,
    })
    filled = getattr(recipe, stage)
    assert getattr(filled, "seed", 5) == 5  # the recipe's seed, where the section has one
    if stage in ("sample", "teacher", "logprobs"):  # the recipe's sources
        assert [m.label for m in getattr(filled, "sources" if stage == "logprobs" else "models")] == ["a", "b"]


def test_config_show_recipe_marks_what_the_recipe_fills():
    sample = stage_config_yaml("sample", recipe=True)
    assert "# models: list of mapping (length >= 1), in a recipe default the recipe's sources (and its pivot, with" in sample
    assert "# seed: int, in a recipe default the recipe's seed." in sample and "\n# seed: 0\n" in sample
    assert not re.search(r"^# models: .*required", sample, flags=re.M)  # the recipe gives them
    logprobs = stage_config_yaml("logprobs", recipe=True)
    assert "# sources: list of mapping, in a recipe default true: the recipe's sources, each with its own backend" in logprobs
    assert not re.search(r"^#? ?pivot:", logprobs, flags=re.M)
    assert re.search(r"^pivot:", stage_config_yaml("logprobs"), flags=re.M)  # a command's config names its M0


def test_design_names_each_registry_with_the_package_where_its_built_in_members_live():
    """docs/design.md's list of registries: every registry with the package it imports, and every member that
    polyfuse itself registers is a module of that package (nothing depends on a side import)."""
    from polyfuse.merge.methods.base import MERGE_METHODS
    from polyfuse.objectives.base import OBJECTIVES
    from polyfuse.objectives.distill import DISTILL_OBJECTIVES
    from polyfuse.pipeline.context import STAGES
    from polyfuse.sampling.base import BACKENDS
    from polyfuse.scorers.base import SCORERS

    registries = {"OBJECTIVES": OBJECTIVES, "DISTILL_OBJECTIVES": DISTILL_OBJECTIVES, "SCORERS": SCORERS,
                  "MERGE_METHODS": MERGE_METHODS, "STAGES": STAGES, "BACKENDS": BACKENDS}
    design = " ".join((DOCS.parent / "design.md").read_text().split())
    bullet = design[design.index("**Registries**"):]
    bullet = bullet[: bullet.index(" - **")]
    for name, registry in registries.items():
        assert re.search(rf"`{name}`[^;]*: `{re.escape(registry.package)}`", bullet), name
        members = {n: registry.get(n).__module__ for n in registry.names()}
        outside = {n: m for n, m in members.items() if m.startswith("polyfuse.") and not m.startswith(f"{registry.package}.")}
        assert members and outside == {}, name
