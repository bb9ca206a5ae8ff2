"""Sharded safetensors output that survives a crash.

The shard layout is fixed before the first tensor is merged: tensors in plan order, a new shard when
the next tensor would push the current one past the limit in BYTES (a tensor larger than the limit gets
a shard of its own). Each shard is written to a temporary file and renamed, then recorded in a
manifest; a rerun with the same plan keeps the recorded shards and merges only the rest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from polyfuse.data.io import write_json
from polyfuse.errors import ConfigError

MANIFEST = ".polyfuse-merge.json"
INDEX = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """`5GB` (powers of 1000, as transformers), `4GiB`, or plain bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in _UNITS:
        raise ConfigError(f"max_shard_size: expected a size like 5GB, 500MB or 1000000 (got {text!r})")
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size <= 0:
        raise ConfigError(f"max_shard_size: must be positive (got {text!r})")
    return size


def plan_shards(sizes: list[tuple[str, int]], limit: int) -> list[list[str]]:
    """Group (name, bytes) in order; flush when the next tensor would exceed `limit`."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def shard_file(index: int, count: int) -> str:
    return "model.safetensors" if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


class ShardWriter:
    """`own_files`: the other files a merge writes into `out` (config.json, ...), whose temporary files a killed
    run may have left; the folder is this merge's when it holds a matching manifest, or nothing but such
    temporary files (a merge killed before its first manifest was in place)."""

    def __init__(self, out: Path, sizes: list[tuple[str, int]], limit: int, fingerprint: str,
                 own_files: tuple[str, ...] = ()):
        self.out = out
        self.sizes = dict(sizes)
        self.shards = plan_shards(sizes, limit)
        self.files = [shard_file(i, len(self.shards)) for i in range(len(self.shards))]
        self.shard_of = {name: i for i, names in enumerate(self.shards) for name in names}
        self.fingerprint = fingerprint
        self.own_files = {*self.files, MANIFEST, INDEX, *own_files}
        self.done: list[str] = []
        self.created = False  # this run made the output folder
        self._buffer: dict[str, torch.Tensor] = {}

    def _check(self) -> None:
        """Refuse before any work: a folder holding other files or another merge."""
        manifest = self._read_manifest()
        foreign = sorted(p.name for p in self.out.iterdir() if not self._temporary(p.name)) if self.out.is_dir() else []
        if manifest is None and foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise ConfigError(f"{self.out}: output folder is not empty and holds no polyfuse merge (it holds "
                              f"{foreign[0]}{more}); choose an empty or new folder")
        if manifest is not None and manifest.get("fingerprint") != self.fingerprint:
            raise ConfigError(f"{self.out}: holds a merge of a different config or inputs; "
                              f"choose another folder or delete it to start over")
        if manifest is not None:
            self.done = [f for f in manifest.get("done", []) if f in self.files and (self.out / f).is_file()]

    def open(self) -> None:
        """`_check`, then free disk space; then create the folder (or clear a killed run's temporary files from it)
        and record the manifest, the last step before any tensor is read."""
        self._check()
        needed = sum(self.sizes[name] for name in self.pending())
        existing = next(p for p in (self.out, *self.out.parents) if p.exists())
        free = shutil.disk_usage(existing).free
        if needed > free:
            raise ConfigError(f"{self.out}: the merge needs about {needed / 1e9:.2f} GB more disk space "
                              f"but only {free / 1e9:.2f} GB are free")
        self.created = not self.out.exists()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self.remove_temporaries()
            self._write_manifest(complete=False)
        except OSError as err:
            self.abandon()
            raise ConfigError(f"{self.out}: output folder not writable ({err})") from None

    def remove_temporaries(self) -> None:
        """Delete the temporary files of this merge's writes that a killed run left behind."""
        for path in self.out.iterdir():
            if self._temporary(path.name):
                path.unlink(missing_ok=True)

    def abandon(self) -> None:
        """After a failure: no temporary file stays; a folder this run created with no finished shard goes too."""
        if not self.out.is_dir():
            return
        self.remove_temporaries()
        if self.created and not self.done:
            shutil.rmtree(self.out, ignore_errors=True)

    def _temporary(self, name: str) -> bool:
        """A temporary file of one of this merge's writes: `.NAME.partial` (shards) or `.NAME.*.tmp` (atomic
        JSON and text writes), NAME one of the files a merge writes."""
        return any(name == f".{own}.partial" or (name.startswith(f".{own}.") and name.endswith(".tmp"))
                   for own in self.own_files)

    def pending(self) -> list[str]:
        """Tensor names still to write, in plan order: everything from the first unfinished shard on."""
        return [n for file, names in zip(self.files, self.shards, strict=True) if file not in self.done
                for n in names]

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self._buffer[name] = tensor.contiguous()
        shard = self.shard_of[name]
        if all(n in self._buffer for n in self.shards[shard]):
            self._flush(shard)

    def finish(self) -> Path:
        """Write the index (for more than one shard) and mark the merge complete."""
        if len(self.files) > 1:
            weight_map = {name: self.files[shard] for name, shard in self.shard_of.items()}
            total = sum(self.sizes.values())
            write_json(self.out / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        self._write_manifest(complete=True)
        return self.out

    def _flush(self, shard: int) -> None:
        from safetensors.torch import save_file

        file = self.files[shard]
        tensors = {n: self._buffer.pop(n) for n in self.shards[shard]}
        tmp = self.out / f".{file}.partial"
        try:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
            with open(tmp, "rb") as handle:  # on disk before the rename makes it a finished shard
                os.fsync(handle.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, self.out / file)
        _fsync_folder(self.out)
        self.done.append(file)
        self._write_manifest(complete=False)

    def _read_manifest(self) -> dict[str, Any] | None:
        path = self.out / MANIFEST
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"{path}: not a readable polyfuse merge manifest ({err}); delete the folder to start "
                              f"over") from None
        if not isinstance(manifest, dict):
            raise ConfigError(f"{path}: not a polyfuse merge manifest; delete the folder to start over")
        return manifest

    def _write_manifest(self, complete: bool) -> None:
        write_json(self.out / MANIFEST, {"fingerprint": self.fingerprint, "files": self.files,
                                         "done": self.done, "complete": complete})



def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (the directory entry itself)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
