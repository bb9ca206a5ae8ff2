"""Vocabulary rules (mergekit's `tokenizer:` block; docs/merge-compat.md): rows are matched by token
string, never by raw row index.

Each input gets a row map: for every output row, the row of that input holding the same token, or -1 when
the input lacks it. Identical vocabularies give the identity map and cost nothing. A token an input lacks
(or every input, with `force`) takes a default row, as mergekit's `PermutedVocabulary`: the row the
`tokenizer.tokens` entry names (a model's row for the token, `model_token` by id or string, or `zero`), else
the only input that has it, else zero when none has it, else the base's row when the base has it, else the
mean of the inputs that have it.

Padded rows: tokenizer ids at or beyond a model's embedding rows have no row in that model (mergekit strips
them; polyfuse keeps the token and treats it as missing there). Without `pad_to_multiple_of` the output keeps
the base's padded row count (a polyfuse decision: mergekit shrinks it to the tokenizer length), and padding
rows align by index where both sides are padding. With `pad_to_multiple_of` (mergekit) the output has
len(tokenizer) rows rounded up to the multiple, and every padding row is the mean of the model's token rows.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from polyfuse.errors import ConfigError
from polyfuse.merge.reference import ModelReference
from polyfuse.merge.sources import ModelSource

if TYPE_CHECKING:
    from polyfuse.merge.config import MergeConfig

logger = logging.getLogger(__name__)
EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight")
HEAD_NAMES = ("lm_head.weight", "embed_out.weight", "output.weight")


def embed_key(source: ModelSource) -> str | None:
    """The input-token embedding, by the usual tensor names (also under a multimodal wrapper, e.g.
    `language_model.model.embed_tokens.weight`)."""
    return next((k for k in source.tensors if k.endswith(EMBED_SUFFIXES)), None)


def head_key(source: ModelSource) -> str | None:
    """The output head, when stored: `lm_head.weight` or its variants, at the top or under a multimodal
    wrapper (`language_model.lm_head.weight`); None for a tied head (read from the embedding)."""
    return next((k for k in source.tensors if k in HEAD_NAMES or k.endswith(tuple(f".{h}" for h in HEAD_NAMES))
                 and "vision" not in k), None)


@dataclass
class Fill:
    """A default row for output row `row`: `rule` is `zero`, `auto` (the module docstring's rule) or `row`
    (input `input`'s row `source_row`); `force` also replaces the row where inputs have the token."""

    row: int
    rule: str
    input: int = -1
    source_row: int = -1
    force: bool = False
    token: str = ""


@dataclass
class VocabPlan:
    rows: int  # output rows
    maps: list[torch.Tensor | None]  # per input: source row per output row, -1 = lacking; None = identity
    added_tokens: list[str] = field(default_factory=list)  # appended to the output tokenizer
    fills: list[Fill] = field(default_factory=list)  # explicit `tokenizer.tokens` rules
    mean_padding_from: int | None = None  # pad_to_multiple_of: rows from here are each model's mean token row
    notes: list[str] = field(default_factory=list)  # stated in the resolved config

    @property
    def remaps(self) -> bool:
        return any(m is not None for m in self.maps) or bool(self.fills) or self.mean_padding_from is not None


def read_vocab(source: ModelSource) -> dict[str, int] | None:
    """token -> id of the input's tokenizer (added tokens included), or None when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source.folder), trust_remote_code=False).get_vocab()
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "merges.txt", "added_tokens.json", "special_tokens_map.json")


def _tokenizer_files(source: ModelSource) -> tuple[tuple[str, str], ...]:
    """(name, sha256) of the files that define a model's vocabulary; () when it has none."""
    return tuple((name, hashlib.sha256((source.folder / name).read_bytes()).hexdigest())
                 for name in TOKENIZER_FILES if (source.folder / name).is_file())


def plan_vocab(inputs: list[ModelSource], rows: list[int], cfg: MergeConfig, position: dict[ModelReference, int],
               source_index: int, where: str) -> VocabPlan:
    """Row maps for every input. `rows[i]`: input i's embedding rows; `position`: model -> index into inputs;
    `source_index`: the input whose tokenizer the output uses (ignored for `union`)."""
    choice = cfg.token_source()
    if choice is None and len(set(rows)) == 1:
        stamps = {_tokenizer_files(source) for source in inputs}
        if len(stamps) == 1 and () not in stamps:  # byte-identical tokenizers: rows match by index, none is loaded
            return VocabPlan(rows[0], [None] * len(inputs))
    vocabs = [read_vocab(source) for source in inputs]
    notes = []
    missing = [s for s, v in zip(inputs, vocabs, strict=True) if v is None]
    if choice is None and missing:  # no tokenizer decision: rows merge by index, when they are the same tokens
        if len(set(rows)) > 1:
            sizes = ", ".join(f"{s.label} {n}" for s, n in zip(inputs, rows, strict=True))
            raise ConfigError(f"{where}: the vocabularies differ in size (embedding rows: {sizes}) and "
                              f"{'no model has' if len(missing) == len(inputs) else missing[0].label + ' has no'} "
                              f"tokenizer files to match rows by token; give every model its tokenizer files and "
                              f"add a tokenizer block (`tokenizer: {{source: base}}`, or union, or a model) to "
                              f"merge them by token string")
        names = ", ".join(s.label for s in missing)
        notes.append(f"{names}: no tokenizer files; embedding rows merged by index (no tokenizer decision "
                     f"needs them)")
        return VocabPlan(rows[0], [None] * len(inputs), notes=notes)
    reference = vocabs[0]
    for i, (source, vocab) in enumerate(zip(inputs, vocabs, strict=True)):
        if vocab is None:
            if rows[i] != rows[0] or reference is None:
                raise ConfigError(f"{source.label}: no readable tokenizer, so its embedding rows cannot be "
                                  f"matched to the base's by token; add the tokenizer files")
            notes.append(f"{source.label}: no tokenizer files; assumed to be the base's (same row count), as "
                         f"mergekit does")
            vocabs[i] = vocab = reference
        beyond = sorted((idx, t) for t, idx in vocab.items() if idx >= rows[i])
        if beyond:
            notes.append(f"{source.label}: {len(beyond)} tokenizer ids at or beyond its {rows[i]} embedding rows "
                         f"(e.g. {beyond[0][1]!r}, id {beyond[0][0]}); treated as tokens it lacks")
    usable = [{t: idx for t, idx in v.items() if idx < n} for v, n in zip(vocabs, rows, strict=True)]
    if choice is None:
        for source, vocab, count in zip(inputs[1:], usable[1:], rows[1:], strict=True):
            if vocab != usable[0]:
                raise ConfigError(f"{where}: {_difference(source, vocab, usable[0])} ({len(vocab)} tokens in "
                                  f"{count} rows; the base {len(usable[0])} in {rows[0]}). Merging rows by index "
                                  f"would mix different tokens; add `tokenizer: {{source: base}}` (or "
                                  f"tokenizer_source: base; or union, or a model) to remap rows by token string, "
                                  f"or distil into the pivot vocabulary first")
    added: list[str] = []
    if choice == "union":
        output = dict(vocabs[0])
        for vocab in usable[1:]:
            for token in sorted(vocab, key=vocab.__getitem__):
                if token not in output:
                    added.append(token)
                    output[token] = len(output)
    else:
        output = dict(vocabs[source_index])
    token_rules = (cfg.tokenizer.tokens or {}) if cfg.tokenizer is not None else {}
    for token in token_rules:
        if token not in output:
            added.append(token)
            output[token] = max(output.values(), default=-1) + 1
    length = max(output.values(), default=-1) + 1
    pad = cfg.tokenizer.pad_to_multiple_of if cfg.tokenizer is not None else None
    if pad:
        out_rows = -(-length // pad) * pad
    else:
        out_rows = max(rows[0], length) if choice is not None else rows[0]
    maps = [_row_map(output, vocab, n, out_rows, padding=not pad) for vocab, n in zip(usable, rows, strict=True)]
    fills = [_fill(output[token], token, rule, position, vocabs, where) for token, rule in token_rules.items()]
    return VocabPlan(out_rows, maps, added, fills, length if pad and out_rows > length else None, notes)


def _fill(row: int, token: str, rule, position: dict[ModelReference, int], vocabs: list[dict[str, int] | None],
          where: str) -> Fill:
    """The explicit default of one `tokenizer.tokens` entry; checked from tokenizers before any tensor is read."""
    source = rule.source
    at = f"{where}: tokenizer.tokens.{token}"
    if source is None:
        return Fill(row, "auto", force=rule.force, token=token)
    if getattr(source, "kind", None) == "zero":
        return Fill(row, "zero", force=rule.force, token=token)
    model = source if isinstance(source, str) else source.model
    index = position.get(ModelReference.parse(model), -1)
    if index < 0:
        raise ConfigError(f"{at}: model {model!r} is not one of the config's models")
    vocab = vocabs[index] or {}
    if isinstance(source, str):
        if token not in vocab:
            raise ConfigError(f"{at}: {model} has no token {token!r}")
        return Fill(row, "row", index, vocab[token], rule.force, token)
    if source.token_id is not None:
        return Fill(row, "row", index, source.token_id, rule.force, token)
    if source.token not in vocab:
        raise ConfigError(f"{at}: {model} has no token {source.token!r}")
    return Fill(row, "row", index, vocab[source.token], rule.force, token)


def _difference(source: ModelSource, vocab: dict[str, int], reference: dict[str, int]) -> str:
    for token, idx in reference.items():
        if vocab.get(token) != idx:
            there = "lacks it" if token not in vocab else f"has it at id {vocab[token]}"
            return (f"{source.label} has a different vocabulary: token {token!r} is id {idx} in the base, "
                    f"{source.where} {there}")
    extra = next(t for t in vocab if t not in reference)
    return f"{source.label} has a different vocabulary: token {extra!r} is not in the base's"


def _row_map(output: dict[str, int], vocab: dict[str, int], rows: int, out_rows: int,
             padding: bool) -> torch.Tensor | None:
    if padding and rows == out_rows and vocab == output and len(output) == max(output.values(), default=-1) + 1 <= rows:
        return None  # the same tokens at the same ids, no holes: the identity (without a loop over 150k tokens)
    mapping = torch.full((out_rows,), -1, dtype=torch.long)
    for token, idx in output.items():
        if idx < out_rows:
            mapping[idx] = vocab.get(token, -1)
    if padding:
        padding_from = max(max(vocab.values(), default=-1) + 1, max(output.values(), default=-1) + 1)
        if padding_from < min(rows, out_rows):  # padding meets padding by index
            mapping[padding_from:min(rows, out_rows)] = torch.arange(padding_from, min(rows, out_rows))
    if rows == out_rows and torch.equal(mapping, torch.arange(out_rows)):
        return None
    return mapping


def remap_rows(tensors: list[torch.Tensor], inputs: list[int], plan: VocabPlan,
               base: int | None) -> list[torch.Tensor]:
    """Put every tensor's rows into the output vocabulary and fill the rows it lacks (module docstring).
    `inputs[k]`: the plan input tensors[k] comes from; `base`: the position of the base in `tensors`, if any.
    Fills are computed for the few rows some input lacks only, so a 150k-row embedding costs one gathered
    copy per remapped input, not several."""
    rows = plan.rows
    maps = [plan.maps[i] for i in inputs]
    gathered = [t if m is None else t[m.clamp(min=0)] for t, m in zip(tensors, maps, strict=True)]
    present = torch.stack([torch.ones(rows, dtype=torch.bool) if m is None else m >= 0 for m in maps])
    forced = torch.zeros(rows, dtype=torch.bool)
    for fill in plan.fills:
        forced[fill.row] = fill.force
    if plan.mean_padding_from is not None:
        present[:, plan.mean_padding_from:] = True  # filled below from each model's own mean
    holes = ((~present).any(0) | forced).nonzero().squeeze(1)
    if len(holes):
        have = present[:, holes].unsqueeze(-1)
        candidates = torch.stack([g[holes] for g in gathered])
        count = have.sum(0)
        fill = (candidates * have).sum(0) / count.clamp(min=1)  # mean; zero where none has it
        if base is not None:
            fill = torch.where(have[base] & (count > 1), candidates[base], fill)
        position = {int(r): n for n, r in enumerate(holes)}
        for rule in plan.fills:
            if rule.rule == "zero":
                fill[position[rule.row]] = 0
            elif rule.rule == "row":
                if rule.input not in inputs:
                    raise ConfigError(f"tokenizer.tokens.{rule.token}: its embedding comes from a model that "
                                      f"does not feed this tensor")
                source = tensors[inputs.index(rule.input)]
                if not 0 <= rule.source_row < source.shape[0]:
                    raise ConfigError(f"tokenizer.tokens.{rule.token}: token id {rule.source_row} is out of "
                                      f"range for a tensor of {source.shape[0]} rows")
                fill[position[rule.row]] = source[rule.source_row]
        for g, p in zip(gathered, present, strict=True):
            replace = ~p[holes] | forced[holes]
            g[holes[replace]] = fill[replace]  # only copies made by the gather are written to
    if plan.mean_padding_from is not None:
        start = plan.mean_padding_from
        for g in gathered:
            g[start:] = g[:start].mean(0)
    return gathered
