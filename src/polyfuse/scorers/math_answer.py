"""Rule-based maths answer checking with math-verify (gold first: `verify(gold, answer)`).

Gold answers may be GSM8K style (`... #### 42`), LaTeX (`\\frac{1}{2}`, `\\boxed{2\\sqrt{2}}`) or plain
numbers; what follows `####` (or the whole gold) is read as one LaTeX expression. In a response, a
`#### x` line wins; otherwise math-verify extracts the answer (a `\\boxed{}` first, else the last
expression), and a response that yields nothing is retried as inline LaTeX (`\\sqrt{8}` alone).
"""

from __future__ import annotations

import threading
from typing import Any, Literal

from polyfuse.data.schemas import SampleRow
from polyfuse.lazy import lazy_import
from polyfuse.scorers.base import SCORERS, ScorerSettings, Verifier

math_verify = lazy_import("math_verify")  # sympy: seconds, only when a row is checked


class MathConfig(ScorerSettings):
    type: Literal["math"] = "math"
    domains: list[str] | None = ["math"]

    def misses(self, row: Any) -> str | None:
        return super().misses(row) or (None if row.answer is not None else f"{self.name or self.type} needs the row's `answer`")


def _final_answer(text: str) -> str:
    """The text after the last `####` (GSM8K's answer marker), up to the end of that line."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0] if tail else tail
    return text


def _parse(text: str, timeout: int | None, is_gold: bool = False) -> list:
    text = _final_answer(text)
    as_latex = f"${text}$"
    if is_gold and "$" not in text and "\\boxed" not in text:
        # A gold answer is the answer itself, so bare LaTeX is read whole (`2\\sqrt{2}` is not `2`).
        return math_verify.parse(as_latex, parsing_timeout=timeout) or math_verify.parse(text, parsing_timeout=timeout)
    return math_verify.parse(text, parsing_timeout=timeout) or math_verify.parse(as_latex, parsing_timeout=timeout)


def _timeout() -> int | None:
    """math-verify's timeouts use SIGALRM, which only works in the main thread; elsewhere they are turned off
    rather than letting every parse fail silently."""
    return 5 if threading.current_thread() is threading.main_thread() else None


@SCORERS.register("math")
class MathVerifier(Verifier):
    Config = MathConfig

    def gold_problem(self, row: SampleRow) -> str | None:
        return None if _parse(row.answer or "", _timeout(), is_gold=True) else "math-verify cannot parse its gold answer"

    def check(self, row: SampleRow) -> tuple[bool, dict[str, Any]]:
        timeout = _timeout()
        gold = _parse(row.answer or "", timeout, is_gold=True)
        if not gold:
            return False, {"error": "gold answer could not be parsed", "gold": row.answer}
        answer = _parse(row.response, timeout)
        details = {"gold": str(gold[-1]), "extracted": str(answer[-1]) if answer else None}
        return bool(answer) and math_verify.verify(gold, answer, timeout_seconds=timeout), details
