"""The backend interface. A backend turns (prompts, sampling parameters) into response texts; adding
one (vLLM, an HTTP server) is one more file that subclasses `Backend` and registers itself."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from pydantic import Field

from polyfuse.config import StrictModel
from polyfuse.registry import Registry


class SamplingParams(StrictModel):
    """Per-model sampling settings. temperature 0 means greedy decoding."""

    n: int = Field(default=1, ge=1, description="Responses per prompt.")
    temperature: float = Field(default=0.8, ge=0.0, description="0: greedy decoding.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling: keep the most likely tokens up to this mass.")
    repetition_penalty: float = Field(default=1.0, gt=0.0, description="Above 1 discourages repeated tokens.")
    max_new_tokens: int = Field(default=256, ge=1, description="Generation budget per response.")
    seed: int = Field(default=0, description="Sampling seed (a stage derives one per shard from it).")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Backend(ABC):
    """Generates responses for one model. `generate` returns, per prompt, `params.n` texts."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 16):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @abstractmethod
    def generate(self, prompts: list[Any], params: SamplingParams, progress: Any = None) -> list[list[str]]:
        """`prompts` are TRL prompts (strings or message lists). `progress` is an optional callable
        called with the number of prompts finished since the last call."""


BACKENDS: Registry[type[Backend]] = Registry("sampling backend")


def get_backend(name: str) -> type[Backend]:
    return BACKENDS.get(name)
