"""Distillation targets in the pivot's tokenization, built once from the teacher store before training.

For every training row the pivot's response tokens are aligned with each teacher's (the rules below);
the objective then builds its own per-position targets from the aligned stored outputs, handed over as the
objectives' own plain data (`AlignedRow`), not as store objects (`DistillObjective.targets`: ULD's sorted
top-K probabilities, FuseLLM's fused sparse target, ...).

Alignment (`alignment`): `positional` pairs response index j with index j (ULD's published rule);
`offsets` aligns by character spans (`polyfuse.alignment.align_offsets`); `dp` is FuseLLM's edit-distance
DTW. In a group of several tokens the **first** token of each side is paired: both are predicted from the
same text prefix. The first special token after the text on both sides (the end of turn) is paired too,
so the teacher also teaches where the answer ends; other special tokens are never aligned.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from polyfuse.data.schemas import SFTRow, response_text
from polyfuse.errors import DataError
from polyfuse.models import ModelSpec, load_tokenizer
from polyfuse.objectives.distill import AlignedRow, DistillObjective, Groups, Projection, TeacherVocabulary
from polyfuse.teacher.online import end_of_turn, stop_pair
from polyfuse.teacher.store import TeacherExample, TeacherStore, read_shard, read_shard_ids

Alignment = Literal["positional", "offsets", "dp"]


@dataclass
class Teacher:
    """A store with what aligning to the pivot needs: how (`alignment`; a teacher whose tokenizer had no
    offsets falls back from `offsets` to `dp`), its tokenizer's token bytes and, for an objective whose targets
    are in the pivot's vocabulary, the map of its ids into it (identity when it shares the pivot's vocabulary)."""

    store: TeacherStore
    alignment: Alignment
    token_bytes: list[bytes | None] | None = None
    vocabulary: TeacherVocabulary | None = None


def _tokenizer(store: TeacherStore) -> Any:
    record = store.manifest["model"]
    return load_tokenizer(ModelSpec.model_validate({k: record[k] for k in ModelSpec.model_fields if k in record}))


def load_teachers(stores: list[TeacherStore], pivot_tokenizer: Any, alignment: Alignment,
                  vocab: Literal["exact", "mined"] | None) -> list[Teacher]:
    """Load each teacher's tokenizer only when the alignment or the vocabulary map needs it."""
    from polyfuse.alignment import token_bytes, vocab_map

    teachers = []
    for store in stores:
        without_offsets = alignment == "offsets" and not store.manifest["model"].get("offsets", True)
        teacher = Teacher(store, "dp" if without_offsets else alignment)
        if teacher.alignment == "dp" or vocab is not None:
            tokenizer = _tokenizer(store)
            teacher.token_bytes = token_bytes(tokenizer)
            if vocab is not None:
                same_vocab = tokenizer.get_vocab() == pivot_tokenizer.get_vocab()
                to_pivot = (np.arange(len(tokenizer), dtype=np.int32) if same_vocab
                            else vocab_map(tokenizer, pivot_tokenizer, vocab))
                teacher.vocabulary = TeacherVocabulary(teacher.token_bytes, to_pivot)
        teachers.append(teacher)
    return teachers


def store_projections(stores: list[TeacherStore], pivot_tokenizer: Any, match: str | None) -> list[Projection | None]:
    """Each stored teacher's vocabulary projection for an objective that reads one (`match`: its match rule,
    `DistillObjective.projection_match`) with the end-of-turn pair as on-policy builds it; Nones otherwise."""
    from polyfuse.alignment.projection import projection

    if match is None:
        return [None] * len(stores)
    tokenizers = [_tokenizer(store) for store in stores]
    return [projection(pivot_tokenizer, tokenizer, match=match, stop_pair=stop_pair(pivot_tokenizer, tokenizer))
            for tokenizer in tokenizers]


