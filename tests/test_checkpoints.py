"""Checkpoints and resume: a CPU SFT run killed with SIGKILL after step k, rerun, ends with weights
bitwise equal to an uninterrupted run's (AdamW, cosine schedule with warmup, shuffled data over 3 epochs,
gradient accumulation); a checkpoint the kill left half-written is never used; another run's checkpoints
are refused by `--resume`."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

import warm_python
from polyfuse.data import SFTRow, write_rows
from polyfuse.errors import UserError
from polyfuse.trainers.checkpoints import MARKER, checkpoints, is_complete, resolve_resume
from tiny_lm import build_tiny_model, sentence

HERE = Path(__file__).parent
# 12 rows, 2 per micro-batch, 2 micro-batches per step: 3 optimiser steps per epoch, 9 in all.
CONFIG = {"batch_size": 2, "grad_accum": 2, "epochs": 3, "learning_rate": 5e-3, "warmup_ratio": 0.2,
          "save_steps": 2, "save_total_limit": 1, "logging_steps": 1}  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), str(HERE)])}


def run(*args: str) -> subprocess.CompletedProcess:
    """`python ARGS` (in a warm child: `warm_python`)."""
    return warm_python.run(list(args), env=ENV, timeout=300)


def train(world: Path, out: Path, kill_at: str = "", resume: str = "") -> subprocess.CompletedProcess:
    return run(str(HERE / "resume_train.py"), str(world / "pivot"), str(world / "sft.jsonl"),
               str(world / "config.json"), str(out), kill_at, resume)  # fmt: skip


def losses(folder: Path) -> list[float]:
    history = json.loads((folder / "polyfuse_training.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The model, data and config, and the uninterrupted run."""
    folder = tmp_path_factory.mktemp("resume")
    build_tiny_model(folder / "pivot")
    rng = random.Random(3)
    write_rows(folder / "sft.jsonl", [SFTRow(id=f"s{i}", prompt=sentence(rng), completion=sentence(rng, 1, 20))
                                      for i in range(12)])  # fmt: skip
    (folder / "config.json").write_text(json.dumps(CONFIG))
    done = train(folder, folder / "uninterrupted")
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (folder / ".uninterrupted.work").exists()  # checkpoints go once the model is saved
    return folder


def assert_same_as_uninterrupted(world: Path, out: Path) -> None:
    resumed, reference = load_file(str(out / "model.safetensors")), load_file(str(world / "uninterrupted" / "model.safetensors"))
    assert resumed.keys() == reference.keys()
    assert all((resumed[k] == reference[k]).all() for k in reference), "weights differ from the uninterrupted run"
    assert losses(out) == losses(world / "uninterrupted") and len(losses(out)) == 9


@pytest.mark.slow
def test_killed_while_saving_resumes_from_the_last_complete_checkpoint_with_the_cli(world, tmp_path):
    out = tmp_path / "sft"
    killed = train(world, out, "save:6")
    assert killed.returncode == -9
    work = tmp_path / ".sft.work"
    assert [step for step, _ in checkpoints(work)] == [4, 6]  # the limit (1) applies to complete ones only
    assert is_complete(work / "checkpoint-4") and not (work / "checkpoint-6" / MARKER).exists()
    (work / "checkpoint-6" / "optimizer.pt").write_bytes(b"half-written")  # would fail to load if used

    cli = ["-m", "polyfuse", "train", "sft", "-c", str(world / "config.json"), "--data", str(world / "sft.jsonl"),
           "--model", str(world / "pivot"), "-o", str(out), "--resume"]  # fmt: skip
    resumed = run(*cli, "--set", "logging_steps=1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "checkpoint-4" in resumed.stderr
    assert_same_as_uninterrupted(world, out)


@pytest.mark.slow
def test_killed_after_a_step_resumes_automatically(world, tmp_path):
    out = tmp_path / "sft"
    assert train(world, out, "step:7").returncode == -9
    assert [step for step, _ in checkpoints(tmp_path / ".sft.work")] == [6]
    resumed = train(world, out)  # no --resume: the library default (recipes) resumes a matching checkpoint
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint-6" in resumed.stderr
    assert_same_as_uninterrupted(world, out)


def fake_checkpoint(work: Path, step: int, fingerprint: str | None) -> Path:
    folder = work / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text("{}")
    if fingerprint is not None:
        (folder / MARKER).write_text(json.dumps({"fingerprint": fingerprint, "step": step}))
    return folder


def test_resume_picks_the_last_complete_checkpoint_of_this_run(tmp_path):
    work = tmp_path / ".model.work"
    for step, mark in [(2, "run"), (4, "run"), (6, None)]:  # 6: killed before its marker
        fake_checkpoint(work, step, mark)
    assert resolve_resume(work, "run", None, is_main=True) == str(work / "checkpoint-4")
    assert [s for s, _ in checkpoints(work)] == [2, 4]  # the half-written one is gone
    assert resolve_resume(work, "run", True, is_main=True) == str(work / "checkpoint-4")
    # Another run's checkpoints: refused by --resume, discarded by the automatic mode.
    with pytest.raises(UserError, match="written by a different run"):
        resolve_resume(work, "other", True, is_main=True)
    assert resolve_resume(work, "other", None, is_main=True) is None and checkpoints(work) == []
    # No --resume: start at step 0, the old checkpoints go.
    fake_checkpoint(work, 8, "run")
    assert resolve_resume(work, "run", False, is_main=True) is None and checkpoints(work) == []
    assert resolve_resume(tmp_path / "nothing", "run", True, is_main=True) is None
