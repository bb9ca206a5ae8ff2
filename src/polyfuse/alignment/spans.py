"""Which response tokens of two tokenizers cover the same text: by character offsets, else FuseLLM's DP.

Every model scores the same response string, each through its own template (`polyfuse.models.encode`).
Aligning on character offsets of that string, never on decoded strings, survives a BOS on one side only,
an end-of-turn marker on one side only, and multi-byte characters split across byte-level tokens. A group
is the tokens of each side between two consecutive common end boundaries, found by one O(m + n) walk.

`align_dp` is FuseLLM's edit-distance DTW, kept as the documented fallback for tokenizers without offsets
(slow tokenizers). It is vectorised: a rapidfuzz cost matrix and one numpy cumulative-minimum per row.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from polyfuse.alignment.tokens import per_tokenizer, special_ids, token_bytes
from polyfuse.data.schemas import as_messages
from polyfuse.errors import ConfigError, DataError
from polyfuse.models.templates import Encoded, encode

Span = tuple[int, int]
Group = tuple[list[int], list[int]]


def _require_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"{type(tokenizer).__name__} is not a fast tokenizer: it has no offsets, so response spans cannot be "
            "computed; align its tokens with `align_dp` instead"
        )


def _offsets(tokenizer, text: str) -> tuple[list[int], list[Span]]:
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoding["input_ids"]), [tuple(pair) for pair in encoding["offset_mapping"]]


def _response_offsets(tokenizer, prompt: Any, response: str, encoded: Encoded) -> tuple[list[Span | None], int, int]:
    """Raw offsets of the response ids in the text they were tokenised from, plus where the response's
    characters lie in that text: (offsets, shift, covered) with response char k at text position k + shift
    for k < covered (a template that trims the response covers fewer characters)."""
    n = len(encoded.response_ids)
    if encoded.mode == "plain":
        ids, offsets = _offsets(tokenizer, " " + response)
        if ids != encoded.response_ids[:-1]:
            raise DataError("response ids from offsets disagree with polyfuse.models.encode (plain mode)")
        return [*offsets, None], 1, len(response)
    messages = as_messages(prompt) + [{"role": "assistant", "content": response}]
    full = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    ids, offsets = _offsets(tokenizer, full)
    if n > len(ids) or ids[len(ids) - n :] != encoded.response_ids:
        raise DataError("response ids from offsets disagree with polyfuse.models.encode (chat mode)")
    offsets = offsets[len(ids) - n :]
    search_from = offsets[0][0] if offsets else 0
    found = full.find(response, search_from)
    if found >= 0:
        return offsets, found, len(response)
    stripped = response.strip()
    found = full.find(stripped, search_from) if stripped else -1
    if found < 0:
        raise DataError("the chat template rewrites the response text: cannot locate it in the rendered conversation")
    lead = len(response) - len(response.lstrip())
    return offsets, found - lead, lead + len(stripped)


def _normalise(raw: list[Span | None], response: str) -> list[Span | None]:
    """Make the spans tile the response: whitespace belongs to the following token (a token's trailing
    whitespace and any uncovered gap move to the next text token; the last keeps trailing whitespace),
    and tokens that share one end (pieces of one multi-byte character) share one span."""
    spanned = [i for i, span in enumerate(raw) if span is not None]
    ends: list[int] = []
    for rank, i in enumerate(spanned):
        start, end = raw[i]
        if rank < len(spanned) - 1:
            kept = response[start:end].rstrip()
            end = start + len(kept) if kept else end
        elif response[end:].isspace():
            end = len(response)
        ends.append(max(end, ends[-1]) if ends else end)
    out: list[Span | None] = [None] * len(raw)
    start, previous_end = 0, 0
    for i, end in zip(spanned, ends, strict=True):
        if end != previous_end:
            start, previous_end = previous_end, end
        out[i] = (start, end)
    return out


def _markers(tokenizer) -> set[int]:
    """Special ids that stand for no response text: all but unk, which stands for text it cannot spell."""
    return special_ids(tokenizer) - {tokenizer.unk_token_id}


def response_spans(tokenizer, prompt: Any, response: str) -> tuple[Encoded, list[Span | None]]:
    """`encode(tokenizer, prompt, response)` and the `[start, end)` character span in `response` of each
    response id: None for special tokens (unk excepted: it stands for text) and for template text
    (end-of-turn markers, the newline after them). Spans tile the response (see `_normalise`); the pieces
    of one character share its span. Raises `DataError` for a slow tokenizer (no offsets)."""
    _require_fast(tokenizer)
    encoded = encode(tokenizer, prompt, response)
    offsets, shift, covered = _response_offsets(tokenizer, prompt, response, encoded)
    specials = per_tokenizer(tokenizer, "markers", _markers)
    raw: list[Span | None] = []
    for token_id, offset in zip(encoded.response_ids, offsets, strict=True):
        if offset is None or token_id in specials:
            raw.append(None)
            continue
        start, end = max(offset[0] - shift, 0), min(offset[1] - shift, covered)
        raw.append((start, end) if start < end else None)
    return encoded, _normalise(raw, response)


def align_offsets(spans_a: list[Span | None], spans_b: list[Span | None]) -> list[Group]:
    """Groups of token indices (side a, side b) between consecutive common end boundaries: 1-1, 1-many,
    many-1 or many-many. Tokens without a span belong to no group, nor do trailing tokens after the last
    common boundary. One merge walk, O(m + n)."""
    a = [i for i, span in enumerate(spans_a) if span is not None]
    b = [j for j, span in enumerate(spans_b) if span is not None]
    ends_a, ends_b = [spans_a[i][1] for i in a], [spans_b[j][1] for j in b]
    groups: list[Group] = []
    p = q = 0
    while p < len(a) and q < len(b):
        first_p, first_q = p, q
        end_a, end_b = ends_a[p], ends_b[q]
        p, q = p + 1, q + 1
        while end_a != end_b:
            if end_a < end_b:
                if p == len(a):
                    return groups
                end_a, p = ends_a[p], p + 1
            else:
                if q == len(b):
                    return groups
                end_b, q = ends_b[q], q + 1
        while p < len(a) and ends_a[p] == end_a:  # more pieces of the same character
            p += 1
        while q < len(b) and ends_b[q] == end_b:
            q += 1
        groups.append((a[first_p:p], b[first_q:q]))
    return groups


def _edit_costs(tokens_a: list[bytes], tokens_b: list[bytes]) -> np.ndarray:
    """Levenshtein distance of every (a, b) pair of byte strings, one byte one symbol (latin-1)."""
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    strings_a = [t.decode("latin-1") for t in tokens_a]
    strings_b = [t.decode("latin-1") for t in tokens_b]
    longest = max(map(len, strings_a + strings_b))
    dtype = np.uint8 if longest < 255 else np.int32
    workers = -1 if len(strings_a) * len(strings_b) > 1 << 20 else 1  # threads cost more than small matrices
    return cdist(strings_a, strings_b, scorer=Levenshtein.distance, dtype=dtype, workers=workers).astype(np.int64)


def align_dp(tokens_a: list[bytes], tokens_b: list[bytes], band: int | None = None) -> list[Group]:
    """FuseLLM's edit-distance DTW over canonical token bytes, as groups like `align_offsets`.

    D(0,0) = 0, D(i,0) = D(0,j) = inf, D(i,j) = c(i,j) + min(D(i-1,j-1), D(i-1,j), D(i,j-1)) with c the
    edit distance; the backtrack from (m,n) prefers the diagonal, then (i-1,j), then (i,j-1), as FuseLLM's
    `np.argmin` does. Pairs on the path that share a position form one group (one-to-many, many-to-one).
    `band` keeps the path within that many cells of the straight line from (1,1) to (m,n). It is the
    fallback for tokenizers without offsets; `align_offsets` is exact and O(m + n).

    Each row is solved at once: with A_j = min(D(i-1,j-1), D(i-1,j)) and C the prefix sums of row i's
    costs, D(i,j) = C_j + min over k <= j of (A_k - C_(k-1)), a cumulative minimum.
    """
    m, n = len(tokens_a), len(tokens_b)
    if m == 0 or n == 0:
        return []
    if band is not None and band < 0:
        raise ConfigError(f"align_dp: band must be >= 0, got {band}")
    cost = _edit_costs(tokens_a, tokens_b)
    prefix = np.cumsum(cost, axis=1)  # C_j
    before = prefix - cost  # C_(j-1)
    inf = np.int64(1) << 50
    table = np.full((m + 1, n + 1), inf, dtype=np.int64)
    table[0, 0] = 0
    for i in range(1, m + 1):
        if band is None:
            low, high = 1, n
        else:
            centre = 1 + round((i - 1) * (n - 1) / max(m - 1, 1))
            low, high = max(1, centre - band), min(n, centre + band)
        above = table[i - 1]
        row = np.minimum(above[low - 1 : high], above[low : high + 1])
        row -= before[i - 1, low - 1 : high]
        np.minimum.accumulate(row, out=row)
        row += prefix[i - 1, low - 1 : high]
        table[i, low : high + 1] = row
    if table[m, n] >= inf:
        raise ConfigError(f"align_dp: band {band} is too narrow for {m} x {n} tokens: no path reaches the end")
    path = _backtrack(table)
    return _groups_of_path(path)


def _backtrack(table: np.ndarray) -> list[tuple[int, int]]:
    """The warping path from (m, n) back to (1, 1), as 0-based (a, b) pairs in forward order."""
    i, j = table.shape[0] - 1, table.shape[1] - 1
    path = [(i - 1, j - 1)]
    while i > 1 or j > 1:
        diagonal, up, left = table.item(i - 1, j - 1), table.item(i - 1, j), table.item(i, j - 1)
        if diagonal <= up and diagonal <= left:
            i, j = i - 1, j - 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
        path.append((i - 1, j - 1))
    path.reverse()
    return path


def _groups_of_path(path: list[tuple[int, int]]) -> list[Group]:
    groups: list[Group] = []
    previous = (-1, -1)
    for i, j in path:
        if i != previous[0] and j != previous[1]:
            groups.append(([i], [j]))
        elif i != previous[0]:
            groups[-1][0].append(i)
        else:
            groups[-1][1].append(j)
        previous = (i, j)
    return groups


def align(tokenizer_a, tokenizer_b, prompt: Any, response: str) -> list[Group]:
    """Groups of response-token indices of two models on the same (prompt, response): offsets when both
    tokenizers are fast, else the DP over the canonical bytes of their text tokens: without offsets, the
    response text is taken to be the response ids before the first special token (end-of-turn, EOS)."""
    if getattr(tokenizer_a, "is_fast", False) and getattr(tokenizer_b, "is_fast", False):
        return align_offsets(response_spans(tokenizer_a, prompt, response)[1],
                             response_spans(tokenizer_b, prompt, response)[1])
    sides = []
    for tokenizer in (tokenizer_a, tokenizer_b):
        table = per_tokenizer(tokenizer, "token_bytes", token_bytes)
        markers = per_tokenizer(tokenizer, "markers", _markers)
        ids = encode(tokenizer, prompt, response).response_ids
        end = next((k for k, t in enumerate(ids) if t in markers), len(ids))  # template text follows a marker
        sides.append([(k, table[t]) for k, t in enumerate(ids[:end]) if table[t]])
    text_a, text_b = sides
    groups = align_dp([t for _, t in text_a], [t for _, t in text_b])
    return [([text_a[i][0] for i in group_a], [text_b[j][0] for j in group_b]) for group_a, group_b in groups]
