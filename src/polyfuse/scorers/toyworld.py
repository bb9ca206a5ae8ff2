"""The `toyworld` verifier: exact match of a response against the gold answer of a toy-world task.

It lives with the other scorers, so the registry finds it like any of them. The toy world
(`polyfuse.toyworld`, a floor above) checks its own answers with `exact_match`; its domains are the
verifier's default `domains` (a test keeps the two lists equal)."""

from __future__ import annotations

from typing import Any, Literal

from polyfuse.data.schemas import SampleRow
from polyfuse.scorers.base import SCORERS, ScorerSettings, Verifier


def exact_match(response: str, answer: str) -> bool:
    """Exact match after stripping surrounding whitespace (the toy models answer with the bare answer)."""
    return response.strip() == answer.strip()


class ToyVerifierConfig(ScorerSettings):
    type: Literal["toyworld"] = "toyworld"
    domains: list[str] | None = ["arithmetic", "strings", "compare"]  # the toy world's domains

    def misses(self, row: Any) -> str | None:
        return super().misses(row) or (None if row.answer is not None else f"{self.name or self.type} needs the row's `answer`")


@SCORERS.register("toyworld")
class ToyVerifier(Verifier):
    Config = ToyVerifierConfig

    def check(self, row: SampleRow) -> tuple[bool, dict[str, Any]]:
        return exact_match(row.response, row.answer or ""), {"gold": row.answer}
