"""`backend: transformers` (the default): the model in this process, batched `generate` over left-padded
prompts sorted by length (batches of `batch_size` prompts, or cut by a token budget), and sequence scoring
by the shared forward kernel."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from polyfuse.lazy import inference_mode, lazy_import
from polyfuse.models import ModelSpec, load_model
from polyfuse.models.forward import DEFAULT_TOKEN_BUDGET, pad_token_id, plan_batches, score_sequences
from polyfuse.models.templates import decode_response, render_prompt
from polyfuse.sampling.base import BACKENDS, Backend, BackendSettings, Done, SamplingParams

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

    @inference_mode
    def generate(self, prompts: list[Any], params: SamplingParams, done: Done, seeds: list[int] | None = None,
                 batch_size: int = 32, token_budget: int | None = None) -> None:
        tokenizer, model = self.tokenizer, self.model
        encoded = [render_prompt(tokenizer, p) for p in prompts]
        pad_id = pad_token_id(tokenizer)
        eos = self.stop_token_ids()
        device = next(model.parameters()).device
        if token_budget is None:
            order = sorted(range(len(prompts)), key=lambda i: len(encoded[i][0]))
            per_batch = max(1, batch_size // params.n) if params.n > 1 else batch_size
            batches = [order[start : start + per_batch] for start in range(0, len(order), per_batch)]
        else:  # each row holds its prompt and max_new_tokens, n times
            lengths = [len(ids) + params.max_new_tokens for ids, _ in encoded]
            batches = plan_batches(lengths, max(1, token_budget // params.n))
        start = 0
        for batch in batches:
            width = max(len(encoded[i][0]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                seq = encoded[i][0]
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
            if params.greedy:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            else:
                kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
            new = out[:, width:].tolist()
            for k, i in enumerate(batch):
                texts = new[k * params.n : (k + 1) * params.n]
                done(i, [decode_response(tokenizer, seq) for seq in texts])
            start += len(batch)

    def score(self, sequences: list[tuple[list[int], int]], token_budget: int = DEFAULT_TOKEN_BUDGET,
              progress: Callable[[int], None] | None = None, entropy: bool = False,
              entropy_top_k: int | None = None) -> list[tuple[float, ...]]:
        """The entropy is always exact here (the full logits are at hand): `entropy_top_k` is not needed."""
        return score_sequences(self.model, sequences, pad_token_id(self.tokenizer), token_budget, progress, entropy)

    def close(self) -> None:
        self.model = None
