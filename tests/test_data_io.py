"""The data model's IO: round trips in every format, clear errors with file and line, atomic shards."""

from __future__ import annotations

import json

import pytest

from polyfuse.data import PreferenceRow, PromptRow, read_rows, write_rows
from polyfuse.data.io import ReadReport, ShardStore, read_metadata, write_metadata
from polyfuse.errors import DataError

ROWS = [
    PreferenceRow(
        id="a",
        prompt=[{"role": "user", "content": "2+2?"}],
        chosen=[{"role": "assistant", "content": "4"}],
        rejected=[{"role": "assistant", "content": "5"}],
        chosen_reward=0.7,
        rejected_reward=0.65,
    ),
    PreferenceRow(
        id="b",
        prompt=[{"role": "user", "content": "hi"}],
        chosen=[{"role": "assistant", "content": "yo"}],
        rejected=[{"role": "assistant", "content": "no"}],
        ref_chosen_logps=-3.5,
    ),
]


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.parquet", "rows_ds"])
def test_round_trip(tmp_path, name):
    path = tmp_path / name
    assert write_rows(path, ROWS) == 2
    back = read_rows(path, PreferenceRow)
    assert [r.model_dump(exclude_none=True) for r in back] == [r.model_dump(exclude_none=True) for r in ROWS]


def test_trl_rows_load_unchanged(tmp_path):
    path = tmp_path / "trl.jsonl"
    path.write_text(
        json.dumps({"id": "x", "prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}) + "\n"
    )
    (row,) = read_rows(path, PreferenceRow)
    assert (row.prompt, row.chosen, row.rejected) == ("Hi", "Hello!", "Go away.")


def test_malformed_rows_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "1", "prompt": "q"}\n{"id": "2"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'prompt': missing"):
        read_rows(path, PromptRow)
    report = ReadReport()
    rows = read_rows(path, PromptRow, skip_invalid=True, report=report)
    assert [r.id for r in rows] == ["1"]
    assert [n for n, _ in report.skipped] == [2, 3]
    assert "not valid JSON" in report.skipped[1][1]
    assert report.summary().startswith("skipped 2 invalid rows (lines 2, 3")


def test_duplicate_ids_are_rejected(tmp_path):
    path = tmp_path / "dup.jsonl"
    path.write_text('{"id": "1", "prompt": "q"}\n{"id": "1", "prompt": "r"}\n')
    with pytest.raises(DataError, match=r"dup.jsonl:2: duplicate id '1' \(first on line 1\)"):
        read_rows(path, PromptRow)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_rows(tmp_path / "nope.jsonl", PromptRow)
    with pytest.raises(DataError, match="unsupported data format"):
        write_rows(tmp_path / "rows.csv", ROWS)


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_rows(path, ROWS)

    class Boom(dict):
        def items(self):
            raise RuntimeError("crash while serialising")

    with pytest.raises(RuntimeError):
        write_rows(path, [ROWS[0], Boom(id="c")])
    assert len(read_rows(path, PreferenceRow)) == 2  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


def test_shard_store_resumes_without_duplicates(tmp_path):
    store = ShardStore(tmp_path / "shards")
    store.write("s-00000", [PromptRow(id="1", prompt="a")], {"process": 0, "processes": 2})
    assert store.done("s-00000") and not store.done("s-00001")
    store.write("s-00001", [PromptRow(id="2", prompt="b")], {"process": 1, "processes": 2})
    store.write("s-00001", [PromptRow(id="2", prompt="b")], {"process": 0, "processes": 1})  # a rerun rewrites, never appends
    assert [r.id for r in store.read_all(PromptRow, ["s-00000", "s-00001"])] == ["1", "2"]
    assert [read_metadata(store.path(k)) for k in ("s-00000", "s-00001")] == [{"process": 0, "processes": 2},
                                                                              {"process": 0, "processes": 1}]


def test_metadata_sidecar(tmp_path):
    path = tmp_path / "rows.jsonl"
    assert read_metadata(path) == {}
    write_metadata(path, {"sources": ["a", "b"]})
    assert read_metadata(path) == {"sources": ["a", "b"]}
