"""The `toyworld` verifier: exact match of a response against a toy task's gold answer."""

from __future__ import annotations

from typing import Any, Literal

from polyfuse.data.schemas import SampleRow
from polyfuse.scorers.base import SCORERS, ScorerSettings, Verifier
from polyfuse.toyworld.tasks import DOMAINS, verify


class ToyVerifierConfig(ScorerSettings):
    type: Literal["toyworld"] = "toyworld"
    domains: list[str] | None = list(DOMAINS)


@SCORERS.register("toyworld")
class ToyVerifier(Verifier):
    Config = ToyVerifierConfig

    def applies_to(self, row: SampleRow) -> bool:
        return row.answer is not None and super().applies_to(row)

    def check(self, row: SampleRow) -> tuple[bool, dict[str, Any]]:
        return verify(row.response, row.answer or ""), {"gold": row.answer}
