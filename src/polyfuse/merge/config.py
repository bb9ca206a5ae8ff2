"""The merge config: mergekit's YAML subset, its refusals, its normal form, and per-tensor parameter resolution.

Everything here runs before a single tensor is read, so a bad method name, a missing weight or an
unsupported `slices:` section fails in a second with exit code 2 instead of after an hour of
downloading, a common mergekit complaint. Header-level checks (shapes, vocabularies) live in `plan.py`.

The config is normalised once, when it is validated, into mergekit's normal form: a list of output slices
whose inputs are `ModelReference`s (`MergeConfig.output_slices`); everything after reads that.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from polyfuse.config import StrictModel, apply_overrides, read_yaml, validate
from polyfuse.errors import ConfigError
from polyfuse.merge.methods.base import MERGE_METHODS, InvalidParameter, MergeMethod, Param
from polyfuse.merge.reference import ModelReference

DType = Literal["float32", "bfloat16", "float16"]
Scalar = bool | int | float | str
REFUSED = {
    "modules": "mergekit's per-module sections (`modules:`, for models with several layer stacks) are not "
               "supported; use `models:`, or `slices:` on a model with one layer stack",
}
SEED = Param("seed", 0, description="random masks (DARE, DELLA, ...) are seeded by (seed, tensor name, model index)",
             explain="seed {v} = random masks are seeded by (seed, tensor name, model index): reruns agree")
ENGINE_PARAMETERS = (SEED,)  # polyfuse keys under `parameters` that the engine itself reads, for every method
NOT_MODELS = ("base", "union")  # tokenizer sources that name no model
CHAT_TEMPLATES = {
    "chatml": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
}
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


@dataclass(frozen=True)
class SliceInput:
    """One input of an output slice, in mergekit's order (sources as listed, the base appended last)."""

    model: ModelReference
    parameters: Params
    where: str  # its config key, for messages
    layer_range: tuple[int, int] | None  # None: the model's full depth (`models:` syntax)


@dataclass(frozen=True)
class OutputSlice:
    index: int
    method: type[MergeMethod]
    inputs: tuple[SliceInput, ...]
    base: int | None  # index into inputs of the base, for methods that treat it as the base
    base_model: ModelReference | None  # the slice's base as the config names it (also for methods that ignore it)
    parameters: Params  # the slice's own (mergekit: above the config's, below the per-model ones)
    where: str

    def merged(self) -> list[tuple[int, SliceInput]]:
        """(index into inputs, input) of every input but the base: the models the method merges."""
        return [(k, entry) for k, entry in enumerate(self.inputs) if k != self.base]


