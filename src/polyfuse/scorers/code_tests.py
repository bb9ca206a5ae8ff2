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
import builtins
import json
import re
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from pydantic import Field

from polyfuse.data.schemas import SampleRow
from polyfuse.scorers.base import SCORERS, ScorerSettings, Verifier
from polyfuse.scorers.sandbox import Limits, Sandbox, run_script
from polyfuse.scorers.sandbox_host import require_isolation

_FENCE = re.compile(r"```(python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_STDERR_TAIL = 2000
_DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_CONTEXT_KINDS = (ast.Import, ast.ImportFrom, ast.Assign, *_DEFINITIONS)


class CodeConfig(ScorerSettings):
    type: Literal["code"] = "code"
    domains: list[str] | None = ["code"]
    timeout_s: float = Field(default=10.0, gt=0, description="Wall time of one response's sandbox.")
    memory_mb: int = Field(default=1024, ge=64, description="Memory of one sandbox, all its processes together.")
    max_processes: int = Field(default=16, ge=1, description="Processes and threads in one sandbox.")
    max_output_bytes: int = Field(default=64 * 1024, ge=1024, description="Output kept from one sandbox.")
    workers: int = Field(default=2, ge=1, description="Sandboxes run at the same time.")
    unsafe_local: bool = Field(
        default=False,
        description="Run model code without bubblewrap (the verdict still cannot be forged, but the code can "
        "read and change your files, see and signal your processes and leave processes running).",
    )

    def limits(self) -> Limits:
        return Limits(
            timeout_s=self.timeout_s, memory_mb=self.memory_mb, max_processes=self.max_processes,
            max_output_bytes=self.max_output_bytes,
        )

    def misses(self, row: Any) -> str | None:
        return super().misses(row) or (None if row.tests else f"{self.name or self.type} needs the row's `tests`")


# CPython 3.11 keeps one AST-conversion depth counter per interpreter: two threads in `ast.parse` at once (the
# scorer's workers) can fail with "SystemError: AST constructor recursion depth mismatch" (CPython gh-106905).
_AST_LOCK = threading.Lock()


def _parse(code: str) -> ast.Module:
    with _AST_LOCK:
        return ast.parse(code)


def _top_level(code: str) -> list[ast.stmt] | None:
    try:
        return _parse(code).body
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


def _free_names(tests: str) -> list[str]:
    """Names the tests read, in order of first use (the candidate may define some of them)."""
    seen: dict[str, None] = {}
    for node in ast.walk(_parse(tests)):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            seen.setdefault(node.id)
    return list(seen)


def _trusted_namespace(prompt: Any, entry_point: str | None) -> dict[str, Any]:
    """The tests' globals: the prompt's own imports and helpers (HumanEval/32's `poly`, /38's
    `encode_cyclic`), run here from the trusted prompt, never from the response."""
    namespace: dict[str, Any] = {"__name__": "__tests__", "__builtins__": builtins}
    if isinstance(prompt, str) and entry_point:
        exec(compile(_context(prompt, entry_point), "<prompt>", "exec"), namespace)
    return namespace


def _stdio_cases(tests: str) -> list[tuple[str, str]] | None:
    """APPS-style stdin/stdout tests (`{"inputs": [...], "outputs": [...]}`), or None for Python tests."""
    if not tests.lstrip().startswith("{"):
        return None
    try:
        spec = json.loads(tests)
    except json.JSONDecodeError:
        return None
    inputs, outputs = spec.get("inputs"), spec.get("outputs")
    if "fn_name" in spec or not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs):
        return None
    if not all(isinstance(x, str) for x in inputs + outputs):
        return None
    return list(zip(inputs, outputs, strict=True))


def _same_output(got: str, expected: str) -> bool:
    """Judge-style comparison: line by line, trailing whitespace and trailing blank lines ignored."""
    def lines(text: str) -> list[str]:
        return [line.rstrip() for line in text.rstrip().splitlines()]
    return lines(got) == lines(expected)


