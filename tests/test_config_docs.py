"""`polyfuse config show STAGE` and docs/configs.md: the annotated YAML is generated from the config classes
and is valid YAML holding every key with its default; every documented example validates against its
stage's config, so the docs cannot drift from the code."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import pytest
import yaml
from pydantic import Field

from polyfuse.cli.config_docs import stage_config, stage_config_yaml, stage_names
from polyfuse.config import StrictModel, _description, _model_in, annotated_yaml, validate

DOCS = Path(__file__).parents[1] / "docs" / "configs.md"
EXAMPLES_REQUIRED = ["sample", "score", "pairs", "logprobs", "teacher", "sft", "distill", "po", "eval"]


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


def _examples() -> dict[str, dict]:
    """`# config: STAGE` YAML blocks of docs/configs.md."""
    blocks = re.findall(r"```yaml\n# config: (\S+)\n(.*?)```", DOCS.read_text(), flags=re.S)
    return {stage: yaml.safe_load(body) for stage, body in blocks}


def test_the_docs_have_one_example_per_stage_and_each_validates():
    examples = _examples()
    assert sorted(examples) == sorted(EXAMPLES_REQUIRED)
    for stage, values in examples.items():
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
        validate(stage_config("po") if issubclass(model, stage_config("po")) else model, values, source=stage)


def test_every_key_of_every_stage_is_described():
    """Merge configs follow mergekit's documentation and are left out."""
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
        if stage != "merge":
            walk(stage_config(stage))
            walk(stage_config(stage, recipe=True))
    assert missing == []