class MergeConfig(StrictModel):
    """A mergekit-compatible merge config (docs/merge-compat.md). `dtype` is accepted for compatibility:
    polyfuse always computes in fp32; it is the default of `out_dtype`. Exactly one of `models` and
    `slices`; `models` is the one-slice case (every model's full depth, the base appended when not listed,
    as mergekit normalises it)."""

    merge_method: str = Field(description="The merge method: linear, ties, dare_ties, slerp, rsaf and the rest (docs/merge-compat.md lists them).")
    base_model: str | None = Field(default=None, description="The model task vectors are taken against (methods that need one).")
    models: list[ModelEntry] = Field(default=[], description="The input models (give this or `slices`).")
    slices: list[SliceEntry] | None = Field(default=None, description="Layer ranges stacked into the output (give this or `models`).")
    parameters: Params = Field(default={}, description="Method parameters for every model (weight, density, t, ...); every method's are listed at the end.")
    dtype: DType | None = Field(default=None, description="Accepted as mergekit does; polyfuse computes in fp32. The default of `out_dtype`.")
    out_dtype: DType | None = Field(default=None, description="The output's dtype; default: `dtype`, else the base model's.")
    tokenizer_source: str | None = Field(default=None, description="mergekit's older form of `tokenizer.source`.")
    tokenizer: TokenizerConfig | None = Field(default=None, description="The output vocabulary and per-token embeddings.")
    chat_template: str | None = Field(default=None, description="A template name (chatml, ...) or literal Jinja for the output tokenizer.")
    _referenced: dict[ModelReference, str] = PrivateAttr(default_factory=dict)  # model -> the key naming it first
    _slices: tuple[OutputSlice, ...] = PrivateAttr(default=())

    @field_validator("parameters")
    @classmethod
    def _no_empty_gradient(cls, value: Params) -> Params:
        for key, item in value.items():
            if isinstance(item, list) and not item:
                raise ValueError(f"{key}: an empty list is neither a gradient nor a filter list")
        return value

    @model_validator(mode="after")
    def _normalise(self) -> MergeConfig:
        """One layout, then the normal form every later step reads (`output_slices`, `referenced_models`)."""
        if bool(self.models) == bool(self.slices):
            raise ValueError("give exactly one of `models` and `slices`")
        if self.tokenizer is not None and self.tokenizer_source is not None:
            raise ValueError("give `tokenizer_source` or a `tokenizer` block, not both (as in mergekit)")
        self._referenced = {}
        base = self._reference(self.base_model, "base_model")
        self._slices = tuple(self._output_slice(index, piece, base) for index, piece in enumerate(self.slices or [None]))
        return self

    def _reference(self, text: str | None, where: str) -> ModelReference | None:
        if text is None:
            return None
        try:
            reference = ModelReference.parse(text)
        except ConfigError as err:
            raise ValueError(f"{where}: {err}") from None
        self._referenced.setdefault(reference, where)
        return reference

    def _output_slice(self, index: int, piece: SliceEntry | None, base: ModelReference | None) -> OutputSlice:
        """mergekit's normal form of one output slice. `models:` is one slice over every model's full depth; a base
        that is not listed is appended as its last input, also for methods that use it as a plain input (linear,
        karcher). For those, polyfuse leaves the base out instead when it has no value for a required per-model
        parameter (mergekit stops with 'missing parameter' there)."""
        name = (piece.merge_method if piece else None) or self.merge_method
        if name not in MERGE_METHODS:
            raise ValueError(f"unknown merge method {name!r}; expected one of: {', '.join(MERGE_METHODS.names())}")
        method = MERGE_METHODS.get(name)
        if piece is None:
            where, parameters = "models", {}
            inputs = [SliceInput(self._reference(e.model, f"models[{i}]"), e.parameters, f"models[{i}]", None)
                      for i, e in enumerate(self.models)]
        else:
            where, parameters = f"slices[{index}]", piece.parameters
            base = self._reference(piece.base_model, f"{where}.base_model") or base
            inputs = [SliceInput(self._reference(s.model, f"{where}.sources[{k}]"), s.parameters,
                                 f"{where}.sources[{k}]", tuple(s.layer_range)) for k, s in enumerate(piece.sources)]
        position = next((k for k, e in enumerate(inputs) if e.model == base), None) if base else None
        if base and position is None and piece is None:
            needs = [p.name for p in method.parameters if p.per_model and p.required and p.name not in self.parameters]
            if method.base_policy != "ignored" or not needs:
                inputs.append(SliceInput(base, {}, "base_model", None))
                position = len(inputs) - 1
            else:
                logger.info("%s: base_model is not merged by %s: it has no %s", where, method.name, needs[0])
        position = None if method.base_policy == "ignored" else position
        return OutputSlice(index, method, tuple(inputs), position, base, parameters, where)

    @property
    def output_slices(self) -> tuple[OutputSlice, ...]:
        """The config as mergekit normalises it: its output slices."""
        return self._slices

    def referenced_models(self) -> dict[ModelReference, str]:
        """Every model the config merges, the base first, each once, with the config key that names it first
        (mergekit's `referenced_models`)."""
        return dict(self._referenced)

    def method(self) -> type[MergeMethod]:
        return MERGE_METHODS.get(self.merge_method)

    def token_source(self) -> ModelReference | str | None:
        """The output vocabulary's source (`tokenizer.source` or `tokenizer_source`): `base`, `union`, a model, or
        None (no tokenizer decision)."""
        choice = self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source
        return choice if choice in (None, *NOT_MODELS) else ModelReference.parse(choice)

    def named_models(self) -> list[ModelReference]:
        """Every model the config names, wherever it names it (base, models, slices, the tokenizer source and
        per-token sources), in that order, as often as it names it."""
        return [ModelReference.parse(owner[key]) for owner, key in _model_keys(self.model_dump(exclude_unset=True))]

    @classmethod
    def yaml_appendix(cls) -> str:
        """What `polyfuse config show merge` adds after the keys: every method parameter, its default per method."""
        lines = ["", *textwrap.wrap("Method parameters, under `parameters:` (for the merge) or under a model's "
                                    "`parameters:` (the per-model ones, which `parameters:` gives every model):", 108)]
        for param, defaults in parameter_reference():
            given = "per model" if param.per_model else "for the merge"
            where = "; ".join(f"{default} {', '.join(owners)}" for default, owners in defaults.items())
            lines += textwrap.wrap(f"{param.name} ({given}): {param.description}; {where}.", 106,
                                   initial_indent="  ", subsequent_indent="    ")
        return "".join(f"#{' ' * bool(line)}{line}\n" for line in lines)

    def map_models(self, change: Callable[[ModelReference], ModelReference]) -> MergeConfig:
        """This config with every model it names (`named_models`) replaced by `change(reference)`."""
        data = self.model_dump(exclude_unset=True)
        for owner, key in _model_keys(data):
            owner[key] = str(change(ModelReference.parse(owner[key])))
        return validate(MergeConfig, data)

    def updated(self, **changes: Any) -> MergeConfig:
        """A copy with `changes`, validated and normalised again (`model_copy` would keep the old normal form)."""
        return validate(MergeConfig, {**self.model_dump(exclude_unset=True), **changes})


