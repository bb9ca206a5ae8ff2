"""docs/data-formats.md against the row schemas, and every YAML and JSONL example of README.md and docs/*.md
against what it claims to be: a recipe, a part of one, a merge config, a stage config, or rows of a schema.

Each example says what it is in the line before its fence (`<!-- example: KIND -->`; docs/configs.md's stage
examples start with `# config: STAGE`); an example that says nothing fails the test, so a new one cannot go
unchecked."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from polyfuse.cli.config_docs import stage_config
from polyfuse.config import _type_text, validate
from polyfuse.data.io import read_rows
from polyfuse.data.schemas import Message, PreferenceRow, PromptRow, SampleRow, SFTRow, UnpairedRow
from polyfuse.evaluation.datasets import load_gsm8k
from polyfuse.evaluation.evaluate import EvalRecord
from polyfuse.logprobs.engine import check_logp_columns
from polyfuse.merge.config import parse_merge_config
from polyfuse.pipeline.recipe import Recipe
from polyfuse.teacher.store import ARRAYS

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FORMATS = ROOT / "docs" / "data-formats.md"
SCHEMAS = {schema.__name__: schema for schema in (PromptRow, SampleRow, SFTRow, PreferenceRow, UnpairedRow, EvalRecord, Message)}
FENCE = re.compile(r"^```(yaml|yml|jsonl|json)\n(.*?)^```", re.S | re.M)
MARKER = re.compile(r"<!-- example: ([\w-]+) -->\s*$")
# What a part of a recipe leaves out, to validate it as a whole recipe.
RECIPE_REST = {"name": "example", "pivot": {"path": "org/pivot"}, "sources": [{"path": "org/source"}],
               "prompts": {"path": "prompts.jsonl"}, "stages": ["prompts", "sample"]}


def examples() -> list[tuple[str, str, str, str]]:
    """(where: page:line, kind, language, body) of every YAML / JSON / JSONL block."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for block in FENCE.finditer(text):
            line = text.count("\n", 0, block.start()) + 1
            before = text[: block.start()].rstrip("\n").rsplit("\n", 1)[-1]
            marker = MARKER.search(before)
            stage = re.match(r"# config: (\S+)\n", block.group(2))
            kind = marker.group(1) if marker else f"config:{stage.group(1)}" if stage else "unmarked"
            found.append((f"{page.relative_to(ROOT)}:{line}", kind, block.group(1), block.group(2)))
    return found


def check_example(where: str, kind: str, language: str, body: str, tmp_path: Path) -> None:
    if kind in SCHEMAS or kind == "gsm8k":
        assert language == "jsonl", f"{where}: rows are shown as jsonl"
        file = tmp_path / "rows.jsonl"
        file.write_text(body)
        if kind == "gsm8k":
            assert load_gsm8k(file)
            return
        rows = read_rows(file, SCHEMAS[kind])  # raises DataError naming the line
        assert len(rows) == len(body.strip().splitlines())
        if kind == "PreferenceRow":
            check_logp_columns(rows, "ref")
            check_logp_columns(rows, "fuse")
        return
    data = yaml.safe_load(body)
    if kind == "recipe":
        validate(Recipe, data, source=where)
    elif kind == "recipe-part":
        validate(Recipe, {**RECIPE_REST, **data}, source=where)
    elif kind == "merge":
        parse_merge_config(data, where)
    elif kind.startswith("config:"):
        stage = kind.removeprefix("config:")
        validate(stage_config(stage, recipe=stage == "eval"), data, source=where)
    else:
        raise AssertionError(f"{where}: a {language} example without `<!-- example: KIND -->` before it "
                             f"(recipe, recipe-part, merge, gsm8k or a row schema: {', '.join(SCHEMAS)})")


@pytest.mark.parametrize(("where", "kind", "language", "body"), examples(), ids=[e[0] for e in examples()])
def test_every_yaml_and_jsonl_example_validates(where, kind, language, body, tmp_path):
    check_example(where, kind, language, body, tmp_path)


def test_the_checks_catch_a_broken_example(tmp_path):
    """The README's old reward-model example (`path:` where the scorer wants `model: {path: ...}`) and a prompt
    row without its prompt are refused, and an example without a marker fails."""
    from polyfuse.errors import ConfigError, DataError

    broken = "score: {scorers: [{type: reward_model, path: my/reward-model}]}\n"
    with pytest.raises(ConfigError, match=r"score\.scorers\.0\.model: required key is missing"):
        check_example("README.md:1", "recipe-part", "yaml", broken, tmp_path)
    with pytest.raises(DataError, match=r"rows\.jsonl:2: field .prompt.: missing"):
        check_example("docs:1", "PromptRow", "jsonl", '{"id": "a", "prompt": "x"}\n{"id": "b"}\n', tmp_path)
    with pytest.raises(AssertionError, match="without `<!-- example: KIND -->`"):
        check_example("docs:1", "unmarked", "yaml", "a: 1\n", tmp_path)


def test_every_page_example_kind_is_found():
    """The examples this test relies on are there (a renamed marker would silently drop them)."""
    kinds = {kind for _, kind, _, _ in examples()}
    assert {"recipe", "recipe-part", "merge", "gsm8k", "PromptRow", "SampleRow", "SFTRow", "PreferenceRow",
            "UnpairedRow", "EvalRecord"} <= kinds


def _table(marker: str) -> list[list[str]]:
    """The rows of the table after `<!-- marker -->` in docs/data-formats.md, as cells."""
    text = FORMATS.read_text()
    start = text.index(f"<!-- {marker} -->")
    lines = text[start:].splitlines()[1:]
    rows = []
    for line in lines[2:]:  # after the header and its rule
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows


def _default(field) -> str:
    if field.is_required():
        return "required"
    return f"`{json.dumps(field.default_factory() if field.default_factory is not None else field.default)}`"


@pytest.mark.parametrize("schema", [PromptRow, SampleRow, SFTRow, PreferenceRow, UnpairedRow, EvalRecord],
                         ids=lambda s: s.__name__)
def test_the_field_tables_are_the_schemas(schema):
    """Each documented field table lists exactly the schema's fields, in order, with its type and default."""
    documented = [row[:3] for row in _table(f"fields: {schema.__name__}")]
    expected = [[f"`{name}`", _type_text(field.annotation).replace(" | ", " or "), _default(field)]
                for name, field in schema.model_fields.items()]
    assert documented == expected
    assert all(len(row) == 4 and row[3] for row in _table(f"fields: {schema.__name__}")), "every field has a meaning"


def test_the_teacher_table_is_the_store_layout():
    assert [row[0] for row in _table("arrays: teacher")] == ["`example_ids`", "`offsets`", *[f"`{a}`" for a in ARRAYS]]
