"""The merge-method interface: one tensor of every model in (fp32), the merged tensor out.

A method is a function of the tensors of one parameter name and its resolved parameters, so the streaming
executor can run it tensor by tensor in bounded memory; it works in place on tensors it owns (`TensorTask`).
Methods that need statistics over the whole model first (RSAF's median rate) implement `tensor_statistics` and
`finish_statistics`; the executor then makes a statistics pass before the merge pass.

Adding a method is adding one file in this package that subclasses `MergeMethod`, declares its `parameters` and
registers it in `MERGE_METHODS`.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from polyfuse.errors import ConfigError
from polyfuse.lazy import lazy_import
from polyfuse.registry import Registry

torch = lazy_import("torch")


@dataclass
class TensorTask:
    """Everything a method sees for one parameter name. Tensors share one shape.

    Ownership: a method may overwrite the tensors of the task `to_fp32` returns, so deltas and sums are formed in
    place instead of as K more large tensors. A task marked `owned` hands its tensors over as they are: the
    executor reads fresh ones for every task and drops them after the merge. Any other task's tensors are lent:
    `to_fp32` copies them, and the caller's tensors are never written to."""

    name: str
    base: torch.Tensor | None  # th0; None for methods that need no base
    models: list[torch.Tensor]  # th_i of the K non-base models, in config order
    model_params: list[dict[str, Any]]  # per model, resolved for this tensor: weight, density, gamma, epsilon
    params: dict[str, Any]  # global, resolved for this tensor, defaults filled: lambda, normalize, t, ...
    seed: int = 0  # the config's global seed
    statistics: dict[str, Any] = field(default_factory=dict)  # from `finish_statistics`, for two-pass methods
    owned: bool = False  # the method may overwrite base and models (see above)

    def deltas(self) -> list[torch.Tensor]:
        """tau_i = th_i - th0, formed in place: afterwards `models` hold the task vectors, so call it once, on a
        task that owns its tensors (from `to_fp32`)."""
        assert self.base is not None, "this method needs a base model"
        assert self.owned, "deltas are formed in place: call to_fp32() first"
        for model in self.models:
            model.sub_(self.base)
        return self.models

    def generator(self, model_index: int) -> torch.Generator:
        """A generator seeded from (global seed, tensor name, model index), so random methods give the same
        result whatever the order in which tensors are processed."""
        digest = hashlib.sha256(f"{self.seed}:{self.name}:{model_index}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))

    def to_fp32(self) -> TensorTask:
        """The same task, owning fp32 tensors: upcasts are new tensors anyway; fp32 tensors are taken as they are
        when this task owns them, else cloned."""

        def owned_fp32(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.dtype != torch.float32:
                return tensor.float()
            return tensor if self.owned else tensor.clone()

        return replace(
            self,
            base=None if self.base is None else owned_fp32(self.base),
            models=[owned_fp32(model) for model in self.models],
            owned=True,
        )


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method, declared once: config validation (name, required, type of the default),
    the resolved config (`explain`), docs/merge-compat.md and `polyfuse config show merge` all read it.

    `default` None: required. `per_model`: given per input model (mergekit's per-input scope; the base takes no
    value), else once for the merge. `explain`: what a value did, for the resolved config: a format string with
    `{v}`, or a function of the value."""

    name: str
    default: Any = None
    per_model: bool = False
    description: str = ""
    explain: str | Callable[[Any], str] = ""

    @property
    def required(self) -> bool:
        return self.default is None

    def explained(self, value: Any) -> str:
        if callable(self.explain):
            return self.explain(value)
        return self.explain.format(v=value) if self.explain else f"{self.name} {value} = {self.description}"

    def but(self, default: Any) -> Param:
        """The same parameter with another default (mergekit's methods of one family differ only there)."""
        return replace(self, default=default)


def percent(value: Any) -> str:
    return f"{float(value) * 100:g}%"


WEIGHT = Param("weight", per_model=True, description="this model's weight",
               explain="weight {v} = this model's tensors (or task vector) count {v}x")
DENSITY = Param("density", 1.0, per_model=True, description="the fraction of the task vector's entries kept",
                explain=lambda v: (f"density {v} = keep {percent(v)} of each task vector's entries, drop the rest"
                                   if float(v) < 1 else
                                   f"density {v} = keep every entry: no sparsification (as in mergekit)"))


class MergeMethod(ABC):
    """One merge method. `parameters` declares every parameter it reads (`Param`); `defaults` (global) and
    `model_defaults` (per model) are derived from them, a name mapped to None being required."""

    name: ClassVar[str]
    # mergekit's base policy: "required" (task vectors against it), "optional" (used as the base when given),
    # "ignored" (the base, when given, is one more plain input, as mergekit appends it to the inputs)
    base_policy: ClassVar[str] = "required"
    min_models: ClassVar[int] = 1  # non-base models (all inputs for base_policy "ignored")
    max_models: ClassVar[int | None] = None
    parameters: ClassVar[tuple[Param, ...]] = ()
    defaults: ClassVar[dict[str, Any]] = {}
    model_defaults: ClassVar[dict[str, Any]] = {}
    description: ClassVar[str] = ""  # one line for logs and the resolved config

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if {"defaults", "model_defaults"} & set(vars(cls)):
            raise TypeError(f"{cls.__name__}: declare parameters as `parameters = (Param(...), ...)`; defaults and "
                            f"model_defaults are derived from them")
        cls.defaults = {p.name: p.default for p in cls.parameters if not p.per_model}
        cls.model_defaults = {p.name: p.default for p in cls.parameters if p.per_model}

    @classmethod
    def parameter(cls, name: str) -> Param | None:
        return next((p for p in cls.parameters if p.name == name), None)

    @abstractmethod
    def merge(self, task: TensorTask) -> torch.Tensor: ...

    @classmethod
    def check(cls, params: dict[str, Any], model_params: list[dict[str, Any]]) -> None:
        """Refuse parameter values this method cannot use (`InvalidParameter`), for one tensor's resolved
        parameters; the plan calls it for every tensor before any is read."""
        check_density(model_params)

    def param(self, task: TensorTask, key: str) -> Any:
        """A global parameter of `task`, falling back to this method's default; None means required."""
        value = task.params.get(key, self.defaults.get(key))
        if value is None:
            raise ConfigError(f"merge method {self.name!r} needs the parameter {key!r}")
        return value

    def model_param(self, task: TensorTask, index: int, key: str) -> Any:
        """A per-model parameter of model `index`, falling back to this method's default."""
        given = task.model_params[index] if index < len(task.model_params) else {}
        value = given.get(key, self.model_defaults.get(key))
        if value is None:
            raise ConfigError(
                f"merge method {self.name!r} needs the per-model parameter {key!r} (model {index})"
            )
        return value

    def tensor_statistics(self, task: TensorTask) -> dict[str, Any] | None:
        """Per-tensor statistics for a statistics pass; None: the method needs none."""
        return None

    def finish_statistics(self, per_tensor: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Whole-model statistics from every tensor's; handed to `merge` as `task.statistics`."""
        return {}

    def report(self) -> dict[str, Any]:
        """What the method decided while merging, for `merge_report.json` (e.g. RSAF's keep ratios); {}: nothing."""
        return {}


class InvalidParameter(ConfigError):
    """A parameter value a method cannot use (raised by `MergeMethod.check` and the functions it calls); the plan
    names where the value was given. `model`: the index of the non-base model whose parameter it is."""

    def __init__(self, key: str, message: str, model: int | None = None):
        super().__init__(f"{key}: {message}")
        self.key, self.message, self.model = key, message, model


def check_density(model_params: list[dict[str, Any]]) -> None:
    """density is the fraction of a task vector's entries kept: 0 drops the task vector (mergekit's rule for a
    density <= 0), 1 keeps it whole (mergekit's rule for >= 1). Outside [0, 1] it is a typo: refused."""
    for i, params in enumerate(model_params):
        density = params.get("density")
        if density is not None and not 0 <= density <= 1:
            raise InvalidParameter("density", f"must be between 0 and 1, the fraction of the task vector kept "
                                              f"(got {density}; mergekit would treat it as "
                                              f"{'1' if density > 1 else '0'})", i)


MERGE_METHODS: Registry[type[MergeMethod]] = Registry("merge method", package="polyfuse.merge.methods")
