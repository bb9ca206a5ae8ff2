"""The `reasoning_gym` verifier: a reasoning-gym task family's own `score_answer`.

A reasoning-gym prompt row (`polyfuse.evaluation.datasets.load_reasoning_gym`) carries the generator's entry
under `reasoning_gym` (its question, answer and metadata; the family is `metadata.source_dataset`), so the
family's `score_answer(answer, entry)` judges it exactly as reasoning-gym does. The answer a response gives is
its last `<answer>...</answer>` (reasoning-gym's own format, read by its `extract_answer`), else its last
non-empty line. Families give partial credit (a well-formed wrong answer can score 0.01): a response passes
when its score reaches `threshold`; the score is kept in the details.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from polyfuse.data.schemas import SampleRow
from polyfuse.errors import UserError
from polyfuse.scorers.base import SCORERS, ScorerSettings, Verifier

ENTRY = "reasoning_gym"  # the prompt-row field holding the generator's entry


class ReasoningGymConfig(ScorerSettings):
    type: Literal["reasoning_gym"] = "reasoning_gym"
    threshold: float = Field(default=1.0, gt=0.0, le=1.0, description="Score (0..1) at or above which an answer passes.")


def given_answer(response: str) -> str:
    """The last `<answer>...</answer>` of a response, else its last non-empty line."""
    from reasoning_gym.utils import extract_answer

    tagged = extract_answer(response)
    if tagged is not None:
        return tagged
    lines = [line.strip() for line in response.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


@SCORERS.register("reasoning_gym")
class ReasoningGymVerifier(Verifier):
    Config = ReasoningGymConfig
    config: ReasoningGymConfig

    def require_ready(self) -> None:
        try:
            import reasoning_gym  # noqa: F401
        except ImportError:
            raise UserError("the reasoning_gym verifier needs reasoning-gym: pip install reasoning-gym") from None

    def applies_to(self, row: SampleRow) -> bool:
        return isinstance((row.model_extra or {}).get(ENTRY), dict) and super().applies_to(row)

    def check(self, row: SampleRow) -> tuple[bool, dict[str, Any]]:
        from reasoning_gym import get_score_answer_fn

        entry = row.model_extra[ENTRY]
        answer = given_answer(row.response)
        score = float(get_score_answer_fn(entry["metadata"]["source_dataset"])(answer, entry))
        return score >= self.config.threshold, {"score": score, "extracted": answer, "gold": entry["answer"]}
