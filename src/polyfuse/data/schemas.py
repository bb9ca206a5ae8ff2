"""Row schemas.

Conventions follow TRL so users can bring their data: `prompt` is a string or a list of chat messages,
`chosen` / `rejected` / `completion` are strings or lists holding one assistant message. Every row has
a stable `id`; pairs and SFT rows keep the ids of the samples they came from, so any selection rule
can be re-run offline.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
