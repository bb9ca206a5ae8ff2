"""Post-merge smoke check: a "successful" merge can still be garbage (spec section 13).

Load the output like any checkpoint, run one forward pass on a fixed text, require finite logits, and
report its perplexity next to the base's, so a collapsed merge shows up as a number, not a surprise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from polyfuse.errors import UserError
from polyfuse.models import ModelSpec, load_model, load_tokenizer

SMOKE_TEXT = ("The quick brown fox jumps over the lazy dog. The cat sat on the mat, and one, two, three "
              "small dogs ran on the big red mat.")


@dataclass
class SmokeResult:
    perplexity: float
    base_perplexity: float


def perplexity(spec: ModelSpec) -> float:
    """Perplexity of SMOKE_TEXT; raises when the logits are not finite."""
    model, tokenizer = load_model(spec), load_tokenizer(spec)
    limit = getattr(model.config, "max_position_embeddings", None)
    ids = tokenizer(SMOKE_TEXT, return_tensors="pt").input_ids[:, :limit]
    with torch.no_grad():
        output = model(input_ids=ids, labels=ids)
    if not torch.isfinite(output.logits).all():
        raise UserError(f"{spec.path}: smoke check failed: the forward pass gives non-finite logits "
                        f"(the merge produced NaN/Inf weights)")
    return math.exp(output.loss.item())


def smoke_check(out: str, base: str, allow_pickle: bool = False) -> SmokeResult:
    """Stored dtypes (`auto`): a 7B check should not need fp32 copies; one model in memory at a time."""
    merged = perplexity(ModelSpec(path=out, dtype="auto"))
    return SmokeResult(merged, perplexity(ModelSpec(path=base, dtype="auto", allow_pickle=allow_pickle)))
