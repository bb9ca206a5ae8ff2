"""What a token *is* as text: its space marker and the canonical bytes of every vocabulary entry.

Cross-tokenizer work compares tokens of different vocabularies, which spell the same text differently
('Ġhello', '▁hello', '##lo', '<0xE3>'). Everything here turns a vocabulary entry into the bytes it
stands for, so the vocabulary map and the DP alignment compare like with like. The space marker is
read from the tokenizer itself (the tokens of " a"): FuseChat's class-name table mapped Gemma to 'Ġ',
but Gemma uses '▁'.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from polyfuse.errors import DataError

BYTE_LEVEL_MARKER = "Ġ"
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def per_tokenizer(tokenizer, name: str, compute: Callable[[Any], Any]) -> Any:
    """`compute(tokenizer)`, remembered per tokenizer object and vocabulary size: a 262k vocabulary's
    bytes or special ids are read once per process, not once per response."""
    memo = _MEMO.setdefault(tokenizer, {})
    key = (name, len(tokenizer))
    if key not in memo:
        memo[key] = compute(tokenizer)
    return memo[key]


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[int, int]:
    """The inverse of GPT-2's `bytes_to_unicode`: printable stand-in code point -> the byte it encodes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = 256 + shifted
            shifted += 1
    return {code_point: byte for byte, code_point in table.items()}


def space_marker(tokenizer) -> str:
    """The symbol the vocabulary writes a leading space with: 'Ġ' (byte-level BPE), '▁' (Metaspace /
    SentencePiece) or '' (none: the space is dropped, as in BERT's WordPiece). Read off the tokens of
    " a", never off the tokenizer's class."""
    ids = tokenizer(" a", add_special_tokens=False)["input_ids"]
    spelled = "".join(tokenizer.convert_ids_to_tokens(ids))
    if not spelled.endswith("a"):
        raise DataError(f"{type(tokenizer).__name__}: cannot read the space marker, ' a' tokenises as {spelled!r}")
    prefix = spelled[:-1]
    return prefix[-1] if prefix and not prefix.isspace() else ""


def special_ids(tokenizer) -> set[int]:
    """Ids that stand for no text: the tokenizer's special tokens and added tokens marked special."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, token in added.items() if token.special}


def _continuation_prefix(tokenizer) -> str:
    """WordPiece's '##' (or any model's continuing-subword prefix); '' when the model has none."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return (getattr(backend.model, "continuing_subword_prefix", None) or "") if backend is not None else ""


def token_bytes(tokenizer) -> list[bytes | None]:
    """The canonical bytes of every id (index = id, length `len(tokenizer)`); None for special tokens.

    - byte-level BPE ('Ġ' marker): each symbol is decoded through GPT-2's byte-to-unicode table;
    - Metaspace / SentencePiece: '▁' is a space, a byte-fallback piece '<0xNN>' is that one byte, the rest
      is UTF-8;
    - a continuing-subword prefix (WordPiece '##x') is dropped: b'x'. When the vocabulary has no space
      marker at all (BERT-style WordPiece keeps no whitespace), a word-initial piece 'x' is read as
      b' x': a word start is treated as space-prefixed. With a marker, the marker alone carries spaces;
      with neither (word-level vocabularies), pieces are read as they are;
    - added tokens that are not special ('\\n\\n' runs, HTML tags in Gemma) are raw text: their UTF-8.
    """
    size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    marker = space_marker(tokenizer)
    continuation = _continuation_prefix(tokenizer)
    added = {i: token.content for i, token in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items()}
    specials = special_ids(tokenizer)
    out: list[bytes | None] = [None] * size
    if marker == BYTE_LEVEL_MARKER:
        table = _unicode_to_byte()
        to_latin1 = {code_point: chr(byte) for code_point, byte in table.items()}
        for i, piece in enumerate(pieces):
            if piece is None or i in specials or i in added:
                continue
            mapped = piece.translate(to_latin1)
            try:
                out[i] = mapped.encode("latin-1")
            except UnicodeEncodeError:  # a symbol outside the byte table: the piece is literal text
                out[i] = piece.encode("utf-8")
    else:
        word_start = " " if not marker and continuation else ""
        for i, piece in enumerate(pieces):
            if piece is None or i in specials or i in added:
                continue
            if piece.startswith("<0x") and _BYTE_FALLBACK.fullmatch(piece):
                out[i] = bytes([int(piece[3:5], 16)])
                continue
            if continuation and piece.startswith(continuation) and len(piece) > len(continuation):
                text = piece[len(continuation) :]
            else:
                text = word_start + piece
            out[i] = (text.replace(marker, " ") if marker else text).encode("utf-8")
    for i, content in added.items():
        if i < size and i not in specials:
            out[i] = content.encode("utf-8")
    return out
