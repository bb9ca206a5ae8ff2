"""What a toy world is made of: one recipe per model, and the presets `default`, `tiny`, `gym` and `gym-tiny`.

A world is identified by the hash of its config (plus `FORMAT_VERSION`, bumped whenever the build
code changes what a config produces), so editing any number here builds a new world next to the old.
A fusion gym (a config with a `gym` section) hashes `GYM_FORMAT_VERSION` too, so the gym's build code
can change without touching the keys of the default worlds.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import Field, model_validator

from polyfuse.config import StrictModel
from polyfuse.errors import ConfigError
from polyfuse.toyworld.tasks import (
    ALL_TASKS,
    DOMAINS,
    GYM_DOMAINS,
    GYM_SISTER_TASKS,
    SISTER_TASKS,
    get_domain,
)
from polyfuse.toyworld.tokenizers import Algorithm, TemplateName

FORMAT_VERSION = 2  # 2: Unigram fallback characters in a reproducible order
GYM_FORMAT_VERSION = 1  # worlds with a `gym` section only
# Not qwen2: transformers 5 loads a qwen2 folder's tokenizer as Qwen2Tokenizer whatever the folder says,
# which rebuilds a byte-level BPE and breaks any other tokenizer; qwen3 folders keep theirs.
Architecture = Literal["llama", "qwen3", "gpt2", "mistral"]


class ModelRecipe(StrictModel):
    """One toy model: architecture, tokenizer, template, size and training.

    `mixture` gives the relative weight of each task (domains and sister tasks) in its training
    examples; None means all of the world's domains equally. A source's specialty is its heaviest
    domain. The reward model ignores `mixture` (it is trained on all domains)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Folder name of the model in the world.")
    architecture: Architecture = Field(default="llama", description="transformers architecture.")
    tokenizer: Algorithm = Field(default="bpe-bytelevel", description="Tokenizer algorithm, trained on the world's corpus.")
    vocab_size: int = Field(default=400, ge=64, description="Tokenizer vocabulary size.")
    template: TemplateName = Field(default="chatml", description="Chat template.")
    hidden_size: int = Field(default=128, ge=8, description="Model width.")
    layers: int = Field(default=2, ge=1, description="Transformer layers.")
    heads: int = Field(default=4, ge=1, description="Attention heads (hidden_size must divide by it).")
    mixture: dict[str, float] | None = Field(default=None, description="Task -> weight in its training data; None: every domain equally.")
    reach: dict[str, int] | None = Field(
        default=None, description="A gym: task -> the highest difficulty level in its training data (docs/gym.md); others: every level.")
    steps: int = Field(default=600, ge=1, description="Training steps.")
    batch_size: int = Field(default=64, ge=1, description="Training batch size.")
    learning_rate: float = Field(default=1e-3, gt=0, description="Training learning rate.")

    @model_validator(mode="after")
    def _check(self) -> ModelRecipe:
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by heads {self.heads}")
        unknown = sorted(set(self.mixture or {}) - set(ALL_TASKS))
        if unknown:
            raise ValueError(f"mixture: unknown tasks {unknown}; expected some of {list(ALL_TASKS)}")
        leveled = {name: get_domain(name).levels for name in self.reach or {} if name in ALL_TASKS}
        wrong = sorted(name for name in self.reach or {} if leveled.get(name, 1) <= 1 or not 1 <= self.reach[name] <= leveled[name])
        if wrong:
            raise ValueError(f"reach: {wrong}: expected gym tasks with a level from 1 to their number of levels "
                             f"({', '.join(f'{n} {d.levels}' for n, d in ALL_TASKS.items() if d.levels > 1)})")
        weights = list(self.mixture.values()) if self.mixture is not None else [1.0]
        if not weights or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError("mixture: weights must be >= 0 with a positive total")
        return self

    @property
    def specialty(self) -> str | None:
        """The domain with the largest weight in `mixture` (None for a uniform generalist)."""
        weights = {k: v for k, v in (self.mixture or {}).items() if k in DOMAINS or k in GYM_DOMAINS}
        return max(weights, key=weights.__getitem__) if weights else None


