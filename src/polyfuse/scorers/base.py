"""The scorer interface: reward models give every response a number, verifiers a pass/fail verdict.

Adding a scorer is one file: a config class (a `ScorerSettings` subclass whose `type` is a literal) and
a `Scorer` (or, for pass/fail checks, `Verifier`) subclass registered under the same name::

    class ToyConfig(ScorerSettings):
        type: Literal["toy"] = "toy"
        domains: list[str] | None = ["toy"]

    @SCORERS.register("toy")
    class ToyVerifier(Verifier):
        Config = ToyConfig
        def check(self, row):
            return row.response.strip() == row.answer, {}

`ScorerConfig` is the field type for configs: it picks the config class from `type` through the
registry, so scorers registered by other modules (e.g. the toy world) validate like built-in ones.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, SerializeAsAny, WrapValidator

from polyfuse.config import StrictModel, validate
from polyfuse.data.schemas import SampleRow
from polyfuse.registry import Registry


class ScorerSettings(StrictModel):
    """Options every scorer has. `name` is the key written into `rewards`/`verdicts` (default: `type`);
    `domains` restricts the scorer to rows of those domains (None: any domain)."""

    type: str = Field(description="The scorer: reward_model, math, code, toyworld, ...")
    name: str | None = Field(default=None, description="Key of its scores in the rows' rewards / verdicts; None: the type.")
    domains: list[str] | None = Field(default=None, description="Score rows of these domains only; None: every domain.")

    def misses(self, row: Any) -> str | None:
        """Why this scorer cannot judge `row` (a prompt or a sample: its `domain`, `answer`, `tests`), from the
        config alone, so that prompts nothing can judge are found before any model runs; None when it can.
        A scorer that needs a field of the row adds its own reason."""
        if self.domains is not None and row.domain not in self.domains:
            return f"{self.name or self.type} judges the domains {', '.join(self.domains)} only"
        return None


class Scorer(ABC):
    Config: ClassVar[type[ScorerSettings]]
    kind: ClassVar[Literal["reward", "verifier"]]

    def __init__(self, config: ScorerSettings, device: str | None = None):
        self.config = config
        self.name = config.name or config.type

    def applies_to(self, row: SampleRow) -> bool:
        return self.config.misses(row) is None

    def require_ready(self) -> None:
        """Raise a UserError if this scorer cannot run on this machine; called before heavy work."""
        return None

    @abstractmethod
    def score(self, rows: list[SampleRow]) -> list[tuple[float | bool, dict[str, Any]]]:
        """One (value, details) per row, in order."""


class Verifier(Scorer):
    """A pass/fail scorer; subclasses implement `check` for one row."""

    kind = "verifier"

    @abstractmethod
    def check(self, row: SampleRow) -> tuple[bool, dict[str, Any]]: ...

    def gold_problem(self, row: SampleRow) -> str | None:
        """Why no response to `row` can be judged (a gold answer this verifier cannot read), else None:
        evaluation refuses such rows before any model runs rather than scoring them 0."""
        return None

    def score(self, rows: list[SampleRow]) -> list[tuple[float | bool, dict[str, Any]]]:
        return [self.check(row) for row in rows]


SCORERS: Registry[type[Scorer]] = Registry("scorer", package="polyfuse.scorers")


# Validated by the config class of the scorer registered under `type`.
ScorerConfig = Annotated[SerializeAsAny[ScorerSettings], WrapValidator(SCORERS.config_validator(ScorerSettings))]


class _OneScorer(StrictModel):
    scorer: ScorerConfig


def parse_scorer_config(data: dict[str, Any] | ScorerSettings, source: str = "scorer") -> ScorerSettings:
    """A config mapping (e.g. `{"type": "math"}`) as the registered scorer's config class."""
    if isinstance(data, ScorerSettings):
        return data
    return validate(_OneScorer, {"scorer": data}, source).scorer


def unjudged(rows: list[Any], configs: list[ScorerSettings]) -> list[tuple[Any, list[str]]]:
    """(row, why each scorer misses it) of every row that none of `configs` can judge."""
    found = []
    for row in rows:
        reasons = [config.misses(row) for config in configs]
        if all(reasons):
            found.append((row, reasons))
    return found


def build_scorer(config: ScorerSettings | dict[str, Any], device: str | None = None) -> Scorer:
    """The scorer for `config`; `device` (if given) overrides the device of any model it loads."""
    config = parse_scorer_config(config)
    return SCORERS.get(config.type)(config, device=device)
