"""Checkpoints a killed training stage resumes from, and the rule that a half-written one is never used.

Trainer writes `checkpoint-N/` in place (model, optimizer, scheduler, RNG state of every process, then
`trainer_state.json`, which holds the data position: epoch and step). A kill while it writes leaves a
folder that looks like a checkpoint. So after Trainer's save, every process waits for the others, and the
main process writes `polyfuse_checkpoint.json` into the folder last, atomically: only a folder holding
that marker counts as complete. The marker also holds a fingerprint of what is trained (config, model,
data, process count): a checkpoint of another run is never resumed. `save_total_limit` is applied here,
after the marker, to complete checkpoints only, so a complete checkpoint is never deleted before the
next one is.

Checkpoints live in the stage's scratch folder (`.<out>.work/`, beside the output), which is removed
once the final model is saved.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from polyfuse.errors import UserError

logger = logging.getLogger(__name__)

MARKER = "polyfuse_checkpoint.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Settings that do not change what is computed: a run may resume with other values.
NOT_FINGERPRINTED = {"logging_steps", "report_to", "run_name", "logging_dir", "save_steps", "save_total_limit",
                     "force"}  # fmt: skip


def fingerprint(config: Any, summary: dict[str, Any], processes: int) -> str:
    """What a checkpoint must have been trained on to be resumed: the config (but its logging and saving
    settings), the summary (model, objective, data hash, dropped rows ...) and the number of processes
    (data order and per-process RNG depend on it)."""
    payload = {
        "config": config.model_dump(exclude=NOT_FINGERPRINTED),
        "summary": summary,
        "processes": processes,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def data_fingerprint(rows: list[Any]) -> str:
    """A hash of the training rows (pydantic models), in order."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(row.model_dump_json().encode())
        digest.update(b"\n")
    return digest.hexdigest()


def checkpoints(work_dir: Path) -> list[tuple[int, Path]]:
    """Every `checkpoint-N` folder, by step."""
    if not work_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in work_dir.iterdir() if (m := CHECKPOINT.match(p.name)) and p.is_dir()]
    return sorted(found)


def is_complete(folder: Path, expected: str | None = None) -> bool:
    """The marker is there (written last) with the expected fingerprint, and so is Trainer's state."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (folder / "trainer_state.json").is_file() and (expected is None or marker.get("fingerprint") == expected)


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def resolve_resume(work_dir: Path, expected: str, resume: bool | None, is_main: bool) -> str | None:
    """The checkpoint to resume from, or None to start at step 0, cleaning `work_dir` accordingly.

    `resume` True (`--resume`): the last complete checkpoint of this run; checkpoints of another run are
    an error. None (recipes): the same, but another run's checkpoints are discarded with a warning.
    False: start again; old checkpoints are discarded. Incomplete checkpoints are always discarded.
    Called by every process; only the main one deletes, between two barriers."""
    found = checkpoints(work_dir)
    usable = [path for _, path in found if is_complete(path, expected)]
    chosen = usable[-1] if usable and resume is not False else None
    if resume is True and chosen is None and any(is_complete(p) for _, p in found):
        raise UserError(
            f"{work_dir}: its checkpoints were written by a different run (config, model, data or process count "
            "changed); rerun without --resume to start again, or restore the original settings"
        )
    if resume is not False and chosen is None and found:
        logger.warning("%s: no complete checkpoint of this run; starting at step 0", work_dir)
    barrier()
    if is_main:
        for _, path in found:
            if path != chosen and not (chosen is not None and is_complete(path, expected)):
                shutil.rmtree(path, ignore_errors=True)
    barrier()
    if chosen is not None:
        logger.warning("resuming from %s", chosen)
    return str(chosen) if chosen is not None else None


class CompleteCheckpoints(TrainerCallback):
    """After Trainer wrote `checkpoint-N` on every process: the marker (main process, last, atomically),
    then `save_total_limit` over complete checkpoints. Must be the last callback (its `on_save` runs after
    every other one)."""

    def __init__(self, expected: str, limit: int | None):
        self.expected = expected
        self.limit = limit

    def on_step_end(self, args, state, control, **kwargs):
        """No checkpoint after the last step (Trainer's habit): the final model is saved right after it."""
        if state.global_step >= state.max_steps and state.global_step % args.save_steps:
            control.should_save = False
        return control

    def on_save(self, args, state, control, **kwargs):
        barrier()  # every process has written its part (sharded model/optimizer, RNG state)
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            staging = folder / f".{MARKER}.tmp"
            staging.write_text(json.dumps({"fingerprint": self.expected, "step": state.global_step}) + "\n")
            os.replace(staging, folder / MARKER)
            complete = [path for _, path in checkpoints(Path(args.output_dir)) if is_complete(path, self.expected)]
            if self.limit is not None:
                for path in complete[: -self.limit]:
                    shutil.rmtree(path, ignore_errors=True)
        barrier()
        return control