def _model_keys(data: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """(mapping, key) of every place a dumped config names a model (not `base` or `union`)."""
    places = [(data, "base_model"), (data, "tokenizer_source")]
    places += [(entry, "model") for entry in data.get("models") or []]
    for piece in data.get("slices") or []:
        places += [(piece, "base_model")] + [(source, "model") for source in piece["sources"]]
    tokenizer = data.get("tokenizer") or {}
    places.append((tokenizer, "source"))
    for rule in (tokenizer.get("tokens") or {}).values():
        source = rule.get("source")
        places.append((source, "model") if isinstance(source, dict) else (rule, "source"))
    return [(owner, key) for owner, key in places if isinstance(owner.get(key), str) and owner[key] not in NOT_MODELS]


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


def check_method(cfg: MergeConfig, source: str) -> None:
    """Model counts, base, parameter names and required parameters, from the config alone."""
    known = _known_params()
    for piece in cfg.output_slices:
        method, name = piece.method, piece.method.name
        where = f"{source}: {piece.where}"
        if method.base_policy == "required" and piece.base_model is None:
            raise ConfigError(f"{source}: base_model: required by {name} (task vectors are taken against it)")
        if method.base_policy != "ignored" and piece.base_model is not None and piece.base is None:
            raise ConfigError(f"{where}: the base model {str(piece.base_model)!r} must be one of the slice's sources "
                              f"(its layers are the base of {name}, as in mergekit)")
        count = len(piece.inputs) - (piece.base is not None)
        what = "inputs" if method.base_policy == "ignored" else "non-base models"
        if count < method.min_models or (method.max_models is not None and count > method.max_models):
            most = "" if method.max_models is None else f" and at most {method.max_models}"
            raise ConfigError(f"{where}: {name} needs at least {method.min_models}{most} {what}; "
                              f"the config gives {count}")
        for key in piece.parameters:
            _check_name(key, method, known, f"{where}.parameters.{key}", per_model=False)
        for _, entry in piece.merged():
            for key in entry.parameters:
                _check_name(key, method, known, f"{source}: {entry.where}.parameters.{key}", per_model=True)
        ParamResolver(cfg, piece, source).check_given()
    for key in cfg.parameters:
        if not any(p.method.parameter(key) for p in cfg.output_slices):
            _check_name(key, cfg.method(), known, f"{source}: parameters.{key}", per_model=False)
    template = cfg.chat_template
    if template not in (None, "auto", *CHAT_TEMPLATES) and "{{" not in template and "{%" not in template:
        raise ConfigError(f"{source}: chat_template: {template!r} is neither auto, a built-in name "
                          f"({', '.join(CHAT_TEMPLATES)}) nor a Jinja template")


def parameter_reference(methods: list[str] | None = None) -> list[tuple[Param, dict[str, list[str]]]]:
    """Every parameter that `methods` (default: every registered one) and the engine read, once per declaration
    (name, scope, description), with the methods that read it grouped by their default (`required` for none):
    what `polyfuse config show merge` and docs/merge-compat.md list."""
    rows: dict[tuple[str, bool, str], tuple[Param, dict[str, list[str]]]] = {}
    declared = [(name, MERGE_METHODS.get(name).parameters) for name in methods or MERGE_METHODS.names()]
    for owner, params in [*declared, ("every method (the engine)", ENGINE_PARAMETERS)]:
        for param in params:
            _, defaults = rows.setdefault((param.name, param.per_model, param.description), (param, {}))
            default = "required by" if param.required else f"default {_text(param.default)} in"
            defaults.setdefault(default, []).append(owner)
    return sorted(rows.values(), key=lambda row: (row[0].name, row[0].per_model))


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _known_params() -> dict[str, list[str]]:
    """Every parameter name any method (or the engine) reads -> the methods that read it."""
    owners: dict[str, list[str]] = {p.name: [] for p in ENGINE_PARAMETERS}
    for method_name in MERGE_METHODS.names():
        for param in MERGE_METHODS.get(method_name).parameters:
            owners.setdefault(param.name, []).append(method_name)
    return owners


def _check_name(key: str, method: type[MergeMethod], known: dict[str, list[str]], where: str, per_model: bool) -> None:
    param = method.parameter(key)
    if (param is not None and (param.per_model or not per_model)) or (not per_model and key in {p.name for p in ENGINE_PARAMETERS}):
        return
    if key in known:  # a real parameter of another method: harmless, but say it does nothing here
        logger.warning("%s: ignored by %s (a parameter of %s)", where, method.name, ", ".join(known[key][:3]))
        return
    raise ConfigError(f"{where}: unknown parameter for {method.name}; expected one of: "
                      f"{', '.join(sorted(p.name for p in method.parameters))}")


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
        self.models = piece.merged()
        self.source = source

    @classmethod
    def of(cls, cfg: MergeConfig, slice_index: int = 0, source: str = "config") -> ParamResolver:
        return cls(cfg, cfg.output_slices[slice_index], source)

    def _layers(self, entry: SliceInput | None = None) -> list[tuple[Params, str]]:
        """Where a parameter may be given, in precedence order: (parameters, the config key that holds them); an
        input's own only for per-model parameters (`entry`)."""
        layers = [(entry.parameters, f"{entry.where}.parameters")] if entry is not None else []
        if self.cfg.slices:
            layers.append((self.piece.parameters, f"{self.piece.where}.parameters"))
        return layers + [(self.cfg.parameters, "parameters")]

    def params(self, tensor: str, t: float) -> dict[str, Any]:
        return {p.name: self._pick(p, self._layers(), tensor, t, f"parameters.{p.name}")
                for p in self.method.parameters if not p.per_model}

    def model_params(self, keys: list[str], t: float) -> list[dict[str, Any]]:
        """Per non-base input; `keys[k]`: the tensor name read from input k of the slice (the base's included)."""
        return [{p.name: self._pick(p, self._layers(entry), keys[k], t, f"{entry.where}.parameters.{p.name}")
                 for p in self.method.parameters if p.per_model}
                for k, entry in self.models]

    def check_given(self) -> None:
        """Every required parameter is given somewhere (the config alone; `check` then resolves it per tensor)."""
        for param in (p for p in self.method.parameters if p.required):
            for entry in [entry for _, entry in self.models] if param.per_model else [None]:
                if not any(param.name in given for given, _ in self._layers(entry)):
                    where = f"{entry.where}.parameters.{param.name}" if entry else f"parameters.{param.name}"
                    raise self._required(where, "; give it per model or under the global parameters" * param.per_model)

    def check(self, tensor: str, keys: list[str], t: float) -> None:
        """Every parameter of this tensor resolves, has its type and a value the method can use (`MergeMethod.check`);
        a refusal names the key where the value was given."""
        try:
            self.method.check(self.params(tensor, t), self.model_params(keys, t))
        except InvalidParameter as err:
            layers = self._layers(self.models[err.model][1] if err.model is not None else None)
            given = next(((p[err.key], name) for p, name in layers if err.key in p), None)
            where = f"{given[1]}.{err.key}" if given else f"{layers[0][1]}.{err.key} (its default)"
            varies = given is not None and isinstance(given[0], list | FilterValue)
            raise ConfigError(f"{self.source}: {where}: {err.message}{f' (at tensor {tensor})' if varies else ''}") from None

    def seed(self) -> int:
        seed = self.cfg.parameters.get(SEED.name, SEED.default)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ConfigError(f"{self.source}: parameters.seed: expected an integer (got {seed!r})")
        return seed

    def _required(self, where: str, detail: str = "") -> ConfigError:
        return ConfigError(f"{self.source}: {where}: required by {self.method.name}{detail}")

    def _pick(self, param: Param, layers: list[tuple[Params, str]], tensor: str, t: float, where: str) -> Any:
        for given, _ in layers:
            if param.name in given:
                value = resolve_value(given[param.name], tensor, t)
                if value is not _MISSING:
                    _check_type(value, param.default, f"{self.source}: {where}")
                    return value
        if param.required:
            raise self._required(where, f", but no value (and no filter) applies to tensor {tensor}")
        return param.default


def _check_type(value: Any, default: Any, where: str) -> None:
    """`value` has the type of the method's default; a required parameter (default None: weight, t) is a number."""
    if default is None or (isinstance(default, int | float) and not isinstance(default, bool)):
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number (got {value!r})")
        return
    ok = isinstance(value, bool) if isinstance(default, bool) else isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{where}: expected a {type(default).__name__} like the default {default!r} (got {value!r})")
