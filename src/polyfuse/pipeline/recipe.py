"""Recipe files: one YAML that names the models, the prompts and the settings of every stage.

The schema is built from the stage registry (`polyfuse.pipeline.context.STAGES`): each stage brings
its section, whether it runs by default, the stages it needs before it and its own cross-stage checks.

Paths of the form `toyworld://pivot` or `toyworld://sources/<name>` point into the recipe's toy world;
they are resolved from the world's config hash alone, so validation needs no model and no build.
`packaged://<name>` is a real GGUF model shipped in a PyPI package (`polyfuse.models.packaged`: smollm2,
gemma3, qwen-coder), so a recipe on them runs on any machine that installed the packages.
Relative paths are relative to the current directory. How the `merge` section names models is
described in `polyfuse.pipeline.stages.merge`. The schema reads no file: prompts and the toy world are read
by `polyfuse.pipeline.sources` when the stages run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationInfo, create_model, model_validator

from polyfuse.config import COPIED, StrictModel, YamlMapping, apply_overrides, read_yaml, validate
from polyfuse.pipeline.context import STAGES, stage, stage_order
from polyfuse.pipeline.sources import ToyWorldRef
from polyfuse.sampling import SampledModel

TOY_SCHEME = "toyworld://"
PACKAGED_SCHEME = "packaged://"


class RecipeBase(StrictModel):
    """The fields every recipe has; `Recipe` adds one field per registered stage."""

    name: str = Field(description="The run's name.")
    work_dir: str | None = Field(default=None, description="None: runs/<name>; every stage writes in <work_dir>/<stage>.")
    seed: int = Field(default=0, description="Default seed of sampling, the split and training (a section's own seed wins).")
    toyworld: ToyWorldRef | None = Field(default=None, description="The toy world of the recipe's toyworld:// paths "
                                         "and toy-world prompts (built on first use, then cached).")
    sources: list[SampledModel] = Field(min_length=1, description="The source models, each with its sampling settings.")
    pivot: SampledModel = Field(description="The pivot (target) model.")

    @model_validator(mode="before")
    @classmethod
    def _fill_sections(cls, data: Any, info: ValidationInfo) -> Any:
        """Each stage fills its section with what comes from the rest of the recipe (`Stage.fill`): the
        recipe's `seed`, so one number changes the whole run, its sources as models, ...; what a section
        gives itself wins. The filled keys are marked as copies (`polyfuse.config.COPIED`): a typo in a
        source is reported once, at `sources`, not again at `sample.models`."""
        copied = (info.context or {}).get(COPIED)  # set by `polyfuse.config.validate`
        if isinstance(data, dict):
            for name in STAGES.names():
                spec = stage(name)
                section = data.get(name, {} if spec.section_default else None)
                if isinstance(section, dict):
                    data[name] = spec.fill(dict(section), data)
                    if copied is not None:
                        copied.update((name, key) for key in spec.recipe_fills() if not _own_value(section, data[name], key))
        return data

    @model_validator(mode="after")
    def _consistent(self) -> RecipeBase:
        order = stage_order()
        if sorted(self.stages, key=order.index) != list(self.stages):
            raise ValueError(f"stages must keep the order {order}")
        for name in self.stages:
            spec = stage(name)
            if spec.section is not None and getattr(self, name) is None and not spec.section_default:
                raise ValueError(f"stage {name!r} is listed in 'stages' but has no '{name}' section")
        labels = [s.label for s in self.sources] + [self.pivot.label]
        if len(set(labels)) != len(labels):
            raise ValueError(f"model names must be unique, got {labels}")
        for position, name in enumerate(self.stages):
            spec = stage(name)
            for needed in spec.requires(self):
                if needed not in self.stages[:position]:
                    raise ValueError(f"stage {name!r} needs the stage {needed!r} to run before it")
            spec.check(self)
        return self

    @property
    def resolved_work_dir(self) -> Path:
        return Path(self.work_dir or f"runs/{self.name}")

    def save_resolved(self, path: Path) -> None:
        """The recipe as its stages run with it: every default and every value a section takes from the rest of
        the recipe written out, without what a stage only learns when it runs; it loads as a recipe again."""
        from polyfuse.data.io import atomic_write_text

        run_time = {name: {k for k, v in stage(name).recipe_fills().items() if v is None} for name in STAGES.names()}
        resolved = self.model_dump(mode="json", exclude={name: keys for name, keys in run_time.items() if keys})
        atomic_write_text(path, RESOLVED_HEADER + yaml.safe_dump(resolved, sort_keys=False))


RESOLVED_HEADER = ("# The recipe as the run resolved it: defaults and the values sections take from the rest of the recipe\n"
                   "# are written out. It loads as a recipe. Not written: what exists once earlier stages ran, such as\n"
                   "# the current pivot that logprobs scores (the model the last training stage made).\n")


def _own_value(section: dict[str, Any], filled: dict[str, Any], key: str) -> bool:
    """Whether the section gave `key` its value itself: kept by `fill`, and not a switch that `fill` turns into
    the recipe's value (logprobs' `sources: true`)."""
    return key in section and filled.get(key) is section[key] and not isinstance(section[key], bool)


def _recipe_schema() -> type[RecipeBase]:
    """`RecipeBase` plus the stage list and one section field per registered stage, in stage order."""
    order = stage_order()
    defaults = [name for name in order if stage(name).default]
    fields: dict[str, Any] = {
        "stages": (list[Literal[tuple(order)]], Field(default_factory=lambda: list(defaults))),  # type: ignore[valid-type]
    }
    for name in order:
        spec = stage(name)
        if spec.section is not None:
            fields[name] = spec.field()
    return create_model("Recipe", __base__=RecipeBase, __module__=__name__, **fields)


Recipe = _recipe_schema()


def _resolve_scheme(node: Any, scheme: str, resolve: Callable[[str], str]) -> Any:
    """`node` with every string `scheme + rest` replaced by `resolve(rest)`."""
    if isinstance(node, dict):
        return {k: _resolve_scheme(v, scheme, resolve) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_scheme(v, scheme, resolve) for v in node]
    if isinstance(node, str) and node.startswith(scheme):
        return resolve(node.removeprefix(scheme))
    return node


def _uses_scheme(node: Any, scheme: str) -> bool:
    if isinstance(node, dict):
        return any(_uses_scheme(v, scheme) for v in node.values())
    if isinstance(node, list):
        return any(_uses_scheme(v, scheme) for v in node)
    return isinstance(node, str) and node.startswith(scheme)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override, resolve `toyworld://` and `packaged://` paths and validate a recipe; no model is loaded."""
    data = apply_overrides(read_yaml(path), overrides)
    if _uses_scheme(data, TOY_SCHEME):
        root = validate(ToyWorldRef, data.get("toyworld") or {}, source=f"{path}: toyworld").root()
        data = YamlMapping(_resolve_scheme(data, TOY_SCHEME, lambda rest: str(root / rest)), getattr(data, "lines", {}))
    if _uses_scheme(data, PACKAGED_SCHEME):
        from polyfuse.models.packaged import packaged_model

        data = YamlMapping(_resolve_scheme(data, PACKAGED_SCHEME, lambda name: str(packaged_model(name, str(path)))),
                           getattr(data, "lines", {}))
    return validate(Recipe, data, source=str(path))
