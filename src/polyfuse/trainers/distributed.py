"""Sharded training through accelerate: what `accelerate launch` asked for becomes Trainer's settings.

`accelerate launch --config_file <FSDP config>` starts the processes and describes FSDP in environment
variables (`ACCELERATE_USE_FSDP`, `FSDP_VERSION`, `FSDP_TRANSFORMER_CLS_TO_WRAP`, ...). On GPUs
accelerate's own state turns them into FSDP, but with CPU processes (`ACCELERATE_USE_CPU`) it settles on
plain DDP, silently. polyfuse therefore reads the launcher's FSDP variables and passes them to
`TrainingArguments(fsdp=..., fsdp_config=...)`, which shards on CPU (gloo) and GPU alike. DeepSpeed
needs nothing: Trainer takes its plugin from the launcher (`ACCELERATE_USE_DEEPSPEED`), GPU only.

What was actually used is read back from the Trainer's accelerator after it is built
(`distributed_summary`) and recorded in `polyfuse_training.json`, so a run never falls back unseen.
"""

from __future__ import annotations

import os
from typing import Any

from polyfuse.errors import UserError

TRUE = ("true", "1", "yes")


def _flag(name: str, default: str = "false") -> bool:
    return os.environ.get(name, default).lower() in TRUE


def fsdp_from_launcher() -> dict[str, Any]:
    """`TrainingArguments` keyword arguments for the FSDP the launcher asked for; empty without FSDP."""
    if not _flag("ACCELERATE_USE_FSDP"):
        return {}
    config: dict[str, Any] = {
        "version": int(os.environ.get("FSDP_VERSION", "2")),
        "auto_wrap_policy": os.environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP"),
        "reshard_after_forward": _flag("FSDP_RESHARD_AFTER_FORWARD", "true"),
        "state_dict_type": os.environ.get("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT"),
        "cpu_ram_efficient_loading": _flag("FSDP_CPU_RAM_EFFICIENT_LOADING"),
        "cpu_offload": _flag("FSDP_OFFLOAD_PARAMS"),
        "activation_checkpointing": _flag("FSDP_ACTIVATION_CHECKPOINTING"),
    }
    layers = [name for name in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if name.strip()]
    if layers:  # otherwise accelerate wraps the model's `_no_split_modules` (its decoder layer)
        config["transformer_layer_cls_to_wrap"] = layers
    if os.environ.get("FSDP_MIN_NUM_PARAMS"):
        config["min_num_params"] = int(os.environ["FSDP_MIN_NUM_PARAMS"])
    if config["version"] != 2:
        raise UserError(
            f"the accelerate config asks for FSDP version {config['version']}; polyfuse trains with FSDP2 "
            "(fsdp_version: 2), e.g. examples/accelerate/fsdp2.yaml"
        )
    return {"fsdp": True, "fsdp_config": config}


def deepspeed_stage_from_launcher() -> int | None:
    """The ZeRO stage the launcher asked for (None without DeepSpeed)."""
    if not _flag("ACCELERATE_USE_DEEPSPEED"):
        return None
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    return int(stage) if stage and stage.isdigit() else None


def launcher_processes() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_lora_supported(lora: Any) -> None:
    """LoRA is merged into plain weights when saving; under FSDP or ZeRO-3 the adapter's base weights are
    sharded, and merging them is not implemented: refuse before any model is loaded."""
    if lora is None:
        return
    if fsdp_from_launcher() or deepspeed_stage_from_launcher() == 3:
        raise UserError(
            "LoRA with sharded weights (FSDP / DeepSpeed ZeRO-3) is not supported: polyfuse saves LoRA merged "
            "into plain weights. LoRA models are small to train: launch with examples/accelerate/ddp.yaml or "
            "deepspeed-zero2.yaml instead, or drop `lora` for full fine-tuning under FSDP2"
        )


def distributed_summary(accelerator: Any) -> dict[str, Any]:
    """How the run was distributed, as the accelerator used it: type FSDP / DEEPSPEED / DDP / NO."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    summary: dict[str, Any] = {"processes": accelerator.num_processes,
                               "mixed_precision": str(accelerator.mixed_precision),
                               "device": accelerator.device.type}  # fmt: skip
    if kind == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        summary = {"type": "FSDP", **summary, "fsdp_version": plugin.fsdp_version,
                   "reshard_after_forward": bool(plugin.reshard_after_forward)}  # fmt: skip
    elif kind == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        summary = {"type": "DEEPSPEED", **summary, "zero_stage": plugin.zero_stage}
    elif kind == DistributedType.NO:
        summary = {"type": "NO", **summary}
    else:  # MULTI_GPU, MULTI_CPU, ...: data parallel
        summary = {"type": "DDP", **summary, "backend": str(kind)}
    return summary


def launcher_sharding() -> dict[str, Any]:
    """Sharding the launcher asked for, before any model is built (for the memory estimate)."""
    processes = launcher_processes()
    if fsdp_from_launcher():
        return {"type": "FSDP", "processes": processes, "zero_stage": 3}
    stage = deepspeed_stage_from_launcher()
    if stage is not None:
        return {"type": "DEEPSPEED", "processes": processes, "zero_stage": stage}
    return {"type": "DDP" if processes > 1 else "NO", "processes": processes, "zero_stage": 0}


def enable_fsdp_on_cpu(accelerator: Any, plugin_args: dict[str, Any]) -> None:
    """FSDP on CPU processes too. accelerate turns the launcher's FSDP into an FSDP plugin only for
    accelerator devices and otherwise settles on plain DDP (MULTI_CPU), silently. Here the plugin built
    from `fsdp_config` is put in place and both of accelerate's state objects are told the run is FSDP,
    through their public `distributed_type` attribute (an `AcceleratorState` created later, e.g. by the
    optimizer wrapper, copies it from `PartialState`); `accelerator.prepare` then shards the model with
    FSDP2 over the gloo group. The one place polyfuse overrides accelerate's choice; tests/test_ddp.py
    checks that each process holds about half of the parameters."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(**plugin_args)
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP
