"""A model as a merge config names it (mergekit's `ModelReference`): a folder or hub id and an optional LoRA
adapter, parsed once from the config's text, frozen and hashable, so every later step compares and looks models
up by reference instead of re-reading paths."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from polyfuse.errors import ConfigError


def _identity(text: str) -> str:
    """What makes two spellings one model: an existing local path's real location (`./a/`, `a` and a symlink to
    it are one folder), else the text without a trailing slash (a hub id, or a name a recipe resolves later)."""
    path = Path(text).expanduser()
    return os.path.realpath(path) if path.exists() else text.rstrip("/")


@dataclass(frozen=True)
class ModelReference:
    """`path`: a local folder or a hub id (`org/name@revision`), or in a recipe a model name; `lora`: a peft
    adapter applied while reading (mergekit's `MODEL+LORA`). Equal references name the same model (`_identity`)."""

    path: str = field(compare=False)
    lora: str | None = field(default=None, compare=False)
    key: tuple[str, str | None] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", (_identity(self.path), None if self.lora is None else _identity(self.lora)))

    @classmethod
    def parse(cls, text: str) -> ModelReference:
        """mergekit's `model+lora` syntax; a path that exists is a model even with a '+' in its name."""
        if "+" not in text or Path(text).expanduser().exists():
            return cls(text)
        parts = text.split("+")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"{text}: expected MODEL+LORA, one model and one LoRA adapter (mergekit's syntax)")
        return cls(parts[0], parts[1])

    def __str__(self) -> str:
        return self.path if self.lora is None else f"{self.path}+{self.lora}"
