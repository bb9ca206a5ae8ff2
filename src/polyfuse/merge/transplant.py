"""Tokenizer transplant (`polyfuse transplant --model MODEL --donor DONOR -o OUT`): give MODEL the DONOR's vocabulary
without training, through mergekit's `mergekit-tokensurgeon` (arXiv 2506.06607), which polyfuse runs as it is and
never re-implements.

tokensurgeon keeps MODEL's embedding rows of the tokens both vocabularies share, and approximates the rows of the
donor's other tokens. polyfuse's default is mergekit's own, and what its documentation recommends for most models:
`omp` (orthogonal matching pursuit: each new token's donor embedding as a sparse combination of at most `k` = 64
shared tokens, the same coefficients applied in MODEL's space). The other methods are options. `k` above the
donor's hidden size is refused: tokensurgeon 0.1.5 then returns embeddings of norm ~1e6 (measured on a 32-wide
toy donor: k 32 gives norms like the model's own, k 33 and 64 do not).

Pinned to mergekit 0.1.5 (its command line and output are what this module reads). The inputs are checked before
any work: local model folders with safetensors weights and a tokenizer, different vocabularies, a free output.
The output is written to a temporary folder and moved into place when complete, with `transplant.json`, which
records the mergekit version, the command, both inputs' content hashes, the token breakdown tokensurgeon reported
and the wall time; the same command again skips a finished transplant and redoes one whose inputs changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from polyfuse.data.hashing import hash_path
from polyfuse.data.io import atomic_write_folder, write_json
from polyfuse.errors import ConfigError, UserError

MERGEKIT_VERSION = "0.1.5"
MANIFEST = "transplant.json"
Method = Literal["omp", "common_interpolation", "subword", "mean", "zero", "randn", "john_hewitt", "landmark_pca",
                 "stb", "mp_rope"]
METHODS: tuple[str, ...] = Method.__args__
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class TransplantOptions:
    """tokensurgeon's settings that polyfuse exposes: the approximation method and its sparsity / neighbour
    count `k`, and the device its matrix arithmetic runs on."""

    method: Method = "omp"
    k: int = 64
    device: str = "cpu"
    quiet: bool = False


@dataclass(frozen=True)
class TransplantResult:
    out: Path
    skipped: bool  # an earlier identical transplant was kept
    manifest: dict[str, Any]


def check_mergekit() -> str:
    """The installed mergekit version, which must be the pinned one."""
    try:
        version = metadata.version("mergekit")
    except metadata.PackageNotFoundError:
        raise UserError(f"polyfuse transplant runs mergekit-tokensurgeon: pip install mergekit=={MERGEKIT_VERSION}") from None
    if version != MERGEKIT_VERSION:
        raise UserError(f"polyfuse transplant is pinned to mergekit {MERGEKIT_VERSION} (its tokensurgeon's command line "
                        f"and output), found {version}: pip install mergekit=={MERGEKIT_VERSION}")
    return version


def _check_model_folder(path: Path, role: str) -> dict[str, Any]:
    """A local model folder tokensurgeon can read safely: config.json, safetensors weights, a tokenizer."""
    if path.suffix == ".gguf":
        raise UserError(f"{role} {path}: a GGUF file; tokensurgeon reads model folders: export it first "
                        "(transformers' de-quantising GGUF load, then save_pretrained)")
    if not path.is_dir():
        raise UserError(f"{role} {path}: no such folder (polyfuse transplant takes local model folders)")
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise UserError(f"{role} {path}: no config.json, expected a Hugging Face model folder") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{role} {path / 'config.json'}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not any(path.glob("*.safetensors")):
        pickles = any(path.glob("*.bin")) or any(path.glob("*.pt"))
        raise UserError(f"{role} {path}: no .safetensors weights" + (" (pickle checkpoints are not read: they can run "
                                                                    "code; convert them to safetensors)" if pickles else ""))
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{role} {path}: no tokenizer ({', '.join(TOKENIZER_FILES)})")
    return config


def _hidden_size(config: dict[str, Any]) -> int | None:
    """The embedding width from config.json (multimodal configs keep it in `text_config`; GPT-2 calls it n_embd)."""
    config = config.get("text_config") or config
    return config.get("hidden_size") or config.get("n_embd")


def _vocabulary(path: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False).get_vocab()


def check_inputs(model: Path, donor: Path, out: Path, options: TransplantOptions) -> None:
    """Everything tokensurgeon would fail on late, or that is not safe, refused at once (exit 2)."""
    check_mergekit()
    if options.method not in METHODS:
        raise ConfigError(f"transplant method {options.method!r}: expected one of {', '.join(METHODS)}")
    if options.k < 1:
        raise ConfigError(f"transplant k must be >= 1, got {options.k}")
    _check_model_folder(model, "MODEL")
    width = _hidden_size(_check_model_folder(donor, "DONOR"))
    if out.resolve() in (model.resolve(), donor.resolve()):
        raise UserError(f"OUT {out}: is one of the inputs; choose a new folder")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise UserError(f"OUT {out}: exists and is not a polyfuse transplant; choose a new folder or remove it")
    if _vocabulary(model) == _vocabulary(donor):
        raise UserError(f"MODEL {model} and DONOR {donor} have the same vocabulary: nothing to transplant")
    if options.method == "omp" and width is not None and options.k > width:
        raise ConfigError(f"transplant k {options.k} is larger than DONOR {donor}'s hidden size {width}: omp fits "
                          f"each new token with k of the donor's embeddings, and more than {width} of them make the "
                          f"fit degenerate (embeddings of norm ~1e6); use k {width} or less")


def tokensurgeon_command(model: Path, donor: Path, out: Path, options: TransplantOptions) -> list[str]:
    """mergekit-tokensurgeon's command line (through this Python, so the pinned mergekit is the one that runs);
    `-v` makes it log its token breakdown, which the manifest records."""
    return [sys.executable, "-m", "mergekit.scripts.tokensurgeon", str(model), str(donor), str(out),
            "--approximation-method", options.method, "--k", str(options.k), "--device", options.device,
            "--no-trust-remote-code", "-v", *(["--quiet"] if options.quiet else [])]


BREAKDOWN = re.compile(r"Token Breakdown:\n((?:[ \t]+.*(?:\n|$))*)")
COUNT = re.compile(r"^\s+([A-Za-z ]+): (\d+)", re.M)


def token_breakdown(log: str) -> list[dict[str, int]]:
    """tokensurgeon's "Token Breakdown" blocks (one per embedding matrix it rebuilt), as dicts."""
    return [{name.lower().replace(" ", "_"): int(count) for name, count in COUNT.findall(block)}
            for block in BREAKDOWN.findall(log)]


