"""Peak memory per device, estimated before any weight is loaded, and a refusal when it cannot fit.

What is counted (bytes per device):
- **Model states.** Trainer keeps fp32 weights also under bf16 autocast, so a trainable parameter costs
  4 (weight) + 4 (gradient) + 8 (AdamW's two moments) = the well-known 16 bytes of mixed-precision
  AdamW; SGD has no state (8 bytes). A frozen parameter (LoRA's base) costs its 4-byte weight.
  FSDP2 and DeepSpeed ZeRO-3 divide all of it by the process count, ZeRO-2 the gradients and optimizer
  state only, DDP nothing.
- **Activations** of the largest possible micro-batch: `batch_size x sequences per item x max_length`
  tokens (sequences per item: 1 for SFT and distillation, 2 or 3 for preference objectives), each
  keeping about `10 x hidden + 4 x intermediate` values per layer for the backward (one layer's worth
  and the layer inputs with gradient checkpointing), plus the LM head's logits with their fp32 upcast,
  log-softmax and gradient (`12 x vocab` bytes per token, fp32). Values are 2 bytes under bf16, else 4.
- **On CPU (fp32)**, where the process's resident memory is what fills up, also the runtime itself
  (Python, torch, transformers: `RUNTIME_BYTES`) and, while the weights load, a second copy of them
  (the state dict read from disk beside the model: its own part, `loading copy`); the devices are the
  host's available memory shared by the local processes.

Each part is labelled by what it counts: `weights` is 4 bytes per parameter (fp32, the precision Trainer
keeps), so 134.5M parameters are 0.50 GiB of weights, plus 0.50 GiB of loading copy on CPU.

It is an upper bound for rows shorter than `max_length`; `bench/memory_estimate.py` compares it with the
measured peak.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from polyfuse.errors import UserError
from polyfuse.progress import note
from polyfuse.trainers.distributed import launcher_sharding

logger = logging.getLogger(__name__)

GIB = 1024**3
RUNTIME_BYTES = 600 * 1024**2  # Python + torch + transformers + datasets resident on CPU, measured ~0.5-0.7 GiB


@dataclass
class MemoryEstimate:
    parameters: int
    trainable: int
    sharding: dict[str, Any]
    parts: dict[str, float]  # bytes per device
    device: str
    available: float | None  # bytes per device, None when unknown

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def describe(self) -> str:
        parts = ", ".join(f"{name} {value / GIB:.2f}" for name, value in self.parts.items())
        fits = "" if self.available is None else f"; available {self.available / GIB:.2f} GiB per {self.device}"
        return (f"memory estimate: {self.total / GIB:.2f} GiB per {self.device} ({parts} GiB) for "
                f"{self.parameters / 1e6:.1f}M parameters ({self.trainable / 1e6:.1f}M trainable), "
                f"{self.sharding['type']} x {self.sharding['processes']}{fits}")  # fmt: skip


def meta_model(spec: Any) -> Any:
    """The model built on the meta device from its config: shapes without weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from polyfuse.models.loader import _common_kwargs

    folder, _ = spec.location()
    try:
        config = AutoConfig.from_pretrained(folder, **_common_kwargs(spec))
    except OSError as err:
        raise UserError(f"{spec.label}: cannot read the model config from {folder!r}: {err}") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)


def lora_parameters(model: Any, lora: Any) -> int:
    """Adapter parameters LoRA adds: r x (in + out) per targeted linear layer (all-linear: every linear
    layer but the LM head)."""
    count = 0
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        if lora.target_modules == "all-linear" or name.rsplit(".", 1)[-1] in lora.target_modules:
            count += lora.r * (module.in_features + module.out_features)
    return count


def estimate_memory(spec: Any, config: Any, sequences_per_item: int) -> MemoryEstimate:
    model = meta_model(spec)
    text = model.config.get_text_config()
    parameters = sum(p.numel() for p in model.parameters())
    adapters = lora_parameters(model, config.lora) if config.lora is not None else 0
    trainable = adapters or parameters
    frozen = parameters if adapters else 0
    sharding = launcher_sharding()
    shards, stage = max(sharding["processes"], 1), sharding["zero_stage"]
    optimizer_bytes = 0 if config.optim.startswith("sgd") else 8
    weights = 4 * (trainable + frozen)
    gradients, optimizer = 4 * trainable, optimizer_bytes * trainable
    if stage == 3:
        weights, gradients, optimizer = weights / shards, gradients / shards, optimizer / shards
    elif stage == 2:
        gradients, optimizer = gradients / shards, optimizer / shards

    cuda = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("true", "1")
    value_bytes = 2 if config.bf16 else 4
    positions = getattr(text, "max_position_embeddings", None) or config.max_length
    tokens = config.batch_size * sequences_per_item * min(config.max_length, positions)
    hidden, layers = text.hidden_size, text.num_hidden_layers
    intermediate = getattr(text, "intermediate_size", None) or 4 * hidden
    per_layer = 10 * hidden + 4 * intermediate
    kept = (layers * hidden + per_layer) if config.gradient_checkpointing else layers * per_layer
    parts = {"weights": weights, "gradients": gradients, "optimizer": optimizer,
             "activations": tokens * kept * value_bytes, "logits": tokens * text.vocab_size * 12}  # fmt: skip
    if cuda:
        free, _ = torch.cuda.mem_get_info(int(os.environ.get("LOCAL_RANK", 0)))
        available, device = float(free), "GPU"
    else:
        parts["runtime"] = RUNTIME_BYTES
        # Loading holds the state dict read from disk and the model at once: a second copy of the weights.
        loading = 2 * 4 * parameters / (shards if stage == 3 else 1) - parts["weights"]
        if loading > 0:
            parts["loading copy"] = loading
        import psutil

        local = int(os.environ.get("LOCAL_WORLD_SIZE", sharding["processes"]))
        available, device = psutil.virtual_memory().available / max(local, 1), "CPU process"
    return MemoryEstimate(parameters, trainable, sharding, parts, device, available)


def check_memory(spec: Any, config: Any, sequences_per_item: int) -> MemoryEstimate:
    """Print the estimate (main process) and refuse a run that cannot fit, unless `config.force`."""
    estimate = estimate_memory(spec, config, sequences_per_item)
    if int(os.environ.get("RANK", "0")) == 0:
        note(estimate.describe())
    if estimate.available is not None and estimate.total > estimate.available and not config.force:
        raise UserError(
            f"{spec.label}: training needs about {estimate.total / GIB:.1f} GiB per {estimate.device} but "
            f"{estimate.available / GIB:.1f} GiB is available ({estimate.describe()}). Lower batch_size or "
            "max_length, turn on gradient_checkpointing, use LoRA, or shard over more devices "
            "(examples/accelerate/fsdp2.yaml); --force (force: true) trains anyway"
        )
    return estimate
