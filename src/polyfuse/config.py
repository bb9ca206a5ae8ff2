"""YAML configs validated by pydantic, with CLI overrides.

Every stage and recipe config is a `StrictModel`: unknown keys are errors (a typo must not be silently
ignored, and the closest allowed key is suggested), and any validation failure becomes a `ConfigError` that
names the file's line, the dotted key, the expected type and the value given, before any model is loaded.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator
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

    model_config = ConfigDict(extra="forbid", validate_assignment=True, defer_build=True)
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


class YamlMapping(dict):
    """A config file's top-level mapping that remembers the line of every key and list item (`lines`: the
    key's path, as pydantic reports a location, -> line number), so that a validation error names its line.
    `apply_overrides` forgets the lines of what it replaces."""

    def __init__(self, data: dict[str, Any], lines: dict[tuple, int]):
        super().__init__(data)
        self.lines = lines


for _dumper in (yaml.SafeDumper, yaml.Dumper):  # it dumps as the plain mapping it is
    _dumper.add_representer(YamlMapping, yaml.representer.SafeRepresenter.represent_dict)


def _node_lines(node: yaml.Node, path: tuple = ()) -> Iterator[tuple[tuple, int]]:
    """(path, line) of every mapping key and list item under a composed YAML node."""
    if isinstance(node, yaml.MappingNode):
        children = [((*path, key.value), key, value) for key, value in node.value]
    elif isinstance(node, yaml.SequenceNode):
        children = [((*path, i), item, item) for i, item in enumerate(node.value)]
    else:
        children = []
    for where, marked, value in children:
        yield where, marked.start_mark.line + 1
        yield from _node_lines(value, where)


def _load_yaml(text: str) -> tuple[Any, dict[tuple, int]]:
    """The document and the line of every key and item, from one parse."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        return (None, {}) if node is None else (loader.construct_document(node), dict(_node_lines(node)))
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file's top-level mapping (a `YamlMapping`, which knows its lines)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, expected a YAML config file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data, lines = _load_yaml(path.read_text(encoding="utf-8"))
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
    return YamlMapping(data, lines)


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
        _forget_lines(data, tuple(int(p) if p.isdigit() else p for p in parts))
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


def _forget_lines(data: Any, path: tuple) -> None:
    """An override replaces the value at `path`: the file's lines of it and of everything under it no longer apply."""
    lines = getattr(data, "lines", None)
    if lines is not None:
        for where in [w for w in lines if w[: len(path)] == path]:
            del lines[where]


def _describe(err: dict[str, Any], model: type[BaseModel], data: Any) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "<root>"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{key}: unknown key{_suggestion(model, data, err['loc'])}"
    if kind == "missing":
        return f"{key}: required key is missing"
    message, given = err["msg"].removeprefix("Value error, "), repr(err.get("input"))
    if not err["loc"]:  # a check across keys: its message names them
        return message
    if given in message:
        return f"{key}: {message}"
    return f"{key}: {message} (got {given})"


def _leading_key(message: str) -> tuple:
    """The key a check across keys names first (`eval.models: ...`, `stages must keep ...`), as a location."""
    first = message.removeprefix("Value error, ").split(":", 1)[0].split(" ", 1)[0]
    return tuple(int(part) if part.isdigit() else part for part in first.split("."))


def _line(lines: dict[tuple, int], loc: tuple) -> int | None:
    """The line of the key at `loc`, else of the nearest key above it that the file has (a missing key: the
    mapping that misses it)."""
    for depth in range(len(loc), 0, -1):
        if loc[:depth] in lines:
            return lines[loc[:depth]]
    return None


def _suggestion(model: type[BaseModel], data: Any, loc: tuple) -> str:
    """"; did you mean 'x'?" for an unknown key close to an allowed one, else the allowed keys when few."""
    allowed = _keys_at(model, data, loc[:-1])
    if not allowed:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f" (the keys here: {', '.join(allowed)})" if len(allowed) <= 12 else ""


