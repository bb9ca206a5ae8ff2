"""What a toy world is made of: one recipe per model, and the presets `default` and `tiny`.

A world is identified by the hash of its config (plus `FORMAT_VERSION`, bumped whenever the build
code changes what a config produces), so editing any number here builds a new world next to the old.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import Field, model_validator

from polyfuse.config import StrictModel
from polyfuse.errors import ConfigError
from polyfuse.toyworld.tasks import DOMAINS
from polyfuse.toyworld.tokenizers import Algorithm, TemplateName

FORMAT_VERSION = 1
Architecture = Literal["llama", "qwen2", "gpt2", "mistral"]


class ModelRecipe(StrictModel):
    """One toy model: architecture, tokenizer, template, size and training.

    `specialty` is the domain that gets `specialty_share` of its training examples (the rest are
    spread evenly over the other domains); None trains a generalist on all domains equally."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    architecture: Architecture = "llama"
    tokenizer: Algorithm = "bpe-bytelevel"
    vocab_size: int = Field(default=400, ge=64)
    template: TemplateName = "chatml"
    hidden_size: int = Field(default=128, ge=8)
    layers: int = Field(default=2, ge=1)
    heads: int = Field(default=4, ge=1)
    specialty: str | None = None
    specialty_share: float = Field(default=0.9, ge=0.0, le=1.0)
    steps: int = Field(default=600, ge=1)
    batch_size: int = Field(default=64, ge=1)
    learning_rate: float = Field(default=3e-3, gt=0)

    @model_validator(mode="after")
    def _check(self) -> ModelRecipe:
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by heads {self.heads}")
        if self.specialty is not None and self.specialty not in DOMAINS:
            raise ValueError(f"specialty {self.specialty!r} is not a toy domain ({', '.join(DOMAINS)})")
        return self


class ToyWorldConfig(StrictModel):
    """The whole world. `reward_model` is trained as a sequence classifier on verifier labels
    (gold answers vs near misses); its `specialty` is ignored."""

    seed: int = 0
    domains: list[str] = Field(default_factory=lambda: list(DOMAINS))
    sources: list[ModelRecipe] = Field(min_length=1)
    pivot: ModelRecipe
    reward_model: ModelRecipe
    corpus_lines: int = Field(default=3000, ge=10, description="Tokenizer training corpus size.")
    train_pool: int = Field(default=6000, ge=10, description="Distinct training examples drawn per model.")
    threads: int = Field(default=2, ge=1, description="torch threads while building.")

    @model_validator(mode="after")
    def _check(self) -> ToyWorldConfig:
        unknown = [d for d in self.domains if d not in DOMAINS]
        if unknown:
            raise ValueError(f"unknown domains {unknown}; expected some of {list(DOMAINS)}")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        return self

    def key(self) -> str:
        """The cache key: a hash of the config and the build format."""
        blob = json.dumps([FORMAT_VERSION, self.model_dump(mode="json")], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @classmethod
    def preset(cls, name: str) -> ToyWorldConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown toy world preset {name!r}; expected one of: {', '.join(PRESETS)}")
        return cls.model_validate(PRESETS[name])


_SOURCES = [
    dict(name="llama-arithmetic", architecture="llama", tokenizer="bpe-bytelevel", vocab_size=512,
         template="llama3", specialty="arithmetic"),
    dict(name="qwen-strings", architecture="qwen2", tokenizer="unigram", vocab_size=384,
         template="chatml", specialty="strings"),
    dict(name="gpt2-compare", architecture="gpt2", tokenizer="wordpiece", vocab_size=320,
         template="none", specialty="compare"),
]
_PIVOT = dict(name="pivot", architecture="mistral", tokenizer="bpe-metaspace", vocab_size=448, template="zephyr")
_REWARD = dict(name="reward_model", architecture="llama", tokenizer="bpe-bytelevel", vocab_size=288, template="gemma")

PRESETS: dict[str, dict] = {
    "default": dict(
        sources=_SOURCES,
        pivot={**_PIVOT, "hidden_size": 96, "steps": 60},
        reward_model={**_REWARD, "steps": 300},
    ),
    "tiny": dict(
        sources=[{**s, "hidden_size": 16, "layers": 1, "heads": 2, "steps": 4, "batch_size": 8} for s in _SOURCES],
        pivot={**_PIVOT, "hidden_size": 16, "layers": 1, "heads": 2, "steps": 4, "batch_size": 8},
        reward_model={**_REWARD, "hidden_size": 16, "layers": 1, "heads": 2, "steps": 4, "batch_size": 8},
        corpus_lines=200,
        train_pool=64,
    ),
}
