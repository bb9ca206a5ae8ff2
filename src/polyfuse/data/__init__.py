"""The one data model shared by every pipeline: prompts, samples, SFT rows, preference pairs and unpaired rows."""

from polyfuse.data.io import read_rows, write_rows
from polyfuse.data.schemas import (
    Message,
    PreferenceRow,
    PromptRow,
    SampleRow,
    SFTRow,
    UnpairedRow,
    as_messages,
    response_text,
    stable_id,
    unpaired_columns,
)

__all__ = [
    "Message",
    "PreferenceRow",
    "PromptRow",
    "SFTRow",
    "SampleRow",
    "UnpairedRow",
    "as_messages",
    "read_rows",
    "response_text",
    "stable_id",
    "unpaired_columns",
    "write_rows",
]
