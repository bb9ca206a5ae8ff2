"""Post-merge smoke check: a "successful" merge can still be garbage (mergekit users report
garbled output after merges that raised no error).

Load the output like any checkpoint, with the class its config names (a causal LM through
`polyfuse.models.load_model`; a multimodal model such as LLaVA through its own class, text only), run one
forward pass on a fixed text, require finite logits, and report its perplexity next to the base's, so a
collapsed merge shows up as a number, not a surprise. Probe ids: the text's, or ids 0..31 of the vocabulary
when there is no tokenizer or it encodes the text to fewer than two ids. When no transformers class fits the
config, the check is skipped with a line that says why.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from polyfuse.errors import UserError
from polyfuse.models import ModelSpec, load_model, load_tokenizer

SMOKE_TEXT = ("The quick brown fox jumps over the lazy dog. The cat sat on the mat, and one, two, three "
              "small dogs ran on the big red mat.")
FALLBACK_IDS = 32


@dataclass
class SmokeResult:
    perplexity: float = math.nan
    base_perplexity: float = math.nan
    skipped: str = ""  # why no check ran; "" when it ran
    detail: str = ""  # how the probe was built, when not from the text


def _model_class(folder: str):
    """The transformers class to load `folder` with, or a reason string when none fits."""
    import transformers

    config = json.loads((Path(folder) / "config.json").read_text())
    names = config.get("architectures") or []
    if not names:
        return "config.json names no architecture"
    cls = getattr(transformers, names[0], None)
    if cls is None:
        return f"transformers has no class {names[0]} (custom code is not run by the smoke check)"
    return cls


def _load(spec: ModelSpec):
    cls = _model_class(spec.path)
    if isinstance(cls, str):
        return cls
    if cls.__name__.endswith("ForCausalLM"):
        return load_model(spec)
    kwargs = {"dtype": "auto", "trust_remote_code": False}
    if spec.allow_pickle:
        kwargs["use_safetensors"] = False
    return cls.from_pretrained(spec.path, **kwargs).eval()


def _probe(spec: ModelSpec, model) -> tuple[torch.Tensor, str]:
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    vocab = int(getattr(text_config, "vocab_size", FALLBACK_IDS) or FALLBACK_IDS)
    limit = getattr(text_config, "max_position_embeddings", None) or 1 << 30
    try:
        ids = load_tokenizer(spec)(SMOKE_TEXT, return_tensors="pt").input_ids[:, :limit]
        why = "the tokenizer encodes the probe text to fewer than 2 ids"
    except (OSError, ValueError, TypeError, KeyError, AttributeError, UserError):
        ids, why = torch.zeros(1, 0, dtype=torch.long), "no tokenizer"
    if ids.shape[1] >= 2 and int(ids.max()) < vocab:
        return ids, ""
    if ids.shape[1] >= 2:
        why = "the tokenizer gives ids beyond the embedding rows"
    count = max(2, min(FALLBACK_IDS, vocab, limit))
    return torch.arange(count).remainder(vocab).unsqueeze(0), f"; {why}: probed with ids 0..{count - 1}"


def perplexity(spec: ModelSpec) -> tuple[float, str] | str:
    """(perplexity of the probe, how the probe was built), or why no check can run; raises when the logits
    are not finite."""
    model = _load(spec)
    if isinstance(model, str):
        return model
    ids, detail = _probe(spec, model)
    with torch.no_grad():
        output = model(input_ids=ids)
    logits = output.logits.float()
    if not torch.isfinite(logits).all():
        raise UserError(f"{spec.path}: smoke check failed: the forward pass gives non-finite logits "
                        f"(the merge produced NaN/Inf weights)")
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return float(torch.exp(loss)), detail  # inf, not an OverflowError, for a loss above ~709 nats


def smoke_check(out: str, base: str, allow_pickle: bool = False) -> SmokeResult:
    """Stored dtypes (`auto`): a 7B check should not need fp32 copies; one model in memory at a time."""
    merged = perplexity(ModelSpec(path=out, dtype="auto"))
    if isinstance(merged, str):
        return SmokeResult(skipped=f"{out}: {merged}")
    reference = perplexity(ModelSpec(path=base, dtype="auto", allow_pickle=allow_pickle))
    if isinstance(reference, str):
        return SmokeResult(merged[0], skipped="", detail=merged[1] + f"; base not checked: {reference}")
    return SmokeResult(merged[0], reference[0], detail=merged[1])
