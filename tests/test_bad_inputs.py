"""Bad inputs to the data readers, config reader and model loader: each is a `UserError` that names the
file (and line or field) and says what was expected, never a traceback; refused writes leave nothing behind."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from polyfuse.config import read_yaml
from polyfuse.data.io import ShardStore, atomic_write_text, read_rows, remove_stale_temporaries, write_rows
from polyfuse.data.schemas import PromptRow
from polyfuse.errors import UserError
from polyfuse.models import ModelSpec, load_model, load_tokenizer
from polyfuse.models.loader import looks_local
from tiny_lm import build_tiny_model


def test_non_utf8_yaml_names_the_file(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(UserError, match=r"recipe\.yaml: not UTF-8 text \(byte 9"):
        read_yaml(path)


def test_non_utf8_jsonl_names_the_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'{"id": "a", "prompt": "fine"}\n{"id": "b", "prompt": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"prompts\.jsonl:2: not UTF-8 text"):
        read_rows(path, PromptRow)


def test_jsonl_path_that_is_a_folder(tmp_path):
    (tmp_path / "prompts.jsonl").mkdir()
    with pytest.raises(UserError, match=r"prompts\.jsonl: is a folder, expected a \.jsonl file"):
        read_rows(tmp_path / "prompts.jsonl", PromptRow)


def test_folder_that_is_not_a_datasets_folder(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="not a `datasets` folder"):
        read_rows(tmp_path / "data", PromptRow)


def test_corrupted_parquet(tmp_path):
    path = tmp_path / "prompts.parquet"
    write_rows(path, [PromptRow(id="a", prompt="x")])
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(UserError, match=r"prompts\.parquet: not a readable Parquet file"):
        read_rows(path, PromptRow)


def test_skip_invalid_with_every_row_invalid_is_an_error(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"nope": 1}\n\n{"id": "x", "prompt": 3}\n')
    with pytest.raises(UserError, match=r"every row is invalid \(2 rows; the first on line 1\)"):
        read_rows(path, PromptRow, skip_invalid=True)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ""])
def test_writes_follow_the_umask_and_leave_no_temporaries(tmp_path, suffix):
    old = os.umask(0o022)
    try:
        path = tmp_path / f"rows{suffix}"
        write_rows(path, [PromptRow(id="a", prompt="x")])
        write_rows(path, [PromptRow(id="b", prompt="y")])  # replaces the old copy
    finally:
        os.umask(old)
    target = path if suffix else path / "dataset_info.json"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [r.id for r in read_rows(path, PromptRow)] == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_stale_temporaries_of_dead_writers_are_removed_but_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    host = __import__("polyfuse.data.io", fromlist=["_HOST"])._HOST
    stale_file = tmp_path / f".00001.jsonl.{host}-{dead_pid}-abc123.tmp"
    stale_dir = tmp_path / f".model.{host}-{dead_pid}-xyz.tmp"
    live = tmp_path / f".00002.jsonl.{host}-{os.getpid()}-def456.tmp"
    other_host = tmp_path / f".00003.jsonl.elsewhere-{dead_pid}-ghi.tmp"
    stale_file.write_text("half")
    stale_dir.mkdir()
    live.write_text("being written")
    other_host.write_text("another machine's")
    ShardStore(tmp_path)  # a resuming stage opens its store
    assert not stale_file.exists() and not stale_dir.exists()
    assert live.exists() and other_host.exists()
    assert remove_stale_temporaries(tmp_path) == 0


def test_a_killed_atomic_write_is_cleaned_on_resume(tmp_path):
    script = (
        "import os, sys; sys.path.insert(0, {!r})\n"
        "from polyfuse.data import io\n"
        "def write(handle):\n    handle.write(b'half'); handle.flush(); os._exit(9)\n"
        "io.atomic_write({!r}, write)\n"
    ).format(str(Path(__file__).parents[1] / "src"), str(tmp_path / "shard.jsonl"))
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    assert [p.name for p in tmp_path.iterdir()][0].endswith(".tmp")
    ShardStore(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return Path(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny"))


def _broken_copy(tiny_folder: Path, tmp_path: Path, name: str) -> Path:
    copy = tmp_path / name
    shutil.copytree(tiny_folder, copy)
    return copy


def test_folder_without_config(tiny_folder, tmp_path):
    folder = _broken_copy(tiny_folder, tmp_path, "noconfig")
    (folder / "config.json").unlink()
    with pytest.raises(UserError, match="noconfig: no config.json in this folder"):
        load_model(ModelSpec(path=str(folder)))


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupted_weights(tiny_folder, tmp_path, damage):
    folder = _broken_copy(tiny_folder, tmp_path, damage)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 64)
    with pytest.raises(UserError, match=f"cannot load model from '.*{damage}'"):
        load_model(ModelSpec(path=str(folder)))


def test_file_that_is_not_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 a zip, not a GGUF")
    with pytest.raises(UserError, match="model.gguf is not a GGUF file"):
        load_model(ModelSpec(path=str(fake)))
    with pytest.raises(UserError, match="missing.gguf not found"):
        load_tokenizer(ModelSpec(path=str(tmp_path / "missing.gguf")))


@pytest.mark.parametrize("device, message", [("cuda:7", "device 'cuda:7' not available"), ("gpu0", "not a device name")])
def test_unavailable_device_is_refused_before_loading(tiny_folder, device, message):
    with pytest.raises(UserError, match=message):
        load_model(ModelSpec(path=str(tiny_folder), device=device))


def test_model_path_that_is_a_file(tmp_path):
    (tmp_path / "pivot").write_text("not a folder")
    with pytest.raises(UserError, match="pivot: is a file, expected a model folder"):
        load_model(ModelSpec(path=str(tmp_path / "pivot")))


def test_local_looking_paths_are_not_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    (tmp_path / "models").mkdir()
    assert looks_local("models/pivot") and looks_local("./pivot") and looks_local("a/b/c")
    assert not looks_local("Qwen/Qwen2.5-7B-Instruct") and not looks_local("gpt2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert looks_local("Qwen/Qwen2.5-7B-Instruct")
    with pytest.raises(UserError, match="models/pivot: no such folder"):
        load_model(ModelSpec(path="models/pivot"))


def test_atomic_text_write_replaces_and_keeps_mode(tmp_path):
    path = tmp_path / "manifest.json"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two" and stat.S_IMODE(path.stat().st_mode) & 0o044


def test_toyworld_cache_follows_xdg(monkeypatch, tmp_path):
    from polyfuse.toyworld import default_cache_dir

    monkeypatch.delenv("POLYFUSE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "polyfuse" / "toyworld"
    monkeypatch.setenv("POLYFUSE_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine" / "toyworld"


def test_a_killed_toyworld_build_leaves_nothing_after_the_next_build(tmp_path):
    from polyfuse.data.io import _HOST
    from polyfuse.toyworld import ToyWorldConfig, build_world, world_dir

    config = ToyWorldConfig.preset("tiny")
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    leftover = tmp_path / f".{config.key()}.{_HOST}-{dead}-abc.tmp"
    (leftover / "qwen-strings").mkdir(parents=True)
    build_world(config, cache_dir=tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [world_dir(config, tmp_path).name]


def _polyfuse(args: list[str], wrap: list[str] | None = None, preexec=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    return subprocess.run([*(wrap or []), sys.executable, "-m", "polyfuse", *args], capture_output=True, text=True,
                          env=env, preexec_fn=preexec)


def _in_tmpfs(folder: Path, options: str) -> list[str]:
    """Run the command in a private mount namespace where `folder` is a small tmpfs (root only, as in CI)."""
    return ["unshare", "--mount", "sh", "-c", f'mount -t tmpfs -o {options} tmpfs "{folder}" && exec "$@"', "sh"]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root to mount a tmpfs")
@pytest.mark.parametrize("case, options, message", [
    ("full disk", "size=64k", "no space left on the device"),
    ("read-only", "ro", "the file system is read-only"),
])
def test_disk_refusals_are_clear_errors_that_leave_nothing(tmp_path, case, options, message):
    folder = tmp_path / "cache"
    folder.mkdir()
    check = f'{sys.executable} -m polyfuse toyworld build --preset tiny --cache-dir "{folder}"; code=$?; echo LEFT:; ls -A "{folder}"; exit $code'
    result = subprocess.run([*_in_tmpfs(folder, options), "sh", "-c", check], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: cannot write" in result.stderr and message in result.stderr and "Traceback" not in result.stderr
    assert result.stdout.rstrip().endswith("LEFT:")  # `ls -A` inside the namespace: no temporary folder left


def test_file_size_limit_is_a_clear_error(tmp_path):
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    result = _polyfuse(["toyworld", "build", "--preset", "tiny", "--cache-dir", str(tmp_path)], preexec=limit)
    assert result.returncode == 2 and "file too large" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_output_location_that_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("the user's file")
    result = _polyfuse(["toyworld", "build", "--preset", "tiny", "--cache-dir", str(tmp_path / "taken" / "cache")])
    assert result.returncode == 2 and "a part of this path is a file, expected a folder" in result.stderr
    assert (tmp_path / "taken").read_text() == "the user's file"
