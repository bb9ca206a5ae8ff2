"""The trained model as a plain HF folder: LoRA merged, the model's own dropout rates, written atomically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from polyfuse.data.io import atomic_write_folder
from polyfuse.trainers.model_setup import ZeroedDropout


def save_trained(trainer: Any, tokenizer: Any, out_dir: Path, summary: dict[str, Any],
                 dropout: ZeroedDropout | None = None) -> Path:
    """Save model (LoRA merged), tokenizer and a training summary as a plain HF folder, atomically
    (`atomic_write_folder`: a temporary folder beside `out_dir` renamed into place, files with the user's
    umask). Sharded weights (FSDP, DeepSpeed ZeRO-3) are gathered into a full state dict by every process
    together (`accelerator.get_state_dict`, a collective); then only the main process writes."""
    out_dir = Path(out_dir)
    accelerator = trainer.accelerator
    accelerator.wait_for_everyone()
    sharded = summary.get("distributed", {}).get("type") in ("FSDP", "DEEPSPEED")
    state_dict = accelerator.get_state_dict(trainer.model) if sharded else None
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(trainer.model)
        if dropout is not None:
            dropout.restore()
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        summary = {**summary, "log_history": trainer.state.log_history}

        def write(staging: Path) -> None:
            model.save_pretrained(staging, state_dict=state_dict)
            tokenizer.save_pretrained(staging)
            (staging / "polyfuse_training.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")

        atomic_write_folder(out_dir, write)
        shutil.rmtree(trainer.args.output_dir, ignore_errors=True)  # Trainer's scratch folder
    accelerator.wait_for_everyone()
    return out_dir
