"""Config validation names the key and the expected type; CLI errors exit with code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from polyfuse.config import apply_overrides, load_config
from polyfuse.errors import ConfigError
from polyfuse.pairs import PairsConfig
from polyfuse.registry import Registry


def test_wrong_type_names_key_and_type(tmp_path):
    path = tmp_path / "pairs.yaml"
    path.write_text("reward: rm\nsft_fraction: lots\n")
    with pytest.raises(ConfigError, match=r"sft_fraction: Input should be a valid number.*got 'lots'"):
        load_config(PairsConfig, path)


def test_unknown_and_missing_keys(tmp_path):
    from polyfuse.scorers import ScoreConfig

    path = tmp_path / "score.yaml"
    path.write_text("chunk_sise: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(ScoreConfig, path)
    assert "chunk_sise: unknown key" in str(err.value) and "scorers: required key is missing" in str(err.value)


def test_every_config_error_names_its_yaml_line_and_a_misspelt_key_the_key_meant(tmp_path):
    """The line of the key (a missing key: of the mapping that misses it), and "did you mean" from the keys the
    mapping at that place allows: nested sections, list items, a registry member chosen by its `type` (a
    scorer, a backend), a recipe; an override's value has no line in the file."""
    from polyfuse.scorers import ScoreConfig

    path = tmp_path / "score.yaml"
    path.write_text("scorers:\n"
                    "  - type: reward_model\n"
                    "    modle: {path: rm}\n"
                    "  - {type: math, domians: [math]}\n"
                    "  - {type: code, timeout: 3}\n"
                    "chunk_sise: 8\n"
                    "device: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(ScoreConfig, path)
    assert str(err.value).splitlines() == [
        f"{path}: invalid config",
        "  line 2: scorers.0.model: required key is missing",
        "  line 3: scorers.0.modle: unknown key; did you mean 'model'?",
        "  line 4: scorers.1.domians: unknown key; did you mean 'domains'?",
        "  line 5: scorers.2.timeout: unknown key; did you mean 'timeout_s'?",
        "  line 7: device: Input should be a valid string (got 3)",
        "  line 6: chunk_sise: unknown key; did you mean 'chunk_size'?",
    ]
    with pytest.raises(ConfigError) as err:
        load_config(ScoreConfig, path, ["chunk_sise=9", "device=cpu", "scorers.0.modle.path=x"])
    assert "  line 3: scorers.0.modle: unknown key; did you mean 'model'?" in str(err.value).splitlines()
    assert "  chunk_sise: unknown key; did you mean 'chunk_size'?" in str(err.value).splitlines()  # from --set
    path.write_text("scorers: [{type: math}]\nzzz: 1\n")
    with pytest.raises(ConfigError, match=r"line 2: zzz: unknown key \(the keys here: scorers, chunk_size, device\)$"):
        load_config(ScoreConfig, path)


def test_a_recipe_error_names_its_line_through_sources_backends_and_sections(tmp_path):
    from polyfuse.pipeline.recipe import load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text("name: t\n"
                    "sources:\n"
                    "  - name: a\n"
                    "    path: a\n"
                    "    backend: {type: vllm, tensor_paralel_size: 2}\n"
                    "    sampling: {temprature: 0.5}\n"
                    "pivot: {name: p, path: p}\n"
                    "prompts: {path: p.jsonl, limt: 3}\n"
                    "sample: {batch_sise: 4}\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert str(err.value).splitlines()[1:] == [
        "  line 5: sources.0.backend.tensor_paralel_size: unknown key; did you mean 'tensor_parallel_size'?",
        "  line 6: sources.0.sampling.temprature: unknown key; did you mean 'temperature'?",
        "  line 8: prompts.limt: unknown key; did you mean 'limit'?",
        "  line 9: sample.batch_sise: unknown key; did you mean 'batch_size'?",
    ]
    path.write_text("name: t\nsources: [{name: a, path: a}]\npivot: {name: p, path: p}\nprompts: {path: p.jsonl}\n"
                    "stages: [sample, prompts]\n")  # a check across keys: the line of the key it names first
    with pytest.raises(ConfigError, match=r"invalid config\n  line 5: stages must keep the order \['prompts', 'sample'"):
        load_recipe(path)


def test_overrides_parse_yaml_scalars_and_nested_keys(tmp_path):
    path = tmp_path / "pairs.yaml"
    path.write_text("reward: rm\n")
    cfg = load_config(
        PairsConfig, path, ["sft_fraction=0.25", "gap_window=[0.0, 2.5]", "pair_choice=largest_gap"]
    )
    assert (cfg.sft_fraction, cfg.gap_window, cfg.pair_choice) == (0.25, (0.0, 2.5), "largest_gap")
    assert apply_overrides({}, ["a.b.c=3"]) == {"a": {"b": {"c": 3}}}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["novalue"])


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("reward: rm\nsft_fraction: [0.5\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: not valid YAML"):
        load_config(PairsConfig, path)


