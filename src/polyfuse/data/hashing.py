"""Content hashes of files and folders: what stage fingerprints and model records are made of."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_path(path: str | Path) -> str:
    """sha256 of a file, or of a folder's (relative path, file hash) list; a hub id hashes as its name."""
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
            digest.update(str(file.relative_to(path)).encode())
            digest.update(file_digest(file).encode())
        return digest.hexdigest()
    return hashlib.sha256(f"hub:{path}".encode()).hexdigest()
