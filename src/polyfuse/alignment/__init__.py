"""Cross-tokenizer alignment for explicit fusion: token bytes, response spans and groups, vocabulary maps."""

from polyfuse.alignment.spans import align, align_dp, align_offsets, response_spans
from polyfuse.alignment.tokens import space_marker, special_ids, token_bytes
from polyfuse.alignment.vocab import DEFAULT_CACHE, vocab_map

__all__ = [
    "DEFAULT_CACHE",
    "align",
    "align_dp",
    "align_offsets",
    "response_spans",
    "space_marker",
    "special_ids",
    "token_bytes",
    "vocab_map",
]