class LoraRecipe(StrictModel):
    """A LoRA fine-tune (peft) of the gym's base on gold answers; the saved model has the adapter merged
    into plain weights, so its task vector lives in the adapted linear layers only (embeddings untouched)."""

    rank: int = Field(default=8, ge=1, description="Rank of the adapter matrices.")
    alpha: float = Field(default=16.0, gt=0, description="Scaling: the update is alpha / rank times B @ A.")
    steps: int = Field(default=300, ge=1, description="Training steps.")
    batch_size: int = Field(default=64, ge=1, description="Training batch size.")
    learning_rate: float = Field(default=1e-3, gt=0, description="Training learning rate.")


class GymSettings(StrictModel):
    """What a fusion gym adds to a world: the merging family's models (a base pretrained on every domain, one
    LoRA specialist per domain fine-tuned from it, a multi-task LoRA fine-tune of the same budget per domain:
    FusionBench's baseline) and gold training texts (answers that no source wrote) for distillation."""

    base: ModelRecipe = Field(description="The shared pretrained base of the specialists (its mixture: None = every domain).")
    specialist: LoraRecipe = Field(default_factory=LoraRecipe, description="Each domain's specialist: the base + LoRA on that domain.")
    multitask: LoraRecipe = Field(default_factory=LoraRecipe, description="The base + LoRA on every domain at once.")
    gold_texts_per_domain: int = Field(default=1000, ge=1, description="Gold training texts per domain in texts/gold.jsonl.")


