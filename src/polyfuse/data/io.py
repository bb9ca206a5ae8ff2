"""Reading and writing rows: JSONL, Parquet or a `datasets` folder; atomic writes; resumable shards.

Every write goes to a temporary file in the same folder and is renamed into place, so a killed process
leaves either the old file or the new one, never half a file. `ShardStore` builds a large output
as numbered shards: a rerun skips shards that exist, so nothing is redone, lost or duplicated.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from pydantic import BaseModel, ValidationError

from polyfuse.errors import DataError, storage_error

R = TypeVar("R", bound=BaseModel)


def _as_dict(row: BaseModel | dict[str, Any]) -> dict[str, Any]:
    return row.model_dump(mode="json", exclude_none=True) if isinstance(row, BaseModel) else row


_HOST = socket.gethostname().replace(".", "_")


def _temp_prefix(path: Path) -> str:
    """Temporary names carry the host and PID of their writer, so a later run can tell a leftover of a killed
    process (safe to delete) from a file another live process is still writing."""
    return f".{path.name}.{_HOST}-{os.getpid()}-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str | Path, recursive: bool = False) -> int:
    """Delete the temporary files and folders that killed writers on this host left in `folder` (and, with
    `recursive`, in every folder below it); returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for root, folders, files in os.walk(folder):
        for name in [*folders, *files]:
            match = re.fullmatch(rf"\..+\.{re.escape(_HOST)}-(\d+)-[^.]*\.tmp", name)
            if match is None or _process_alive(int(match.group(1))):
                continue
            entry = Path(root) / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
        if not recursive:
            break
        folders[:] = [name for name in folders if (Path(root) / name).is_dir()]  # not into removed ones
    return removed


def temporary_folder(path: str | Path) -> Path:
    """A new empty folder beside `path`, named so that `remove_stale_temporaries` clears it if its writer dies."""
    path = Path(path)
    folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp"))
    os.chmod(folder, 0o777 & ~_umask())  # mkdtemp's 0700 would make the final folder private
    return folder


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_tree(root: Path) -> None:
    for file in [root, *root.rglob("*")]:
        if file.is_file():
            with file.open("rb") as handle:
                os.fsync(handle.fileno())


