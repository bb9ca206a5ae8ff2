"""The one loader for models and tokenizers: hub id, local folder or GGUF file.

Safe by default: `trust_remote_code` is off and only safetensors weights are read unless the user
explicitly allows pickles (`allow_pickle: true`). GGUF files are not pickles and load either way: a model is
loaded from the GGUF file's export, made once into the cache (`polyfuse.models.gguf`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field

from polyfuse.config import StrictModel
from polyfuse.errors import UserError
from polyfuse.models.gguf import cached_export, check_gguf_file, is_gguf_path


class ModelSpec(StrictModel):
    """Where a model comes from and how to load it. `path` is a hub id, a local folder, or a `.gguf`
    file (or give the folder in `path` and the file name in `gguf_file`)."""

    name: str | None = Field(default=None, description="Short name used in data rows; defaults to the path's last part.")
    path: str = Field(description="Hub id (org/name), local folder, or .gguf file.")
    gguf_file: str | None = Field(default=None, description="The .gguf file inside `path` (a folder or hub repo).")
    revision: str | None = Field(default=None, description="Hub branch, tag or commit.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(default="float32", description="Weights' dtype; auto: the checkpoint's.")
    device: str = Field(default="cpu", description="cpu, cuda, cuda:1, mps.")
    trust_remote_code: bool = Field(default=False, description="Run the model repository's own Python code (only for repos you trust).")
    allow_pickle: bool = Field(default=False, description="Also read pickle (.bin) weights, which can run code; default: safetensors only.")

    @property
    def label(self) -> str:
        name = Path(self.path.rstrip("/")).name
        return self.name or (name[: -len(".gguf")] if is_gguf_path(name) else name)

    def location(self) -> tuple[str, str | None]:
        """(folder or hub id, gguf file name or None)."""
        if self.gguf_file is None and is_gguf_path(self.path):
            file = Path(self.path.rstrip("/"))
            return str(file.parent), file.name
        return self.path, self.gguf_file


def looks_local(path: str) -> bool:
    """Whether `path` can only mean a local folder or file, never a hub id (`org/name`).

    A hub id has at most one slash and no leading `.`, `/` or `~`; a path whose first part is an existing
    folder (`models/pivot` with a `models/` here) is local too. Offline (`HF_HUB_OFFLINE=1`) everything is local.
    Deciding this up front turns a typo in a local path into "no such folder" at once, instead of a minute
    of retried hub requests ending in an unrelated message.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or is_gguf_path(path):
        return True
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or "\\" in path:
        return True
    return "/" in path and Path(path.split("/", 1)[0]).is_dir()


def check_device(spec: ModelSpec) -> None:
    """Refuse a device this machine does not have, before any weight is read."""
    import torch

    try:
        device = torch.device(spec.device)
    except RuntimeError:
        raise UserError(f"{spec.label}: device {spec.device!r} is not a device name (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise UserError(f"{spec.label}: device {spec.device!r} not available (this machine has {count} CUDA devices)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{spec.label}: device 'mps' not available on this machine")


def check_location(spec: ModelSpec, needs_config: bool = True) -> None:
    """Refuse a missing folder, a folder without `config.json` or a file that is not GGUF, naming the path."""
    folder, gguf = spec.location()
    if gguf is not None:
        check_gguf_file(Path(folder).expanduser() / gguf, spec.label)
        return
    local = Path(folder).expanduser()
    if local.exists() or looks_local(folder):
        if not local.is_dir():
            kind = "is a file, expected a model folder" if local.exists() else "no such folder"
            raise UserError(f"{spec.label}: {folder}: {kind}")
        if needs_config and not (local / "config.json").is_file():
            raise UserError(f"{spec.label}: {folder}: no config.json in this folder; is it a Hugging Face model folder?")


def resolved(spec: ModelSpec, export: bool = True) -> ModelSpec:
    """`spec` with a GGUF file replaced by the folder of its export (same name): exported on first use, or, with
    `export=False` (a tokenizer or config needs no weights), only where the export exists already."""
    folder, gguf = spec.location()
    if gguf is None:
        return spec
    check_location(spec)
    exported = cached_export(Path(folder).expanduser() / gguf, spec.label, export=export)
    return spec if exported is None else spec.model_copy(update={"name": spec.label, "path": str(exported), "gguf_file": None})


def _common_kwargs(spec: ModelSpec) -> dict:
    _, gguf = spec.location()
    kwargs: dict = {"trust_remote_code": spec.trust_remote_code}
    if spec.revision:
        kwargs["revision"] = spec.revision
    if gguf is not None:
        kwargs["gguf_file"] = gguf
    return kwargs


def load_tokenizer(spec: ModelSpec, padding_side: str = "right"):
    from transformers import AutoTokenizer

    spec = resolved(spec, export=False)
    folder, _ = spec.location()
    check_location(spec, needs_config=False)
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

    spec = resolved(spec, export=False)
    folder, _ = spec.location()
    check_location(spec)
    try:
        return AutoConfig.from_pretrained(folder, **_common_kwargs(spec))
    except (OSError, ValueError) as err:
        raise UserError(f"{spec.label}: cannot load config from {folder!r}: {err}") from None


def load_generation_config(spec: ModelSpec):
    """The model's `GenerationConfig` (EOS ids, default sampling), as `generate` in transformers sees it: the
    folder's `generation_config.json`, else derived from `config.json` (so for GGUF files not exported yet)."""
    from transformers import GenerationConfig

    spec = resolved(spec, export=False)
    folder, gguf = spec.location()
    if gguf is None:
        try:
            return GenerationConfig.from_pretrained(folder, revision=spec.revision)
        except OSError:
            pass
    return GenerationConfig.from_model_config(load_config(spec))


def load_model(spec: ModelSpec, task: Literal["causal-lm", "sequence-classification"] = "causal-lm"):
    """Load a model in eval mode on `spec.device` (a GGUF file from its export, made on first use)."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    check_device(spec)
    spec = resolved(spec)
    folder, _ = spec.location()
    check_location(spec)
    kwargs = _common_kwargs(spec)
    kwargs["dtype"] = "auto" if spec.dtype == "auto" else getattr(torch, spec.dtype)
    if not spec.allow_pickle:
        kwargs["use_safetensors"] = True
    try:
        model = auto.from_pretrained(folder, **kwargs)
    except OSError as err:
        hint = "" if spec.allow_pickle else " (only safetensors are read unless allow_pickle: true)"
        raise UserError(f"{spec.label}: cannot load model from {folder!r}{hint}: {err}") from None
    except (SafetensorError, ValueError) as err:  # a truncated or corrupted weights file, an unknown model type
        raise UserError(f"{spec.label}: cannot load model from {folder!r}: {err}") from None
    return model.to(spec.device).eval()
