"""The merge-method interface: one tensor of every model in (fp32), the merged tensor out.

A method is a function of the tensors of one parameter name and its resolved parameters, so the streaming
executor can run it tensor by tensor in bounded memory; it works in place on tensors it owns (`TensorTask`).
Methods that need statistics over the whole model first (RSAF's median rate) implement `tensor_statistics` and
`finish_statistics`; the executor then makes a statistics pass before the merge pass.

Adding a method is adding one file in this package that subclasses `MergeMethod` and registers it in
`MERGE_METHODS`.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch

from polyfuse.errors import ConfigError
from polyfuse.registry import Registry


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


class MergeMethod(ABC):
    """One merge method. Class attributes describe its parameters for validation and for the resolved
    config: `defaults` (global), `model_defaults` (per model; a name mapped to None is required)."""

    name: ClassVar[str]
    # mergekit's base policy: "required" (task vectors against it), "optional" (used as the base when given),
    # "ignored" (the base, when given, is one more plain input, as mergekit appends it to the inputs)
    base_policy: ClassVar[str] = "required"
    min_models: ClassVar[int] = 1  # non-base models (all inputs for base_policy "ignored")
    max_models: ClassVar[int | None] = None
    defaults: ClassVar[dict[str, Any]] = {}
    model_defaults: ClassVar[dict[str, Any]] = {}
    description: ClassVar[str] = ""  # one line for logs and the resolved config
    explanations: ClassVar[dict[str, str]] = {}  # parameter -> what its value means here ("{v}": the value)

    @abstractmethod
    def merge(self, task: TensorTask) -> torch.Tensor: ...

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


MERGE_METHODS: Registry[type[MergeMethod]] = Registry("merge method", package="polyfuse.merge.methods")
