"""Kills: the tiny FuseChat-3.0 recipe, and the standalone `teacher` and `logprobs` commands, SIGKILLed just
before atomic renames in every stage (the toy world's build included) and at random moments, then rerun
until they finish. The outputs must equal an uninterrupted run's, with no temporary file left anywhere, no
row lost or duplicated, and no finished stage redone.

The kill points come from the renames of the uninterrupted run, so they follow the code: in every stage the
middle shard (sharded stages), the last output, and the manifest that says "done". The kill hook is a
test-only launcher (`kill_at_rename.py`); `bench/kill_suite.py` kills before every rename of the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from kill_at_rename import launch
from polyfuse.config import apply_overrides
from polyfuse.data import SampleRow, read_rows
from polyfuse.pipeline.demo import recipe_path
from polyfuse.pipeline.recipe import load_recipe
from polyfuse.pipeline.runner import run_recipe
from polyfuse.toyworld import ToyWorldConfig, world_dir
from test_pipeline import tiny_overrides

pytestmark = pytest.mark.slow

DONE = '"status": "done"'


def relative_renames(log: Path, root: Path) -> list[str]:
    """The renames of a run, as paths relative to `root`, in order."""
    lines = log.read_text().splitlines() if log.exists() else []
    return [os.path.relpath(line, root) for line in lines if line.startswith(str(root))]


def kill_plan(renames: list[str], stages: list[str]) -> list[tuple[str, str | None]]:
    """(destination, text its source must hold) per kill point, in the order a run reaches them: per stage,
    the middle shard of a sharded stage, the last output and the manifest that says done."""
    plan: list[tuple[str, str | None]] = []
    for stage in stages:
        outputs = [r for r in renames if r.startswith(f"{stage}/") and not r.endswith("manifest.json")]
        shards = [r for r in outputs if "/shards" in r]
        picks = [shards[len(shards) // 2]] if len(shards) > 2 else []
        plan += [(path, None) for path in dict.fromkeys([*picks, *outputs[-1:]])]
        plan.append((f"{stage}/manifest.json", DONE))
    return [*plan, ("report.md", None)]


# Hold times or absolute paths (of the work folder, the toy world's cache): not compared.
UNCOMPARED = ("manifest.json", "run.json", "report.json", "report.md", "recipe.resolved.yaml", "polyfuse_training.json",
              "world.json")


def digests(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Content hashes of the outputs under `root`, but the files that record times or paths (`UNCOMPARED`,
    the data files' `.meta.json` sidecars)."""
    found = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if not path.is_file() or name.startswith(skip) or path.name in UNCOMPARED or name.endswith(".meta.json"):
            continue
        found[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def temporaries(root: Path) -> list[str]:
    """Hidden or temporary entries: what a killed writer leaves (`.x.HOST-PID-*.tmp`, `.model.tmp`, ...), and
    request journals (`<shard>.partial.jsonl`), which a finished run has none of."""
    return [str(p.relative_to(root)) for p in root.rglob("*")
            if p.name.startswith(".") or p.name.endswith((".tmp", ".partial.jsonl"))]


def finished(work: Path) -> dict[str, float]:
    """Stage -> when its manifest said done."""
    done = {}
    for manifest in work.glob("*/manifest.json"):
        data = json.loads(manifest.read_text())
        if data.get("status") == "done":
            done[data["stage"]] = data["finished"]
    return done


def test_recipe_killed_before_every_kind_of_rename_and_at_random_gives_the_same_outputs(tiny_world, tmp_path,
                                                                                        monkeypatch):
    # The uninterrupted run, in this process, recording its renames.
    reference = tmp_path / "reference"
    renames: list[str] = []
    for name in ("replace", "rename"):
        original = getattr(os, name)
        monkeypatch.setattr(os, name, lambda src, dst, _o=original, **kw: (renames.append(os.fspath(dst)), _o(src, dst, **kw))[1])
    recipe = load_recipe(recipe_path("fusechat3-toy.yaml"), tiny_overrides(tiny_world.root.parent))
    run_recipe(recipe, reference, quiet=True)
    monkeypatch.undo()
    expected = digests(reference)
    plan = kill_plan([os.path.relpath(r, reference) for r in renames if r.startswith(str(reference))], recipe.stages)

    # The same recipe with a cold toy-world cache, killed at every point of the plan in turn.
    cache = tmp_path / "cache"
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(apply_overrides(yaml.safe_load(recipe_path("fusechat3-toy.yaml").read_text()),
                                                          tiny_overrides(cache))))
    work = tmp_path / "work"
    args = ["run", str(recipe_file), "--work-dir", str(work), "-q"]
    world = world_dir(ToyWorldConfig.preset("tiny"), cache).name
    kills, done_before = 0, {}
    for target, contains in [(world, None), *plan]:
        assert launch(args, kill_before=target, contains=contains) == -signal.SIGKILL, f"never reached {target}"
        kills += 1
        now = finished(work)
        assert {s: now[s] for s in done_before} == done_before, "a finished stage was redone"
        done_before = now
    # Random kills in a second work folder (the world is built now), then a run to the end.
    rng = random.Random(0)
    random_work = tmp_path / "random"
    for _ in range(2):
        kills += launch(["run", str(recipe_file), "--work-dir", str(random_work), "-q"],
                        kill_after_s=rng.uniform(1, 8)) == -signal.SIGKILL
    for folder in (work, random_work):
        assert launch(["run", str(recipe_file), "--work-dir", str(folder), "-q"]) == 0
        assert digests(folder) == expected
        assert temporaries(folder) == [] and temporaries(cache) == []
        samples = read_rows(folder / "sample/samples.jsonl", SampleRow)
        assert len({s.id for s in samples}) == len(samples) == len(read_rows(reference / "sample/samples.jsonl", SampleRow))
    assert finished(work).keys() >= done_before.keys()
    wall_times = (work / "report.md").read_text().split("## Wall time")[1]  # the whole run, the toy world first
    assert [line.split(" | ")[0] for line in wall_times.splitlines() if line.startswith("| ")][1:] == [
        "| toy world (build or cache)", *(f"| {stage}" for stage in recipe.stages), "| **total, this run**"]
    world_files = digests(cache / world)
    assert world_files == digests(tiny_world.root) and world_files  # the killed build, redone, is the same world
    print(f"recipe: {kills} kills ({len(plan) + 1} before renames, {kills - len(plan) - 1} at random), outputs "
          "identical, 0 stray files")


