"""Batched `generate` with transformers: left-padded batches of prompts sorted by length."""

from __future__ import annotations

from typing import Any

import torch

from polyfuse.models.forward import pad_token_id
from polyfuse.models.templates import decode_response, render_prompt
from polyfuse.sampling.base import BACKENDS, Backend, SamplingParams


@BACKENDS.register("transformers")
class TransformersBackend(Backend):
    @torch.inference_mode()
    def generate(self, prompts: list[Any], params: SamplingParams, progress: Any = None) -> list[list[str]]:
        tokenizer, model = self.tokenizer, self.model
        encoded = [render_prompt(tokenizer, p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i][0]))
        results: list[list[str]] = [[] for _ in prompts]
        pad_id = pad_token_id(tokenizer)
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        device = next(model.parameters()).device
        per_batch = max(1, self.batch_size // params.n) if params.n > 1 else self.batch_size
        generator_seed = params.seed
        for start in range(0, len(order), per_batch):
            batch = order[start : start + per_batch]
            width = max(len(encoded[i][0]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                seq = encoded[i][0]
                ids[row, width - len(seq) :] = torch.tensor(seq)
                mask[row, width - len(seq) :] = 1
            # Seed per batch, so results do not depend on what ran before in this process.
            torch.manual_seed(generator_seed + start)
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
            for k, seq in enumerate(new):
                i = batch[k // params.n]
                results[i].append(decode_response(tokenizer, seq, encoded[i][1]))
            if progress is not None:
                progress(len(batch))
        return results