def align_groups(alignment: Alignment, student_spans: list, teacher: TeacherExample,
                 student_bytes: list[bytes | None] | None = None,
                 teacher_bytes: list[bytes | None] | None = None) -> Groups:
    """Groups of (pivot response indices, teacher response indices)."""
    from polyfuse.alignment import align_dp, align_offsets

    n_student, n_teacher = len(student_spans), len(teacher.token_ids)
    if alignment == "positional":
        return [([j], [j]) for j in range(min(n_student, n_teacher))]
    teacher_spans = teacher.span_list()
    if alignment == "offsets":
        groups = align_offsets(student_spans, teacher_spans)
    else:  # the DP over the text tokens: those with bytes, before the first special token
        text_s, text_t = _text_tokens(student_bytes), _text_tokens(teacher_bytes)
        raw = align_dp([student_bytes[j] for j in text_s], [teacher_bytes[k] for k in text_t])
        groups = [([text_s[a] for a in left], [text_t[b] for b in right]) for left, right in raw]
        texts = set(text_t)
        teacher_spans = [(0, 0) if k in texts else None for k in range(n_teacher)]  # which tokens are text
    end_s, end_t = end_of_turn(student_spans), end_of_turn(teacher_spans)
    if end_s is not None and end_t is not None:
        groups.append(([end_s], [end_t]))
    return groups


def _text_tokens(pieces: list[bytes | None]) -> list[int]:
    end = next((k for k, piece in enumerate(pieces) if piece is None), len(pieces))  # template text follows
    return [k for k in range(end) if pieces[k]]


def distill_features(
    pivot_tokenizer: Any,
    rows: list[SFTRow],
    teachers: list[Teacher],
    objective: DistillObjective,
    max_length: int,
    dropped: list[str],
) -> Iterator[dict[str, Any]]:
    """One training feature per row (input ids, prompt length and the objective's targets); rows longer
    than `max_length` are left out and their ids appended to `dropped`. Teachers are read one shard at a
    time, in row order, so memory holds one shard per teacher."""
    from polyfuse.alignment import response_spans, token_bytes

    uses_dp = any(t.alignment == "dp" for t in teachers)
    uses_bytes = uses_dp or objective.vocabulary_map() is not None  # `load_teachers` read the teachers' bytes
    pivot_bytes = token_bytes(pivot_tokenizer) if uses_bytes else None
    lookups = [_ShardedLookup(t.store) for t in teachers]
    for row in rows:
        encoded, spans = response_spans(pivot_tokenizer, row.prompt, response_text(row.completion))
        if len(encoded.input_ids) > max_length:
            dropped.append(row.id)
            continue
        labels = list(encoded.response_ids)
        student_bytes = [pivot_bytes[y] for y in labels] if uses_dp else None
        examples = [lookup.get(row.id) for lookup in lookups]
        groups = [
            None if ex is None else align_groups(
                t.alignment, spans, ex, student_bytes,
                None if t.token_bytes is None else [t.token_bytes[int(q)] for q in ex.token_ids],
            )
            for ex, t in zip(examples, teachers, strict=True)
        ]
        aligned = AlignedRow(labels, [None if ex is None else ex.outputs() for ex in examples], groups,
                             [t.vocabulary for t in teachers], pivot_bytes)
        yield {"completion_input_ids": encoded.input_ids, "completion_prompt_length": len(encoded.prompt_ids),
               **objective.targets(aligned)}


class _ShardedLookup:
    """Examples of one store by id, loading shards in order as rows ask for them (rows come in the order
    the teacher run stored them, so each shard is loaded once)."""

    def __init__(self, store: TeacherStore):
        self.store = store
        self.where = {}
        for shard in store.shards():
            self.where.update(dict.fromkeys(read_shard_ids(shard), shard))
        self.loaded: tuple[Any, dict[str, TeacherExample]] = (None, {})

    def get(self, example_id: str) -> TeacherExample | None:
        shard = self.where.get(example_id)
        if shard is None:
            return None  # too long for this teacher
        if self.loaded[0] != shard:
            self.loaded = (shard, read_shard(shard))
        example = self.loaded[1][example_id]
        if len(example.topk_ids) != len(example.token_ids):
            raise DataError(f"{shard}: example {example_id!r} has {len(example.topk_ids)} positions for "
                            f"{len(example.token_ids)} tokens")
        return example
