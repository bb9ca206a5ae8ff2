"""YAML configs validated by pydantic, with CLI overrides.

Every stage and recipe config is a `StrictModel`: unknown keys are errors (a typo must not be silently
ignored), and any validation failure becomes a `ConfigError` that names the dotted key, the expected
type and the value given, before any model is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from polyfuse.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """`recipe_only`: the keys only a recipe's section reads (a stage's config class is also the `--config`
    of its command, which refuses them rather than ignore them)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    recipe_only: ClassVar[tuple[str, ...]] = ()


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); save the file as UTF-8") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML scalars (`3`, `0.1`, `true`, `[1, 2]`)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.learning_rate=1e-5")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def _describe(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "<root>"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{key}: unknown key"
    if kind == "missing":
        return f"{key}: required key is missing"
    if not err["loc"]:  # a check across keys: the input is the whole config, the message says what is wrong
        return f"{key}: {err['msg'].removeprefix('Value error, ')}"
    given = err.get("input")
    return f"{key}: {err['msg']} (got {given!r})"


def validate(model: type[M], data: dict[str, Any], source: str = "config") -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        raise ConfigError(f"{source}: invalid config\n  " + "\n  ".join(lines)) from None


def load_config(model: type[M], path: str | Path | None, overrides: list[str] | None = None) -> M:
    """A stage command's `--config` (with `--set` overrides), validated as the stage's config class."""
    data = apply_overrides(read_yaml(path) if path is not None else {}, overrides)
    source = str(path or "config")
    for key in getattr(model, "recipe_only", ()):
        if key in data:
            raise ConfigError(f"{source}: {key}: only a recipe's section reads this key; remove it from a command's config")
    return validate(model, data, source=source)