def test_registry_unknown_name_lists_known():
    reg: Registry[int] = Registry("thing")
    reg.register("one")(1)
    with pytest.raises(ConfigError, match="unknown thing 'two'; expected one of: one"):
        reg.get("two")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("one")(2)


def test_registry_config_validator_picks_the_options_class_of_the_named_member():
    """The one validator behind `backend:` and `scorers:` fields: `type` picks the member's `Config`; a member
    registered after the field was defined validates too; a bare name only where `by_name`."""
    from typing import Annotated, Literal

    from pydantic import SerializeAsAny, WrapValidator

    from polyfuse.config import StrictModel, validate

    class Options(StrictModel):
        type: str

    class OneOptions(Options):
        type: Literal["one"] = "one"
        size: int = 1

    things: Registry[type] = Registry("thing")
    things.register("one")(type("One", (), {"Config": OneOptions}))

    class Holder(StrictModel):
        named: Annotated[SerializeAsAny[Options], WrapValidator(things.config_validator(Options, by_name=True))] = None
        mapped: Annotated[SerializeAsAny[Options], WrapValidator(things.config_validator(Options))] = None

    held = validate(Holder, {"named": "one", "mapped": {"type": "one", "size": 3}})
    assert (type(held.named), held.named.size, type(held.mapped), held.mapped.size) == (OneOptions, 1, OneOptions, 3)
    assert held.model_dump() == {"named": {"type": "one", "size": 1}, "mapped": {"type": "one", "size": 3}}
    assert Holder(named=held.mapped).named is held.mapped  # an options object is kept as it is

    class TwoOptions(Options):
        type: Literal["two"] = "two"

    things.register("two")(type("Two", (), {"Config": TwoOptions}))
    assert type(validate(Holder, {"mapped": {"type": "two"}}).mapped) is TwoOptions
    with pytest.raises(ConfigError, match=r"mapped: expected a mapping with a 'type' key \(one of: one, two\)"):
        validate(Holder, {"mapped": "one"})
    with pytest.raises(ConfigError, match=r"named: expected a thing name or a mapping with a 'type' key"):
        validate(Holder, {"named": 3})
    with pytest.raises(ConfigError, match=r"named: unknown thing 'three'; expected one of: one, two"):
        validate(Holder, {"named": "three"})
    with pytest.raises(ConfigError, match=r"mapped.sizes: unknown key"):
        validate(Holder, {"mapped": {"type": "one", "sizes": 2}})


def run_pairs_cli(polyfuse_cli, tmp_path, config: str, scored: str):
    (tmp_path / "pairs.yaml").write_text(config)
    (tmp_path / "scored.jsonl").write_text(scored)
    return polyfuse_cli("pairs", "--config", tmp_path / "pairs.yaml", "--scored", tmp_path / "scored.jsonl",
                        "--out", tmp_path / "out")


def test_cli_config_error_exits_2_without_traceback(polyfuse_cli, tmp_path):
    proc = run_pairs_cli(polyfuse_cli, tmp_path, "reward: rm\nsft_fraction: 3\n", "")
    assert proc.returncode == 2
    assert "sft_fraction: Input should be less than or equal to 1" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_cli_bad_data_row_exits_2_with_line(polyfuse_cli, tmp_path):
    proc = run_pairs_cli(polyfuse_cli, tmp_path, "reward: rm\n", '{"id": "x"}\n')
    assert proc.returncode == 2
    assert "scored.jsonl:1: field 'prompt': missing" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_cli_unknown_flag_exits_2(tmp_path):
    """As a process of its own: the installed entry point answers a bad flag with typer's usage error."""
    proc = subprocess.run([sys.executable, "-m", "polyfuse", "pairs", "--bogus"], capture_output=True, text=True)
    assert proc.returncode == 2 and "No such option" in proc.stderr
