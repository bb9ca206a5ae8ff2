"""The merge config: mergekit's YAML subset, its refusals, and per-tensor parameter resolution.

Everything here runs before a single tensor is read, so a bad method name, a missing weight or an
unsupported `slices:` section fails in a second with exit code 2 instead of after an hour of
downloading, a common mergekit complaint. Header-level checks (shapes, vocabularies) live in `plan.py`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from polyfuse.config import StrictModel, apply_overrides, read_yaml, validate
from polyfuse.errors import ConfigError
from polyfuse.merge.methods.base import MERGE_METHODS, InvalidParameter, MergeMethod
from polyfuse.merge.sources import split_reference

DType = Literal["float32", "bfloat16", "float16"]
Scalar = bool | int | float | str
REFUSED = {
    "modules": "mergekit's per-module sections (`modules:`, for models with several layer stacks) are not "
               "supported; use `models:`, or `slices:` on a model with one layer stack",
}
ENGINE_PARAMS = {"seed": 0}  # polyfuse keys under `parameters` that the engine itself reads
CHAT_TEMPLATES = {
    "chatml": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
}
IGNORED_PARAMS = {"int8_mask": "a mergekit memory trick; polyfuse always computes in fp32"}
_FALLBACK = (None, "*")
logger = logging.getLogger(__name__)


class FilterValue(StrictModel):
    """One entry of a filtered value. mergekit's rule: the FIRST entry, in list order, whose filter is missing,
    `*`, or a substring of the tensor name applies; a fallback listed before a filter shadows it."""

    filter: str | None = Field(default=None, description="A substring of the tensor names this entry applies to; none or `*`: every tensor.")
    value: Scalar | list[float] = Field(description="A number, or a list of numbers interpolated over the layers (a gradient).")


ParamValue = Scalar | list[float] | FilterValue | list[FilterValue]
Params = dict[str, ParamValue]


class ModelEntry(StrictModel):
    """One input model and its own parameters."""

    model: str = Field(description="A local folder, hub id (`org/name@revision`), `MODEL+LORA`, or in a recipe a source or stage name.")
    parameters: Params = Field(default={}, description="This model's parameters (weight, density, ...), overriding the config's.")


class SliceSource(StrictModel):
    """One model's layers `[start, end)` feeding an output slice (mergekit's `InputSliceDefinition`)."""

    model: str = Field(description="The model the layers come from.")
    layer_range: tuple[int, int] = Field(description="[start, end): the layers taken, end excluded.")
    parameters: Params = Field(default={}, description="This model's parameters in this slice.")

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] < 0 or value[1] <= value[0]:
            raise ValueError(f"expected [start, end) with 0 <= start < end (got {list(value)})")
        return value


class SliceEntry(StrictModel):
    """One output slice: layer i of the slice merges layer start_k + i of every source k.
    `merge_method` per slice is a polyfuse extension (mergekit has one method per config);
    `residual_weight` is accepted because mergekit accepts it; mergekit 0.1.5 does not use it, nor does polyfuse."""

    sources: list[SliceSource] = Field(description="The models and layer ranges merged into this slice.")
    base_model: str | None = Field(default=None, description="The slice's base model; default: the config's.")
    parameters: Params = Field(default={}, description="Parameters for this slice, overriding the config's.")
    merge_method: str | None = Field(default=None, description="This slice's method; default: the config's.")
    residual_weight: float | None = Field(default=None, description="Accepted as mergekit accepts it; unused (as in mergekit 0.1.5).")

    @field_validator("sources")
    @classmethod
    def _some(cls, value: list[SliceSource]) -> list[SliceSource]:
        if not value:
            raise ValueError("a slice needs at least one source")
        lengths = {s.layer_range[1] - s.layer_range[0] for s in value}
        if len(lengths) > 1:
            raise ValueError(f"all sources of a slice must span the same number of layers (got {sorted(lengths)})")
        return value

    @property
    def length(self) -> int:
        return self.sources[0].layer_range[1] - self.sources[0].layer_range[0]


class ModelToken(StrictModel):
    """A token's embedding taken from one model's row, by id or by token string (mergekit `model_token`)."""

    kind: Literal["model_token"] = Field(description="`model_token`: one model's embedding row.")
    model: str = Field(description="The model whose row is taken.")
    token_id: int | None = Field(default=None, description="The row by id (give this or `token`).")
    token: str | None = Field(default=None, description="The row by token string (give this or `token_id`).")

    @model_validator(mode="after")
    def _one_of(self) -> ModelToken:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token_id or token")
        return self


class ZeroToken(StrictModel):
    """An all-zero embedding row."""

    kind: Literal["zero"] = Field(description="`zero`: a row of zeros.")


class TokenEmbedding(StrictModel):
    """Where a token's embedding comes from; `force` uses it even where a model has the token."""

    source: ModelToken | ZeroToken | str | None = Field(
        default=None, description="A model name (its row for this token), a model_token or zero source; default: the merge's rule."
    )
    force: bool = Field(default=False, description="Use `source` even for models that have the token.")


