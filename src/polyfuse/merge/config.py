"""The merge config: mergekit's YAML subset, its refusals, and per-tensor parameter resolution.

Everything here runs before a single tensor is read, so a bad method name, a missing weight or an
unsupported `slices:` section fails in a second with exit code 2 instead of after an hour of
downloading (spec section 13). Header-level checks (shapes, vocabularies) live in `plan.py`.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import field_validator

from polyfuse.config import StrictModel, apply_overrides, read_yaml, validate
from polyfuse.errors import ConfigError
from polyfuse.merge.methods.base import MERGE_METHODS, MergeMethod

DType = Literal["float32", "bfloat16", "float16"]
Scalar = bool | int | float | str
REFUSED = {
    "slices": "polyfuse merges whole models; per-slice layer ranges (frankenmerges) are not supported",
    "modules": "polyfuse merges whole models; per-module sections are not supported",
    "layer_range": "polyfuse merges whole models of one architecture; layer ranges are not supported",
}
ENGINE_PARAMS = {"seed": 0}  # polyfuse keys under `parameters` that the engine itself reads
CHAT_TEMPLATES = {
    "chatml": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
}
IGNORED_PARAMS = {"int8_mask": "a mergekit memory trick; polyfuse always computes in fp32"}
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_FALLBACK = (None, "*")
logger = logging.getLogger(__name__)


class FilterValue(StrictModel):
    """One entry of a filtered value: the first entry whose filter is a substring of the tensor name wins."""

    filter: str | None = None
    value: Scalar | list[float]


ParamValue = Scalar | list[float] | list[FilterValue]


class ModelEntry(StrictModel):
    model: str
    parameters: dict[str, ParamValue] = {}


class MergeConfig(StrictModel):
    """A mergekit-compatible merge config (spec section 10). `dtype` is accepted for compatibility:
    polyfuse always computes in fp32; it is the default of `out_dtype`."""

    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] = []
    parameters: dict[str, ParamValue] = {}
    dtype: DType | None = None
    out_dtype: DType | None = None
    tokenizer_source: str | None = None
    chat_template: str | None = None

    @field_validator("parameters")
    @classmethod
    def _no_empty_gradient(cls, value: dict[str, ParamValue]) -> dict[str, ParamValue]:
        for key, item in value.items():
            if isinstance(item, list) and not item:
                raise ValueError(f"{key}: an empty list is neither a gradient nor a filter list")
        return value

    def method(self) -> type[MergeMethod]:
        return load_methods().get(self.merge_method)

    def merged_models(self) -> list[tuple[int, ModelEntry]]:
        """(index under `models`, entry) of the non-base models: the base may be repeated under `models`,
        but it is not a task vector."""
        base = self.base_model if self.method().requires_base else None
        return [(i, e) for i, e in enumerate(self.models) if base is None or not same_model(e.model, base)]

    def reference(self) -> str:
        """The model whose tensor order, config and (by default) tokenizer the output follows."""
        return self.base_model or self.models[0].model


def same_model(a: str, b: str) -> bool:
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a.rstrip("/") == b.rstrip("/")


def load_methods():
    """The registry, filled: importing the methods package imports (registers) every method file."""
    import polyfuse.merge.methods  # noqa: F401

    return MERGE_METHODS


def load_merge_config(path: str | Path, overrides: list[str] | None = None) -> MergeConfig:
    """Read, refuse by name, validate the schema, then check the method's needs; no model is touched."""
    return parse_merge_config(apply_overrides(read_yaml(path), overrides), str(path))


