"""Vocabulary rules (spec section 11): rows are matched by token string, never by raw row index.

Each input gets a row map: for every output row, the row of that input holding the same token, or -1
when the input lacks it. Identical vocabularies give the identity map and cost nothing. Rows past
`len(tokenizer)` are padding: they align by index only where both sides are padding, and the output
keeps the base's padded row count. A token an input lacks takes the base's row if the base has it,
else the mean of the inputs that have it (the only one, when one has it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from polyfuse.errors import ConfigError
from polyfuse.merge.sources import ModelSource

logger = logging.getLogger(__name__)
EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight")
HEAD_NAMES = ("lm_head.weight", "embed_out.weight", "output.weight")


def embed_key(source: ModelSource) -> str | None:
    return next((k for k in source.tensors if k.endswith(EMBED_SUFFIXES)), None)


def head_key(source: ModelSource) -> str | None:
    return next((k for k in source.tensors if k in HEAD_NAMES), None)


@dataclass
class VocabPlan:
    rows: int  # output rows (the base's padded count, or more for a larger output vocabulary)
    maps: list[torch.Tensor | None]  # per input: source row per output row, -1 = lacking; None = identity
    added_tokens: list[str] = field(default_factory=list)  # `union`: appended to the base tokenizer

    @property
    def remaps(self) -> bool:
        return any(m is not None for m in self.maps)


def read_vocab(source: ModelSource) -> dict[str, int] | None:
    """token -> id of the input's tokenizer (added tokens included), or None when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source.folder), trust_remote_code=False).get_vocab()
    except (OSError, ValueError, TypeError):
        return None


def plan_vocab(inputs: list[ModelSource], rows: list[int], tokenizer_source: str | None, source_index: int,
               where: str) -> VocabPlan:
    """Row maps for every input. `rows[i]`: input i's embedding rows; `source_index`: the input whose
    tokenizer the output uses (ignored for `union`)."""
    vocabs = [read_vocab(source) for source in inputs]
    reference = vocabs[0]
    for i, (source, vocab) in enumerate(zip(inputs, vocabs, strict=True)):
        if vocab is None:
            if rows[i] != rows[0] or reference is None:
                raise ConfigError(f"{source.label}: no readable tokenizer, so its embedding rows cannot be "
                                  f"matched to the base's by token; add the tokenizer files")
            logger.warning("%s: no tokenizer; assuming the base's (same row count)", source.label)
            vocabs[i] = vocab = reference
        beyond = [t for t, idx in vocab.items() if idx >= rows[i]]
        if beyond:
            raise ConfigError(f"{source.label}: tokenizer has ids beyond the {rows[i]} embedding rows "
                              f"(e.g. {beyond[0]!r}); the checkpoint and its tokenizer do not match")
    if tokenizer_source is None:
        for source, vocab in zip(inputs[1:], vocabs[1:], strict=True):
            if vocab != reference:
                raise ConfigError(f"{where}: {_difference(source, vocab, reference)}. Merging rows by index "
                                  f"would mix different tokens; set tokenizer_source: base to remap rows by "
                                  f"token string, or distil into the pivot vocabulary first")
    added: list[str] = []
    if tokenizer_source == "union":
        output = dict(reference)
        for vocab in vocabs[1:]:
            for token in sorted(vocab, key=vocab.__getitem__):
                if token not in output:
                    added.append(token)
                    output[token] = len(output)
    else:
        output = vocabs[source_index]
    out_rows = max(rows[0], max(output.values()) + 1)
    maps = [_row_map(output, vocab, n, out_rows) for vocab, n in zip(vocabs, rows, strict=True)]
    return VocabPlan(out_rows, maps, added)


def _difference(source: ModelSource, vocab: dict[str, int], reference: dict[str, int]) -> str:
    for token, idx in reference.items():
        if vocab.get(token) != idx:
            there = "lacks it" if token not in vocab else f"has it at id {vocab[token]}"
            return (f"{source.label} has a different vocabulary: token {token!r} is id {idx} in the base, "
                    f"{source.where} {there}")
    extra = next(t for t in vocab if t not in reference)
    return f"{source.label} has a different vocabulary: token {extra!r} is not in the base's"


def _row_map(output: dict[str, int], vocab: dict[str, int], rows: int, out_rows: int) -> torch.Tensor | None:
    mapping = torch.full((out_rows,), -1, dtype=torch.long)
    for token, idx in output.items():
        mapping[idx] = vocab.get(token, -1)
    padding_from = max(max(vocab.values()) + 1, max(output.values()) + 1)
    if padding_from < rows:  # padding meets padding by index
        mapping[padding_from:rows] = torch.arange(padding_from, rows)
    if rows == out_rows and torch.equal(mapping, torch.arange(out_rows)):
        return None
    return mapping


def remap_rows(tensors: list[torch.Tensor], maps: list[torch.Tensor | None], rows: int,
               has_base: bool) -> list[torch.Tensor]:
    """Put every input's rows into the output vocabulary and fill the rows it lacks (module docstring);
    with `has_base`, tensors[0] is the base. Fills are computed for the few rows some input lacks only,
    so a 150k-row embedding costs one gathered copy per remapped input, not several."""
    gathered = [t if m is None else t[m.clamp(min=0)] for t, m in zip(tensors, maps, strict=True)]
    present = torch.stack([torch.ones(rows, dtype=torch.bool) if m is None else m >= 0 for m in maps])
    holes = (~present).any(0).nonzero().squeeze(1)
    if len(holes):
        have = present[:, holes].unsqueeze(-1)
        candidates = torch.stack([g[holes] for g in gathered])
        fill = (candidates * have).sum(0) / have.sum(0).clamp(min=1)
        if has_base:
            fill = torch.where(have[0], candidates[0], fill)
        for g, p in zip(gathered, present, strict=True):
            lacking = ~p[holes]
            g[holes[lacking]] = fill[lacking]  # only copies made by the gather are written to
    return gathered
