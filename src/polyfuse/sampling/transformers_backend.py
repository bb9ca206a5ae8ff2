"""`backend: transformers` (the default): the model in this process, batched `generate` over left-padded
prompts sorted by length (batches of `batch_size` prompts, or cut by a token budget), and sequence scoring
by the shared forward kernel. A prompt is run through the model once however many responses it gets (its KV cache
copied for each of `n`, `polyfuse.models.forward.prefill`), and once for evaluation's gold answer and greedy answer
(`greedy_and_score`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal

from polyfuse.lazy import lazy_import
from polyfuse.models import ModelSpec, load_model
from polyfuse.models.forward import (
    DEFAULT_TOKEN_BUDGET,
    cache_argument,
    continuation_logps,
    pad_token_id,
    plan_batches,
    prefill,
    prefix_groups,
    score_sequences,
    score_topk,
)
from polyfuse.models.templates import render_prompt
from polyfuse.sampling.base import BACKENDS, Backend, BackendSettings, Done, PositionTopK, SamplingParams

np = lazy_import("numpy")
torch = lazy_import("torch")


class TransformersSettings(BackendSettings):
    type: Literal["transformers"] = "transformers"


@BACKENDS.register("transformers")
class TransformersBackend(Backend):
    Config = TransformersSettings

    def __init__(self, spec: ModelSpec, config: TransformersSettings, model: Any = None):
        """`model`: an already loaded model of `spec` (evaluation of a model in memory); else it is loaded."""
        super().__init__(spec, config)
        self.model = model if model is not None else load_model(spec)

    def _batches(self, prompt_ids: list[list[int]], lengths: list[int], batch_size: int, token_budget: int | None,
                 n: int = 1) -> list[list[int]]:
        """Prompt indices by batch, within groups of prompts that share a prefix (`prefix_groups`: `prefill`
        computes it once): `batch_size` prompts over length-sorted ones, or cut by `token_budget` over `lengths`
        (each row: its prompt and what follows it, n times)."""
        batches = []
        for group in prefix_groups(prompt_ids):
            if token_budget is None:
                order = sorted(group, key=lambda i: lengths[i])
                per_batch = max(1, batch_size // n)
                batches += [order[start : start + per_batch] for start in range(0, len(order), per_batch)]
            else:
                planned = plan_batches([lengths[i] for i in group], max(1, token_budget // n))
                batches += [[group[k] for k in batch] for batch in planned]
        return batches

    def _generate_options(self, params: SamplingParams) -> dict[str, Any]:
        """`generate`'s keyword arguments for `params`."""
        options: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "pad_token_id": pad_token_id(self.tokenizer),
            "eos_token_id": self.stop_token_ids(),
            "repetition_penalty": params.repetition_penalty,
        }
        if params.stop:  # transformers keeps the stop string in the ids: `response_text` cuts it
            options.update(stop_strings=params.stop, tokenizer=self.tokenizer)
        if params.greedy:
            options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            options.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        return options

    def _sample(self, prompt_ids: list[list[int]], params: SamplingParams, batch_size: int,
                token_budget: int | None) -> Iterator[tuple[int, list[list[int]]]]:
        """(prompt index, its `params.n` generated id lists, padding after a stop included), batch by batch."""
        options = self._generate_options(params)
        lengths = [len(ids) + params.max_new_tokens for ids in prompt_ids]
        start = 0
        for batch in self._batches(prompt_ids, lengths, batch_size, token_budget, params.n):
            # `generate` draws from one generator for the whole batch, so per-request seeds cannot apply:
            # the batch is seeded by its offset, and results do not depend on what ran before in this process.
            torch.manual_seed(params.seed + start)
            with torch.inference_mode():  # around the call, not the generator: its consumer runs between yields
                # each prompt's shared prefix and the rest prefilled once, the cache copied for its n responses
                cache, ids, mask = prefill(self.model, [prompt_ids[i] for i in batch], pad_token_id(self.tokenizer),
                                           params.max_new_tokens)
                if params.n > 1:
                    cache.batch_repeat_interleave(params.n)
                    ids, mask = ids.repeat_interleave(params.n, dim=0), mask.repeat_interleave(params.n, dim=0)
                out = self.model.generate(input_ids=ids, attention_mask=mask, **options,
                                          **{cache_argument(self.model): cache})
            new = out[:, ids.shape[1] :].tolist()
            for k, i in enumerate(batch):
                yield i, new[k * params.n : (k + 1) * params.n]
            start += len(batch)

    def greedy_and_score(self, prompts: list[Any], golds: list[tuple[list[int], int] | None], params: SamplingParams,
                         batch_size: int = 32, token_budget: int | None = None,
                         generated: Callable[[int], None] | None = None,
                         scored: Callable[[int], None] | None = None) -> tuple[list[str], list[tuple[float, ...] | None]]:
        """As `Backend.greedy_and_score`, with one prefill per prompt: its KV cache (all but the last prompt token,
        `prefill`) serves the gold answer's teacher-forced forward (`continuation_logps`) and greedy `generate`,
        which goes on from it. A gold whose prompt part is not the generation prompt (a template without the
        prefix property: `encode` falls back to the plain format) is scored on its own by `score`. Batches:
        prompt + the longer of max_new_tokens and the gold answer per row, by `token_budget` (else `batch_size`)."""
        if not params.greedy or params.n != 1:
            return super().greedy_and_score(prompts, golds, params, batch_size, token_budget, generated, scored)
        encoded = [render_prompt(self.tokenizer, p)[0] for p in prompts]
        found: list[tuple[float, ...] | None] = [None] * len(prompts)
        apart = [i for i, gold in enumerate(golds) if gold is not None and gold[0][: gold[1]] != encoded[i]]
        if apart:
            for i, values in zip(apart, self.score([golds[i] for i in apart], token_budget or DEFAULT_TOKEN_BUDGET,
                                                   scored), strict=True):
                found[i] = values
        continuations = [gold[0][gold[1] :] if gold is not None and i not in apart else []
                         for i, gold in enumerate(golds)]
        lengths = [len(ids) + max(params.max_new_tokens, len(c)) for ids, c in zip(encoded, continuations, strict=True)]
        texts: list[str] = [""] * len(prompts)
        options = self._generate_options(params)
        self.model.eval()
        for batch in self._batches(encoded, lengths, batch_size, token_budget):
            with torch.inference_mode():
                cache, ids, mask = prefill(self.model, [encoded[i] for i in batch], pad_token_id(self.tokenizer),
                                           max(lengths[i] - len(encoded[i]) for i in batch))
                sums = continuation_logps(self.model, cache, ids, mask, [continuations[i] for i in batch])
                out = self.model.generate(input_ids=ids, attention_mask=mask, **options,
                                          **{cache_argument(self.model): cache})
            for k, i in enumerate(batch):
                texts[i] = self.response_text(out[k, ids.shape[1] :].tolist(), params)
                if continuations[i]:
                    found[i] = sums[k]
            if scored is not None:
                scored(sum(1 for i in batch if continuations[i]))
            if generated is not None:
                generated(len(batch))
        return texts, found

    def generate(self, prompts: list[Any], params: SamplingParams, done: Done, seeds: list[int] | None = None,
                 batch_size: int = 32, token_budget: int | None = None) -> None:
        encoded = [render_prompt(self.tokenizer, p)[0] for p in prompts]
        for i, texts in self._sample(encoded, params, batch_size, token_budget):
            done(i, [self.response_text(seq, params) for seq in texts])

    def generate_ids(self, prompt_ids: list[list[int]], params: SamplingParams,
                     seeds: list[int] | None = None) -> list[list[list[int]]]:
        """As `Backend.generate_ids`; the model keeps its mode (the caller puts a training model in eval mode)
        and the global random state is restored afterwards, so sampling does not move a trainer's RNG."""
        stops = set(self.stop_token_ids())
        results: list[list[list[int]]] = [[] for _ in prompt_ids]
        with torch.random.fork_rng(devices=[] if not torch.cuda.is_available() else None):
            for i, sequences in self._sample(prompt_ids, params, batch_size=len(prompt_ids) or 1, token_budget=None):
                results[i] = [_cut_at_stop(seq, stops) for seq in sequences]
        return results

    def topk_logprobs(self, sequences: list[tuple[list[int], int]], k: int,
                      token_budget: int = DEFAULT_TOKEN_BUDGET) -> list[PositionTopK]:
        scored = score_topk(self.model, sequences, pad_token_id(self.tokenizer), k, token_budget)
        return [PositionTopK(s["topk_ids"].numpy().astype(np.int32), s["topk_logprobs"].numpy().astype(np.float32),
                             s["token_logps"].numpy().astype(np.float32)) for s in scored]

    def score(self, sequences: list[tuple[list[int], int]], token_budget: int = DEFAULT_TOKEN_BUDGET,
              progress: Callable[[int], None] | None = None, entropy: bool = False,
              entropy_top_k: int | None = None) -> list[tuple[float, ...]]:
        """Sequences whose prompts share a prefix are batched together and each batch's prompts prefilled once
        (`prefill`: the shared prefix as one row), the responses scored from that KV cache by the model's own forward
        (`continuation_logps`). With `entropy` (exact here: the full logits are at hand, `entropy_top_k` is not
        needed), or an empty prompt, the forward kernel's `score_sequences` runs each whole sequence."""
        if entropy or any(prompt_length == 0 for _, prompt_length in sequences):
            return score_sequences(self.model, sequences, pad_token_id(self.tokenizer), token_budget, progress, entropy)
        prompts = [ids[:prompt_length] for ids, prompt_length in sequences]
        responses = [ids[prompt_length:] for ids, prompt_length in sequences]
        results: list[tuple[float, ...]] = [(0.0, 0)] * len(sequences)
        self.model.eval()
        for batch in self._batches(prompts, [len(ids) for ids, _ in sequences], len(sequences), token_budget):
            with torch.inference_mode():
                cache, ids, mask = prefill(self.model, [prompts[i] for i in batch], pad_token_id(self.tokenizer),
                                           max(len(responses[i]) for i in batch))
                for i, values in zip(batch, continuation_logps(self.model, cache, ids, mask, [responses[i] for i in batch]),
                                     strict=True):
                    results[i] = values
            if progress is not None:
                progress(len(batch))
        return results

    def close(self) -> None:
        self.model = None


def _cut_at_stop(ids: list[int], stops: set[int]) -> list[int]:
    """Generated ids up to and including the first stop id (`generate` pads a stopped row after it)."""
    return next((ids[: k + 1] for k, token in enumerate(ids) if token in stops), ids)
