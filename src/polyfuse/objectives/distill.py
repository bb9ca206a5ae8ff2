"""Explicit fusion: the interface of distillation objectives, and what they share.

A distillation objective is one file in this package (`uld.py`, `fusellm.py`): a `DistillObjective`
registered in `DISTILL_OBJECTIVES` that declares the per-position target fields it reads (`target_fields`, with
how the collator batches each), builds them for one training row from the teachers' stored top-K outputs
aligned to the pivot's tokens (`targets`), and computes its loss from them (`__call__`). The data builder
(`polyfuse.teacher.targets`) and the trainer (`polyfuse.trainers.distill`) read nothing else of it.

An objective reads plain data defined here (`AlignedRow`: arrays, token ids and bytes), never the teacher
store's or the data builder's objects, so it can be computed, and tested, from arrays alone.

Every loss is per response position: the trainer sums it and divides by the global token count
(across accumulation steps and processes), so batch 1 x accumulation 4 equals batch 4 x accumulation 1.
Teacher targets are constants; the student's logits are upcast to fp32 once and shared by every term.
Standard deviations are the sample std (Bessel-corrected, torch's default), as in the logit-standardisation
reference code (CVPR 2024, `logit.std(-1)`); over a vocabulary the two definitions differ by ~1/(2V).
"""

from __future__ import annotations

import warnings
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, Literal

from polyfuse.config import StrictModel
from polyfuse.errors import DataError
from polyfuse.lazy import lazy_import
from polyfuse.registry import Registry

np = lazy_import("numpy")
torch = lazy_import("torch")

STD_EPS = 1e-6
Groups = list[tuple[list[int], list[int]]]  # (pivot response indices, teacher response indices)


class DistillBatch:
    """Student logits and precomputed teacher targets at the N response positions of a micro-batch
    (row-major order of the scored positions: position j's logits predict response token j). The targets
    are the fields the objective declares, each with N first (`batch.teacher_probs`, ...)."""

    def __init__(self, logits: torch.Tensor, labels: torch.Tensor,
                 projections: Sequence[Projection | None] = (), **targets: torch.Tensor | None):
        self.logits = logits  # [N, V] student logits (any dtype; losses compute in fp32), carries gradients
        self.labels = labels  # [N] gold next tokens (pivot vocabulary)
        self.projections = tuple(projections)  # per teacher: its vocabulary projection (`Projection`), if needed
        self.targets = {name: value for name, value in targets.items() if value is not None}

    def __getattr__(self, name: str) -> torch.Tensor:
        try:
            return self.__dict__["targets"][name]
        except KeyError:
            raise AttributeError(name) from None

    def require(self, name: str) -> torch.Tensor:
        """A precomputed teacher field, detached: teacher targets are constants of the loss."""
        if name not in self.targets:
            raise DataError(f"the distillation objective needs {name!r}, which the batch does not have")
        return self.targets[name].detach()


@dataclass(frozen=True)
class TargetField:
    """How the collator batches one target field: each row gives one entry per response position, and the
    rows' entries are concatenated in row order. `sparse`: an entry is a list whose length varies (ids or
    probabilities of a sparse distribution), zero-padded to the batch's longest. `kind`: the torch dtype's name
    (`long`, `float32`), so declaring a field imports no torch."""

    kind: str
    sparse: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.kind)


@dataclass(frozen=True)
class TeacherOutputs:
    """One teacher's stored outputs on one training row, over its own P response tokens (its tokenizer):
    position p holds the distribution that predicts its p-th token."""

    token_ids: np.ndarray  # [P] its response tokens
    topk_ids: np.ndarray  # [P, K] the top-K ids of the distribution predicting each token
    topk_logits: np.ndarray  # [P, K] their raw logits
    std: np.ndarray  # [P] the std of the full-vocabulary logits (`logit_std`, for logit standardisation)
    token_logps: np.ndarray  # [P] the log-prob of each of its tokens
    # [P, K] the normalised log-probs of the top-K ids (what a teacher server returns); None: a store without them
    topk_logprobs: np.ndarray | None = field(default=None, kw_only=True)

    @property
    def cross_entropy(self) -> float:
        """CE_k: the teacher's mean NLL on the gold response, in its own tokens."""
        return float(-self.token_logps.astype(np.float64).mean())


@dataclass(frozen=True)
class TeacherVocabulary:
    """A teacher's vocabulary, as targets in the pivot's vocabulary need it (`vocabulary_map()`)."""

    token_bytes: list[bytes | None]  # by teacher id: the token's text as bytes; None: a special token
    to_pivot: np.ndarray  # [V_teacher] the pivot id of each teacher id; -1: none (an exact map)