def _store_arrays(store: Path) -> dict[str, list]:
    """Every teacher array by model, shard and name (npz files carry zip timestamps, so bytes differ)."""
    arrays = {}
    for shard in sorted(store.rglob("*.npz")):
        with np.load(shard) as data:
            arrays[str(shard.relative_to(store))] = {k: data[k].tolist() for k in data.files}
    return arrays


def test_standalone_teacher_and_logprobs_killed_before_renames_give_the_same_outputs(tiny_world, tmp_path):
    sources = sorted(p for p in (tiny_world.root / "sources").iterdir())[:2]
    models = [{"name": p.name, "path": str(p)} for p in sources]
    rows = [{"id": f"r{i}", "prompt": f"{i} + {i} =", "completion": str(2 * i)} for i in range(9)]
    pairs = [{"id": f"q{i}", "prompt": f"{i} + 1 =", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(9)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (tmp_path / "teacher.yaml").write_text(yaml.safe_dump({"models": models, "top_k": 4, "chunk_size": 3}))
    (tmp_path / "logprobs.yaml").write_text(yaml.safe_dump({"pivot": {"name": "pivot", "path": str(tiny_world.root / "pivot")},
                                                            "sources": models, "chunk_size": 3}))
    commands = {
        "teacher": lambda out: ["teacher", "-c", str(tmp_path / "teacher.yaml"), "--data", str(tmp_path / "sft.jsonl"),
                                "-o", str(out), "-q"],
        "logprobs": lambda out: ["logprobs", "-c", str(tmp_path / "logprobs.yaml"), "--data", str(tmp_path / "pairs.jsonl"),
                                 "-o", str(out / "scored.jsonl"), "-q"],
    }
    kills = 0
    for name, command in commands.items():
        log = tmp_path / f"{name}.log"
        reference, killed = tmp_path / f"{name}-reference", tmp_path / f"{name}-killed"
        assert launch(command(reference), log=str(log)) == 0
        renames = relative_renames(log, reference)
        shards = [r for r in renames if "shard" in r]
        # the middle shard, then the last write: the teacher's manifest that says complete, logprobs' sidecar
        plan = [(shards[len(shards) // 2], None), (renames[-1], '"complete": true' if name == "teacher" else None)]
        for target, contains in plan:
            assert launch(command(killed), kill_before=target, contains=contains) == -signal.SIGKILL, target
            kills += 1
        kills += launch(command(killed), kill_after_s=random.Random(1).uniform(0.3, 1.5)) == -signal.SIGKILL
        assert launch(command(killed)) == 0
        if name == "teacher":
            assert _store_arrays(killed) == _store_arrays(reference)
            assert all(json.loads((killed / m.name / "manifest.json").read_text())["complete"] for m in sources)
        else:
            assert (killed / "scored.jsonl").read_bytes() == (reference / "scored.jsonl").read_bytes()
        assert temporaries(killed) == []
    print(f"teacher + logprobs: {kills} kills, outputs identical, 0 stray files")


def test_ctrl_c_stops_a_toy_world_build_and_its_workers_at_once(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while two worker processes train
    models: every process is gone within seconds (a worker does not finish the jobs it holds), exit code 130
    with one line saying what is kept, and nothing left of the build (nor the cache folder it made)."""
    cache = tmp_path / "cache"
    command = [sys.executable, "-m", "polyfuse", "toyworld", "build", "--preset", "default", "--cache-dir", str(cache)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not any(p.suffix == ".tmp" for p in cache.glob("*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # the workers are training
    assert process.poll() is None, "the build ended before the interrupt"
    interrupted = time.monotonic()
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert time.monotonic() - interrupted < 15
    assert process.returncode == 130
    assert err.strip() == "interrupted: finished work is kept; the same command again resumes it (`train` commands with --resume)"
    with pytest.raises(ProcessLookupError):  # no worker left behind in the group
        os.killpg(process.pid, 0)
    assert not cache.exists()  # the temporary folder removed, then the cache folder the command made


def test_a_shard_killed_before_its_sidecar_is_written_again_with_it(tiny_world, tmp_path):
    """A kill just before a sample shard's `.meta.json` sidecar is renamed into place leaves the shard without
    it: the rerun counts that shard as unfinished and writes both, so no shard is left without its sidecar."""
    prompts = [{"id": f"p{i}", "prompt": f"{i} + 1 =", "domain": "arithmetic", "answer": str(i + 1)} for i in range(6)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    (tmp_path / "sample.yaml").write_text(yaml.safe_dump({
        "models": [{"name": "pivot", "path": str(tiny_world.root / "pivot"), "sampling": {"n": 2, "max_new_tokens": 4}}],
        "chunk_size": 2}))

    def command(out: Path) -> list[str]:
        return ["sample", "-c", str(tmp_path / "sample.yaml"), "--prompts", str(tmp_path / "prompts.jsonl"), "-o", str(out), "-q"]

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert launch(command(reference)) == 0
    middle = "shards/pivot-00001.jsonl"
    assert launch(command(killed), kill_before=f"{middle}.meta.json") == -signal.SIGKILL
    assert (killed / middle).exists() and not (killed / f"{middle}.meta.json").exists()  # the window the kill hit
    assert launch(command(killed)) == 0
    shards = sorted((killed / "shards").glob("*.jsonl"))
    assert [s.name for s in shards] == ["pivot-00000.jsonl", "pivot-00001.jsonl", "pivot-00002.jsonl"]
    assert all(Path(f"{shard}.meta.json").exists() for shard in shards)
    assert (killed / "samples.jsonl").read_bytes() == (reference / "samples.jsonl").read_bytes()
    assert temporaries(killed) == []