class ToyWorldConfig(StrictModel):
    """The whole world. `reward_model` is trained as a one-logit sequence classifier on verifier
    labels (gold answers vs near misses of every domain)."""

    seed: int = Field(default=0, description="World seed: corpus, prompts, weights.")
    domains: list[str] = Field(default_factory=lambda: list(DOMAINS), description="Task domains of the world.")
    sources: list[ModelRecipe] = Field(min_length=1, description="The specialist source models.")
    pivot: ModelRecipe = Field(description="The weak pivot.")
    reward_model: ModelRecipe = Field(description="The reward model (a one-logit sequence classifier).")
    corpus_lines: int = Field(default=3000, ge=10, description="Tokenizer training corpus size.")
    train_pool: int = Field(default=6000, ge=10, description="Training examples drawn (with repeats) per model.")
    threads: int = Field(default=1, ge=1, description="torch threads per model being trained.")
    workers: int = Field(default=2, ge=1, description="Models trained at once, each in its own process.")
    gym: GymSettings | None = Field(default=None, description="A fusion gym's additions (merging base, specialists, gold texts).")

    @model_validator(mode="after")
    def _check(self) -> ToyWorldConfig:
        family = GYM_DOMAINS if self.gym is not None else DOMAINS
        unknown = [d for d in self.domains if d not in family]
        if unknown:
            kind = "a gym" if self.gym is not None else "a world without a `gym` section"
            raise ValueError(f"unknown domains {unknown} for {kind}: expected some of {list(family)}")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        return self

    @property
    def corpus_tasks(self) -> list[str]:
        """The domains whose prompts train the tokenizers: a gym's own, else the default world's (whatever
        `domains` says, as before the gym existed, so no cached world changes)."""
        return list(self.domains) if self.gym is not None else list(DOMAINS)

    def key(self) -> str:
        """The cache key: a hash of the config and the build format (`workers` changes only the
        speed of a build, not its weights, so it is left out; a world without a gym hashes as it did
        before the gym existed)."""
        if self.gym is None:
            data = self.model_dump(mode="json", exclude={"workers", "gym"})
            for recipe in [*data["sources"], data["pivot"], data["reward_model"]]:
                if recipe["reach"] is None:  # a field the gym added
                    del recipe["reach"]
            blob = json.dumps([FORMAT_VERSION, data], sort_keys=True)
        else:
            blob = json.dumps([FORMAT_VERSION, GYM_FORMAT_VERSION, self.model_dump(mode="json", exclude={"workers"})],
                              sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @classmethod
    def preset(cls, name: str) -> ToyWorldConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown toy world preset {name!r}; expected one of: {', '.join(PRESETS)}")
        return cls.model_validate(PRESETS[name])


def _specialist(domain: str, share: float = 0.94) -> dict[str, float]:
    return {d: share if d == domain else (1 - share) / (len(DOMAINS) - 1) for d in DOMAINS}


_SOURCES = [
    dict(name="llama-compare", architecture="llama", tokenizer="bpe-bytelevel", vocab_size=512,
         template="llama3", mixture=_specialist("compare")),
    dict(name="qwen-strings", architecture="qwen3", tokenizer="unigram", vocab_size=384,
         template="chatml", mixture=_specialist("strings"), steps=400),
    dict(name="gpt2-arithmetic", architecture="gpt2", tokenizer="wordpiece", vocab_size=320,
         template="none", mixture=_specialist("arithmetic")),
]
_PIVOT = dict(name="pivot", architecture="mistral", tokenizer="bpe-metaspace", vocab_size=448, template="zephyr",
              hidden_size=96, mixture={t: 1.0 for t in SISTER_TASKS}, steps=300)
_REWARD = dict(name="reward_model", architecture="llama", tokenizer="bpe-bytelevel", vocab_size=288,
               template="gemma", hidden_size=64, layers=3, steps=600)
# One head of 32 dimensions: the smallest attention head vLLM's CPU kernels run, so the tiny world
# also serves the inference-engine tests (`backend: vllm`).
_TINY = dict(hidden_size=32, layers=1, heads=1, steps=4, batch_size=8)

# The fusion gym (docs/gym.md): each source trained mostly on its specialty and partly on a second domain, so
# that it is good but imperfect there and partly right on the second; every domain is some source's specialty
# and another's second domain. Measured calibration in docs/gym.md.
_GYM_SOURCES = [
    dict(name="llama-largest", architecture="llama", tokenizer="bpe-bytelevel", vocab_size=512, template="llama3",
         mixture={"largest": 0.5, "addition": 0.5}, reach={"largest": 2, "addition": 2}),
    dict(name="qwen-reversal", architecture="qwen3", tokenizer="unigram", vocab_size=384, template="chatml",
         mixture={"reversal": 0.6, "largest": 0.4}, reach={"reversal": 8, "largest": 1}, steps=500),
    dict(name="gpt2-addition", architecture="gpt2", tokenizer="wordpiece", vocab_size=320, template="none", layers=3,
         mixture={"addition": 0.8, "reversal": 0.2}, reach={"reversal": 4}, steps=800),
]
_GYM_PIVOT = {**_PIVOT, "mixture": {t: 1.0 for t in GYM_SISTER_TASKS}}
_GYM_BASE = dict(name="base", architecture="llama", tokenizer="bpe-metaspace", vocab_size=416, template="chatml",
                 reach={"reversal": 3, "largest": 1}, steps=400)
_GYM = dict(
    domains=list(GYM_DOMAINS), sources=_GYM_SOURCES, pivot=_GYM_PIVOT, reward_model=_REWARD,
    gym=dict(base=_GYM_BASE, specialist=dict(steps=200), multitask=dict(steps=600)),
)

PRESETS: dict[str, dict] = {
    "default": dict(sources=_SOURCES, pivot=_PIVOT, reward_model=_REWARD),
    "tiny": dict(
        sources=[{**s, **_TINY} for s in _SOURCES],
        pivot={**_PIVOT, **_TINY},
        reward_model={**_REWARD, **_TINY},
        corpus_lines=200,
        train_pool=64,
        workers=1,
    ),
    "gym": _GYM,
    "gym-tiny": dict(
        _GYM,
        sources=[{**s, **_TINY} for s in _GYM_SOURCES],
        pivot={**_GYM_PIVOT, **_TINY},
        reward_model={**_REWARD, **_TINY},
        gym=dict(base={**_GYM_BASE, **_TINY}, specialist=dict(rank=2, steps=4, batch_size=8),
                 multitask=dict(rank=2, steps=4, batch_size=8), gold_texts_per_domain=20),
        corpus_lines=200,
        train_pool=64,
        workers=1,
    ),
}