def parse_merge_config(raw: Any, source: str, check: bool = True) -> MergeConfig:
    """A config from its YAML data: refuse by name, validate the schema, then (with `check`) the method's
    needs. A recipe's `merge` section checks later (`check=False`): its base and models may still be names
    of stages whose outputs do not exist yet."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping, got {type(raw).__name__}")
    refuse_by_name(raw, source)
    methods = load_methods()
    name = raw.get("merge_method")
    if name is None:
        raise ConfigError(f"{source}: merge_method: required key is missing")
    if not isinstance(name, str) or name not in methods:
        known = ", ".join(methods.names()) or "none registered"
        raise ConfigError(f"{source}: merge_method: unknown merge method {name!r}; expected one of: {known}")
    cfg = validate(MergeConfig, raw, source=source)
    if check:
        check_method(cfg, source)
    return cfg


def refuse_by_name(raw: Any, source: str, where: str = "") -> None:
    """mergekit features polyfuse does not implement are named, never half-supported or ignored."""
    if isinstance(raw, dict):
        for key, value in raw.items():
            if key in REFUSED:
                raise ConfigError(f"{source}: {where}{key}: not supported: {REFUSED[key]}")
            refuse_by_name(value, source, f"{where}{key}.")
    elif isinstance(raw, list):
        for i, value in enumerate(raw):
            refuse_by_name(value, source, f"{where.rstrip('.')}[{i}].")


def check_method(cfg: MergeConfig, source: str) -> None:
    """Model counts, base, parameter names and required parameters, from the config alone."""
    method = cfg.method()
    name = cfg.merge_method
    if method.requires_base and cfg.base_model is None:
        raise ConfigError(f"{source}: base_model: required by {name} (task vectors are taken against it)")
    count = len(cfg.merged_models())
    if count < method.min_models or (method.max_models is not None and count > method.max_models):
        most = "" if method.max_models is None else f" and at most {method.max_models}"
        raise ConfigError(f"{source}: models: {name} needs at least {method.min_models}{most} "
                          f"non-base models; the config has {count}")
    known = _known_params()
    for key in cfg.parameters:
        _check_name(key, method, known, f"{source}: parameters.{key}", per_model=False)
    for i, entry in enumerate(cfg.models):
        for key in entry.parameters:
            _check_name(key, method, known, f"{source}: models[{i}].parameters.{key}", per_model=True)
    for key, default in method.model_defaults.items():
        if default is not None or key in cfg.parameters:
            continue
        for i, entry in cfg.merged_models():
            if key not in entry.parameters:
                raise ConfigError(f"{source}: models[{i}].parameters.{key}: required by {name}; "
                                  f"give it per model or under the global parameters")
    for key, default in method.defaults.items():
        if default is None and key not in cfg.parameters:
            raise ConfigError(f"{source}: parameters.{key}: required by {name}")
    template = cfg.chat_template
    if template not in (None, "auto", *CHAT_TEMPLATES) and "{{" not in template and "{%" not in template:
        raise ConfigError(f"{source}: chat_template: {template!r} is neither auto, a built-in name "
                          f"({', '.join(CHAT_TEMPLATES)}) nor a Jinja template")


def _known_params() -> set[str]:
    names = set(ENGINE_PARAMS) | set(IGNORED_PARAMS)
    for method_name in MERGE_METHODS.names():
        method = MERGE_METHODS.get(method_name)
        names |= set(method.defaults) | set(method.model_defaults)
    return names


def _check_name(key: str, method: type[MergeMethod], known: set[str], where: str, per_model: bool) -> None:
    if key in method.model_defaults or (not per_model and (key in method.defaults or key in ENGINE_PARAMS)):
        return
    if key in known:  # a real parameter of another method: harmless, but say it does nothing here
        why = f" ({IGNORED_PARAMS[key]})" if key in IGNORED_PARAMS else ""
        logger.warning("%s: ignored by %s%s", where, method.name, why)
        return
    raise ConfigError(f"{where}: unknown parameter for {method.name}; expected one of: "
                      f"{', '.join(sorted(set(method.model_defaults) | set(method.defaults)))}")


def layer_index(tensor: str) -> int | None:
    """The decoder layer a tensor belongs to; None for embeddings, final norm and lm_head (t = 0)."""
    match = _LAYER.search(tensor)
    return int(match.group(1)) if match else None


_MISSING = object()


def resolve_value(value: Any, tensor: str, num_layers: int) -> Any:
    """A scalar, a gradient over layers, or a filter list, read for one tensor (spec section 10)."""
    if isinstance(value, list) and value and isinstance(value[0], FilterValue):
        fallback = next((e for e in value if e.filter in _FALLBACK), None)
        chosen = next((e for e in value if e.filter not in _FALLBACK and e.filter in tensor), fallback)
        return _MISSING if chosen is None else resolve_value(chosen.value, tensor, num_layers)
    if isinstance(value, list):
        layer = layer_index(tensor)
        t = 0.0 if layer is None or num_layers <= 1 else layer / (num_layers - 1)
        position = t * (len(value) - 1)
        low = math.floor(position)
        high = min(low + 1, len(value) - 1)
        return value[low] + (value[high] - value[low]) * (position - low)
    return value


class ParamResolver:
    """Per-tensor parameters: per-model value > global value > the method's default."""

    def __init__(self, cfg: MergeConfig, num_layers: int, source: str = "config"):
        self.cfg = cfg
        self.method = cfg.method()
        self.models = cfg.merged_models()
        self.num_layers = num_layers
        self.source = source

    def params(self, tensor: str) -> dict[str, Any]:
        values = {}
        for key, default in self.method.defaults.items():
            values[key] = self._pick([self.cfg.parameters], key, default, tensor, f"parameters.{key}")
        return values

    def model_params(self, tensor: str) -> list[dict[str, Any]]:
        out = []
        for index, entry in self.models:
            out.append({
                key: self._pick([entry.parameters, self.cfg.parameters], key, default, tensor,
                                f"models[{index}].parameters.{key}")
                for key, default in self.method.model_defaults.items()
            })
        return out

    def seed(self) -> int:
        seed = self.cfg.parameters.get("seed", ENGINE_PARAMS["seed"])
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ConfigError(f"{self.source}: parameters.seed: expected an integer (got {seed!r})")
        return seed

    def _pick(self, layers: list[dict[str, Any]], key: str, default: Any, tensor: str, where: str) -> Any:
        for layer in layers:
            if key in layer:
                value = resolve_value(layer[key], tensor, self.num_layers)
                if value is not _MISSING:
                    _check_type(value, default, f"{self.source}: {where}")
                    return value
        if default is None:
            raise ConfigError(f"{self.source}: {where}: required by {self.method.name}, "
                              f"but no value (and no filter) applies to tensor {tensor}")
        return default


def _check_type(value: Any, default: Any, where: str) -> None:
    if default is None:
        return
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int | float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{where}: expected a {type(default).__name__} like the default {default!r} (got {value!r})")