def follow_umask(root: str | Path) -> None:
    """Give `root` and everything in it the modes the user's umask gives new files and folders: writers
    such as safetensors create private (0600) files, and HF tools' outputs follow the umask."""
    mask = _umask()
    for entry in [Path(root), *Path(root).rglob("*")]:
        if not entry.is_symlink():
            os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~mask)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """`write` fills a temporary file in the same folder, which is then renamed into place.

    The file gets the user's umask (like every HF tool), not `mkstemp`'s private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        raise_for_storage(err, path)
        raise


def atomic_write_folder(path: str | Path, write: Callable[[Path], Any]) -> None:
    """`write` fills a temporary folder beside `path`, which then replaces `path`.

    The old copy is renamed aside before the new one moves in and deleted only after, so a kill leaves
    the old or the new folder (or, between the two renames, the old one under its temporary name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_folder(path)
    try:
        write(tmp)
        follow_umask(tmp)
        _fsync_tree(tmp)
        old = None
        if path.exists():
            old = temporary_folder(path)
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_for_storage(err, path)
        raise


def raise_for_storage(err: BaseException, path: Path) -> None:
    """A full disk, a read-only folder or a file-size limit met while writing `path`: a `StorageError` that
    names `path` (the write's own error often names no file)."""
    problem = storage_error(err, where=path)
    if problem is not None and problem is not err:
        raise problem from err


def link_or_copy(source: str | Path, target: str | Path) -> None:
    """A hard link of a finished file (written once, by atomic rename, so no writer changes it in place), or a copy
    where the two paths are on different filesystems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


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

        atomic_write(path, lambda handle: pq.write_table(pa.Table.from_pylist(records), handle))
    elif path.suffix == "":
        from datasets import Dataset

        atomic_write_folder(path, lambda tmp: Dataset.from_list(records).save_to_disk(str(tmp)))
    else:
        raise DataError(f"{path}: unsupported data format {path.suffix!r}; use .jsonl, .parquet or a folder")
    return len(records)


def _raw_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line or row number, record) pairs; JSON syntax errors are reported with their line."""
    if path.suffix in (".jsonl", ".json", ".parquet") and path.is_dir():
        raise DataError(f"{path}: is a folder, expected a {path.suffix} file")
    if path.suffix in (".jsonl", ".json"):
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(f"{path}:{number}: not UTF-8 text (byte {err.start}: {err.reason})") from None
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as err:
                    yield number, err
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{path}: not a readable Parquet file ({err})") from None
        for number, record in enumerate(table.to_pylist(), start=1):
            yield number, record
    elif path.is_dir():
        from datasets import load_from_disk

        if not (path / "dataset_info.json").is_file() and not (path / "dataset_dict.json").is_file():
            raise DataError(f"{path}: a folder, but not a `datasets` folder saved with save_to_disk (no dataset_info.json)")
        try:
            dataset = load_from_disk(str(path))
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: cannot read this `datasets` folder ({err})") from None
        if not hasattr(dataset, "features"):
            raise DataError(f"{path}: a DatasetDict with splits {list(dataset)}; give the folder of one split")
        for number, record in enumerate(dataset, start=1):
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
        message = "missing" if e["type"] == "missing" else e["msg"].removeprefix("Value error, ")
        key = ".".join(str(p) for p in e["loc"])
        parts.append(f"field {key!r}: {message}" if key else message)  # no key: a check across fields
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
    invalid, first_invalid = 0, 0
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
            invalid += 1
            first_invalid = first_invalid or number
            if report is not None:
                report.skipped.append((number, problem))
    if invalid and not rows:
        raise DataError(f"{path}: every row is invalid ({invalid} rows; the first on line {first_invalid}); nothing to read")
    return rows


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata sidecar of a data file (`<file>.meta.json`), or {} when there is none."""
    meta = Path(f"{path}.meta.json")
    return json.loads(meta.read_text()) if meta.exists() else {}


def write_metadata(path: str | Path, metadata: dict[str, Any]) -> None:
    write_json(Path(f"{path}.meta.json"), metadata)


class ShardStore:
    """Numbered JSONL shards in one folder. Each shard is written whole and atomically, so after a
    crash a shard either exists complete or not at all; `done()` tells a rerun what is left. The folder is
    made with the first shard: a command refused before its first shard leaves nothing behind. A shard's
    sidecar (`<key>.jsonl.meta.json`) records which process of a launch wrote it; it is written after the
    shard, so a shard is finished only once its sidecar exists too (a kill between the two redoes the shard).

    A shard being worked on may also keep a journal (`<key>.partial.jsonl`): records appended one line at
    a time as pieces of the shard finish (a server's requests), so a killed run redoes none of them. A
    line cut short by the kill is ignored; the journal is deleted once its shard is written (or, when a kill
    came between the two, by the next store on the folder)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        remove_stale_temporaries(self.folder)
        for journal in self.folder.glob("*.partial.jsonl"):
            if self.done(journal.name.removesuffix(".partial.jsonl")):
                journal.unlink(missing_ok=True)  # processes of a launch may race here

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.jsonl"

    def done(self, key: str) -> bool:
        return self.path(key).exists() and Path(f"{self.path(key)}.meta.json").exists()

    def write(self, key: str, rows: Iterable[BaseModel | dict[str, Any]], writer: dict[str, Any]) -> None:
        """Write the shard, then its sidecar (`writer`: `ShardPlan.writer`): a write refused (full disk) leaves
        nothing, and a kill between the two a shard without its sidecar, which `done` counts as unfinished."""
        write_rows(self.path(key), rows)
        write_metadata(self.path(key), writer)
        self.journal(key).unlink(missing_ok=True)

    def journal(self, key: str) -> Path:
        return self.folder / f"{key}.partial.jsonl"

    def append(self, key: str, record: dict[str, Any]) -> None:
        """Add one record to the shard's journal; written through before this returns, so it outlives a
        killed process."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.journal(key).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    def journaled(self, key: str) -> list[dict[str, Any]]:
        """The complete records of the shard's journal, in the order they were appended. A last line that a
        killed writer left unfinished is cut off the file, so the records appended next start on a line of
        their own."""
        path = self.journal(key)
        if not path.exists():
            return []
        data = path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            os.truncate(path, complete)
        return [json.loads(line) for line in data[:complete].decode("utf-8").splitlines()]

    def read_all(self, schema: type[R], keys: Iterable[str]) -> list[R]:
        rows: list[R] = []
        for key in keys:
            rows.extend(read_rows(self.path(key), schema))
        return rows
