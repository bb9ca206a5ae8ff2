"""X-Token's projection W [V_S, V_T] between a student's and a teacher's vocabularies (arXiv 2605.21699), built
once per tokenizer pair and cached on disk. Spec: `methods/onpolicy-distillation.md`, sections 4.2 and 6 (d).

Row v (a student token) is built from string rules:
- its canonical bytes (`token_bytes`: space markers and byte fallback read off each tokenizer) equal a teacher
  token's: weight 1.0 on that token (the lowest teacher id among equals);
- otherwise its text re-tokenised by the teacher tokenizer, the first `max_pieces` (4) pieces weighted
  `0.9 * 0.1^i` and normalised to sum 1. A piece list whose bytes do not spell the token (a tokenizer that
  adds a word-start space, a normaliser, bytes that are not whole UTF-8 characters) is replaced by the greedy
  longest match over the teacher's canonical bytes; a token neither can spell gets no row;
- special tokens get no row, but for `stop_pair`: the student's end-of-turn token gets weight 1.0 on the
  teacher's, so that where the teacher would end its turn and the student did not stop, the student's stop mass
  meets the teacher's end-of-turn mass (as one shared vocabulary compares them); the student's own stop token
  is still compared on its own (`objectives.topk`). Not a matched pair of the hybrid losses (GOLD skips EOS).
`reverse_pass` (off by default, as the spec decides: its effect is unpublished) adds each teacher token's own
re-tokenisation by the student into the same cells, then keeps each row's `row_top_k` largest entries,
renormalises, and gives every exact match back its single 1.0. NeMo-RL's "scale trick" is not implemented.

The cache key hashes both vocabularies (canonical bytes and special ids), both tokenizers' definitions (which
decide the re-tokenisation), the options and a format version; the file is written atomically.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from polyfuse.alignment.tokens import per_tokenizer, token_bytes
from polyfuse.alignment.vocab import _fingerprint
from polyfuse.config import cache_root
from polyfuse.data.io import atomic_write
from polyfuse.errors import ConfigError
from polyfuse.objectives.distill import Projection
from polyfuse.objectives.gold import Match

FORMAT_VERSION = 1
DEFAULT_CACHE = cache_root() / "projections"
RELAXED_MATCH = 0.6  # X-Token's H-KL: a student token's top W entry counts as its match from this weight on
LONGEST_PIECE = 64  # bytes: the greedy fallback tries teacher pieces up to this long


def piece_weights(count: int) -> np.ndarray:
    """`0.9 * 0.1^i` for i < count, normalised to sum 1 (1 piece: 1.0; 2: 0.909091, 0.090909; ...)."""
    raw = 0.9 * 0.1 ** np.arange(count, dtype=np.float64)
    return raw / raw.sum()


def _greedy(text: bytes, lookup: dict[bytes, int], longest: int) -> list[int] | None:
    """Longest-match pieces of `text` over a vocabulary's canonical bytes, or None if a byte has no piece."""
    pieces, at = [], 0
    while at < len(text):
        for size in range(min(longest, len(text) - at), 0, -1):
            piece = lookup.get(text[at : at + size])
            if piece is not None:
                pieces.append(piece)
                at += size
                break
        else:
            return None
    return pieces


def retokenize(texts: list[bytes], tokenizer) -> tuple[list[list[int] | None], int]:
    """Each byte string as pieces of `tokenizer`: its own tokenization when that spells the bytes exactly,
    else the greedy longest match over its canonical bytes; None when neither can. Returns (pieces, how many
    needed the fallback)."""
    canonical = per_tokenizer(tokenizer, "token_bytes", token_bytes)
    lookup: dict[bytes, int] = {}
    for i, piece in enumerate(canonical):
        if piece:
            lookup.setdefault(piece, i)
    longest = min(LONGEST_PIECE, max(map(len, lookup), default=1))
    decoded = [text.decode("utf-8", errors="strict") if _is_utf8(text) else None for text in texts]
    readable = [i for i, text in enumerate(decoded) if text]
    encoded = tokenizer([decoded[i] for i in readable], add_special_tokens=False)["input_ids"] if readable else []
    out: list[list[int] | None] = [None] * len(texts)
    for i, ids in zip(readable, encoded, strict=True):
        if all(canonical[t] is not None for t in ids) and b"".join(canonical[t] for t in ids) == texts[i]:
            out[i] = list(ids)
    fallback = [i for i, pieces in enumerate(out) if pieces is None]
    for i in fallback:
        out[i] = _greedy(texts[i], lookup, longest)
    return out, len(fallback)