@dataclass(frozen=True)
class Projection:
    """How a student's distribution is read in a teacher's vocabulary (X-Token, arXiv 2605.21699): the sparse
    matrix W [V_S, V_T] (each student token's weights over teacher tokens, rows summing to 1), held transposed
    as a torch sparse CSR tensor [V_T, V_S] so that the student's mass on a few teacher ids is a row gather;
    and the one-to-one matched pairs that the hybrid losses (GOLD, H-KL) compare directly. Built once per
    tokenizer pair (`polyfuse.alignment.projection`); `identity` for a shared vocabulary."""

    weights_t: torch.Tensor  # sparse CSR [V_T, V_S]: W transposed
    matched_student: torch.Tensor  # [M] int64 student ids, paired one-to-one with
    matched_teacher: torch.Tensor  # [M] int64 teacher ids
    teacher_vocab_size: int  # |V_T| in GOLD's adaptive weight |matched| / |V_T| (the teacher's logit width)

    @classmethod
    def from_entries(cls, student_ids: np.ndarray, teacher_ids: np.ndarray, weights: np.ndarray,
                     shape: tuple[int, int], matched: tuple[np.ndarray, np.ndarray],
                     teacher_vocab_size: int | None = None) -> Projection:
        """From W's nonzero entries (student id, teacher id, weight) and its shape (V_S, V_T)."""
        coo = torch.sparse_coo_tensor(
            torch.from_numpy(np.stack([np.asarray(teacher_ids, np.int64), np.asarray(student_ids, np.int64)])),
            torch.from_numpy(np.asarray(weights, np.float32)), (shape[1], shape[0]), check_invariants=True).coalesce()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
            transposed = coo.to_sparse_csr()
        return cls(transposed, torch.as_tensor(matched[0], dtype=torch.long),
                   torch.as_tensor(matched[1], dtype=torch.long), teacher_vocab_size or shape[1])

    @classmethod
    def identity(cls, vocab_size: int) -> Projection:
        """W = I: a teacher that shares the student's vocabulary; every token is matched to itself."""
        ids = np.arange(vocab_size)
        return cls.from_entries(ids, ids, np.ones(vocab_size), (vocab_size, vocab_size), (ids, ids))

    @property
    def shape(self) -> tuple[int, int]:
        """(V_S, V_T), W's shape."""
        return int(self.weights_t.shape[1]), int(self.weights_t.shape[0])

    @cached_property
    def teacher_to_student(self) -> torch.Tensor:
        """[V_T] the matched student id of each teacher id, -1 for none."""
        out = torch.full((self.shape[1],), -1, dtype=torch.long)
        out[self.matched_teacher] = self.matched_student
        return out

    @cached_property
    def student_matched(self) -> torch.Tensor:
        """[V_S] bool: the student id is in a matched pair."""
        out = torch.zeros(self.shape[0], dtype=torch.bool)
        out[self.matched_student] = True
        return out


@dataclass(frozen=True)
class AlignedRow:
    """One training row as the data builder hands it to `DistillObjective.targets`: the pivot's response
    tokens and, per teacher in store order, its stored outputs on the row and their alignment."""

    labels: list[int]  # the pivot's response token ids; position j predicts labels[j]
    examples: list[TeacherOutputs | None]  # per teacher; None: the row was too long for it
    groups: list[Groups | None]  # per teacher: its response tokens aligned to the pivot's
    vocabularies: list[TeacherVocabulary | None]  # per teacher; None: the objective asks for no vocabulary map
    pivot_bytes: list[bytes | None] | None  # the pivot's token bytes, when a vocabulary map is used


# ---- shared pieces -------------------------------------------------------------------------------------


def logit_std(logits: torch.Tensor) -> torch.Tensor:
    """Per-position sample std over the full vocabulary, fp32: the one statistic a teacher stores so that its
    top-K logits can be standardised offline exactly as the student's are online."""
    return logits.float().std(dim=-1)


def log_probs_at(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """fp32 log q_theta [N, M] at ids [N, M] (any integer dtype), gathered, so no vocabulary-sized target is
    ever built."""
    x = logits.float()
    return x.gather(-1, ids.long()) - torch.logsumexp(x, dim=-1, keepdim=True)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """fp32 NLL [N] of the gold next tokens; every position is scored (no ignore index)."""
    return -log_probs_at(logits, labels[:, None]).squeeze(-1)


# ---- the interface ---------------------------------------------------------------------------------------


class DistillObjective(StrictModel):
    """Hyper-parameters of one distillation loss. Calling it on a batch gives `(per-position losses [N],
    metrics)`, metrics per position [N] (`loss/ce`, `loss/kd`, ...).

    `target_fields` declares every target field the objective may read and how it is batched; `required_fields()`
    names those this instance reads (setting-dependent ones included, as
    `PreferenceObjective.required_columns()`), and `targets` builds exactly those for one row."""

    target_fields: ClassVar[dict[str, TargetField]] = {}
    default_alignment: ClassVar[str] = "offsets"  # how the data builder pairs pivot and teacher tokens

    def required_fields(self) -> tuple[str, ...]:
        return tuple(self.target_fields)

    def vocabulary_map(self) -> Literal["exact", "mined"] | None:
        """How each teacher's token ids are mapped into the pivot vocabulary its targets use
        (`AlignedRow.vocabularies`, with the pivot's token bytes); None: no map."""
        return None

    def projection_match(self) -> str | None:
        """The match rule of the vocabulary projection (`Projection`) each teacher needs in the batch, built from
        both tokenizers (`polyfuse.alignment.projection`); None: the objective reads no projection."""
        return None

    @abstractmethod
    def targets(self, row: AlignedRow) -> dict[str, Any]:
        """The `required_fields()` of one row, each with one entry per pivot response position."""

    @abstractmethod
    def __call__(self, batch: DistillBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


DISTILL_OBJECTIVES: Registry[type[DistillObjective]] = Registry("distillation objective", package="polyfuse.objectives")
