"""What `polyfuse run` checks before its first stage writes anything, and all that `polyfuse run --check` does.

A mistake anywhere in a recipe must cost seconds, not the stages before the one it breaks. Checked, without
loading any weights and without writing anything:

- every model the stages to run name (sources, pivot, reward models, teachers, the models `logprobs` scores,
  merge inputs given as paths) with `polyfuse.models.checks`: place, device, architecture for its use, a
  reward model's head, GGUF header, tokenizer, chat template;
- every data file the stages name exists, and every prompts file reads as valid prompt rows;
- every prompt can be judged: a prompt that no scorer of `score.scorers` judges (a math prompt without
  `answer`, a domain no scorer covers) would be scored as nothing, and one that no verifier of `eval.scorers`
  judges would stop `eval` at the end of the run.

Models of a toy world that is not built yet (only `--check` sees that: `run` builds the world first) are
polyfuse's own and are left out, as are its prompts.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polyfuse.config import walk_config
from polyfuse.errors import UserError
from polyfuse.models import ModelSpec
from polyfuse.models.checks import ModelCheck, check_model, enforce, models_in
from polyfuse.pipeline.context import stage_reference
from polyfuse.pipeline.sources import PromptSource, load_prompts


@dataclass
class RecipeCheck:
    """The models checked, what was found of the recipe's data, and the problems (each one line)."""

    models: list[ModelCheck] = field(default_factory=list)
    data: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def describe(self) -> str:
        """What was checked, a line per model and per data finding (`polyfuse run --check` prints it, then
        `enforce` shows the warnings and problems)."""
        lines = [f"checked {len(self.models)} models from their config and tokenizer files (no weights loaded) "
                 f"and the recipe's data in {self.seconds:.1f} s:"]
        lines += [f"  {check.describe()}" for check in self.models]
        lines += [f"  {finding}" for finding in self.data]
        return "\n".join(lines)

    def enforce(self) -> None:
        """Show the warnings; raise the problems as one `UserError`, a line each."""
        enforce(self.models, self.problems)


def check_recipe(recipe: Any) -> RecipeCheck:
    """Check the models, data files and prompts of the stages `recipe` runs (see the module docstring)."""
    started = time.perf_counter()
    report = RecipeCheck()
    sections = {name: getattr(recipe, name, None) for name in recipe.stages}
    unbuilt = _unbuilt_world(recipe)
    models = [(where, spec, task) for where, spec, task in models_in({"sources": recipe.sources, "pivot": recipe.pivot,
                                                                        **sections})
              if unbuilt is None or not Path(spec.path).is_relative_to(unbuilt)]
    report.models = [check_model(spec, task, where) for where, spec, task in models]
    report.models += [check_model(spec, where=where, chat=False) for where, spec in _merge_inputs(recipe)]
    if unbuilt is not None:
        report.data.append(f"- the toy world is not built yet ({unbuilt}): its models and prompts are polyfuse's "
                           "own, checked once `polyfuse run` has built it")
    for where, path in _data_paths(sections):
        if not Path(path).expanduser().exists():
            report.problems.append(f"{where}: {path}: data file not found")
    prompts = _read_prompts(recipe, "prompts", recipe.prompts, unbuilt, report)
    if "score" in recipe.stages and prompts:
        _check_judged(prompts, recipe.score.scorers, "score.scorers", "prompts", report)
    if "eval" in recipe.stages:
        from polyfuse.scorers import SCORERS

        rows = _read_prompts(recipe, "eval.prompts", recipe.eval.prompts, unbuilt, report)
        from polyfuse.evaluation import default_verifier_configs

        configs = default_verifier_configs() if recipe.eval.scorers is None else recipe.eval.scorers  # as eval grades
        verifiers = [c for c in configs if SCORERS.get(c.type).kind == "verifier"]
        if rows and _check_judged(rows, verifiers, "the verifiers of eval.scorers", "eval.prompts", report):
            _check_golds(rows, verifiers, report)
    report.seconds = time.perf_counter() - started
    return report


def _unbuilt_world(recipe: Any) -> Path | None:
    """The recipe's toy-world folder when the world is not built yet, else None."""
    from polyfuse.toyworld.build import WORLD_FILE

    if recipe.toyworld is None:
        return None
    root = recipe.toyworld.root()
    return None if (root / WORLD_FILE).is_file() else root


def _merge_inputs(recipe: Any) -> Iterator[tuple[str, ModelSpec]]:
    """The merge section's models given as paths (not the recipe's models or a stage's output, which exist
    only once that stage ran), each as a model spec; a `model+lora` reference as its model."""
    if "merge" not in recipe.stages or recipe.merge is None:
        return
    named = {"pivot", *(source.label for source in recipe.sources)}
    for reference in recipe.merge.referenced_models():
        if reference.path not in named and stage_reference(reference.path) is None:
            yield "merge", ModelSpec(path=reference.path)


def _data_paths(node: Any) -> Iterator[tuple[str, str]]:
    """(dotted key, path) of every data file a config names: a `PromptSource`'s `path` and any `data` or
    `calibration` key."""
    for where, value in walk_config(node):
        if isinstance(value, PromptSource) and value.data_file is not None:
            yield f"{where}.path", value.data_file
        elif isinstance(value, str) and where.rpartition(".")[2] in ("data", "calibration"):
            yield where, value


def _read_prompts(recipe: Any, where: str, source: PromptSource, unbuilt: Path | None, report: RecipeCheck) -> list:
    """The rows of a prompt source, read as its stage will read them (a malformed row is a problem now);
    [] when they cannot be read yet (a toy world not built) or at all."""
    if source.toyworld is not None and unbuilt is not None:
        return []
    if source.data_file is not None and not Path(source.data_file).expanduser().exists():
        return []  # reported as a missing data file
    try:
        rows = load_prompts(source)
    except UserError as err:
        report.problems.append(f"{where}: {err}")
        return []
    report.data.append(f"✓ {where}: {len(rows)} prompts from {source.path or 'the toy world'}")
    return rows


def _check_judged(rows: list, scorers: list, key: str, where: str, report: RecipeCheck) -> bool:
    """A problem when a prompt is judged by none of `scorers`, naming the first such prompt and why; True when
    every prompt is judged."""
    from polyfuse.scorers import unjudged

    missed = unjudged(rows, scorers)
    if not missed:
        report.data.append(f"✓ {where}: every prompt is judged by {key}")
        return True
    row, reasons = missed[0]
    why = "; ".join(reasons) or "no scorer is given"
    report.problems.append(
        f"{where}: {len(missed)} of {len(rows)} prompts cannot be judged by {key} and would be scored as nothing; "
        f"the first, id {row.id!r} (domain {row.domain!r}): {why}. Give such prompts what a scorer needs (math: "
        "`answer`, code: `tests`), add a scorer for their domain, or leave them out")
    return False


def _check_golds(rows: list, verifiers: list, report: RecipeCheck) -> None:
    """The eval stage's own pre-model checks (`polyfuse.evaluation.judges`: no empty or unreadable gold answer,
    every verifier can run here), now rather than after training."""
    from polyfuse.evaluation import judges
    from polyfuse.scorers import build_scorer

    try:
        judges(rows, [build_scorer(config) for config in verifiers])
    except UserError as err:
        report.problems.append(f"eval.prompts: {err}")
