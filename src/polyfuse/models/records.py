"""What a stage records about each model it ran: its spec, content hash, tokenizer and template mode."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from polyfuse.data.hashing import hash_path
from polyfuse.models.loader import ModelSpec


def model_record(spec: ModelSpec, tokenizer: Any, modes: Counter) -> dict[str, Any]:
    folder, gguf = spec.location()
    return {
        **spec.model_dump(),
        "name": spec.label,
        "hash": hash_path(Path(folder) / gguf if gguf else folder),
        "tokenizer": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "template_mode": modes.most_common(1)[0][0] if len(modes) == 1 else dict(modes),
    }
