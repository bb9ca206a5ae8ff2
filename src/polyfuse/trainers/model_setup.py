"""What is done to the policy before training: a LoRA adapter (peft) and dropout switched off.

Dropout is switched off as TRL's DPOTrainer does, and further: TRL zeroes `nn.Dropout` modules only, but
attention dropout read from a float attribute (Llama's `attention_dropout`, passed to the attention kernel
while `model.training`) is not a module, so the float attributes named like a dropout rate are zeroed too,
on the modules and on the configs. The configs' own rates are written back before saving
(`ZeroedDropout.restore`), so the saved model keeps the rates it came with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import set_seed


def add_lora(model: Any, lora: Any, seed: int) -> Any:
    """`model` wrapped in the LoRA adapter `lora` (a `LoraSettings`), initialised from `seed`."""
    from peft import LoraConfig, get_peft_model

    set_seed(seed)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, task_type="CAUSAL_LM")  # fmt: skip
    return get_peft_model(model, config)


@dataclass
class ZeroedDropout:
    """The config-level rates `disable_dropout` set to 0, keyed by (id of the config, attribute)."""

    rates: dict[tuple[int, str], float] = field(default_factory=dict)
    configs: dict[int, Any] = field(default_factory=dict)

    def restore(self) -> None:
        """Write the configs' own rates back (before saving the model)."""
        for (key, name), value in self.rates.items():
            setattr(self.configs[key], name, value)


def disable_dropout(model: Any) -> ZeroedDropout:
    """Set every dropout rate of `model` to 0: `nn.Dropout` modules, float attributes named like a rate on
    the modules, and on the model's configs (composite configs' sub-configs included)."""
    configs = {}
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
            continue
        for name, value in vars(module).items():
            if _is_dropout_rate(name, value):
                setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            configs[id(config)] = config
            for sub in ("text_config", "vision_config", "audio_config"):
                if getattr(config, sub, None) is not None:
                    configs[id(getattr(config, sub))] = getattr(config, sub)
    zeroed = ZeroedDropout(configs=configs)
    for key, config in configs.items():
        for name, value in list(vars(config).items()):
            if _is_dropout_rate(name, value):
                zeroed.rates[(key, name)] = value
                setattr(config, name, 0.0)
    return zeroed


def _is_dropout_rate(name: str, value: Any) -> bool:
    return (
        isinstance(value, float)
        and not isinstance(value, bool)
        and value > 0
        and ("dropout" in name or name.endswith("pdrop"))
    )
