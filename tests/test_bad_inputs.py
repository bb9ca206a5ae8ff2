"""Bad inputs, from the data readers and the model loader up to every command: each is a `UserError` that
names the file (and line or key) and says what was expected, exit code 2, never a traceback; a refused
command leaves nothing behind. The table `CASES` at the end runs one user mistake per case through the CLI."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from polyfuse.cli.main import main
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


def test_a_stage_whose_input_an_earlier_stage_left_empty_names_it(tmp_path):
    from polyfuse.pipeline.runner import _refuse_empty_inputs

    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / "sft.jsonl").write_text("")
    (tmp_path / "pairs" / "report.json").write_text("{}")
    with pytest.raises(UserError, match=r"stage 'sft': its input .*pairs/sft\.jsonl has no rows; stage 'pairs' kept "
                                        r"none \(see .*pairs/report\.json\)"):
        _refuse_empty_inputs("sft", {"sft": str(tmp_path / "pairs" / "sft.jsonl")}, tmp_path)


def test_folder_writes_follow_the_umask_even_when_the_writer_makes_private_files(tmp_path):
    """safetensors writes 0600 files; a saved model, like every output, gets the user's umask."""
    from polyfuse.data.io import atomic_write_folder

    def write(folder: Path) -> None:
        (folder / "weights").write_bytes(b"w")
        os.chmod(folder / "weights", 0o600)
        (folder / "sub").mkdir(mode=0o700)

    old = os.umask(0o027)
    try:
        atomic_write_folder(tmp_path / "model", write)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "model", *(tmp_path / "model").iterdir()]}
    assert modes == {"model": 0o750, "weights": 0o640, "sub": 0o750}


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
    nested = tmp_path / "eval" / "records" / f".a.jsonl.{host}-{dead_pid}-n.tmp"
    nested.parent.mkdir(parents=True)
    nested.write_text("half")
    ShardStore(tmp_path)  # a resuming stage opens its store
    assert not stale_file.exists() and not stale_dir.exists()
    assert live.exists() and other_host.exists() and nested.exists()
    assert remove_stale_temporaries(tmp_path) == 0
    assert remove_stale_temporaries(tmp_path, recursive=True) == 1  # what a rerun of a recipe does
    assert not nested.exists() and live.exists()


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
    with pytest.raises(UserError, match="missing.gguf: no such file"):
        load_tokenizer(ModelSpec(path=str(tmp_path / "missing.gguf")))
    with pytest.raises(UserError, match=r"Missing\.GGUF: no such file"):  # any case, a trailing slash: still a file
        load_tokenizer(ModelSpec(path=str(tmp_path / "Missing.GGUF") + "/"))


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
    """Run the command in private user and mount namespaces where `folder` is a small tmpfs: no privileges
    needed (the user is root inside its own namespace), root or not."""
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
            f'mount -t tmpfs -o {options} tmpfs "{folder}" && exec "$@"', "sh"]


def _tmpfs_problem() -> str | None:
    """Why `_in_tmpfs` cannot work here (no unshare, user namespaces switched off), or None."""
    if shutil.which("unshare") is None:
        return "no unshare command"
    with tempfile.TemporaryDirectory() as folder:
        probe = subprocess.run([*_in_tmpfs(Path(folder), "size=64k"), "true"], capture_output=True, text=True)
    return f"cannot mount a tmpfs in a user namespace: {probe.stderr.strip()}" if probe.returncode else None


# Skipped only off CI: CI (root or not) can mount a tmpfs in its own namespaces, so there a problem fails the test.
_TMPFS_PROBLEM = _tmpfs_problem()


@pytest.mark.skipif(_TMPFS_PROBLEM is not None and not os.environ.get("CI"), reason=str(_TMPFS_PROBLEM))
@pytest.mark.parametrize("case, options, message", [
    ("full disk", "size=64k", "no space left on the device"),
    ("read-only", "ro", "the file system is read-only"),
])
def test_disk_refusals_are_clear_errors_that_leave_nothing(tmp_path, case, options, message):
    assert _TMPFS_PROBLEM is None, _TMPFS_PROBLEM
    folder = tmp_path / "cache"
    folder.mkdir()
    check = f'{sys.executable} -m polyfuse toyworld build --preset tiny --cache-dir "{folder}"; code=$?; echo LEFT:; ls -A "{folder}"; exit $code'
    result = subprocess.run([*_in_tmpfs(folder, options), "sh", "-c", check], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: cannot write" in result.stderr and message in result.stderr and "Traceback" not in result.stderr
    assert result.stdout.rstrip().endswith("LEFT:")  # `ls -A` inside the namespace: no temporary folder left


@pytest.mark.parametrize("command, limit, written", [
    ("toyworld build --preset tiny --cache-dir out", 20_000, r"out/[0-9a-f]{16}"),
    ("train sft --data {kit}/sft.jsonl --model {world}/pivot -o out -q", 20_000, "out"),  # safetensors (Rust)
    ("sample -c {kit}/sample.yaml --prompts {kit}/prompts.jsonl -o out -q", 300, r"out/shards/pivot-00000\.jsonl"),
], ids=["toyworld", "train", "sample"])
def test_file_size_limit_is_a_clear_error_naming_the_output(command, limit, written, kit, tiny_world, tmp_path):
    import resource

    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    args = shlex.split(command.format(kit=kit, world=tiny_world.root))
    result = subprocess.run([sys.executable, "-m", "polyfuse", *args], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}, preexec_fn=set_limit)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert re.search(rf"error: cannot write {written}: file too large", result.stderr), result.stderr
    assert list(tmp_path.iterdir()) == []  # no temporary file, no empty output folder, no Trainer scratch