class TokenizerConfig(StrictModel):
    """mergekit's `tokenizer:` block: the output vocabulary (`base`, `union` or a model), per-token embedding
    sources, and the padded row count."""

    source: str = Field(default="union", description="The output vocabulary: `union`, `base`, or a model's.")
    tokens: dict[str, TokenEmbedding] | None = Field(default=None, description="Per token string: where its embedding comes from.")
    pad_to_multiple_of: int | None = Field(default=None, description="Pad the embedding rows to a multiple of this.")

    @field_validator("pad_to_multiple_of")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise ValueError("must be a positive integer")
        return value


class MergeConfig(StrictModel):
    """A mergekit-compatible merge config (docs/merge-compat.md). `dtype` is accepted for compatibility:
    polyfuse always computes in fp32; it is the default of `out_dtype`. Exactly one of `models` and
    `slices`; `models` is the one-slice case (every model's full depth, the base appended when not listed,
    as mergekit normalises it)."""

    merge_method: str = Field(description="The merge method: linear, ties, dare_ties, slerp, rsaf and the rest (docs/merge-compat.md lists them).")
    base_model: str | None = Field(default=None, description="The model task vectors are taken against (methods that need one).")
    models: list[ModelEntry] = Field(default=[], description="The input models (give this or `slices`).")
    slices: list[SliceEntry] | None = Field(default=None, description="Layer ranges stacked into the output (give this or `models`).")
    parameters: Params = Field(default={}, description="Method parameters for every model (weight, density, t, ...).")
    dtype: DType | None = Field(default=None, description="Accepted as mergekit does; polyfuse computes in fp32. The default of `out_dtype`.")
    out_dtype: DType | None = Field(default=None, description="The output's dtype; default: `dtype`, else the base model's.")
    tokenizer_source: str | None = Field(default=None, description="mergekit's older form of `tokenizer.source`.")
    tokenizer: TokenizerConfig | None = Field(default=None, description="The output vocabulary and per-token embeddings.")
    chat_template: str | None = Field(default=None, description="A template name (chatml, ...) or literal Jinja for the output tokenizer.")

    @field_validator("parameters")
    @classmethod
    def _no_empty_gradient(cls, value: Params) -> Params:
        for key, item in value.items():
            if isinstance(item, list) and not item:
                raise ValueError(f"{key}: an empty list is neither a gradient nor a filter list")
        return value

    @model_validator(mode="after")
    def _one_layout(self) -> MergeConfig:
        if bool(self.models) == bool(self.slices):
            raise ValueError("give exactly one of `models` and `slices`")
        if self.tokenizer is not None and self.tokenizer_source is not None:
            raise ValueError("give `tokenizer_source` or a `tokenizer` block, not both (as in mergekit)")
        return self

    def method(self) -> type[MergeMethod]:
        return MERGE_METHODS.get(self.merge_method)

    def merged_models(self) -> list[tuple[int, ModelEntry]]:
        """(index under `models`, entry) of the non-base models: the base may be repeated under `models`,
        but it is not a task vector."""
        base = self.base_model if self.method().base_policy != "ignored" else None
        return [(i, e) for i, e in enumerate(self.models) if base is None or not same_model(e.model, base)]

    def token_source(self) -> str | None:
        """The output vocabulary's source (`tokenizer.source` or `tokenizer_source`); None: no tokenizer decision."""
        return self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source

    def referenced_models(self) -> list[str]:
        """Every model the config names, the base first, each once (mergekit's `referenced_models`)."""
        refs = [self.base_model] if self.base_model else []
        if self.slices:
            for piece in self.slices:
                refs += ([piece.base_model] if piece.base_model else []) + [s.model for s in piece.sources]
        else:
            refs += [e.model for e in self.models]
        unique: list[str] = []
        for ref in refs:
            if not any(same_model(ref, seen) for seen in unique):
                unique.append(ref)
        return unique

    def reference(self) -> str:
        """The model whose config and (by default) tokenizer the output follows."""
        return self.referenced_models()[0]


def same_model(a: str, b: str) -> bool:
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a.rstrip("/") == b.rstrip("/")


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
    names = [("merge_method", raw.get("merge_method"))]
    if raw.get("merge_method") is None:
        raise ConfigError(f"{source}: merge_method: required key is missing")
    for i, piece in enumerate(raw.get("slices") or []):
        if isinstance(piece, dict) and "merge_method" in piece:
            names.append((f"slices[{i}].merge_method", piece["merge_method"]))
    methods = MERGE_METHODS
    for where, name in names:
        if not isinstance(name, str) or name not in methods:
            known = ", ".join(methods.names()) or "none registered"
            raise ConfigError(f"{source}: {where}: unknown merge method {name!r}; expected one of: {known}")
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


