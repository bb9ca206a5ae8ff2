"""`backend: openai`: any OpenAI-compatible server (vLLM, SGLang, llama.cpp's server, TGI) by base URL and
served model name, through the `openai` client.

- By default requests go to `/v1/completions` with the prompt rendered by polyfuse's convention, sent as
  token ids, so the server conditions on the same ids as the other backends. The model's `path` names
  its tokenizer (a local folder or hub id of the same model the server serves). `endpoint: chat` sends
  the messages to `/v1/chat/completions` instead: the **server's** chat template then decides the prompt.
- Requests run concurrently (`concurrency` at most, asyncio); each has a timeout and is retried with
  exponential backoff on 429, 5xx, timeouts and connection errors (`max_retries`, the client's own retry
  policy, which also honours `Retry-After`); after the last try the run stops with one clear error.
- Every request carries its own seed (`request_seed`), so a resumed run asks for the same samples.
  (vLLM's CPU server needs `--max-num-batched-tokens >= max-num-seqs x max-model-len` for seeded
  requests; see the README.)
- The API key is read from the environment variable named by `api_key_env`, never from a config file,
  and is never written to manifests or logs.
- Scoring (`polyfuse logprobs`) asks for the prompt's log-probs (`echo` + `logprobs`), which vLLM's
  server returns; servers that do not are refused with a clear error.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from pydantic import Field

from polyfuse.config import NOT_FINGERPRINTED
from polyfuse.data.schemas import as_messages
from polyfuse.errors import ConfigError, UserError
from polyfuse.models import ModelSpec
from polyfuse.models.templates import cut_at_stop, render_prompt
from polyfuse.sampling.base import (
    BACKENDS,
    Backend,
    BackendSettings,
    Done,
    PositionTopK,
    SamplingParams,
    ranked_topk,
)


class OpenAISettings(BackendSettings):
    """The server's address, served model and endpoint, and how requests are sent. Only `model`, `endpoint`
    (and the model's path: its tokenizer) decide the answers; the others are left out of a stage's fingerprint,
    so a run killed mid-way and resumed with another concurrency, timeout, key or address keeps what it has.
    `base_url` among them: a URL does not identify the weights behind it (the same URL may serve another model
    after a restart), and a server restarted at another address (another node, port) is the common reason
    to change it mid-run."""

    type: Literal["openai"] = "openai"
    base_url: str = Field(description="The server's API root, e.g. http://127.0.0.1:8000/v1.",
                          json_schema_extra=NOT_FINGERPRINTED)
    model: str | None = Field(default=None, description="The served model name (default: the model's path).")
    endpoint: Literal["completions", "chat"] = Field(
        default="completions",
        description="completions: polyfuse renders the prompt (token ids); chat: the server's template does.",
    )
    api_key_env: str | None = Field(default=None, description="Environment variable holding the API key.",
                                    json_schema_extra=NOT_FINGERPRINTED)
    concurrency: int = Field(default=16, ge=1, description="Requests in flight at most.", json_schema_extra=NOT_FINGERPRINTED)
    timeout: float = Field(default=600.0, gt=0, description="Seconds per request try.", json_schema_extra=NOT_FINGERPRINTED)
    max_retries: int = Field(default=5, ge=0, description="Retries of a request on 429, 5xx, timeouts, lost connections.",
                             json_schema_extra=NOT_FINGERPRINTED)


@BACKENDS.register("openai")
class OpenAIBackend(Backend):
    Config = OpenAISettings
    loads_weights = False
    journals_requests = True

    def __init__(self, spec: ModelSpec, config: OpenAISettings):
        super().__init__(spec, config)
        self.config: OpenAISettings = config
        key = "EMPTY"  # servers without authentication ignore it; the client insists on some key
        if config.api_key_env is not None:
            key = os.environ.get(config.api_key_env, "")
            if not key:
                raise ConfigError(f"{spec.label}: backend.api_key_env: environment variable {config.api_key_env} is not set")
        self._key = key
        self.served = config.model or spec.path

    def _client(self) -> Any:
        from openai import AsyncOpenAI

        return AsyncOpenAI(base_url=self.config.base_url, api_key=self._key, timeout=self.config.timeout,
                           max_retries=self.config.max_retries)

    def _run(self, count: int, request: Callable[[Any, int], Any]) -> None:
        """Send `request(client, i)` for i in range(count), `concurrency` at a time; a request that still
        fails after its retries stops the run with a clear error (the finished ones are kept by the caller)."""
        import openai

        async def main() -> None:
            limit = asyncio.Semaphore(self.config.concurrency)
            async with self._client() as client:

                async def one(i: int) -> None:
                    async with limit:
                        await request(client, i)

                await asyncio.gather(*(one(i) for i in range(count)))

        tries = f"after {self.config.max_retries + 1} tries"
        where = f"{self.spec.label}: {self.config.base_url}"
        try:
            _run_to_completion(main)
        except openai.APITimeoutError:
            raise UserError(f"{where}: no answer within {self.config.timeout:g} s {tries} (backend.timeout)") from None
        except openai.APIConnectionError as err:
            raise UserError(f"{where}: cannot connect {tries} ({err.__cause__ or err}); is the server running?") from None
        except openai.APIStatusError as err:
            raise UserError(f"{where}: the server answered {err.status_code} {tries}: {_message(err)}") from None

    def generate(self, prompts: list[Any], params: SamplingParams, done: Done, seeds: list[int] | None = None,
                 batch_size: int = 32, token_budget: int | None = None) -> None:
        seeds = self.seeds_for(prompts, params, seeds)
        common: dict[str, Any] = {"model": self.served, "n": params.n, "temperature": params.temperature,
                                  "top_p": params.top_p, "max_tokens": params.max_new_tokens}
        if params.stop:
            common["stop"] = params.stop
        if params.repetition_penalty != 1.0:  # not in OpenAI's API; vLLM and SGLang read it from the body
            common["extra_body"] = {"repetition_penalty": params.repetition_penalty}

        async def request(client: Any, i: int) -> None:
            seed = None if params.greedy else seeds[i]
            if self.config.endpoint == "chat":
                reply = await client.chat.completions.create(messages=as_messages(prompts[i]), seed=seed, **common)
                texts = [choice.message.content or "" for choice in sorted(reply.choices, key=lambda c: c.index)]
            else:
                ids, _ = render_prompt(self.tokenizer, prompts[i])
                reply = await client.completions.create(prompt=ids, seed=seed, **common)
                texts = [choice.text for choice in sorted(reply.choices, key=lambda c: c.index)]
            done(i, [cut_at_stop(text, params.stop).strip() for text in texts])

        self._run(len(prompts), request)

    @classmethod
    def logprob_settings(cls, spec: ModelSpec, config: OpenAISettings, top_k: int | None,
                         entropy: bool = False) -> OpenAISettings:
        """A server returns a few log-probs per position (the probe checks a teacher's top_k), not the
        distribution an entropy needs."""
        if not entropy:
            return config
        raise ConfigError(f"{spec.label}: backend openai cannot give source completion entropies (unpaired rows, "
                          "CGPO's consensus): score the sources with backend transformers or vllm")

    def score(self, sequences: list[tuple[list[int], int]], token_budget: int = 0,
              progress: Callable[[int], None] | None = None, entropy: bool = False,
              entropy_top_k: int | None = None) -> list[tuple[float, int]]:
        if entropy:
            self.logprob_settings(self.spec, self.config, entropy_top_k, entropy=True)  # refuses
        results: list[tuple[float, int]] = [(0.0, 0)] * len(sequences)

        async def request(client: Any, i: int) -> None:
            ids, prompt_length = sequences[i]
            reply = await client.completions.create(model=self.served, prompt=ids, max_tokens=1, temperature=0.0,
                                                    echo=True, logprobs=0)
            logprobs = reply.choices[0].logprobs
            values = getattr(logprobs, "token_logprobs", None) or []
            if len(values) < len(ids) or any(v is None for v in values[prompt_length : len(ids)]):
                raise UserError(f"{self.spec.label}: {self.config.base_url} returned no prompt log-probs "
                                "(completions with echo and logprobs); score with the transformers or vllm backend")
            results[i] = (float(sum(values[prompt_length : len(ids)])), len(ids) - prompt_length)
            if progress is not None:
                progress(1)

        self._run(len(sequences), request)
        return results

    def topk_logprobs(self, sequences: list[tuple[list[int], int]], k: int,
                      token_budget: int = 0) -> list[PositionTopK]:
        """Through vLLM's `prompt_logprobs` extension of `/v1/completions` (one generated token, greedy): each prompt
        position's top-k with ranks plus the token itself, keyed by token id. A server that returns none (not
        vLLM), or refuses k (its `--max-logprobs`, 20 by default), is one clear error."""
        results: list[PositionTopK | None] = [None] * len(sequences)

        async def request(client: Any, i: int) -> None:
            ids, prompt_length = sequences[i]
            reply = await client.completions.create(model=self.served, prompt=ids, max_tokens=1, temperature=0.0,
                                                    extra_body={"prompt_logprobs": k})
            positions = (reply.choices[0].model_extra or {}).get("prompt_logprobs")
            if not positions or len(positions) < len(ids) or any(p is None for p in positions[prompt_length:len(ids)]):
                raise UserError(f"{self.spec.label}: {self.config.base_url} returned no prompt log-probs (vLLM's "
                                "`prompt_logprobs`); serve the teacher with vLLM, or run it with the transformers or "
                                "vllm backend")
            answer = [{int(token): (entry["logprob"], entry.get("rank")) for token, entry in position.items()}
                      for position in positions[prompt_length : len(ids)]]
            results[i] = ranked_topk(answer, ids[prompt_length:], k, self.spec.label)

        self._run(len(sequences), request)
        return results  # type: ignore[return-value]


def _run_to_completion(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """`asyncio.run(main())`, also from code that runs inside an event loop (a Jupyter cell), where
    `asyncio.run` refuses: then in a thread of its own, with its own loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(main())
        return
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, main()).result()


def _message(err: Any) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        return str(body.get("message") or body.get("error") or body)[:300]
    return str(getattr(err, "message", err))[:300]