def _is_utf8(text: bytes) -> bool:
    try:
        text.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _twins(source: list[bytes | None], target: list[bytes | None]) -> np.ndarray:
    """[len(source)] the lowest target id with the same canonical bytes, -1 for none (and for specials)."""
    lowest: dict[bytes, int] = {}
    for j, piece in enumerate(target):
        if piece is not None:
            lowest.setdefault(piece, j)
    return np.array([lowest.get(piece, -1) if piece is not None else -1 for piece in source], dtype=np.int64)


def _piece_entries(owners: np.ndarray, pieces: list[list[int] | None], max_pieces: int) -> tuple[np.ndarray, ...]:
    """(owner, piece, weight) triples of the re-tokenised tokens, the first `max_pieces` pieces each."""
    rows, cols, weights = [], [], []
    for owner, ids in zip(owners.tolist(), pieces, strict=True):
        if ids:
            kept = ids[:max_pieces]
            rows += [owner] * len(kept)
            cols += kept
            weights += piece_weights(len(kept)).tolist()
    return np.array(rows, np.int64), np.array(cols, np.int64), np.array(weights, np.float64)


def _normalise_rows(rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, size: int, top_k: int | None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum duplicate cells, keep each row's `top_k` largest entries (ties: lowest column), rows summing to 1."""
    cells = rows * size + cols
    unique, inverse = np.unique(cells, return_inverse=True)
    summed = np.bincount(inverse, weights=weights)
    rows, cols = unique // size, unique % size
    order = np.lexsort((cols, -summed, rows))
    rows, cols, summed = rows[order], cols[order], summed[order]
    if top_k is not None:
        first = np.searchsorted(rows, rows, side="left")
        keep = np.arange(len(rows)) - first < top_k
        rows, cols, summed = rows[keep], cols[keep], summed[keep]
    totals = np.bincount(rows, weights=summed, minlength=int(rows.max()) + 1 if len(rows) else 0)
    return rows, cols, summed / totals[rows]


def build_weights(student, teacher, max_pieces: int = 4, reverse_pass: bool = False,
                  row_top_k: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """W's entries (student ids, teacher ids, weights) and counts of how each row was built."""
    student_bytes = per_tokenizer(student, "token_bytes", token_bytes)
    teacher_bytes = per_tokenizer(teacher, "token_bytes", token_bytes)
    twin = _twins(student_bytes, teacher_bytes)
    exact = np.flatnonzero(twin >= 0)
    others = np.array([v for v, piece in enumerate(student_bytes) if piece and twin[v] < 0], np.int64)
    pieces, fallback = retokenize([student_bytes[v] for v in others], teacher)
    rows, cols, weights = _piece_entries(others, pieces, max_pieces)
    rows, cols, weights = np.concatenate([exact, rows]), np.concatenate([twin[exact], cols]), np.concatenate(
        [np.ones(len(exact)), weights])
    stats = {"exact": len(exact), "retokenized": int(sum(p is not None for p in pieces)),
             "fallback": fallback, "no_row": int(sum(p is None for p in pieces))}
    if reverse_pass:
        teacher_ids = np.array([c for c, piece in enumerate(teacher_bytes) if piece], np.int64)
        back, _ = retokenize([teacher_bytes[c] for c in teacher_ids], student)
        back_cols, back_rows, back_weights = _piece_entries(teacher_ids, back, max_pieces)
        rows, cols, weights = _normalise_rows(np.concatenate([rows, back_rows]), np.concatenate([cols, back_cols]),
                                              np.concatenate([weights, back_weights]), len(teacher_bytes), row_top_k)
        keep = ~np.isin(rows, exact)  # exact matches get their single 1.0 back
        rows, cols, weights = (np.concatenate([exact, rows[keep]]), np.concatenate([twin[exact], cols[keep]]),
                               np.concatenate([np.ones(len(exact)), weights[keep]]))
    else:
        rows, cols, weights = _normalise_rows(rows, cols, weights, len(teacher_bytes), None)
    return rows, cols, weights.astype(np.float32), stats


def matched_pairs(rule: Match, rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, student,
                  teacher) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one (student ids, teacher ids) under a match rule:
    - `strings` (GOLD): identical raw vocabulary strings (`get_vocab()`, space markers included);
    - `exact` (X-Token's strict map): a row whose only entry is 1.0; on a collision the lowest student id wins;
    - `relaxed` (H-KL): a row's top entry (ties: lowest teacher id) when its weight is >= 0.6; on a collision
      the highest weight wins, then the lowest student id;
    - `none`: no pairs (GOLD's plain ULD)."""
    if rule == "none":
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if rule == "strings":
        student_vocab = student.get_vocab()
        shared = [(student_vocab[s], t) for s, t in teacher.get_vocab().items() if s in student_vocab]
        pairs = np.array(sorted(shared), np.int64).reshape(-1, 2)
        return pairs[:, 0], pairs[:, 1]
    order = np.lexsort((cols, -weights, rows))  # per row: highest weight first, then lowest teacher id
    rows, cols, weights = rows[order], cols[order], weights[order]
    first = np.r_[True, rows[1:] != rows[:-1]]
    counts = np.diff(np.r_[np.flatnonzero(first), len(rows)])
    top_rows, top_cols, top_weights = rows[first], cols[first], weights[first]
    if rule == "exact":
        keep = (counts == 1) & (top_weights == 1.0)
    elif rule == "relaxed":
        keep = top_weights >= RELAXED_MATCH
    else:
        raise ConfigError(f"unknown match rule {rule!r}; expected strings, exact, relaxed or none")
    top_rows, top_cols, top_weights = top_rows[keep], top_cols[keep], top_weights[keep]
    winner = np.lexsort((top_rows, -top_weights, top_cols))  # per teacher id: highest weight, then lowest student
    top_rows, top_cols = top_rows[winner], top_cols[winner]
    once = np.r_[True, top_cols[1:] != top_cols[:-1]] if len(top_cols) else np.zeros(0, bool)
    return top_rows[once], top_cols[once]


def _tokenizer_hash(tokenizer) -> bytes:
    """Its vocabulary (canonical bytes, special ids) and what decides how it splits text: the fast tokenizer's
    serialised definition, else its vocabulary's strings."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    vocabulary = _fingerprint(tokenizer, per_tokenizer(tokenizer, "token_bytes", token_bytes))
    return vocabulary + hashlib.sha256(f"{type(tokenizer).__name__}:{text}".encode()).digest()


def cache_key(student, teacher, max_pieces: int, reverse_pass: bool, row_top_k: int) -> str:
    digest = hashlib.sha256(f"polyfuse-projection:{FORMAT_VERSION}:{max_pieces}:{reverse_pass}:{row_top_k}:".encode())
    for tokenizer in (student, teacher):
        digest.update(per_tokenizer(tokenizer, "projection-hash", _tokenizer_hash))
    return digest.hexdigest()[:32]


def projection(student, teacher, match: Match = "exact", max_pieces: int = 4, reverse_pass: bool = False,
               row_top_k: int = 4, cache_dir: str | Path | None = None,
               teacher_vocab_size: int | None = None, stop_pair: tuple[int, int] | None = None) -> Projection:
    """The `Projection` of `student`'s vocabulary into `teacher`'s (module docstring): W = I when every id has the
    same canonical bytes in both, else W's entries from the cache (`cache_dir`, default `$POLYFUSE_CACHE/projections`) or built
    and cached. `match` picks the hybrid losses' pairs (`matched_pairs`); `teacher_vocab_size` (default
    `len(teacher)`) is GOLD's |V_T|, the teacher's logit width in TRL; `stop_pair`: (the student's end-of-turn id,
    the teacher's), W's one row for a special token."""
    if max_pieces < 1 or row_top_k < 1:
        raise ConfigError(f"projection: max_pieces and row_top_k must be >= 1, got {max_pieces} and {row_top_k}")
    shape = (len(student), len(teacher))
    if per_tokenizer(student, "token_bytes", token_bytes) == per_tokenizer(teacher, "token_bytes", token_bytes):
        ids = np.arange(shape[0])
        rows, cols, weights = ids, ids, np.ones(shape[0], np.float32)
    else:
        path = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE) / (
            f"xtoken-{cache_key(student, teacher, max_pieces, reverse_pass, row_top_k)}.npz")
        try:
            with np.load(path, allow_pickle=False) as stored:
                rows, cols, weights = stored["student_ids"], stored["teacher_ids"], stored["weights"]
        except (OSError, KeyError, ValueError):  # not cached yet, or a damaged file: build it again
            rows, cols, weights, stats = build_weights(student, teacher, max_pieces, reverse_pass, row_top_k)
            atomic_write(path, lambda handle: np.savez(handle, student_ids=rows.astype(np.int32),
                                                       teacher_ids=cols.astype(np.int32), weights=weights,
                                                       stats=json.dumps(stats)))
    pairs = matched_pairs(match, rows, cols, weights, student, teacher)
    if stop_pair is not None and not np.isin(stop_pair[0], rows):  # W = I pairs them already
        rows, cols, weights = np.r_[rows, stop_pair[0]], np.r_[cols, stop_pair[1]], np.r_[weights, np.float32(1.0)]
    return Projection.from_entries(rows, cols, weights, shape, pairs, teacher_vocab_size)
