"""Row schemas.

Conventions follow TRL so users can bring their data: `prompt` is a string or a list of chat messages,
`chosen` / `rejected` / `completion` are strings or lists holding one assistant message. Every row has
a stable `id`; pairs and SFT rows keep the ids of the samples they came from, so any selection rule
can be re-run offline.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from polyfuse.errors import DataError

Role = Literal["system", "user", "assistant", "tool"]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Role
    content: str


PromptField = str | list[Message]
ResponseField = str | list[Message]


def as_messages(prompt: PromptField | list[dict[str, Any]]) -> list[dict[str, str]]:
    """A prompt in TRL's plain or conversational form, as a list of message dicts."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [m.model_dump() if isinstance(m, Message) else dict(m) for m in prompt]


def response_text(response: ResponseField | list[dict[str, Any]]) -> str:
    """The assistant text of a TRL completion (a string, or a list ending in an assistant message)."""
    if isinstance(response, str):
        return response
    last = response[-1]
    return last.content if isinstance(last, Message) else last["content"]


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def stable_id(*parts: Any) -> str:
    """A short content hash: the same inputs give the same id on every machine and run."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _check_prompt(cls, value: PromptField) -> PromptField:
    if isinstance(value, list) and not value:
        raise ValueError("prompt has no messages")
    if isinstance(value, str) and not value.strip():
        raise ValueError("prompt is empty")
    return value


class Row(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str = Field(min_length=1)


class PromptRow(Row):
    """A task prompt. `answer` is the gold answer (maths, toy domains); `tests` is code run against a
    response (HumanEval-style, with `entry_point`)."""

    prompt: PromptField
    domain: str = "general"
    answer: str | None = None
    tests: str | None = None
    entry_point: str | None = None

    _non_empty = field_validator("prompt")(_check_prompt)


class SampleRow(PromptRow):
    """One response of one model to one prompt, with its provenance and (after scoring) its scores."""

    prompt_id: str
    model: str
    sample_index: int = Field(ge=0)
    response: str
    sampling: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0
    rewards: dict[str, float] = Field(default_factory=dict)
    verdicts: dict[str, bool] = Field(default_factory=dict)
    details: dict[str, Any] = Field(default_factory=dict)

    @property
    def correct(self) -> bool | None:
        """True when every verifier passed, None when no verifier ran."""
        return all(self.verdicts.values()) if self.verdicts else None


class SFTRow(Row):
    """TRL prompt-completion row."""

    prompt: PromptField
    completion: ResponseField
    domain: str = "general"
    source: str | None = None
    sample_id: str | None = None
    reward: float | None = None

    _non_empty = field_validator("prompt")(_check_prompt)


class PreferenceRow(Row):
    """TRL preference row, plus provenance. `chosen_source` holds WRPO's y_ws (the best source response)
    when the row is in the WRPO layout. The `ref_*` columns (sum, mean and token count under the initial
    pivot; the InfiXAI/InfiFPO README's names) are added by the log-prob engine."""

    prompt: PromptField
    chosen: ResponseField
    rejected: ResponseField
    domain: str = "general"
    source: str | None = None
    chosen_id: str | None = None
    rejected_id: str | None = None
    chosen_reward: float | None = None
    rejected_reward: float | None = None
    chosen_correct: bool | None = None
    rejected_correct: bool | None = None
    chosen_source: ResponseField | None = None
    ref_chosen_logps: float | None = None
    ref_rejected_logps: float | None = None
    ref_mean_chosen_logps: float | None = None
    ref_mean_rejected_logps: float | None = None
    ref_chosen_ntokens: int | None = None
    ref_rejected_ntokens: int | None = None

    _non_empty = field_validator("prompt")(_check_prompt)

    @model_validator(mode="after")
    def _a_real_preference(self) -> PreferenceRow:
        # An empty side or chosen == rejected trains at loss ln 2 with a zero gradient: a data bug, not a pair.
        chosen, rejected = response_text(self.chosen), response_text(self.rejected)
        if not chosen.strip() or not rejected.strip():
            raise ValueError(f"{'chosen' if not chosen.strip() else 'rejected'} response is empty")
        if chosen == rejected:
            raise ValueError("chosen and rejected are the same response")
        return self


# --- Unpaired rows (KTO, CGPO, FuseSFT) -------------------------------------------------------------------


class UnpairedRow(Row):
    """One completion labelled on its own, desirable (D) or undesirable (U): TRL's KTO columns `prompt`,
    `completion`, `label` (TRL's boolean is read as D / U), plus provenance and the precomputed columns.

    - `prompt_id` groups the completions of one prompt (CGPO's baseline shift, mismatched completions, the
      calibration split); a row without one is grouped by its prompt.
    - `source_allocation_weight`: CGPO's sampling weight of the row within its class (never invented).
    - `kl_completion`: a completion of another prompt, scored on this row's prompt: KTO's KL row and CGPO's
      anchor, for the reference point z0; fixed when the data is built.
    - `ref_*`: S, A and n of `completion` and `kl_completion` under the initial pivot M0. `fuse_*`: one value
      per source, in the data set's source order; `fuse_completion_entropy` is a source's mean token entropy
      over the completion divided by ln(its vocabulary width), in [0, 1].
    - `source_consensus` ... `calibrated_entropies`: CGPO's consensus columns (the reference release's names);
      `fusesft_weight`: the row's FuseSFT weight within its prompt."""

    SOURCE_COLUMNS: ClassVar[tuple[str, ...]] = (
        "fuse_completion_logps", "fuse_mean_completion_logps", "fuse_completion_ntokens", "fuse_completion_entropy",
        "source_weights", "calibrated_entropies",
    )

    prompt: PromptField
    completion: ResponseField
    label: Literal["D", "U"]
    prompt_id: str | None = None
    domain: str = "general"
    source: str | None = None
    sample_id: str | None = None
    reward: float | None = None
    correct: bool | None = None
    source_allocation_weight: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    kl_completion: ResponseField | None = None
    ref_completion_logps: float | None = None
    ref_mean_completion_logps: float | None = None
    ref_completion_ntokens: int | None = None
    ref_kl_completion_logps: float | None = None
    ref_mean_kl_completion_logps: float | None = None
    ref_kl_completion_ntokens: int | None = None
    fuse_completion_logps: list[float] | None = None
    fuse_mean_completion_logps: list[float] | None = None
    fuse_completion_ntokens: list[int] | None = None
    fuse_completion_entropy: list[Annotated[float, Field(ge=0, le=1)]] | None = None
    source_consensus: float | None = None
    baseline_shift: float | None = None
    aligned_consensus: float | None = None
    source_weights: list[float] | None = None
    calibrated_entropies: list[float] | None = None
    fusesft_weight: float | None = Field(default=None, ge=0, le=1)

    _non_empty = field_validator("prompt")(_check_prompt)

    @property
    def desirable(self) -> bool:
        """TRL's boolean label: True for D."""
        return self.label == "D"

    @field_validator("label", mode="before")
    @classmethod
    def _d_or_u(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return "D" if value else "U"
        if value not in ("D", "U"):
            raise ValueError(f"must be 'D' (desirable) or 'U' (undesirable), or TRL's true / false; got {value!r}")
        return value

    @model_validator(mode="after")
    def _grouped_and_consistent(self) -> UnpairedRow:
        if not response_text(self.completion).strip():
            raise ValueError("completion is empty")
        if self.prompt_id is None:
            self.prompt_id = stable_id(as_messages(self.prompt))
        lengths = {name: len(value) for name in self.SOURCE_COLUMNS if (value := getattr(self, name)) is not None}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"the per-source columns differ in length: {lengths}")
        return self


class ScoredRow:
    """What `polyfuse logprobs` reads: a row with a `label` is an `UnpairedRow`, any other a `PreferenceRow`
    (`model_validate` picks the schema per row; a file must hold one kind, which the log-prob engine checks)."""

    @staticmethod
    def model_validate(record: dict[str, Any]) -> PreferenceRow | UnpairedRow:
        return (UnpairedRow if "label" in record else PreferenceRow).model_validate(record)


COLUMN_ORIGINS = {
    "ref_": "score the rows with the initial pivot first",
    "fuse_completion_entropy": "each source's normalised token entropy over the completion, from scoring the rows "
    "with every source",
    "fuse_": "score the rows with every source first",
    "kl_completion": "the unpaired data builder assigns each row a completion of another prompt",
    "aligned_consensus": "build CGPO's source consensus first (`polyfuse consensus`, a recipe's `consensus` stage)",
    "fusesft_weight": "the FuseSFT trainer computes it from the rows' rewards",
}


def unpaired_columns(rows: list[UnpairedRow], names: Sequence[str], needed_for: str) -> dict[str, list[Any]]:
    """The named columns of every row, or one line naming the first row that lacks one and what needs it."""
    columns: dict[str, list[Any]] = {}
    for name in names:
        values = [getattr(row, name) for row in rows]
        missing = [row.id for row, value in zip(rows, values, strict=True) if value is None]
        if missing:
            others = f" (and {len(missing) - 1} other rows)" if len(missing) > 1 else ""
            origin = next((hint for key, hint in COLUMN_ORIGINS.items() if name.startswith(key)), None)
            raise DataError(
                f"row {missing[0]!r}{others} has no {name!r}, which {needed_for} needs" + (f": {origin}" if origin else "")
            )
        columns[name] = values
    return columns