@SCORERS.register("code")
class CodeVerifier(Verifier):
    Config = CodeConfig
    config: CodeConfig

    def require_ready(self) -> None:
        require_isolation(self.config.unsafe_local)

    def check(self, row: SampleRow) -> tuple[bool, dict[str, Any]]:
        require_isolation(self.config.unsafe_local)
        program, built_from = build_program(row.response, row.prompt, row.entry_point)
        details: dict[str, Any] = {"program": built_from}
        try:
            compile(program, "main.py", "exec")
        except (SyntaxError, ValueError) as err:
            return False, {**details, "stage": "static", "error": f"{type(err).__name__}: {err}"}
        if row.entry_point and not _defines(program, row.entry_point):
            return False, {**details, "stage": "static", "error": f"{row.entry_point!r} is not defined"}
        cases = None if row.entry_point else _stdio_cases(row.tests)
        if cases is not None:
            return self._check_stdio(program, cases, details)
        return self._check_calls(program, row, details)

    def _check_calls(self, program: str, row: SampleRow, details: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        """The tests run here, in the scorer, with the candidate's functions as proxies into its sandbox."""
        try:
            tests = compile(row.tests, "<tests>", "exec")
            namespace = _trusted_namespace(row.prompt, row.entry_point)
        except Exception as err:  # noqa: BLE001 - the row's own tests or prompt are broken: a fail, not a crash
            return False, {**details, "stage": "static", "error": f"the row's tests cannot run: {type(err).__name__}: {err}"}
        error = None
        with Sandbox(self.config.limits(), self.config.unsafe_local) as box:
            try:
                box.load(program)
                wanted = [n for n in _free_names(row.tests) if n not in namespace and not hasattr(builtins, n)]
                if row.entry_point:
                    wanted.append(row.entry_point)
                for name, found in box.resolve(wanted).items():
                    if found[0] == "callable":
                        namespace[name] = box.function(name)
                    elif found[0] == "value":
                        namespace[name] = found[1]
                exec(tests, namespace)
                if row.entry_point:
                    namespace["check"](namespace[row.entry_point])
            except BaseException:  # noqa: BLE001 - any failure of the candidate or a test is a fail
                error = traceback.format_exc(limit=-3)
        report = box.close()
        passed = error is None and report.failure is None
        return passed, {
            **details, "stage": "tests", "timed_out": report.timed_out, "failure": report.failure,
            "duration_s": report.duration_s, "isolation": report.isolation,
            "error": None if error is None else error[-_STDERR_TAIL:], "stderr": report.stderr[-_STDERR_TAIL:],
        }

    def _check_stdio(self, program: str, cases: list[tuple[str, str]], details: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        """One fresh sandbox per case; the output is compared here."""
        duration, isolation = 0.0, ""
        for index, (given, expected) in enumerate(cases):
            returncode, report = run_script(program, given, self.config.limits(), self.config.unsafe_local)
            duration += report.duration_s
            isolation = report.isolation
            ok = returncode == 0 and not report.output_truncated and _same_output(report.stdout, expected)
            if not ok:
                why = report.failure or (f"exit status {returncode}" if returncode else "wrong output")
                return False, {
                    **details, "stage": "tests", "timed_out": report.timed_out, "failure": report.failure,
                    "duration_s": round(duration, 3), "isolation": isolation, "error": f"case {index}: {why}",
                    "stderr": report.stderr[-_STDERR_TAIL:],
                }
        return True, {
            **details, "stage": "tests", "timed_out": False, "failure": None, "duration_s": round(duration, 3),
            "isolation": isolation, "error": None, "stderr": "",
        }

    def score(self, rows: list[SampleRow]) -> list[tuple[float | bool, dict[str, Any]]]:
        with ThreadPoolExecutor(self.config.workers) as pool:
            return list(pool.map(self.check, rows))
