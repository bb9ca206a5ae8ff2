"""`backend: transformers` (the default): the model in this process, batched `generate` over left-padded
prompts sorted by length (batches of `batch_size` prompts, or cut by a token budget), and sequence scoring
by the shared forward kernel."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal

from polyfuse.lazy import lazy_import
from polyfuse.models import ModelSpec, load_model
from polyfuse.models.forward import (
    DEFAULT_TOKEN_BUDGET,
    pad_token_id,
    plan_batches,
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

    def _sample(self, prompt_ids: list[list[int]], params: SamplingParams, batch_size: int,
                token_budget: int | None) -> Iterator[tuple[int, list[list[int]]]]:
        """(prompt index, its `params.n` generated id lists, padding after a stop included), batch by batch."""
        tokenizer, model = self.tokenizer, self.model
        pad_id = pad_token_id(tokenizer)
        eos = self.stop_token_ids()
        device = next(model.parameters()).device
        if token_budget is None:
            order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
            per_batch = max(1, batch_size // params.n) if params.n > 1 else batch_size
            batches = [order[start : start + per_batch] for start in range(0, len(order), per_batch)]
        else:  # each row holds its prompt and max_new_tokens, n times
            lengths = [len(ids) + params.max_new_tokens for ids in prompt_ids]
            batches = plan_batches(lengths, max(1, token_budget // params.n))
        start = 0
        for batch in batches:
            width = max(len(prompt_ids[i]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                seq = prompt_ids[i]
                ids[row, width - len(seq) :] = torch.tensor(seq)
                mask[row, width - len(seq) :] = 1
            # `generate` draws from one generator for the whole batch, so per-request seeds cannot apply:
            # the batch is seeded by its offset, and results do not depend on what ran before in this process.
            torch.manual_seed(params.seed + start)
            kwargs: dict[str, Any] = {
                "max_new_tokens": params.max_new_tokens,
                "num_return_sequences": params.n,
                "pad_token_id": pad_id,
                "eos_token_id": eos,
                "repetition_penalty": params.repetition_penalty,
            }
            if params.stop:  # transformers keeps the stop string in the ids: `response_text` cuts it
                kwargs.update(stop_strings=params.stop, tokenizer=tokenizer)
            if params.greedy:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            else:
                kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
            with torch.inference_mode():  # around the call, not the generator: its consumer runs between yields
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
            new = out[:, width:].tolist()
            for k, i in enumerate(batch):
                yield i, new[k * params.n : (k + 1) * params.n]
            start += len(batch)

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
        """The entropy is always exact here (the full logits are at hand): `entropy_top_k` is not needed."""
        return score_sequences(self.model, sequences, pad_token_id(self.tokenizer), token_budget, progress, entropy)

    def close(self) -> None:
        self.model = None


def _cut_at_stop(ids: list[int], stops: set[int]) -> list[int]:
    """Generated ids up to and including the first stop id (`generate` pads a stopped row after it)."""
    return next((ids[: k + 1] for k, token in enumerate(ids) if token in stops), ids)
