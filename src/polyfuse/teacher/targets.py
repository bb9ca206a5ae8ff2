"""Distillation targets in the pivot's tokenization, built once from the teacher store before training.

For every training row the pivot's response tokens are aligned with each teacher's (spec sections 0, 1.2,
2.3 and 3), then one of two sparse targets is made per response position j (the position predicting
the pivot's token y_j):

- **ULD** (InfiFusion): per teacher, the sorted top-K probabilities after logit standardisation
  (`teacher_uld_probs`), the teacher's top-K entropy (for uncertainty weights), and whether the teacher
  has a position aligned to j. No vocabulary mapping: ULD compares sorted vectors.
- **FuseLLM**: per candidate, the aligned source distribution mapped into the pivot vocabulary where a
  one-to-one group's tokens agree, else one-hot on y_j; then MinCE (the candidate with the lowest CE on
  this example) or AvgCE (`softmax(exp(-CE))`-weighted union) fuses them into one (ids, probs) list.

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
import torch

from polyfuse.data.schemas import SFTRow, response_text
from polyfuse.errors import DataError
from polyfuse.models import ModelSpec, load_tokenizer
from polyfuse.objectives.distill import (
    avg_ce_weights,
    fuse_sparse,
    min_ce_choice,
    teacher_uld_probs,
    topk_entropy,
)
from polyfuse.teacher.store import TeacherExample, TeacherStore, read_shard, read_shard_ids

Alignment = Literal["positional", "offsets", "dp"]
Groups = list[tuple[list[int], list[int]]]


@dataclass
class Teacher:
    """A store with what aligning to the pivot needs: how (`alignment`; a teacher whose tokenizer had no
    offsets falls back from `offsets` to `dp`), its tokenizer's token bytes and, for FuseLLM, the map of its
    ids into the pivot vocabulary (identity when it shares the pivot's vocabulary)."""

    store: TeacherStore
    alignment: Alignment
    token_bytes: list[bytes | None] | None = None
    to_pivot: np.ndarray | None = None
    same_vocab: bool = False


def load_teachers(stores: list[TeacherStore], pivot_tokenizer: Any, alignment: Alignment,
                  vocab: Literal["exact", "mined"] | None) -> list[Teacher]:
    """Load each teacher's tokenizer only when the alignment or the vocabulary map needs it."""
    from polyfuse.alignment import token_bytes, vocab_map

    teachers = []
    for store in stores:
        without_offsets = alignment == "offsets" and not store.manifest["model"].get("offsets", True)
        teacher = Teacher(store, "dp" if without_offsets else alignment)
        if teacher.alignment == "dp" or vocab is not None:
            record = store.manifest["model"]
            tokenizer = load_tokenizer(ModelSpec.model_validate({k: record[k] for k in ModelSpec.model_fields if k in record}))
            teacher.same_vocab = tokenizer.get_vocab() == pivot_tokenizer.get_vocab()
            teacher.token_bytes = token_bytes(tokenizer)
            if vocab is not None:
                teacher.to_pivot = (np.arange(len(tokenizer), dtype=np.int32) if teacher.same_vocab
                                    else vocab_map(tokenizer, pivot_tokenizer, vocab))
        teachers.append(teacher)
    return teachers


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
    end_s, end_t = _end_of_turn(student_spans), _end_of_turn(teacher_spans)
    if end_s is not None and end_t is not None:
        groups.append(([end_s], [end_t]))
    return groups


def _text_tokens(pieces: list[bytes | None]) -> list[int]:
    end = next((k for k, piece in enumerate(pieces) if piece is None), len(pieces))  # template text follows
    return [k for k in range(end) if pieces[k]]


def _end_of_turn(spans: list) -> int | None:
    """The first span-less (non-text) token after the last text token, if any."""
    last_text = max((i for i, s in enumerate(spans) if s is not None), default=-1)
    return next((i for i in range(last_text + 1, len(spans)) if spans[i] is None), None)


def uld_targets(n: int, examples: list[TeacherExample | None], groups: list[Groups | None], top_k: int,
                tau: float, standardize: bool) -> dict[str, Any]:
    """`teacher_probs` [n][T][K], `teacher_mask` [n][T], `teacher_entropy` [n][T] for one row."""
    probs = np.zeros((n, len(examples), top_k), dtype=np.float32)
    mask = np.zeros((n, len(examples)), dtype=bool)
    entropy = np.zeros((n, len(examples)), dtype=np.float32)
    for t, (example, teacher_groups) in enumerate(zip(examples, groups, strict=True)):
        if example is None:
            continue
        pairs = [(left[0], right[0]) for left, right in teacher_groups]
        if not pairs:
            continue
        student_idx = np.array([j for j, _ in pairs])
        teacher_idx = np.array([k for _, k in pairs])
        logits = torch.from_numpy(example.topk_logits[teacher_idx].astype(np.float32))[:, :top_k]
        std = torch.from_numpy(example.std[teacher_idx])
        sorted_probs = teacher_uld_probs(logits, std, tau=tau, standardize=standardize)
        probs[student_idx, t, : sorted_probs.shape[-1]] = sorted_probs.numpy()
        entropy[student_idx, t] = topk_entropy(logits).numpy()
        mask[student_idx, t] = True
    return {"teacher_probs": probs.tolist(), "teacher_mask": mask.tolist(), "teacher_entropy": entropy.tolist()}


def candidate_distributions(labels: list[int], example: TeacherExample, groups: Groups, teacher: Teacher,
                            pivot_bytes: list[bytes | None], top_k: int,
                            temperature: float = 1.0) -> list[tuple[list[int], list[float]]]:
    """Per pivot response position: the candidate's distribution mapped into the pivot vocabulary where a
    one-to-one group's tokens agree, else one-hot on the pivot's own token (spec 1.4)."""
    out: list[tuple[list[int], list[float]]] = [([y], [1.0]) for y in labels]
    for left, right in groups:
        if len(left) != 1 or len(right) != 1:
            continue
        j, k = left[0], right[0]
        source_token = int(example.token_ids[k])
        same_text = teacher.token_bytes[source_token] is not None and teacher.token_bytes[source_token] == pivot_bytes[labels[j]]
        if not (same_text or teacher.to_pivot[source_token] == labels[j]):
            continue
        mapped = teacher.to_pivot[example.topk_ids[k][:top_k]]
        logits = example.topk_logits[k][:top_k].astype(np.float64)
        ids, kept = [], []
        for position, pivot_id in enumerate(mapped.tolist()):
            if pivot_id < 0 or pivot_id in ids:  # unmapped (exact map), or a duplicate: keep the first
                continue
            ids.append(pivot_id)
            kept.append(logits[position] / temperature)
        if ids:
            weights = np.exp(np.array(kept) - max(kept))
            out[j] = (ids, (weights / weights.sum()).tolist())
    return out


def fusellm_targets(labels: list[int], per_candidate: list[list[tuple[list[int], list[float]]] | None],
                    cross_entropies: list[float | None], fusion: Literal["min_ce", "avg_ce"]) -> dict[str, Any]:
    """The fused sparse target of every position: MinCE picks one candidate per example, AvgCE mixes all."""
    available = [c for c, dists in enumerate(per_candidate) if dists is not None]
    if not available:
        return {"target_ids": [[y] for y in labels], "target_probs": [[1.0] for _ in labels]}
    ce = torch.tensor([cross_entropies[c] for c in available], dtype=torch.float64)
    if fusion == "min_ce":
        chosen = per_candidate[available[min_ce_choice(ce)]]
        return {"target_ids": [ids for ids, _ in chosen], "target_probs": [probs for _, probs in chosen]}
    weights = avg_ce_weights(ce)
    target_ids, target_probs = [], []
    for j in range(len(labels)):
        ids, probs = fuse_sparse(
            [torch.tensor(per_candidate[c][j][0]) for c in available],
            [torch.tensor(per_candidate[c][j][1], dtype=torch.float64) for c in available],
            weights,
        )
        target_ids.append(ids.tolist())
        target_probs.append(probs.tolist())
    return {"target_ids": target_ids, "target_probs": target_probs}


def distill_features(
    pivot_tokenizer: Any,
    rows: list[SFTRow],
    teachers: list[Teacher],
    needs: tuple[str, ...],
    max_length: int,
    objective: Any,
    dropped: list[str],
) -> Iterator[dict[str, Any]]:
    """One training feature per row (input ids, prompt length and the targets `needs` names); rows longer
    than `max_length` are left out and their ids appended to `dropped`. Teachers are read one shard at a
    time, in row order, so memory holds one shard per teacher."""
    from polyfuse.alignment import response_spans, token_bytes

    uses_dp = any(t.alignment == "dp" for t in teachers)
    pivot_bytes = token_bytes(pivot_tokenizer) if ("target_ids" in needs or uses_dp) else None
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
        feature: dict[str, Any] = {"completion_input_ids": encoded.input_ids,
                                   "completion_prompt_length": len(encoded.prompt_ids)}
        if "teacher_probs" in needs:
            targets = uld_targets(len(labels), examples, groups, objective.top_k, objective.tau, objective.standardize)
            feature.update({name: value for name, value in targets.items() if name in needs})
        if "target_ids" in needs:
            per_candidate = [
                None if ex is None else candidate_distributions(labels, ex, g, t, pivot_bytes, objective.top_k,
                                                                objective.temperature)
                for ex, g, t in zip(examples, groups, teachers, strict=True)
            ]
            cross_entropies = [None if ex is None else ex.cross_entropy for ex in examples]
            feature.update(fusellm_targets(labels, per_candidate, cross_entropies, objective.fusion))
        yield feature


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
