"""FuseLLM's edit-distance DTW as the original pure-Python cell loop: the reference that the vectorised
`polyfuse.alignment.align_dp` is checked against (tests/test_alignment.py) and timed against
(bench/alignment_speed.py)."""

from __future__ import annotations

from rapidfuzz.distance import Levenshtein


def reference_dp(tokens_a: list[bytes], tokens_b: list[bytes]) -> list[tuple[int, int]]:
    """FuseLLM's DTW as a pure-Python cell loop: the warping path as 0-based pairs."""
    m, n = len(tokens_a), len(tokens_b)
    table = [[float("inf")] * (n + 1) for _ in range(m + 1)]
    table[0][0] = 0
    for i in range(1, m + 1):
        for j in range(1, n + 1):
            cost = Levenshtein.distance(tokens_a[i - 1].decode("latin-1"), tokens_b[j - 1].decode("latin-1"))
            table[i][j] = cost + min(table[i - 1][j - 1], table[i - 1][j], table[i][j - 1])
    i, j, path = m, n, [(m - 1, n - 1)]
    while i > 1 or j > 1:
        options = [table[i - 1][j - 1], table[i - 1][j], table[i][j - 1]]
        move = options.index(min(options))
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
        path.append((i - 1, j - 1))
    return path[::-1]