@dataclass
class SliceInput:
    """One input of an output slice, in mergekit's order (sources as listed, the base appended last)."""

    model: str
    parameters: Params
    where: str  # its config key, for messages
    layer_range: tuple[int, int] | None  # None: the model's full depth (`models:` syntax)


@dataclass
class OutputSlice:
    index: int
    method: type[MergeMethod]
    inputs: list[SliceInput]
    base: int | None  # index into inputs of the base, for methods that treat it as the base
    parameters: Params  # the slice's own (mergekit: above the config's, below the per-model ones)
    where: str


def output_slices(cfg: MergeConfig) -> list[OutputSlice]:
    """The config as mergekit normalises it: a list of output slices. `models:` is one slice over every
    model's full depth; a base that is not listed is appended as its last input, also for methods that
    use it as a plain input (linear, karcher). For those, polyfuse leaves the base out instead when it has
    no value for a required per-model parameter (mergekit stops with 'missing parameter' there)."""
    out = []
    pieces = cfg.slices or [None]
    for index, piece in enumerate(pieces):
        method = MERGE_METHODS.get((piece.merge_method if piece else None) or cfg.merge_method)
        base_ref = (piece.base_model if piece else None) or cfg.base_model
        if piece is None:
            inputs = [SliceInput(e.model, e.parameters, f"models[{i}]", None) for i, e in enumerate(cfg.models)]
            where = "models"
            parameters: Params = {}
        else:
            inputs = [SliceInput(s.model, s.parameters, f"slices[{index}].sources[{k}]", tuple(s.layer_range))
                      for k, s in enumerate(piece.sources)]
            where = f"slices[{index}]"
            parameters = piece.parameters
        base = next((k for k, e in enumerate(inputs) if base_ref and same_model(e.model, base_ref)), None)
        if base_ref and base is None and piece is None:
            needs = [k for k, d in method.model_defaults.items() if d is None and k not in parameters
                     and k not in cfg.parameters]
            if method.base_policy != "ignored" or not needs:
                inputs.append(SliceInput(base_ref, {}, "base_model", None))
                base = len(inputs) - 1
            else:
                logger.info("%s: base_model is not merged by %s: it has no %s", where, method.name, needs[0])
        if method.base_policy == "ignored":
            base = None
        out.append(OutputSlice(index, method, inputs, base, parameters, where))
    return out


def check_method(cfg: MergeConfig, source: str) -> None:
    """Model counts, base, parameter names and required parameters, from the config alone."""
    known = _known_params()
    for piece in output_slices(cfg):
        method, name = piece.method, piece.method.name
        base_ref = (cfg.slices[piece.index].base_model if cfg.slices else None) or cfg.base_model
        where = f"{source}: {piece.where}"
        if method.base_policy == "required" and base_ref is None:
            raise ConfigError(f"{source}: base_model: required by {name} (task vectors are taken against it)")
        if method.base_policy != "ignored" and base_ref is not None and piece.base is None:
            raise ConfigError(f"{where}: the base model {base_ref!r} must be one of the slice's sources "
                              f"(its layers are the base of {name}, as in mergekit)")
        count = len(piece.inputs) - (piece.base is not None)
        what = "inputs" if method.base_policy == "ignored" else "non-base models"
        if count < method.min_models or (method.max_models is not None and count > method.max_models):
            most = "" if method.max_models is None else f" and at most {method.max_models}"
            raise ConfigError(f"{where}: {name} needs at least {method.min_models}{most} {what}; "
                              f"the config gives {count}")
        for key in piece.parameters:
            _check_name(key, method, known, f"{where}.parameters.{key}", per_model=False)
        for k, entry in enumerate(piece.inputs):
            if k == piece.base:
                continue
            for key in entry.parameters:
                _check_name(key, method, known, f"{source}: {entry.where}.parameters.{key}", per_model=True)
            for key, default in method.model_defaults.items():
                if default is None and not any(key in p for p in (entry.parameters, piece.parameters,
                                                                  cfg.parameters)):
                    raise ConfigError(f"{source}: {entry.where}.parameters.{key}: required by {name}; "
                                      f"give it per model or under the global parameters")
        for key, default in method.defaults.items():
            if default is None and key not in piece.parameters and key not in cfg.parameters:
                raise ConfigError(f"{source}: parameters.{key}: required by {name}")
    for ref in cfg.referenced_models():
        try:
            split_reference(ref)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
    pieces = output_slices(cfg)
    for key in cfg.parameters:
        if not any(key in p.method.defaults or key in p.method.model_defaults for p in pieces):
            _check_name(key, cfg.method(), known, f"{source}: parameters.{key}", per_model=False)
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


