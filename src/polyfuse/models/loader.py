"""The one loader for models and tokenizers: hub id, local folder or GGUF file.

Safe by default: `trust_remote_code` is off and only safetensors weights are read unless the user
explicitly allows pickles (`allow_pickle: true`). GGUF files are not pickles and load either way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from polyfuse.config import StrictModel
from polyfuse.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelSpec(StrictModel):
    """Where a model comes from and how to load it. `path` is a hub id, a local folder, or a `.gguf`
    file (or give the folder in `path` and the file name in `gguf_file`)."""

    name: str | None = Field(default=None, description="Short name used in data rows; defaults to the path's last part.")
    path: str
    gguf_file: str | None = None
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False
    allow_pickle: bool = False

    @property
    def label(self) -> str:
        return self.name or Path(self.path.rstrip("/")).name.removesuffix(".gguf")

    def location(self) -> tuple[str, str | None]:
        """(folder or hub id, gguf file name or None)."""
        if self.gguf_file is None and self.path.endswith(".gguf"):
            file = Path(self.path)
            return str(file.parent), file.name
        return self.path, self.gguf_file


def _common_kwargs(spec: ModelSpec) -> dict:
    folder, gguf = spec.location()
    if gguf is not None and not (Path(folder) / gguf).is_file() and Path(folder).exists():
        raise UserError(f"{spec.label}: GGUF file {Path(folder) / gguf} not found")
    kwargs: dict = {"trust_remote_code": spec.trust_remote_code}
    if spec.revision:
        kwargs["revision"] = spec.revision
    if gguf is not None:
        kwargs["gguf_file"] = gguf
    return kwargs


def load_tokenizer(spec: ModelSpec, padding_side: str = "right"):
    from transformers import AutoTokenizer

    folder, _ = spec.location()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **_common_kwargs(spec))
    except (OSError, ValueError) as err:
        raise UserError(f"{spec.label}: cannot load tokenizer from {folder!r}: {err}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_config(spec: ModelSpec):
    """The model's `PretrainedConfig` (context size, architecture) without loading weights."""
    from transformers import AutoConfig

    folder, _ = spec.location()
    try:
        return AutoConfig.from_pretrained(folder, **_common_kwargs(spec))
    except (OSError, ValueError) as err:
        raise UserError(f"{spec.label}: cannot load config from {folder!r}: {err}") from None


def load_model(spec: ModelSpec, task: Literal["causal-lm", "sequence-classification"] = "causal-lm"):
    """Load a model in eval mode on `spec.device`."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    folder, gguf = spec.location()
    kwargs = _common_kwargs(spec)
    kwargs["dtype"] = "auto" if spec.dtype == "auto" else DTYPES[spec.dtype]
    if gguf is None and not spec.allow_pickle:
        kwargs["use_safetensors"] = True
    try:
        model = auto.from_pretrained(folder, **kwargs)
    except OSError as err:
        hint = "" if spec.allow_pickle else " (only safetensors are read unless allow_pickle: true)"
        raise UserError(f"{spec.label}: cannot load model from {folder!r}{hint}: {err}") from None
    if gguf is not None:
        # transformers de-quantises GGUF weights into dense tensors of `dtype` but keeps a quantizer marker,
        # which makes Trainer refuse to fine-tune and save_pretrained write a GGUF quantization config.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
    return model.to(spec.device).eval()
