"""YAML configs validated by pydantic, with CLI overrides.

Every stage and recipe config is a `StrictModel`: unknown keys are errors (a typo must not be silently
ignored), and any validation failure becomes a `ConfigError` that names the dotted key, the expected
type and the value given, before any model is loaded.
"""

from __future__ import annotations

from pathlib import Path
from types import UnionType
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from polyfuse.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


# The marker of a field that changes how a stage runs, not what it computes (a server's concurrency, timeout,
# retries, key, address): `Field(..., json_schema_extra=NOT_FINGERPRINTED)`. A stage's fingerprint leaves such
# fields out (`fingerprinted`), so changing one after a kill resumes the stage instead of starting it over.
NOT_FINGERPRINTED = {"fingerprint": False}


class StrictModel(BaseModel):
    """`recipe_only`: the keys only a recipe's section reads (a stage's config class is also the `--config`
    of its command, which refuses them rather than ignore them)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    recipe_only: ClassVar[tuple[str, ...]] = ()


def fingerprinted(model: BaseModel) -> dict[str, Any]:
    """`model`'s JSON dump without the fields marked `NOT_FINGERPRINTED`, at any depth: what a stage's
    fingerprint hashes."""
    return model.model_dump(mode="json", exclude=_not_fingerprinted(model))


def _not_fingerprinted(value: Any) -> dict | None:
    """The pydantic `exclude` of the marked fields in `value` (a model, or lists and mappings of them)."""
    if isinstance(value, BaseModel):
        items = ((name, getattr(value, name), field) for name, field in type(value).model_fields.items())
    elif isinstance(value, (list, tuple)):
        items = ((i, item, None) for i, item in enumerate(value))
    elif isinstance(value, dict):
        items = ((key, item, None) for key, item in value.items())
    else:
        return None
    exclude: dict[Any, Any] = {}
    for key, item, field in items:
        extra = getattr(field, "json_schema_extra", None)
        if isinstance(extra, dict) and extra.get("fingerprint") is False:
            exclude[key] = True
        elif (inner := _not_fingerprinted(item)) is not None:
            exclude[key] = inner
    return exclude or None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, expected a YAML config file")
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
    """Apply `a.b.c=value` overrides; values are parsed as YAML (`3`, `0.1`, `true`, `[1, 2]`). A number
    picks an item of a list: `sources.0.path=...`."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.learning_rate=1e-5")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {key!r}: {raw!r} is not a YAML value ({getattr(err, 'problem', err)})") from None
        node: Any = data
        parts = key.strip().split(".")
        for depth, part in enumerate(parts):
            where = ".".join(parts[:depth]) or "the config"
            if isinstance(node, list):
                if not (part.isdigit() and int(part) < len(node)):
                    raise ConfigError(f"override {key!r}: {where} is a list of {len(node)} items; {part!r} is not "
                                      f"an index of it (0 to {len(node) - 1})")
                part = int(part)
            elif not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {where} is a value, not a section")
            if depth == len(parts) - 1:
                node[part] = value
                break
            if isinstance(node, dict) and node.get(part) is None:
                node[part] = {}
            node = node[part]
    return data