# ---------------------------------------------------------------------------------------------------------
# The bad-input table: one user mistake per case, through the real entry point (`polyfuse.cli.main.main`, in
# this process). Every case must exit with code 2 and print one `error:` message matching `expected` (what
# is wrong and where), with no traceback, and leave its folder exactly as it was: nothing written, existing
# files untouched. The command runs in the case's own folder; `{kit}` holds valid inputs for every command,
# `{world}` is the tiny toy world; `files` are the case's own (bad) inputs, written before it runs.
# ---------------------------------------------------------------------------------------------------------

FOLDER = object()  # a `files` value: make an empty folder


@dataclass
class Copy:
    """A `files` value: a copy of a folder, with one of its files cut to half its size."""

    source: str
    truncate: str | None = None


PROMPTS = [{"id": f"p{i}", "prompt": f"{i} + {i} =", "domain": "arithmetic", "answer": str(2 * i)} for i in range(3)]
SAMPLES = [
    {**p, "id": f"{p['id']}-{m}-{k}", "prompt_id": p["id"], "model": m, "sample_index": k, "response": f"{k + i}"}
    for i, p in enumerate(PROMPTS) for m in ("a", "b") for k in range(2)
]
SCORED = [{**s, "rewards": {"rm": 0.1 * n}, "verdicts": {"toyworld": n % 2 == 0}} for n, s in enumerate(SAMPLES)]
SFT = [{"id": f"s{i}", "prompt": f"{i} + 1 =", "completion": str(i + 1)} for i in range(4)]
PREFERENCE = [{"id": f"q{i}", "prompt": f"{i} + 2 =", "chosen": str(i + 2), "rejected": str(i + 3)} for i in range(4)]
# Unpaired rows as `polyfuse logprobs` writes them for two sources (without the entropy: `ENTROPY` adds it).
UNPAIRED = [{"id": f"u{i}", "prompt": f"{i // 2} + 1 =", "prompt_id": f"p{i // 2}", "completion": str(i),
             "label": "DU"[i % 2], "ref_mean_completion_logps": -1.0 - 0.1 * i,
             "fuse_mean_completion_logps": [-1.0, -2.0 + 0.1 * i]} for i in range(8)]  # fmt: skip
ENTROPY = [{**row, "fuse_completion_entropy": [0.3, 0.2 + 0.05 * i]} for i, row in enumerate(UNPAIRED)]
TWO_SOURCES = json.dumps({"sources": [{"name": "a"}, {"name": "b"}]})


def _write(path: Path, content: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if content is FOLDER:
        path.mkdir()
    elif callable(content):
        content(path)
    elif isinstance(content, Copy):
        shutil.copytree(content.source, path)
        if content.truncate:
            data = (path / content.truncate).read_bytes()
            (path / content.truncate).write_bytes(data[: len(data) // 2])
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in content))
    else:
        path.write_text(yaml.safe_dump(content, sort_keys=False))


def _dataset_dict(path: Path) -> None:
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(PROMPTS)}).save_to_disk(str(path))


def run_cli(argv: list[str]) -> tuple[int, str]:
    """`polyfuse ARGV` in this process: (exit code, stdout + stderr). Any exception but SystemExit (a
    traceback for the user) propagates and fails the test."""
    out = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return code, out.getvalue()


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def kit(tiny_world, tmp_path_factory) -> Path:
    """Valid inputs for every command: data files, one config per command, a teacher store, a tiny recipe."""
    from polyfuse.config import apply_overrides
    from polyfuse.pipeline.demo import recipe_path
    from test_pipeline import tiny_overrides

    root, world = tmp_path_factory.mktemp("kit"), tiny_world.root
    pivot = {"name": "pivot", "path": str(world / "pivot")}
    source = {"name": "src", "path": str(min((world / "sources").iterdir()))}
    recipe = yaml.safe_load(recipe_path("fusechat3-toy.yaml").read_text())
    for name, content in {
        "prompts.jsonl": PROMPTS, "samples.jsonl": SAMPLES, "scored.jsonl": SCORED, "sft.jsonl": SFT,
        "preference.jsonl": PREFERENCE,
        "sample.yaml": {"models": [{**pivot, "sampling": {"max_new_tokens": 4}}]},
        "score.yaml": {"scorers": [{"type": "reward_model", "name": "rm", "model": {"path": str(world / "reward_model")}},
                                   {"type": "toyworld"}]},
        "pairs.yaml": {"reward": "rm", "gap_window": None},
        "logprobs.yaml": {"pivot": pivot, "sources": [source]},
        "teacher.yaml": {"models": [source], "top_k": 4},
        "train.yaml": {"epochs": 1, "batch_size": 2, "save_steps": 0},
        "recipe.yaml": apply_overrides(recipe, tiny_overrides(world.parent)),
    }.items():
        _write(root / name, content)
    code, output = run_cli(["teacher", "-c", str(root / "teacher.yaml"), "--data", str(root / "sft.jsonl"),
                            "--out", str(root / "teachers"), "-q"])
    assert code == 0, output
    return root