def _keys_at(model: type[BaseModel], data: Any, path: tuple) -> list[str]:
    """The keys allowed in the mapping at `path` of `data` validated as `model` ([] when not known): the
    annotations are followed down the path, a registry's field (a scorer, a backend) by the mapping's `type`."""
    annotation, node = model, data
    for part in path:
        annotation = _concrete(annotation, node)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            fields = {info.alias or name: info for name, info in annotation.model_fields.items()}
            if part not in fields:
                return []
            info = fields[part]  # pydantic keeps a field's `Annotated` validators apart from its type
            annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        elif get_origin(annotation) in (list, tuple) and isinstance(part, int):
            annotation = get_args(annotation)[0]
        elif get_origin(annotation) is dict:
            annotation = get_args(annotation)[1]
        else:
            return []
        node = node[part] if isinstance(node, dict | list) and (isinstance(node, dict) or part < len(node)) else None
    annotation = _concrete(annotation, node)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [info.alias or name for name, info in annotation.model_fields.items()]
    return []


def _concrete(annotation: Any, node: Any) -> Any:
    """The model or container type that validates `node`: the member of a union that fits it, a registry's
    member class for a mapping with `type` (the wrap validator made by `Registry.config_validator`)."""
    while get_origin(annotation) is Annotated:
        for meta in annotation.__metadata__:
            registry = getattr(getattr(meta, "func", None), "registry", None)
            if registry is not None and isinstance(node, dict) and node.get("type") in registry:
                return registry.get(node["type"]).Config
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        wanted = dict if isinstance(node, dict) else list if isinstance(node, list) else None
        for member in members:
            plain = _strip_annotated(member)
            if (wanted is dict and isinstance(plain, type) and issubclass(plain, BaseModel)) or \
                    (wanted is list and get_origin(plain) is list):
                return _concrete(member, node)
        return members[0] if len(members) == 1 else annotation
    return annotation


# The validation context's key for the places (locations, as tuples) that a validator filled with values
# copied from elsewhere in the same config (a recipe's sources into its sample section): errors inside them
# are the errors of the originals, which report them, so `validate` leaves them out.
COPIED = "copied"


def validate(model: type[M], data: dict[str, Any], source: str = "config") -> M:
    context: dict[str, set[tuple]] = {COPIED: set()}
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        errors = [e for e in exc.errors() if not any(tuple(e["loc"][: len(c)]) == c for c in context[COPIED])]
        lines = getattr(data, "lines", {})
        described = []
        for error in errors or exc.errors():
            line = _line(lines, tuple(error["loc"]) or _leading_key(error["msg"]))
            described.append(("" if line is None else f"line {line}: ") + _describe(error, model, data))
        raise ConfigError(f"{source}: invalid config\n  " + "\n  ".join(described)) from None


def load_config(model: type[M], path: str | Path | None, overrides: list[str] | None = None,
                fixed: dict[str, Any] | None = None, command: str = "this command") -> M:
    """A stage command's `--config` (with `--set` overrides), validated as the stage's config class. `fixed`:
    the values the command itself sets (`train dpo`: the objective); a config that says otherwise is refused."""
    data = apply_overrides(read_yaml(path) if path is not None else {}, overrides)
    source = config_source(path, overrides)
    for key, value in (fixed or {}).items():
        if data.setdefault(key, value) != value:
            raise ConfigError(f"{source}: {key} is {data[key]!r} but the command is `{command}`")
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


