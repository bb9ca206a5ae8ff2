"""The `choice` verifier: multiple-choice questions answered by the letter of an option (ARC, MMLU style).

A row holds its options under `choices` and its gold answer as `"<letter>. <option text>"` (the text is the
gold continuation the bits-per-byte metric scores; `polyfuse.evaluation.datasets.load_olmo` writes such rows).
The letter a response picks: the one after "answer is" / "answer:", else a valid letter standing alone at the
start of the response ("C", "C.", "(C)"), else the option whose full text the response contains, if only one.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from polyfuse.data.schemas import SampleRow
from polyfuse.scorers.base import SCORERS, ScorerSettings, Verifier


class ChoiceConfig(ScorerSettings):
    type: Literal["choice"] = "choice"


def picked_letter(response: str, choices: list[str]) -> str | None:
    letters = "".join(chr(ord("A") + i) for i in range(len(choices)))
    stated = re.search(rf"answer(?: is)?\s*:?\s*\(?([{letters}])\b", response, flags=re.IGNORECASE)
    if stated:
        return stated.group(1).upper()
    leading = re.match(rf"\s*\(?([{letters}])(?:[.):]|\s|$)", response)
    if leading:
        return leading.group(1)
    named = [letters[i] for i, text in enumerate(choices) if text.strip() and text.strip().lower() in response.lower()]
    return named[0] if len(named) == 1 else None


@SCORERS.register("choice")
class ChoiceVerifier(Verifier):
    Config = ChoiceConfig

    def applies_to(self, row: SampleRow) -> bool:
        return isinstance((row.model_extra or {}).get("choices"), list) and bool(row.answer) and super().applies_to(row)

    def check(self, row: SampleRow) -> tuple[bool, dict[str, Any]]:
        gold = row.answer.strip()[0]
        picked = picked_letter(row.response, row.model_extra["choices"])
        return picked == gold, {"gold": gold, "picked": picked}