@dataclass
class Case:
    id: str
    command: str  # run in the case's folder; `{kit}` and `{world}` are replaced
    expected: str  # a regex the message must match
    files: dict[str, Any] = field(default_factory=dict)


BAD_UTF8 = b"models:\n  - path: caf\xe9\n"
CASES = [
    # configs and overrides, through `sample`
    Case("config-missing", "sample -c nope.yaml --prompts {kit}/prompts.jsonl -o out", r"nope\.yaml: config file not found"),
    Case("config-a-folder", "sample -c conf --prompts {kit}/prompts.jsonl -o out", r"conf: is a folder, expected a YAML config file",
         {"conf": FOLDER}),
    Case("config-not-utf8", "sample -c bad.yaml --prompts {kit}/prompts.jsonl -o out", r"bad\.yaml: not UTF-8 text",
         {"bad.yaml": BAD_UTF8}),
    Case("config-bad-yaml", "sample -c bad.yaml --prompts {kit}/prompts.jsonl -o out", r"bad\.yaml line 2: not valid YAML",
         {"bad.yaml": "batch_size: 4\n  chunk_size: 2\n"}),
    Case("config-a-list", "sample -c bad.yaml --prompts {kit}/prompts.jsonl -o out", r"bad\.yaml: expected a mapping",
         {"bad.yaml": "- 1\n- 2\n"}),
    Case("config-unknown-key", "sample -c {kit}/sample.yaml --set batch_sise=4 --prompts {kit}/prompts.jsonl -o out",
         r"batch_sise: unknown key"),
    Case("config-wrong-type", "sample -c {kit}/sample.yaml --set batch_size=many --prompts {kit}/prompts.jsonl -o out",
         r"batch_size: Input should be a valid integer.*got 'many'"),
    Case("config-below-minimum", "sample -c {kit}/sample.yaml --set chunk_size=0 --prompts {kit}/prompts.jsonl -o out",
         r"chunk_size: Input should be greater than or equal to 1"),
    Case("override-without-equals", "sample -c {kit}/sample.yaml --set batch_size --prompts {kit}/prompts.jsonl -o out",
         r"override 'batch_size': expected KEY=VALUE"),
    Case("override-into-a-value", "sample -c {kit}/sample.yaml --set models.0.path.x=1 --prompts {kit}/prompts.jsonl -o out",
         r"override 'models.0.path.x': models\.0\.path is a value, not a section"),
    Case("override-index-out-of-range", "sample -c {kit}/sample.yaml --set models.3.device=cpu --prompts {kit}/prompts.jsonl -o out",
         r"override 'models.3.device': models is a list of 1 items; '3' is not an index of it"),
    Case("override-not-yaml", "sample -c {kit}/sample.yaml --set batch_size=[4 --prompts {kit}/prompts.jsonl -o out",
         r"override 'batch_size': '\[4' is not a YAML value"),
    Case("unknown-flag", "sample -c {kit}/sample.yaml --prompt {kit}/prompts.jsonl -o out", r"No such option: --prompt"),
    # sample: prompt data
    Case("prompts-missing", "sample -c {kit}/sample.yaml --prompts nope.jsonl -o out", r"nope\.jsonl: data file not found"),
    Case("prompts-a-folder", "sample -c {kit}/sample.yaml --prompts p.jsonl -o out", r"p\.jsonl: is a folder, expected a \.jsonl file",
         {"p.jsonl": FOLDER}),
    Case("prompts-not-utf8", "sample -c {kit}/sample.yaml --prompts p.jsonl -o out", r"p\.jsonl:2: not UTF-8 text",
         {"p.jsonl": b'{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "caf\xe9"}\n'}),
    Case("prompts-bad-json", "sample -c {kit}/sample.yaml --prompts p.jsonl -o out", r"p\.jsonl:2: not valid JSON",
         {"p.jsonl": '{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": \n'}),
    Case("prompts-not-an-object", "sample -c {kit}/sample.yaml --prompts p.jsonl -o out", r"p\.jsonl:1: expected a JSON object",
         {"p.jsonl": "[1, 2]\n"}),
    Case("prompts-missing-field", "sample -c {kit}/sample.yaml --prompts p.jsonl -o out", r"p\.jsonl:1: field 'prompt': missing",
         {"p.jsonl": [{"id": "a", "text": "x"}]}),
    Case("prompts-empty-prompt", "sample -c {kit}/sample.yaml --prompts p.jsonl -o out", r"p\.jsonl:2: field 'prompt': .*prompt is empty",
         {"p.jsonl": [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "  "}]}),
    Case("prompts-empty-file", "sample -c {kit}/sample.yaml --prompts p.jsonl -o out", r"p\.jsonl: no rows",
         {"p.jsonl": ""}),
    Case("prompts-all-invalid-skipped", "sample -c {kit}/sample.yaml --prompts p.jsonl --skip-invalid -o out",
         r"p\.jsonl: every row is invalid \(2 rows; the first on line 1\)", {"p.jsonl": '{"id": 1}\n{"x": 2}\n'}),
    Case("prompts-duplicate-id", "sample -c {kit}/sample.yaml --prompts p.jsonl -o out", r"p\.jsonl:2: duplicate id 'a' \(first on line 1\)",
         {"p.jsonl": [{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}]}),
    Case("prompts-csv", "sample -c {kit}/sample.yaml --prompts p.csv -o out", r"p\.csv: unsupported data format",
         {"p.csv": "id,prompt\na,x\n"}),
    Case("prompts-corrupt-parquet", "sample -c {kit}/sample.yaml --prompts p.parquet -o out", r"p\.parquet: not a readable Parquet file",
         {"p.parquet": b"PAR1 not really"}),
    Case("prompts-folder-not-datasets", "sample -c {kit}/sample.yaml --prompts data -o out", r"data: a folder, but not a `datasets` folder",
         {"data/notes.txt": "hello"}),
    # sample: models and output
    Case("sample-out-is-a-file", "sample -c {kit}/sample.yaml --prompts {kit}/prompts.jsonl -o out", r"out: is a file, expected a folder",
         {"out": "the user's file"}),
    Case("sample-no-models", "sample -c bad.yaml --prompts {kit}/prompts.jsonl -o out", r"models: List should have at least 1 item",
         {"bad.yaml": {"models": []}}),
    Case("sample-model-missing", "sample -c bad.yaml --prompts {kit}/prompts.jsonl -o out", r"models/pivot: no such folder",
         {"bad.yaml": {"models": [{"path": "models/pivot"}]}, "models": FOLDER}),
    Case("sample-model-no-config", "sample -c bad.yaml --prompts {kit}/prompts.jsonl -o out", r"m: no config\.json in this folder",
         {"bad.yaml": {"models": [{"path": "m"}]}, "m/model.safetensors": b"x"}),
    Case("sample-model-not-gguf", "sample -c bad.yaml --prompts {kit}/prompts.jsonl -o out", r"m\.gguf is not a GGUF file",
         {"bad.yaml": {"models": [{"path": "m.gguf"}]}, "m.gguf": b"PK\x03\x04 a zip"}),
    Case("sample-device-missing", "sample -c {kit}/sample.yaml --set models.0.device=cuda:7 --prompts {kit}/prompts.jsonl -o out",
         r"device 'cuda:7' not available"),
    Case("sample-top-p-zero", "sample -c bad.yaml --prompts {kit}/prompts.jsonl -o out", r"models\.0\.sampling\.top_p: Input should be greater than 0",
         {"bad.yaml": {"models": [{"path": "{world}/pivot", "sampling": {"top_p": 0}}]}}),
    Case("sample-unknown-backend", "sample -c {kit}/sample.yaml --set models.0.backend=vlm --prompts {kit}/prompts.jsonl -o out",
         r"backend.*'vlm'"),
    # score
    Case("score-prompts-not-samples", "score -c {kit}/score.yaml --samples {kit}/prompts.jsonl -o out",
         r"prompts\.jsonl:1: field 'prompt_id': missing"),
    Case("score-unknown-scorer", "score -c bad.yaml --samples {kit}/samples.jsonl -o out", r"scorers\.0.*'judge'.*(math|toyworld)",
         {"bad.yaml": {"scorers": [{"type": "judge"}]}}),
    Case("score-scorer-without-type", "score -c bad.yaml --samples {kit}/samples.jsonl -o out", r"scorers\.0.*'type' key",
         {"bad.yaml": {"scorers": [{"name": "x"}]}}),
    Case("score-reward-model-missing", "score -c bad.yaml --samples {kit}/samples.jsonl -o out", r"rm/none: no such folder",
         {"bad.yaml": {"scorers": [{"type": "reward_model", "model": {"path": "rm/none"}}]}, "rm": FOLDER}),
    Case("score-out-is-a-file", "score -c {kit}/score.yaml --samples {kit}/samples.jsonl -o out", r"out: is a file, expected a folder",
         {"out": "the user's file"}),
    # pairs
    Case("pairs-reward-no-sample-has", "pairs -c {kit}/pairs.yaml --set reward=judge --scored {kit}/scored.jsonl -o out",
         r"reward 'judge'.*rm"),
    Case("pairs-unscored-samples", "pairs -c {kit}/pairs.yaml --scored {kit}/samples.jsonl -o out", r"reward 'rm'"),
    Case("pairs-fraction-above-1", "pairs -c {kit}/pairs.yaml --set sft_fraction=1.5 --scored {kit}/scored.jsonl -o out",
         r"sft_fraction: Input should be less than or equal to 1"),
    Case("pairs-window-reversed", "pairs -c {kit}/pairs.yaml --set gap_window=[0.5,0.1] --scored {kit}/scored.jsonl -o out",
         r"gap_window"),
    Case("pairs-unknown-rule", "pairs -c {kit}/pairs.yaml --set pair_rule=best --scored {kit}/scored.jsonl -o out",
         r"pair_rule: Input should be 'intra_source' or 'cross_model'"),
    Case("pairs-reward-is-a-verdict", "pairs -c {kit}/pairs.yaml --set reward=toyworld --scored {kit}/scored.jsonl -o out",
         r"pairs\.reward: 'toyworld' is a verifier's verdict, not a reward; .*leave pairs\.reward out"),
    Case("pairs-choice-needs-a-reward", "pairs --set pair_choice=largest_gap --scored {kit}/scored.jsonl -o out",
         r"pair_choice 'largest_gap' ranks pairs by reward, and no reward is given"),
    Case("pairs-out-is-a-file", "pairs -c {kit}/pairs.yaml --scored {kit}/scored.jsonl -o out", r"out: is a file, expected a folder",
         {"out": "the user's file"}),
    # logprobs
    Case("logprobs-chosen-is-rejected", "logprobs -c {kit}/logprobs.yaml --data p.jsonl -o out.jsonl",
         r"p\.jsonl:1: .*chosen and rejected are the same response",
         {"p.jsonl": [{"id": "a", "prompt": "x", "chosen": "y", "rejected": "y"}]}),
    Case("logprobs-empty-chosen", "logprobs -c {kit}/logprobs.yaml --data p.jsonl -o out.jsonl", r"p\.jsonl:1: .*chosen response is empty",
         {"p.jsonl": [{"id": "a", "prompt": "x", "chosen": " ", "rejected": "y"}]}),
    Case("logprobs-no-pivot", "logprobs -c bad.yaml --data {kit}/preference.jsonl -o out.jsonl", r"pivot: required key is missing",
         {"bad.yaml": {"sources": []}}),
    Case("logprobs-out-csv", "logprobs -c {kit}/logprobs.yaml --data {kit}/preference.jsonl -o out.csv", r"out\.csv: unsupported data format"),
    Case("logprobs-out-is-a-folder", "logprobs -c {kit}/logprobs.yaml --data {kit}/preference.jsonl -o out.jsonl",
         r"out\.jsonl.*folder", {"out.jsonl": FOLDER}),
    Case("logprobs-out-in-a-file", "logprobs -c {kit}/logprobs.yaml --data {kit}/preference.jsonl -o taken/out.jsonl",
         r"taken/out\.jsonl: taken is a file, expected a folder", {"taken": "the user's file"}),
    Case("logprobs-pivot-device", "logprobs -c {kit}/logprobs.yaml --set pivot.device=cuda:7 --data {kit}/preference.jsonl -o o.jsonl",
         r"device 'cuda:7' not available"),
    # teacher
    Case("teacher-preference-rows", "teacher -c {kit}/teacher.yaml --data {kit}/preference.jsonl -o out",
         r"preference\.jsonl:1: field 'completion': missing"),
    Case("teacher-no-models", "teacher -c {kit}/teacher.yaml --set models=[] --data {kit}/sft.jsonl -o out",
         r"models: List should have at least 1 item"),
    Case("teacher-top-k-zero", "teacher -c {kit}/teacher.yaml --set top_k=0 --data {kit}/sft.jsonl -o out",
         r"top_k: Input should be greater than or equal to 1"),
    Case("teacher-out-is-a-file", "teacher -c {kit}/teacher.yaml --data {kit}/sft.jsonl -o out", r"out: is a file, expected a folder",
         {"out": "the user's file"}),
    # train sft / distill / preference objectives
    Case("sft-unknown-scheduler", "train sft -c {kit}/train.yaml --set lr_scheduler=cosinus --data {kit}/sft.jsonl --model {world}/pivot -o out",
         r"lr_scheduler: 'cosinus' is not a learning-rate schedule of transformers; one of linear, cosine"),
    Case("sft-unknown-optim", "train sft -c {kit}/train.yaml --set optim=adam --data {kit}/sft.jsonl --model {world}/pivot -o out",
         r"optim: 'adam' is not an optimizer of transformers; one of adamw_torch"),
    Case("sft-optim-not-installed", "train sft -c {kit}/train.yaml --set optim=adamw_bnb_8bit --data {kit}/sft.jsonl --model {world}/pivot -o out",
         r"optim: 'adamw_bnb_8bit' cannot be used here: .*bitsandbytes"),
    Case("sft-unknown-tracker", "train sft -c {kit}/train.yaml --set report_to=tensorbored --data {kit}/sft.jsonl --model {world}/pivot -o out",
         r"report_to: 'tensorbored' is not a tracker"),
    Case("sft-zero-epochs", "train sft -c {kit}/train.yaml --set epochs=0 --data {kit}/sft.jsonl --model {world}/pivot -o out",
         r"epochs: Input should be greater than 0"),
    Case("sft-lora-rank-zero", "train sft -c {kit}/train.yaml --set lora.r=0 --data {kit}/sft.jsonl --model {world}/pivot -o out",
         r"lora\.r: Input should be greater than or equal to 1"),
    Case("sft-out-is-a-file", "train sft -c {kit}/train.yaml --data {kit}/sft.jsonl --model {world}/pivot -o out",
         r"out: is a file, expected a folder", {"out": "the user's file"}),
    Case("sft-empty-data", "train sft -c {kit}/train.yaml --data d.jsonl --model {world}/pivot -o out", r"d\.jsonl: no rows",
         {"d.jsonl": "\n"}),
    Case("sft-model-missing", "train sft -c {kit}/train.yaml --data {kit}/sft.jsonl --model ./pivot -o out", r"pivot: no such folder"),
    Case("sft-corrupt-weights", "train sft -c {kit}/train.yaml --data {kit}/sft.jsonl --model m -o out", r"cannot load model from 'm'",
         {"m": Copy("{world}/pivot"), "m/model.safetensors": b"\xff" * 64}),
    Case("sft-truncated-weights", "train sft -c {kit}/train.yaml --data {kit}/sft.jsonl --model m -o out", r"cannot load model from 'm'",
         {"m": Copy("{world}/pivot", truncate="model.safetensors")}),
    Case("sft-rows-all-too-long", "train sft -c {kit}/train.yaml --set max_length=2 --data {kit}/sft.jsonl --model {world}/pivot -o out",
         r"max_length"),
    Case("distill-no-teachers", "train distill -c {kit}/train.yaml --data {kit}/sft.jsonl --teachers none --model {world}/pivot -o out",
         r"none: no teacher outputs here; run `polyfuse teacher`"),
    Case("distill-not-a-store", "train distill -c {kit}/train.yaml --data {kit}/sft.jsonl --teachers t --model {world}/pivot -o out",
         r"t: no teacher outputs here", {"t/readme.txt": "hi"}),
    Case("distill-unknown-objective", "train distill -c {kit}/train.yaml --set objective=kdd --data {kit}/sft.jsonl --teachers {kit}/teachers --model {world}/pivot -o out",
         r"objective.*'kdd'.*(uld|fusellm)"),
    Case("dpo-objective-mismatch", "train dpo -c bad.yaml --data {kit}/preference.jsonl --model {world}/pivot -o out",
         r"bad\.yaml: objective is 'ipo' but the command is `train dpo`", {"bad.yaml": {"objective": "ipo"}}),
    Case("dpo-negative-beta", "train dpo --set beta=-1 --data {kit}/preference.jsonl --model {world}/pivot -o out",
         r"beta: Input should be greater than 0"),
    Case("ipo-unknown-argument", "train ipo --set objective_args.tau=1 --data {kit}/preference.jsonl --model {world}/pivot -o out",
         r"objective 'ipo': tau: Extra inputs are not permitted"),
    Case("wrpo-without-chosen-source", "train wrpo --data {kit}/preference.jsonl --model {world}/pivot -o out",
         r"chosen_source"),
    Case("dpo-empty-rejected", "train dpo --data p.jsonl --model {world}/pivot -o out", r"p\.jsonl:1: .*rejected response is empty",
         {"p.jsonl": [{"id": "a", "prompt": "x", "chosen": "y", "rejected": ""}]}),
    # eval
    Case("eval-batch-size-zero", "eval --model {world}/pivot --data toyworld --toy-preset tiny --batch-size 0 -o out",
         r"Invalid value for '--batch-size'"),
    Case("eval-negative-new-tokens", "eval --model {world}/pivot --data toyworld --toy-preset tiny --max-new-tokens -1 -o out",
         r"Invalid value for '--max-new-tokens'"),
    Case("eval-limit-zero", "eval --model {world}/pivot --data toyworld --toy-preset tiny --limit 0 -o out", r"Invalid value for '--limit'"),
    Case("eval-unknown-data", "eval --model {world}/pivot --data gsm9k -o out", r"gsm9k"),
    Case("eval-gsm8k-file-missing", "eval --model {world}/pivot --data gsm8k:none.jsonl -o out", r"none\.jsonl: GSM8K file not found"),
    Case("eval-same-name-twice", "eval --model a={world}/pivot --model a={world}/reward_model --data toyworld -o out",
         r"--model: two models are named 'a'"),
    Case("eval-same-folder-twice", "eval --model {world}/pivot --model {world}/pivot/ --data toyworld -o out",
         r"--model: two models are named '.*pivot'"),
    Case("eval-out-is-a-file", "eval --model {world}/pivot --data {kit}/prompts.jsonl -o out", r"out: is a file, expected a folder",
         {"out": "the user's file"}),
    Case("eval-unknown-preset", "eval --model {world}/pivot --data toyworld --toy-preset huge -o out", r"huge.*(default|tiny)"),
    Case("eval-model-missing", "eval --model ./none --data {kit}/prompts.jsonl -o out", r"none: no such folder"),
    # run and demo
    Case("run-recipe-missing", "run none.yaml", r"none\.yaml: config file not found"),
    Case("run-stage-order", "run {kit}/recipe.yaml --set stages=[sample,prompts] --work-dir w", r"stages must keep the order"),
    Case("run-unknown-stage", "run {kit}/recipe.yaml --set stages=[prompts,smaple] --work-dir w", r"stages\.1.*'smaple'"),
    Case("run-stage-without-section", "run {kit}/recipe.yaml --set merge=null --set stages=[merge] --work-dir w",
         r"stage 'merge' is listed in 'stages' but has no 'merge' section"),
    Case("run-duplicate-model-names", "run {kit}/recipe.yaml --set pivot.name=llama-compare --work-dir w", r"model names must be unique"),
    Case("run-pairs-nothing-ranks", "run {kit}/recipe.yaml --set pairs.reward=null --work-dir w",
         r"pairs: no reward is set and the score stage has no verifier, so nothing ranks the responses; set "
         r"pairs\.reward to one of: rm"),
    Case("run-unknown-scheduler", "run {kit}/recipe.yaml --set sft.lr_scheduler=cosinus --work-dir w", r"sft\.lr_scheduler: 'cosinus'"),
    Case("run-unknown-optim", "run {kit}/recipe.yaml --set po.optim=adam --work-dir w", r"po\.optim: 'adam'"),
    Case("run-work-dir-is-a-file", "run {kit}/recipe.yaml --work-dir w", r"w: is a file, expected a folder", {"w": "the user's file"}),
    Case("run-source-missing", "run {kit}/recipe.yaml --set sources.0.path=models/none --work-dir w", r"models/none: no such",
         {"models": FOLDER}),
    Case("run-no-sft-rows", "run {kit}/recipe.yaml --set pairs.sft_fraction=0 --work-dir w",
         r"pairs\.sft_fraction is 0: no prompt gives SFT rows, but the recipe runs 'sft'"),
    Case("run-pairs-reward-unknown", "run {kit}/recipe.yaml --set pairs.reward=judge --work-dir w", r"pairs\.reward.*'judge'"),
    Case("demo-unknown-preset", "demo --preset huge --work-dir w", r"huge.*(default|tiny)"),
    Case("demo-work-dir-is-a-file", "demo --preset tiny --work-dir w", r"w: is a file, expected a folder", {"w": "the user's file"}),
    # toy world
    Case("toyworld-unknown-preset", "toyworld build --preset huge --cache-dir c", r"huge.*(default|tiny)"),
    Case("toyworld-unknown-key", "toyworld build -c bad.yaml --cache-dir c", r"bad\.yaml: invalid config\n.*colour: unknown key",
         {"bad.yaml": {"colour": "blue"}}),
    Case("toyworld-info-bad-seed", "toyworld info --preset tiny --set seed=abc --cache-dir c", r"seed: Input should be a valid integer"),
    Case("toyworld-cache-in-a-file", "toyworld build --preset tiny --cache-dir taken/c", r"taken/c: taken is a file, expected a folder",
         {"taken": "the user's file"}),
    Case("toyworld-config-missing", "toyworld info -c none.yaml --cache-dir c", r"none\.yaml: config file not found"),
    # more data shapes
    Case("prompts-no-messages", "sample -c {kit}/sample.yaml --prompts p.jsonl -o out", r"p\.jsonl:1: field 'prompt': .*prompt has no messages",
         {"p.jsonl": [{"id": "a", "prompt": []}]}),
    Case("prompts-unknown-role", "sample -c {kit}/sample.yaml --prompts p.jsonl -o out", r"p\.jsonl:1: field 'prompt.*role'",
         {"p.jsonl": [{"id": "a", "prompt": [{"role": "robot", "content": "hi"}]}]}),
    Case("prompts-dataset-dict", "sample -c {kit}/sample.yaml --prompts data -o out", r"data: a DatasetDict with splits \['train'\]",
         {"data": _dataset_dict}),
    Case("prompts-damaged-datasets-folder", "sample -c {kit}/sample.yaml --prompts data -o out",
         r"data: cannot read this `datasets` folder", {"data/dataset_dict.json": '{"splits": ["train"]}'}),
    Case("sft-corrupt-parquet", "train sft --data d.parquet --model {world}/pivot -o out", r"d\.parquet: not a readable Parquet file",
         {"d.parquet": b"PAR1" + b"\0" * 64 + b"PAR1"}),
    Case("sft-model-not-gguf", "train sft --data {kit}/sft.jsonl --model m.gguf -o out", r"m\.gguf is not a GGUF file",
         {"m.gguf": b"GGML old"}),
    Case("sft-model-gguf-missing", "train sft --data {kit}/sft.jsonl --model none.gguf -o out", r"none\.gguf: no such file$"),
    Case("config-misspelt-key-line", "sample -c bad.yaml --prompts {kit}/prompts.jsonl -o out",
         r"bad\.yaml: invalid config\n  line 1: models: .*\n  line 2: batch_sise: unknown key; did you mean 'batch_size'\?",
         {"bad.yaml": "models: []\nbatch_sise: 4\n"}),
    Case("run-reward-model-a-causal-lm", "run {kit}/recipe.yaml --set score.scorers.0.model.path={world}/pivot --work-dir w",
         r"score\.scorers\.0\.model \(pivot\): not a reward model: MistralForCausalLM has no sequence-classification head"),
    Case("sft-model-is-a-file", "train sft --data {kit}/sft.jsonl --model ./m -o out", r"\./m: is a file, expected a model folder",
         {"m": "weights?"}),
    Case("distill-corrupt-shard", "train distill --data {kit}/sft.jsonl --teachers t --model {world}/pivot -o out",
         r"t/src/shard-00000\.npz", {"t": Copy("{kit}/teachers", truncate="src/shard-00000.npz")}),
    Case("dpo-objective-args-not-a-mapping", "train dpo --set objective_args=3 --data {kit}/preference.jsonl --model {world}/pivot -o out",
         r"--set objective_args=3: invalid config\n  objective_args: Input should be a valid dictionary"),
    Case("dpo-inconsistent-reference", "train dpo --data p.jsonl --model {world}/pivot -o out", r"p\.jsonl.*ref_",
         {"p.jsonl": [{**PREFERENCE[0], "ref_chosen_logps": -3.0, "ref_rejected_logps": -4.0, "ref_mean_chosen_logps": -1.0,
                       "ref_mean_rejected_logps": -1.0, "ref_chosen_ntokens": 2, "ref_rejected_ntokens": 2}]}),
    Case("logprobs-unknown-overflow", "logprobs -c {kit}/logprobs.yaml --set overflow=truncate --data {kit}/preference.jsonl -o o.jsonl",
         r"overflow: Input should be 'drop' or 'error'"),
    Case("eval-empty-model-path", "eval --model a= --data {kit}/prompts.jsonl -o out", r"--model a=: no path after the '='"),
    Case("eval-bad-prompt-rows", "eval --model {world}/pivot --data p.jsonl -o out", r"p\.jsonl:1: field 'prompt': missing",
         {"p.jsonl": [{"id": "a"}]}),
    Case("run-recipe-not-utf8", "run r.yaml", r"r\.yaml: not UTF-8 text", {"r.yaml": b"name: caf\xe9\n"}),
    Case("run-sources-not-a-list", "run {kit}/recipe.yaml --set sources=3 --work-dir w", r"sources: Input should be a valid list"),
    Case("run-negative-temperature", "run {kit}/recipe.yaml --set sources.1.sampling.temperature=-1 --work-dir w",
         r"sources\.1\.sampling\.temperature: Input should be greater than or equal to 0"),
    Case("run-stop-not-a-list", "run {kit}/recipe.yaml --set sources.1.sampling.stop=END --work-dir w",
         r"sources\.1\.sampling\.stop: Input should be a valid list"),
    Case("run-stop-empty-string", "run {kit}/recipe.yaml --set 'sources.1.sampling.stop=[\"\\n\", \"\"]' --work-dir w",
         r"sources\.1\.sampling\.stop\.1: String should have at least 1 character"),
    Case("run-prompts-file-missing", "run {kit}/recipe.yaml --set prompts.toyworld=null --set prompts.path=none.jsonl --work-dir w",
         r"none\.jsonl: (data file not found|no such)"),
    Case("config-show-unknown-stage", "config show smaple", r"smaple.*sample"),
    # unpaired rows (KTO, CGPO, FuseSFT)
    Case("unpaired-label-neither-d-nor-u", "train cgpo --data u.jsonl --model {world}/pivot -o out",
         r"u\.jsonl:1: .*label.*must be 'D' \(desirable\) or 'U' \(undesirable\), or TRL's true / false; got 'maybe'",
         {"u.jsonl": [{**UNPAIRED[0], "label": "maybe"}]}),
    Case("consensus-without-entropy-column", "consensus --data s.jsonl --set calibration_min_rows=1 -o out",
         r"s\.jsonl: row 'u0' \(and \d+ other rows\) has no 'fuse_completion_entropy', which the CGPO consensus needs",
         {"s.jsonl": UNPAIRED, "s.jsonl.meta.json": TWO_SOURCES}),
    Case("consensus-calibration-overlaps-training", "consensus --data s.jsonl --set calibration=c.jsonl -o out",
         r"the calibration split overlaps training: 1 prompts in both \(e\.g\. 'p0'\)",
         {"s.jsonl": ENTROPY, "s.jsonl.meta.json": TWO_SOURCES, "c.jsonl": ENTROPY[:2], "c.jsonl.meta.json": TWO_SOURCES}),
    Case("cgpo-trains-on-calibration-prompts", "train cgpo --data s.jsonl --model {world}/pivot -o out",
         r"s\.jsonl: 1 prompts of the training rows are in the consensus step's calibration split",
         {"s.jsonl": [{**row, "aligned_consensus": -1.0} for row in ENTROPY],
          "s.jsonl.meta.json": json.dumps({**json.loads(TWO_SOURCES), "consensus": {"calibration": {"prompts": ["p3"]}}})}),
    Case("run-po-and-upo", "run {kit}/recipe.yaml --set stages=[prompts,sample,score,pairs,sft,po,upo] --set upo={{}} "
         "--work-dir w", r"a recipe trains with pairs \(po\) or with unpaired rows \(upo\), not both"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_error_and_leaves_nothing(case, kit, tiny_world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    places = {"kit": str(kit), "world": str(tiny_world.root)}
    for name, content in case.files.items():
        if isinstance(content, dict | list):
            content = json.loads(json.dumps(content).replace("{world}", places["world"]))
        elif isinstance(content, Copy):
            content = Copy(content.source.format(**places), content.truncate)
        _write(tmp_path / name, content)
    before, kit_before = _tree(tmp_path), _tree(kit)
    code, output = run_cli(shlex.split(case.command.format(**places)))
    assert code == 2, output
    assert "Traceback" not in output
    assert re.search(case.expected, output), output
    assert _tree(tmp_path) == before, "the refused command left files behind or changed the user's files"
    assert _tree(kit) == kit_before
