"""The one data model shared by every pipeline: prompts, samples, SFT rows and preference pairs."""

from polyfuse.data.io import read_rows, write_rows
from polyfuse.data.schemas import (
    Message,
    PreferenceRow,
    PromptRow,
    SampleRow,
    SFTRow,
    as_messages,
    response_text,
    stable_id,
)

__all__ = [
    "Message",
    "PreferenceRow",
    "PromptRow",
    "SFTRow",
    "SampleRow",
    "as_messages",
    "read_rows",
    "response_text",
    "stable_id",
    "write_rows",
]