def walk_config(node: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    """Every value inside a config (pydantic models, mappings, lists), each with where it sits
    (`sample.models[0].path`), the node itself first: the one walk behind the checks of a recipe's models
    and data files and the model paths a stage hashes."""
    yield where, node
    if isinstance(node, BaseModel):
        children = [(f"{where}.{name}" if where else name, getattr(node, name)) for name in type(node).model_fields]
    elif isinstance(node, dict):
        children = [(f"{where}.{key}" if where else str(key), value) for key, value in node.items()]
    elif isinstance(node, list | tuple):
        children = [(f"{where}[{i}]", value) for i, value in enumerate(node)]
    else:
        children = []
    for key, value in children:
        yield from walk_config(value, key)


def annotated_yaml(model: type[BaseModel], variants: dict[type, list[type]] | None = None,
                   title: str | None = None, exclude: tuple[str, ...] = (), filled: dict[str, str] | None = None) -> str:
    """`model`'s keys as a YAML document of their defaults, each key preceded by a comment with its type,
    constraints, default and description (what `polyfuse config show` prints). Nested models are expanded
    (an optional one commented out); `variants` maps a base model to the concrete models a field may hold
    (one per scorer type, one per backend): a list shows each as one item, a single field its default
    and each variant as a commented-out block. `title` (default: the model's docstring) heads the document;
    `exclude` leaves top-level keys out; `filled` (top-level key -> its value in words) marks the keys a
    recipe fills from its other keys: described, their value commented out."""
    lines = _comment(title or _doc(model), "")
    _emit(model, lines, "", variants or {}, exclude, filled or {})
    return "\n".join(lines) + "\n"


def _doc(model: type) -> str:
    return " ".join((model.__doc__ or "").split())


def _emit(model: type[BaseModel], lines: list[str], indent: str, variants: dict[type, list[type]],
          exclude: tuple[str, ...] = (), filled: dict[str, str] | None = None) -> None:
    filled = filled or {}
    for name, field in model.model_fields.items():
        if name in exclude:
            continue
        required = field.is_required()
        default = None if required else field.get_default(call_default_factory=True)
        nested = _model_in(field.annotation)
        kinds = variants.get(nested, [nested])
        head = f"{name}: {_type_text(field.annotation)}{_constraints(field.metadata)}"
        if name in filled:
            head += f", in a recipe default {filled[name]}"
        elif required:
            head += ", required"
        elif nested is None or default is None or len(kinds) > 1:  # else the block below shows the default
            head += f", default {_flow(default)}"
        description = _description(model, name) or (_doc(nested) if nested is not None else "")
        text = f"{head}. {description}".rstrip()
        lines += _comment(text if text.endswith(".") else f"{text}.", indent)
        value = f"{indent}{name}: {'' if required else _flow(default)}".rstrip()
        if nested is None:
            entry = [value]
        elif len(kinds) > 1 and not _holds_list(field.annotation):  # one of several models (a backend): the
            block: list[str] = []  # default, then each model's keys, commented out
            for item in kinds:
                block += [f"{indent}{name}:", *_comment(_doc(item), indent + "  ")]
                _emit(item, block, indent + "  ", variants)
            entry = [value, *_commented(block, indent)]
        else:
            block = [f"{indent}{name}:"]
            if _holds_list(field.annotation):
                for item in kinds:
                    block += [f"{indent}  -", *(_comment(_doc(item), indent + "    ") if item is not nested else [])]
                    _emit(item, block, indent + "    ", variants)
            else:
                _emit(nested, block, indent + "  ", variants)
            off = default is None and not required  # optional and off: its keys, commented out
            entry = [value, *_commented(block, indent)] if off else block
        lines += _commented(entry, indent) if name in filled else entry


def _commented(lines: list[str], indent: str) -> list[str]:
    return [f"{indent}# {line[len(indent):]}" for line in lines]


def _holds_list(annotation: Any) -> bool:
    """A list field, optional or not."""
    annotation = _strip_annotated(annotation)
    if get_origin(annotation) in (Union, UnionType):
        return any(_holds_list(a) for a in get_args(annotation) if a is not type(None))
    return get_origin(annotation) is list


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


def cache_root() -> Path:
    """polyfuse's cache: `$POLYFUSE_CACHE`, else `$XDG_CACHE_HOME/polyfuse`, else `~/.cache/polyfuse`."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(os.environ.get("POLYFUSE_CACHE") or (Path(xdg) / "polyfuse" if xdg else "~/.cache/polyfuse")).expanduser()