def _fingerprint(inputs: dict[str, str], options: TransplantOptions) -> str:
    record = {"inputs": inputs, "method": options.method, "k": options.k, "mergekit": MERGEKIT_VERSION}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _run_tokensurgeon(command: list[str], folder: Path, quiet: bool) -> str:
    """Run it, its output streamed to this process's stderr (unless quiet) and kept in `transplant.log`."""
    # its bars and transformers' messages, which the CLI turns off for its own process (cli.main)
    quieted = ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY")
    environment = {key: value for key, value in os.environ.items() if key not in quieted}
    log_path = folder / "transplant.log"
    with log_path.open("wb") as log, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                       env=environment) as process:
        for chunk in iter(lambda: process.stdout.read1(1 << 16), b""):
            log.write(chunk)
            if not quiet:
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
    text = log_path.read_text(errors="replace")
    if process.returncode != 0:
        tail = "\n".join(text.strip().splitlines()[-3:])
        raise UserError(f"mergekit-tokensurgeon failed (exit {process.returncode}): {tail}")
    return text


def transplant(model: str | Path, donor: str | Path, out: str | Path,
               options: TransplantOptions | None = None) -> TransplantResult:
    """MODEL with DONOR's tokenizer and vocabulary-sized embeddings in OUT (module docstring)."""
    options = options or TransplantOptions()
    model, donor, out = Path(model), Path(donor), Path(out)
    check_inputs(model, donor, out, options)
    inputs = {"model": hash_path(model), "donor": hash_path(donor)}
    fingerprint = _fingerprint(inputs, options)
    if (out / MANIFEST).is_file():
        previous = json.loads((out / MANIFEST).read_text())
        if previous.get("fingerprint") == fingerprint:
            return TransplantResult(out, True, previous)
    manifest: dict[str, Any] = {}

    def write(folder: Path) -> None:
        command = tokensurgeon_command(model, donor, folder, options)
        start = time.perf_counter()
        log = _run_tokensurgeon(command, folder, options.quiet)
        manifest.update({
            "tool": "mergekit-tokensurgeon", "mergekit": MERGEKIT_VERSION, "fingerprint": fingerprint,
            "command": ["mergekit-tokensurgeon", *tokensurgeon_command(model, donor, out, options)[3:]], "method": options.method, "k": options.k,
            "model": {"path": str(model), "hash": inputs["model"]}, "donor": {"path": str(donor), "hash": inputs["donor"]},
            "token_breakdown": token_breakdown(log), "seconds": round(time.perf_counter() - start, 1)})
        write_json(folder / MANIFEST, manifest)

    atomic_write_folder(out, write)
    return TransplantResult(out, False, manifest)
