"""Reading and writing rows: JSONL, Parquet or a `datasets` folder; atomic writes; resumable shards.

Every write goes to a temporary file in the same folder and is renamed into place, so a killed process
leaves either the old file or the new one, never half a file. `ShardStore` builds a large output
as numbered shards: a rerun skips shards that exist, so nothing is redone, lost or duplicated.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from pydantic import BaseModel, ValidationError

from polyfuse.errors import DataError

R = TypeVar("R", bound=BaseModel)


def _as_dict(row: BaseModel | dict[str, Any]) -> dict[str, Any]:
    return row.model_dump(mode="json", exclude_none=True) if isinstance(row, BaseModel) else row


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """`write` fills a temporary file in the same folder, which is then renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_rows(path: str | Path, rows: Iterable[BaseModel | dict[str, Any]]) -> int:
    """Write rows atomically; the format follows the suffix (`.jsonl`, `.parquet`) or, for a path
    without suffix, a `datasets` folder. Returns the number of rows."""
    path = Path(path)
    records = [_as_dict(r) for r in rows]
    if path.suffix != ".jsonl":  # columnar formats need the same columns in every row
        columns = list(dict.fromkeys(k for r in records for k in r))
        records = [{k: r.get(k) for k in columns} for r in records]
    if path.suffix == ".jsonl":
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(pa.Table.from_pylist(records), tmp)
        os.replace(tmp, path)
    elif path.suffix == "":
        import shutil

        from datasets import Dataset

        tmp = path.with_name(f".{path.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        Dataset.from_list(records).save_to_disk(str(tmp))
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    else:
        raise DataError(f"{path}: unsupported data format {path.suffix!r}; use .jsonl, .parquet or a folder")
    return len(records)


def _raw_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line or row number, record) pairs; JSON syntax errors are reported with their line."""
    if path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as err:
                    yield number, err
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for number, record in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield number, record
    elif path.is_dir():
        from datasets import load_from_disk

        for number, record in enumerate(load_from_disk(str(path)), start=1):
            yield number, record
    else:
        raise DataError(f"{path}: unsupported data format; use .jsonl, .parquet or a datasets folder")


@dataclass
class ReadReport:
    """What `read_rows(..., skip_invalid=True)` left out, by line."""

    skipped: list[tuple[int, str]] = field(default_factory=list)

    def summary(self) -> str:
        lines = ", ".join(str(n) for n, _ in self.skipped[:20])
        more = " ..." if len(self.skipped) > 20 else ""
        return f"skipped {len(self.skipped)} invalid rows (lines {lines}{more})"


def _explain(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "row"
        parts.append(f"field {key!r}: {'missing' if e['type'] == 'missing' else e['msg']}")
    return "; ".join(parts)


def read_rows(
    path: str | Path,
    schema: type[R],
    skip_invalid: bool = False,
    report: ReadReport | None = None,
) -> list[R]:
    """Read and validate every row. A malformed row raises `DataError` naming the file and line, unless
    `skip_invalid`, in which case it is recorded in `report` and left out."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    rows: list[R] = []
    seen: dict[str, int] = {}
    for number, record in _raw_records(path):
        problem = None
        if isinstance(record, Exception):
            problem = f"not valid JSON ({record.msg})"
        elif not isinstance(record, dict):
            problem = "expected a JSON object"
        else:
            try:
                row = schema.model_validate({k: v for k, v in record.items() if v is not None})
            except ValidationError as err:
                problem = _explain(err)
            else:
                row_id = getattr(row, "id", None)
                if row_id is not None and row_id in seen:
                    problem = f"duplicate id {row_id!r} (first on line {seen[row_id]})"
                else:
                    seen[row_id] = number
                    rows.append(row)
        if problem is not None:
            if not skip_invalid:
                raise DataError(f"{path}:{number}: {problem}")
            if report is not None:
                report.skipped.append((number, problem))
    return rows


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata sidecar of a data file (`<file>.meta.json`), or {} when there is none."""
    meta = Path(f"{path}.meta.json")
    return json.loads(meta.read_text()) if meta.exists() else {}


def write_metadata(path: str | Path, metadata: dict[str, Any]) -> None:
    write_json(Path(f"{path}.meta.json"), metadata)


class ShardStore:
    """Numbered JSONL shards in one folder. Each shard is written whole and atomically, so after a
    crash a shard either exists complete or not at all; `missing()` tells a rerun what is left."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.jsonl"

    def done(self, key: str) -> bool:
        return self.path(key).exists()

    def write(self, key: str, rows: Iterable[BaseModel | dict[str, Any]]) -> None:
        write_rows(self.path(key), rows)

    def read_all(self, schema: type[R], keys: Iterable[str]) -> list[R]:
        rows: list[R] = []
        for key in keys:
            rows.extend(read_rows(self.path(key), schema))
        return rows
