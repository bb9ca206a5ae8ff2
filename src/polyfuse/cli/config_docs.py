"""`polyfuse config show STAGE`: a stage's config as annotated YAML, generated from its pydantic model, so the
documentation of every key is the code that validates it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, create_model

from polyfuse.config import annotated_yaml
from polyfuse.errors import ConfigError


def _command_configs() -> dict[str, type]:
    """The configs the commands' `--config` takes, by name: every stage's section (the same class as the
    recipe's section, whose models a recipe names once in `sources` and `pivot`), the toy world's and the
    recipe's."""
    from polyfuse.pipeline.context import STAGES
    from polyfuse.pipeline.recipe import RecipeBase
    from polyfuse.toyworld import ToyWorldConfig

    sections = {name: STAGES.get(name).section for name in STAGES.names() if STAGES.get(name).section is not None}
    return {**sections, "toyworld": ToyWorldConfig, "recipe": RecipeBase}


def _objective_registries() -> list[tuple[Any, type]]:
    """(registry, training config) of the objectives with a `polyfuse train NAME` command each: the preference
    objectives (`po`) and the unpaired ones (`upo`)."""
    from polyfuse.objectives import OBJECTIVES, UNPAIRED_OBJECTIVES
    from polyfuse.trainers import PreferenceTrainConfig, UnpairedTrainConfig

    return [(OBJECTIVES, PreferenceTrainConfig), (UNPAIRED_OBJECTIVES, UnpairedTrainConfig)]


def _objective_config(name: str) -> type | None:
    """The training config with `objective: name` and that objective's own keys under `objective_args` (what
    `polyfuse train NAME --config` takes), or None when no registry has the objective."""
    for registry, base in _objective_registries():
        if name in registry.names():
            objective = registry.get(name)
            return create_model(
                f"{name} training", __base__=base, __doc__=base.__doc__,
                objective=(Literal[name], Field(default=name, description="The objective.")),  # type: ignore[valid-type]
                objective_args=(objective, Field(default_factory=objective, description=f"The hyper-parameters of {name}.")),
            )
    return None


def stage_names() -> list[str]:
    names = {n.replace("_", "-") for registry, _ in _objective_registries() for n in registry.names()}
    return sorted({*_command_configs(), *names})


def stage_config(stage: str, recipe: bool = False) -> type:
    """The config class `config show STAGE` documents: the stage's section (what its command's `--config` and
    a recipe's section both take), or an objective's training config."""
    commands = _command_configs()
    if stage in commands:
        return commands[stage]
    config = _objective_config(stage.replace("-", "_"))
    if config is not None:
        return config
    raise ConfigError(f"no stage {stage!r}; config show knows: {', '.join(stage_names())}")


def _variants() -> dict[type, list[type]]:
    """Fields that hold one of several registered models: every scorer type and every backend is shown (a list
    field: one item each; a single field: one commented-out block each)."""
    from polyfuse.sampling import BACKENDS, BackendSettings
    from polyfuse.scorers import SCORERS
    from polyfuse.scorers.base import ScorerSettings

    return {ScorerSettings: [SCORERS.get(name).Config for name in SCORERS.names()],
            BackendSettings: [BACKENDS.get(name).Config for name in BACKENDS.names()]}


RECIPE_TITLE = ("A recipe (`polyfuse run RECIPE`): the models, the stages to run and one section per stage. Relative "
                "paths are relative to the current folder; toyworld://pivot and toyworld://sources/NAME point into "
                "the toy world of the `toyworld` key; packaged://smollm2, packaged://gemma3 and packaged://qwen-coder "
                "are the GGUF files of their PyPI packages (docs/real-models.md).")


def _recipe_fills(stage: str) -> dict[str, str | None]:
    """The keys of a stage's recipe section that the recipe fills (`Stage.recipe_fills`)."""
    from polyfuse.pipeline.context import STAGES

    return STAGES.get(stage)().recipe_fills() if stage in STAGES.names() else {}


def stage_config_yaml(stage: str, recipe: bool = False) -> str:
    """`polyfuse config show STAGE`'s output. With `recipe`, the recipe section's: the keys the recipe fills from
    its other keys are marked and commented out, and those a recipe does not give (set when the stage runs)
    are left out; without, a command's: the keys only a recipe reads are left out (a command refuses them)."""
    model = stage_config(stage, recipe)
    fills = _recipe_fills(stage) if recipe else {}
    exclude = tuple(k for k, v in fills.items() if v is None) if recipe else getattr(model, "recipe_only", ())
    text = annotated_yaml(model, _variants(), title=RECIPE_TITLE if stage == "recipe" else None, exclude=exclude,
                          filled={k: v for k, v in fills.items() if v is not None})
    text += model.yaml_appendix() if hasattr(model, "yaml_appendix") else ""  # what the keys' comments cannot say
    if stage == "recipe":
        from polyfuse.pipeline.context import stage_order

        text += ("# stages: the stages to run, in this order: " + ", ".join(stage_order()) + ".\n"
                 "# Then one section per stage, named after it: `polyfuse config show STAGE` documents each.\n")
    return f"# polyfuse config show {stage}{' --recipe' * recipe}\n{text}"

