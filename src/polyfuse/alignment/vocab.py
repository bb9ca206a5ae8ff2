"""Source id -> pivot id maps (FuseLLM's EM and MinED), computed once per tokenizer pair and cached.

The per-position targets of FuseLLM live in the pivot's vocabulary, so every source id in a stored top-K
needs a pivot id. MinED compares one source token against the whole pivot vocabulary, which is the known
cost of the method: here it runs only for the source tokens without an exact match, through rapidfuzz's
compiled `cdist` in row chunks of bounded memory, and the result is cached on disk as `.npy`, keyed by a
hash of both vocabularies' canonical bytes, their special-token ids, the method and a format version.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal

import numpy as np

from polyfuse.alignment.tokens import per_tokenizer, special_ids, token_bytes
from polyfuse.config import cache_root
from polyfuse.errors import ConfigError

FORMAT_VERSION = 1
DEFAULT_CACHE = cache_root() / "vocab-maps"
CHUNK_CELLS = 1 << 26  # distance cells per cdist call: 64 MiB of uint8
SPECIAL_ROLES = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
Method = Literal["exact", "mined"]


def _fingerprint(tokenizer, pieces: list[bytes | None]) -> bytes:
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(b"\xff" if piece is None else len(piece).to_bytes(2, "little") + piece)
    digest.update(repr([getattr(tokenizer, role, None) for role in SPECIAL_ROLES]).encode())
    return digest.digest()


def _special_targets(source, pivot) -> dict[int, int]:
    """Source special id -> pivot id: bos, eos, pad and unk to their counterparts where the pivot has
    one; every other special (end-of-turn markers, unused slots) to the pivot's unk, else its eos."""
    fallback = pivot.unk_token_id if pivot.unk_token_id is not None else pivot.eos_token_id
    targets = {i: fallback for i in special_ids(source)}
    for role in reversed(SPECIAL_ROLES):  # eos wins over pad when a source uses one id for both
        source_id, pivot_id = getattr(source, role, None), getattr(pivot, role, None)
        if source_id is not None and pivot_id is not None:
            targets[source_id] = pivot_id
    return targets


def _min_edit_distance(queries: list[bytes], choices: list[bytes]) -> np.ndarray:
    """For each query, the index of the choice at minimum Levenshtein distance, the lowest index on ties.
    Strings are decoded as latin-1 so that each byte is one symbol (a multi-byte character is several)."""
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    choice_strings = [c.decode("latin-1") for c in choices]
    longest = max(map(len, choice_strings)) + max(map(len, queries))
    dtype = np.uint8 if longest < 255 else np.int32
    rows = max(1, CHUNK_CELLS // len(choices))
    best = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), rows):
        chunk = [q.decode("latin-1") for q in queries[start : start + rows]]
        distances = cdist(chunk, choice_strings, scorer=Levenshtein.distance, dtype=dtype, workers=-1)
        best[start : start + len(chunk)] = distances.argmin(axis=1)
    return best


def _build(source, pivot, source_pieces, pivot_pieces, method: Method) -> np.ndarray:
    mapping = np.full(len(source_pieces), -1, dtype=np.int32)
    lowest_id: dict[bytes, int] = {}
    for j, piece in enumerate(pivot_pieces):
        if piece is not None:
            lowest_id.setdefault(piece, j)
    for i, piece in enumerate(source_pieces):
        if piece is not None:
            mapping[i] = lowest_id.get(piece, -1)
    if method == "mined":
        missing = [i for i, piece in enumerate(source_pieces) if piece is not None and mapping[i] < 0]
        choice_ids = np.fromiter(sorted(set(lowest_id.values())), dtype=np.int32)
        if missing and len(choice_ids):
            nearest = _min_edit_distance([source_pieces[i] for i in missing], [pivot_pieces[j] for j in choice_ids])
            mapping[missing] = choice_ids[nearest]
    for source_id, pivot_id in _special_targets(source, pivot).items():
        if source_id < len(mapping) and pivot_id is not None:
            mapping[source_id] = pivot_id
    return mapping


def vocab_map(source_tokenizer, pivot_tokenizer, method: Method = "mined",
              cache_dir: str | Path | None = None) -> np.ndarray:
    """int32 array of length `len(source_tokenizer)`: the pivot id of each source id (directional).

    - "exact" (EM): the pivot token with the same canonical bytes (`token_bytes`, so 'Ġhello' and
      '▁hello' match), else -1;
    - "mined" (MinED): the exact match if any, else the pivot token at minimum edit distance over canonical
      bytes (one byte one symbol), ties to the lowest pivot id (FuseLLM publishes no tie rule; polyfuse's
      choice).
    Under both, special tokens map by role (bos, eos, pad, unk) when the pivot has that role, and every
    other special to the pivot's unk, else its eos. The map is cached in `cache_dir` (default
    `DEFAULT_CACHE`, under `$POLYFUSE_CACHE` when set) and reused whenever both vocabularies are the same.
    """
    if method not in ("exact", "mined"):
        raise ConfigError(f"vocab_map: method must be 'exact' or 'mined', got {method!r}")
    source_pieces = per_tokenizer(source_tokenizer, "token_bytes", token_bytes)
    pivot_pieces = per_tokenizer(pivot_tokenizer, "token_bytes", token_bytes)
    key = hashlib.sha256(
        f"polyfuse-vocab-map:{FORMAT_VERSION}:{method}:".encode()
        + _fingerprint(source_tokenizer, source_pieces) + _fingerprint(pivot_tokenizer, pivot_pieces)
    ).hexdigest()[:32]
    path = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE) / f"{method}-{key}.npy"
    if path.is_file():
        cached = np.load(path)
        if cached.shape == (len(source_pieces),) and cached.dtype == np.int32:
            return cached
    mapping = _build(source_tokenizer, pivot_tokenizer, source_pieces, pivot_pieces, method)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        np.save(handle, mapping)
    os.replace(temporary, path)
    return mapping