def _describe(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "<root>"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{key}: unknown key"
    if kind == "missing":
        return f"{key}: required key is missing"
    message, given = err["msg"].removeprefix("Value error, "), repr(err.get("input"))
    if not err["loc"]:  # a check across keys: its message names them
        return message
    if given in message:
        return f"{key}: {message}"
    return f"{key}: {message} (got {given})"


def validate(model: type[M], data: dict[str, Any], source: str = "config") -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        raise ConfigError(f"{source}: invalid config\n  " + "\n  ".join(lines)) from None


def load_config(model: type[M], path: str | Path | None, overrides: list[str] | None = None) -> M:
    """A stage command's `--config` (with `--set` overrides), validated as the stage's config class."""
    data = apply_overrides(read_yaml(path) if path is not None else {}, overrides)
    source = config_source(path, overrides)
    for key in getattr(model, "recipe_only", ()):
        if key in data:
            raise ConfigError(f"{source}: {key}: only a recipe's section reads this key; remove it from a command's config")
    return validate(model, data, source=source)


def config_source(path: str | Path | None, overrides: list[str] | None) -> str:
    """How an error names a config: its file, and the `--set` overrides when there are any."""
    parts = [] if path is None else [str(path)]
    if overrides:
        parts.append("--set " + " ".join(overrides))
    return " with ".join(parts) or "config"


def annotated_yaml(model: type[BaseModel], variants: dict[type, list[type]] | None = None,
                   title: str | None = None, exclude: tuple[str, ...] = ()) -> str:
    """`model`'s keys as a YAML document of their defaults, each key preceded by a comment with its type,
    constraints, default and description (what `polyfuse config show` prints). Nested models are expanded
    (an optional one commented out); `variants` maps a base model to the concrete models a field may hold
    (e.g. one per scorer type), each shown as one list item. `title` (default: the model's docstring) heads
    the document; `exclude` leaves top-level keys out."""
    lines = _comment(title or _doc(model), "")
    _emit(model, lines, "", variants or {}, exclude)
    return "\n".join(lines) + "\n"


def _doc(model: type) -> str:
    return " ".join((model.__doc__ or "").split())


def _emit(model: type[BaseModel], lines: list[str], indent: str, variants: dict[type, list[type]],
          exclude: tuple[str, ...] = ()) -> None:
    for name, field in model.model_fields.items():
        if name in exclude:
            continue
        required = field.is_required()
        default = None if required else field.get_default(call_default_factory=True)
        nested = _model_in(field.annotation)
        head = f"{name}: {_type_text(field.annotation)}{_constraints(field.metadata)}"
        head += ", required" if required else (f", default {_flow(default)}" if nested is None or default is None else "")
        description = _description(model, name) or (_doc(nested) if nested is not None else "")
        lines += _comment(f"{head}. {description}".rstrip(". ") + ".", indent)
        if nested is None:
            lines.append(f"{indent}{name}: {'' if required else _flow(default)}".rstrip())
            continue
        block: list[str] = []
        if get_origin(_strip_annotated(field.annotation)) is list:
            for item in variants.get(nested, [nested]):
                block.append(f"{indent}  -" + (f"  # {_doc(item) or item.__name__}" if item is not nested else ""))
                _emit(item, block, indent + "    ", variants)
        else:
            _emit(nested, block, indent + "  ", variants)
        if default is None and not required:  # optional and off: its keys, commented out
            lines += [f"{indent}{name}: null", f"{indent}# {name}:", *(f"{indent}# {line[len(indent):]}" for line in block)]
        else:
            lines += [f"{indent}{name}:", *block]


def _description(model: type[BaseModel], name: str) -> str | None:
    """A field's description, else that of the field it overrides (a subclass that narrows a field's type
    or default, e.g. a scorer's `type`, keeps its base's description)."""
    for cls in model.__mro__:
        field = getattr(cls, "model_fields", {}).get(name)
        if field is not None and field.description:
            return field.description
    return None


def _comment(text: str, indent: str) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=108 - len(indent), initial_indent=f"{indent}# ", subsequent_indent=f"{indent}#   ")


def _flow(value: Any) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip().removesuffix("...").strip()


def _strip_annotated(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds (alone, optional, or as list items), else None."""
    annotation = _strip_annotated(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (list, Union, UnionType):
        found = [m for a in get_args(annotation) if a is not type(None) and (m := _model_in(a)) is not None]
        return found[0] if len(found) == 1 and len(get_args(annotation)) <= 2 else None
    return None


def _type_text(annotation: Any) -> str:
    annotation = _strip_annotated(annotation)
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin in (Union, UnionType):
        return " | ".join(_type_text(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is list:
        return f"list of {_type_text(args[0])}"
    if origin is tuple:
        return f"[{', '.join(_type_text(a) for a in args)}]"
    if origin is dict:
        return f"mapping of {_type_text(args[0])} to {_type_text(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _constraints(metadata: list[Any]) -> str:
    symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "length >="}
    found = [f"{symbols[k]} {getattr(m, k)}" for m in metadata for k in symbols if getattr(m, k, None) is not None]
    return f" ({', '.join(found)})" if found else ""
