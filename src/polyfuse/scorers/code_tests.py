"""Code correctness: the response passes static analysis and all of the row's tests, in the sandbox.

Which program is run (the rule):
1. The code is the first fenced block (```python, ```py or bare ```) that defines the row's
   `entry_point`, else the first fenced block, else the whole response.
2. If that code parses and defines `entry_point` at top level, the program is the prompt's other
   top-level statements (imports such as `List`, helper functions) followed by the code.
3. Otherwise, when the prompt is a plain string, the response is taken as a continuation of it
   (HumanEval completions continue the prompt's signature and docstring): program = prompt + code.
Static analysis: the program must compile and define `entry_point`. Then the tests run after it:
HumanEval style (`tests` defines `check(candidate)`, followed by `check(entry_point)`), or, without an
entry point, the tests as plain statements (e.g. MBPP `assert` lines).
"""

from __future__ import annotations

import ast
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from pydantic import Field

from polyfuse.data.schemas import SampleRow
from polyfuse.scorers.base import SCORERS, ScorerSettings, Verifier
from polyfuse.scorers.sandbox import run_sandboxed

_FENCE = re.compile(r"```(python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_STDERR_TAIL = 2000
_DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_CONTEXT_KINDS = (ast.Import, ast.ImportFrom, ast.Assign, *_DEFINITIONS)


class CodeConfig(ScorerSettings):
    type: Literal["code"] = "code"
    domains: list[str] | None = ["code"]
    timeout_s: float = Field(default=10.0, gt=0)
    memory_mb: int = Field(default=1024, ge=64)
    max_output_bytes: int = Field(default=64 * 1024, ge=1024)
    workers: int = Field(default=2, ge=1, description="Sandboxes run at the same time.")


def _top_level(code: str) -> list[ast.stmt] | None:
    try:
        return ast.parse(code).body
    except SyntaxError:
        return None


def _defines(code: str, name: str) -> bool:
    return any(isinstance(node, _DEFINITIONS) and node.name == name for node in _top_level(code) or [])


def _context(prompt: str, entry_point: str) -> str:
    """The prompt's top-level imports, definitions and assignments other than the entry point's own
    definition: what a full solution may rely on (`List`, HumanEval/38's `encode_cyclic`)."""
    lines = prompt.splitlines(keepends=True)
    kept = []
    for node in _top_level(prompt) or []:
        if not isinstance(node, _CONTEXT_KINDS) or getattr(node, "name", None) == entry_point:
            continue
        start = min([d.lineno for d in getattr(node, "decorator_list", [])] + [node.lineno])
        kept.append("".join(lines[start - 1 : node.end_lineno]).rstrip("\n"))
    return "\n".join(kept) + "\n\n" if kept else ""


def build_program(response: str, prompt: Any, entry_point: str | None) -> tuple[str, str]:
    """(program, how it was built: "response", "context+response" or "prompt+response"); see the module doc."""
    blocks = [m.group(2) for m in _FENCE.finditer(response)]
    defining = [b for b in blocks if entry_point and _defines(b, entry_point)]
    code = (defining or blocks or [response])[0]
    if entry_point is None:
        return code, "response"
    if _defines(code, entry_point):
        context = _context(prompt, entry_point) if isinstance(prompt, str) else ""
        return context + code, "context+response" if context else "response"
    if isinstance(prompt, str):
        return prompt + code, "prompt+response"
    return code, "response"


@SCORERS.register("code")
class CodeVerifier(Verifier):
    Config = CodeConfig
    config: CodeConfig

    def applies_to(self, row: SampleRow) -> bool:
        return bool(row.tests) and super().applies_to(row)

    def check(self, row: SampleRow) -> tuple[bool, dict[str, Any]]:
        program, built_from = build_program(row.response, row.prompt, row.entry_point)
        details: dict[str, Any] = {"program": built_from}
        try:
            compile(program, "main.py", "exec")
        except (SyntaxError, ValueError) as err:
            return False, {**details, "stage": "static", "error": f"{type(err).__name__}: {err}"}
        if row.entry_point and not _defines(program, row.entry_point):
            return False, {**details, "stage": "static", "error": f"{row.entry_point!r} is not defined"}
        harness = f"{program}\n\n{row.tests}\n"
        if row.entry_point:
            harness += f"\ncheck({row.entry_point})\n"
        cfg = self.config
        result = run_sandboxed(harness, cfg.timeout_s, cfg.memory_mb, cfg.max_output_bytes)
        return result.passed, {
            **details, "stage": "tests", "returncode": result.returncode, "timed_out": result.timed_out,
            "duration_s": result.duration_s, "network_isolated": result.network_isolated,
            "stderr": result.stderr[-_STDERR_TAIL:],
        }

    def score(self, rows: list[SampleRow]) -> list[tuple[float | bool, dict[str, Any]]]:
        with ThreadPoolExecutor(self.config.workers) as pool:
            return list(pool.map(self.check, rows))
