"""The backend interface: how polyfuse runs inference on a model (sampling, evaluation, scoring).

A backend is built from a model spec and its own options, and loads (or connects to) its model itself,
so no weights are loaded twice and a stage never needs to know which engine runs. Adding one is one
file in this package: an options class (a `BackendSettings` subclass whose `type` is a literal) and a
`Backend` subclass registered under the same name::

    class EchoSettings(BackendSettings):
        type: Literal["echo"] = "echo"

    @BACKENDS.register("echo")
    class EchoBackend(Backend):
        Config = EchoSettings
        def generate(self, prompts, params, done, seeds=None, batch_size=32, token_budget=None):
            for i, prompt in enumerate(prompts):
                done(i, [str(prompt)] * params.n)

A model chooses its backend with its `backend:` field (`BackendConfig`: a name, or a mapping with `type`
and the backend's options), validated with the model before anything starts.

Every backend renders prompts with polyfuse's own template convention (`render_prompt`) and hands the
engine token ids, so all backends condition on the same ids and responses are decoded the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import numpy as np
from pydantic import Field, SerializeAsAny, WrapValidator, model_serializer

from polyfuse.config import StrictModel
from polyfuse.data.schemas import stable_id
from polyfuse.errors import ConfigError, UserError
from polyfuse.models import ModelSpec, load_generation_config, load_tokenizer
from polyfuse.models.forward import DEFAULT_TOKEN_BUDGET
from polyfuse.models.templates import decode_response
from polyfuse.registry import Registry


class SamplingSettings(StrictModel):
    """Per-model sampling settings (a model's `sampling:`). temperature 0 means greedy decoding. The seed is
    not among them: the sample stage derives one per shard from its own `seed` (in a recipe, the recipe's)."""

    n: int = Field(default=1, ge=1, description="Responses per prompt.")
    temperature: float = Field(default=0.8, ge=0.0, description="0: greedy decoding.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling: keep the most likely tokens up to this mass.")
    repetition_penalty: float = Field(default=1.0, gt=0.0, description="Above 1 discourages repeated tokens.")
    max_new_tokens: int = Field(default=256, ge=1, description="Generation budget per response.")
    stop: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description="Strings that end a response (not kept in it), e.g. [\"\\n\"] for a base "
        "model that never emits EOS; as vLLM's and OpenAI's `stop`.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @model_serializer(mode="wrap")
    def _no_empty_stop(self, handler: Any) -> dict[str, Any]:
        """No `stop` key without stop strings: the configs, fingerprints and rows of such runs stay what they were
        before stop strings existed, so their cached stages stay valid."""
        data = handler(self)
        if not self.stop:
            data.pop("stop", None)
        return data


class SamplingParams(SamplingSettings):
    """What one `generate` call samples with: a model's settings and the seed its requests derive from."""

    seed: int = Field(default=0, description="The requests' seeds derive from it (`request_seed`).")


def request_seed(seed: int, position: int) -> int:
    """The seed of one request (prompt): a function of the shard's seed and the prompt's position in it,
    so a resumed shard sends every remaining prompt with the seed it had in the first run."""
    return int(stable_id("request", seed, position), 16) % (2**31)


Done = Callable[[int, list[str]], None]


@dataclass(frozen=True)
class PositionTopK:
    """A model's answer at the P response positions of one scored sequence (`Backend.topk_logprobs`): position p
    is the distribution that predicts response token p; its K most likely ids and their normalised log-probs,
    by rank (-inf padded when the vocabulary has fewer), and the log-prob of the token itself."""

    topk_ids: np.ndarray  # [P, K] int32
    topk_logprobs: np.ndarray  # [P, K] float32, descending
    token_logps: np.ndarray  # [P] float32


def ranked_topk(positions: list[dict[int, tuple[float, int]]], tokens: list[int], k: int, label: str) -> PositionTopK:
    """A `PositionTopK` from an engine's per-position answer {token id: (log-prob, rank)} (vLLM's prompt log-probs:
    the top-k by rank 1..k, plus the realised token wherever it ranks). Fewer than k ranked entries in a position
    (a vocabulary smaller than k) are -inf padded; a position without the realised token is refused."""
    ids = np.zeros((len(tokens), k), np.int32)
    logps = np.full((len(tokens), k), -np.inf, np.float32)
    own = np.zeros(len(tokens), np.float32)
    for p, (answer, token) in enumerate(zip(positions, tokens, strict=True)):
        ranked = sorted((rank, token_id, logp) for token_id, (logp, rank) in answer.items() if rank is not None and rank <= k)
        for slot, (_, token_id, logp) in enumerate(ranked[:k]):
            ids[p, slot], logps[p, slot] = token_id, logp
        if token not in answer:
            raise UserError(f"{label}: the engine's answer has no log-prob for the scored token {token} at response "
                            f"position {p}")
        own[p] = answer[token][0]
    return PositionTopK(ids, logps, own)


class BackendSettings(StrictModel):
    """Options every backend has; `type` names the backend."""

    type: str = Field(description="The backend: transformers, vllm or openai (or a name a module registered).")


class Backend(ABC):
    """Runs inference on one model. Built from the model's spec and its backend options; loads or connects
    to the model in `__init__` and frees it in `close` (also a context manager)."""

    Config: ClassVar[type[BackendSettings]]
    # False for a backend that connects to a server serving a fixed model: it cannot run a model that a
    # recipe trains (a new folder), so stages refuse that combination when the recipe is validated.
    loads_weights: ClassVar[bool] = True
    # True for a backend whose requests finish one by one and cost a round trip each (a server): the sample
    # stage then journals every finished request, so a killed run resends none of them. Local engines
    # finish a batch at once, and a killed run redoes the shard.
    journals_requests: ClassVar[bool] = False

    def __init__(self, spec: ModelSpec, config: BackendSettings):
        self.spec, self.config = spec, config
        self.tokenizer = load_tokenizer(spec, padding_side="left")

    @abstractmethod
    def generate(self, prompts: list[Any], params: SamplingParams, done: Done, seeds: list[int] | None = None,
                 batch_size: int = 32, token_budget: int | None = None) -> None:
        """Call `done(index into prompts, params.n response texts)` as each request finishes, in any order
        (the sample stage writes each one down, so a killed run resends nothing it has). `prompts` are TRL
        prompts (strings or message lists); `seeds[i]` is the seed of prompt i (None: derived from
        `params.seed`); `batch_size` is how many prompts one engine call takes. `token_budget`, where the
        backend batches itself (transformers), cuts its batches by padded tokens instead (rows x (longest
        prompt + max_new_tokens) x n), over length-sorted prompts."""

    def generate_all(self, prompts: list[Any], params: SamplingParams, seeds: list[int] | None = None,
                     batch_size: int = 32, progress: Callable[[int], None] | None = None,
                     token_budget: int | None = None) -> list[list[str]]:
        """Every prompt's responses, in prompt order; `progress` is called with each finished count."""
        results: list[list[str]] = [[] for _ in prompts]

        def done(index: int, texts: list[str]) -> None:
            results[index] = texts
            if progress is not None:
                progress(1)

        self.generate(prompts, params, done, seeds, batch_size, token_budget)
        return results

    def greedy_and_score(self, prompts: list[Any], golds: list[tuple[list[int], int] | None], params: SamplingParams,
                         batch_size: int = 32, token_budget: int | None = None,
                         generated: Callable[[int], None] | None = None,
                         scored: Callable[[int], None] | None = None) -> tuple[list[str], list[tuple[float, ...] | None]]:
        """What evaluation needs of a model: each prompt's one greedy response (`params`: temperature 0, n 1) and
        `score`'s (S, n) of each gold `(ids, prompt length)` sequence (None: no gold), in input order; `generated`
        and `scored` are called with each finished count. Here `score` then `generate_all`; a backend that can
        prefill each prompt once for both (transformers) overrides it."""
        wanted = [i for i, gold in enumerate(golds) if gold is not None]
        sums = self.score([golds[i] for i in wanted], token_budget or DEFAULT_TOKEN_BUDGET, scored) if wanted else []
        found: list[tuple[float, ...] | None] = [None] * len(prompts)
        for i, values in zip(wanted, sums, strict=True):
            found[i] = values
        texts = self.generate_all(prompts, params, batch_size=batch_size, progress=generated, token_budget=token_budget)
        return [t[0] for t in texts], found

    def score(self, sequences: list[tuple[list[int], int]], token_budget: int = DEFAULT_TOKEN_BUDGET,
              progress: Callable[[int], None] | None = None, entropy: bool = False,
              entropy_top_k: int | None = None) -> list[tuple[float, ...]]:
        """(sum of the response tokens' log-probs in fp32, response token count) of each `(ids, prompt
        length)` sequence, in input order. `token_budget` bounds a forward's padded tokens where the
        backend batches itself (transformers); `progress` is called with each finished count. With `entropy`,
        also the sum over the same positions of the next-token entropy divided by ln V (V: the LM head's
        width), and, where it is estimated from each position's `entropy_top_k` largest log-probs (vllm),
        the sum of the estimate's error bounds (else the entropy is exact and the bound absent)."""
        raise ConfigError(f"{self.spec.label}: the {self.config.type!r} backend cannot score sequences; "
                          "use the transformers or vllm backend")

    def generate_ids(self, prompt_ids: list[list[int]], params: SamplingParams,
                     seeds: list[int] | None = None) -> list[list[list[int]]]:
        """`params.n` sampled continuations of each prompt, as token ids: what on-policy distillation trains
        on (the student's own tokens, never a re-tokenised text). A continuation that stopped ends with its
        stop id (`stop_token_ids`); one that ran out of `max_new_tokens` does not."""
        raise ConfigError(f"{self.spec.label}: the {self.config.type!r} backend does not return sampled token ids; "
                          "sample the student with the transformers or vllm backend")

    def topk_logprobs(self, sequences: list[tuple[list[int], int]], k: int,
                      token_budget: int = DEFAULT_TOKEN_BUDGET) -> list[PositionTopK]:
        """The top-`k` log-probs at every response position of each `(ids, prompt length)` sequence, in input
        order (a teacher scoring a student's text). Raises `UserError` when the engine returns fewer than `k`."""
        raise ConfigError(f"{self.spec.label}: the {self.config.type!r} backend cannot return top-K log-probs; "
                          "use the transformers, vllm or openai backend")

    @classmethod
    def logprob_settings(cls, spec: ModelSpec, config: BackendSettings, top_k: int | None,
                         entropy: bool = False) -> BackendSettings:
        """The options an engine is started with when it will return `top_k` log-probs per position (None: every
        log-prob of the vocabulary), for a teacher's top-K or, with `entropy`, a source's completion entropy
        (vllm: enough prompt log-probs); called before any engine starts, so a backend that cannot give them
        refuses here."""
        return config

    @classmethod
    def max_length(cls, spec: ModelSpec, config: BackendSettings) -> int | None:
        """The longest sequence (prompt and response tokens) the backend can score for this model, from the
        options alone, before any engine starts (the log-prob stage drops longer pairs before it scores
        anything); None: no limit of its own (the model's context still applies)."""
        return None

    def response_text(self, ids: list[int], params: SamplingParams) -> str:
        """A response's text from its generated ids: decoded, cut at the first stop string, stripped."""
        return decode_response(self.tokenizer, ids, params.stop)

    def seeds_for(self, prompts: list[Any], params: SamplingParams, seeds: list[int] | None) -> list[int]:
        return seeds if seeds is not None else [request_seed(params.seed, i) for i in range(len(prompts))]

    def stop_token_ids(self) -> list[int]:
        """The ids that end a response: the model's generation config's EOS (one id or several), else its
        config's, else the tokenizer's; what `generate` in transformers stops on."""
        eos = load_generation_config(self.spec).eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return [eos] if isinstance(eos, int) else list(eos or [])

    def close(self) -> None:  # noqa: B027 (a hook: only backends that hold an engine free one)
        """Free the model (engine, memory, connections)."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


BACKENDS: Registry[type[Backend]] = Registry("backend", package="polyfuse.sampling")


# A backend name (`vllm`) or a mapping with `type`, validated by that backend's options class.
BackendConfig = Annotated[
    SerializeAsAny[BackendSettings], WrapValidator(BACKENDS.config_validator(BackendSettings, by_name=True))
]


class EngineModel(ModelSpec):
    """A model and the backend that runs it (default: transformers, in this process)."""

    backend: BackendConfig = Field(default="transformers", validate_default=True,
                                   description="transformers, vllm, openai, or a mapping {type: ..., options}.")


class SampledModel(EngineModel):
    """A model, its backend and its sampling settings: a recipe's source or pivot."""

    sampling: SamplingSettings = Field(default_factory=SamplingSettings)


def build_backend(model: EngineModel) -> Backend:
    """The backend of `model`, loaded or connected."""
    return BACKENDS.get(model.backend.type)(model, model.backend)


def backend_max_length(model: EngineModel) -> int | None:
    """The longest sequence `model`'s backend can score (`Backend.max_length`), without starting it."""
    return BACKENDS.get(model.backend.type).max_length(model, model.backend)