def layer_position(layer: int | None, num_layers: int) -> float:
    """mergekit's gradient position t of layer `layer` in a slice of `num_layers` layers: l / (n - 1), 1 for a
    one-layer slice; 0 outside the layers (embeddings, final norm, head)."""
    if layer is None:
        return 0.0
    return layer / (num_layers - 1) if num_layers > 1 else 1.0


_MISSING = object()


def resolve_value(value: Any, tensor: str, t: float) -> Any:
    """A scalar, a gradient read at position t, or a filter list, for one tensor (mergekit's
    `evaluate_setting`): in a filter list the first entry that applies wins, in list order; a list of
    numbers is interpolated linearly at t * (n - 1); a list of booleans or strings is read at int(t * (n - 1))."""
    if isinstance(value, FilterValue):
        value = [value]
    if isinstance(value, list) and value and isinstance(value[0], FilterValue):
        chosen = next((e for e in value if e.filter in _FALLBACK or e.filter in tensor), None)
        return _MISSING if chosen is None else resolve_value(chosen.value, tensor, t)
    if isinstance(value, list):
        position = t * (len(value) - 1)
        low = int(position)
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            return value[low]
        high = min(low + 1, len(value) - 1)
        return value[low] + (value[high] - value[low]) * (position - low)
    return value


class ParamResolver:
    """Per-tensor parameters in mergekit's precedence: the input's own value > the slice's > the config's
    `parameters` > the method's default. Global parameters are read for the output tensor name, per-model
    ones for the name of that input's tensor (they differ in slices)."""

    def __init__(self, cfg: MergeConfig, piece: OutputSlice, source: str = "config"):
        self.cfg = cfg
        self.piece = piece
        self.method = piece.method
        self.models = [(k, e) for k, e in enumerate(piece.inputs) if k != piece.base]
        self.source = source

    def params(self, tensor: str, t: float) -> dict[str, Any]:
        return {key: self._pick([self.piece.parameters, self.cfg.parameters], key, default, tensor, t,
                                f"parameters.{key}")
                for key, default in self.method.defaults.items()}

    def model_params(self, keys: list[str], t: float) -> list[dict[str, Any]]:
        """Per non-base input; `keys[k]`: the tensor name read from input k of the slice."""
        return [{key: self._pick([entry.parameters, self.piece.parameters, self.cfg.parameters], key, default,
                                 keys[k], t, f"{entry.where}.parameters.{key}")
                 for key, default in self.method.model_defaults.items()}
                for k, entry in self.models]

    def check(self, tensor: str, keys: list[str], t: float) -> None:
        """Every parameter of this tensor resolves, has its type and a value the method can use (`MergeMethod.check`);
        a refusal names the key where the value was given."""
        try:
            self.method.check(self.params(tensor, t), self.model_params(keys, t))
        except InvalidParameter as err:
            layers = [(self.piece.parameters, f"{self.piece.where}.parameters"), (self.cfg.parameters, "parameters")]
            if err.model is not None:
                entry = self.models[err.model][1]
                layers.insert(0, (entry.parameters, f"{entry.where}.parameters"))
            given = next(((p[err.key], name) for p, name in layers if err.key in p), None)
            where = f"{given[1]}.{err.key}" if given else f"{layers[0][1]}.{err.key} (its default)"
            varies = given is not None and isinstance(given[0], list | FilterValue)
            raise ConfigError(f"{self.source}: {where}: {err.message}{f' (at tensor {tensor})' if varies else ''}") from None

    @classmethod
    def of(cls, cfg: MergeConfig, slice_index: int = 0, source: str = "config") -> ParamResolver:
        return cls(cfg, output_slices(cfg)[slice_index], source)

    def seed(self) -> int:
        seed = self.cfg.parameters.get("seed", ENGINE_PARAMS["seed"])
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ConfigError(f"{self.source}: parameters.seed: expected an integer (got {seed!r})")
        return seed

    def _pick(self, layers: list[Params], key: str, default: Any, tensor: str, t: float, where: str) -> Any:
        for layer in layers:
            if key in layer:
                value = resolve_value(layer[key], tensor, t)
                if value is not _MISSING:
                    _check_type(value, default, f"{self.source}: {where}")
                    return value
        if default is None:
            raise ConfigError(f"{self.source}: {where}: required by {self.method.name}, "
                              f"but no value (and no filter) applies to tensor {tensor}")
        return default


def _check_type(value: Any, default: Any, where: str) -> None:
    """`value` has the type of the method's default; a required parameter (default None: weight, t) is a number."""
    if default is None or (isinstance(default, int | float) and not isinstance(default, bool)):
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number (got {value!r})")
        return
    ok = isinstance(value, bool) if isinstance(default, bool) else isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{where}: expected a {type(default).__name__} like the default {default!r} (got {value!r})")
