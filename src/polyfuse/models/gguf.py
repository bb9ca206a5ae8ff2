"""GGUF in, safetensors out.

transformers reads a GGUF file (`gguf_file=`) by de-quantising every tensor and converting the vocabulary on
every load, keeps a quantizer marker with which `save_pretrained` refuses ("not serializable") and Trainer
refuses to fine-tune, and vLLM treats a folder whose config.json has a GGUF `quantization_config` as GGUF.
So polyfuse exports a GGUF file once into a plain model folder: float32 safetensors (the de-quantised values
exactly: a K-quant's scale times its integer is not representable in 16 bits), config.json without
`quantization_config`, the tokenizer with its chat template, the generation config, and `polyfuse_export.json`
recording the source file (sha256, size, architecture, quantisation). A `.gguf` given wherever a model folder
is accepted is exported on first use into `<cache>/gguf/<sha256>/` and every later load (transformers, vLLM,
the merge) reads that folder.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import struct
from collections import Counter
from pathlib import Path
from typing import Any

from polyfuse import __version__
from polyfuse.config import cache_root
from polyfuse.data.hashing import file_digest
from polyfuse.data.io import atomic_write_folder, remove_stale_temporaries, write_json
from polyfuse.errors import UserError
from polyfuse.progress import note

RECORD = "polyfuse_export.json"
_STRING = 8  # GGUF's value type of a string


def cache_dir() -> Path:
    """Where `.gguf` files given as models are exported: `<cache>/gguf/` (`polyfuse.config.cache_root`)."""
    return cache_root() / "gguf"


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    return file_digest(Path(path))


def sha256(file: Path) -> str:
    """The file's sha256, hashed once per process while its size and modification time stay the same."""
    stat = file.stat()
    return _digest(str(file.resolve()), stat.st_size, stat.st_mtime_ns)


def is_gguf_path(path: str) -> bool:
    """A path that names a GGUF file (`.gguf` in any case; a trailing slash does not make it a folder)."""
    return path.rstrip("/").lower().endswith(".gguf")


def check_gguf_file(file: Path, label: str) -> None:
    """Refuse a missing file, a folder, or a file without the GGUF magic bytes, naming it."""
    if not file.is_file():
        raise UserError(f"{label}: {file}: {'is a folder, expected a GGUF file' if file.is_dir() else 'no such file'}")
    with file.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise UserError(f"{label}: {file} is not a GGUF file (it does not start with the GGUF magic bytes); "
                            "give a .gguf file written by llama.cpp or a model folder")


def architecture(file: Path) -> str:
    """`general.architecture` of a GGUF file from its first bytes (llama.cpp writes that key first), else
    from the full metadata."""
    with file.open("rb") as handle:
        handle.read(24)  # magic, version, tensor count, metadata count
        try:
            (length,) = struct.unpack("<Q", handle.read(8))
            key = handle.read(min(length, 64))
            (kind,) = struct.unpack("<I", handle.read(4))
            if key == b"general.architecture" and kind == _STRING:
                (length,) = struct.unpack("<Q", handle.read(8))
                return handle.read(min(length, 256)).decode()
        except (struct.error, UnicodeDecodeError):
            pass
    return str(info(file)["architecture"])


@functools.lru_cache(maxsize=1)
def supported_architectures() -> frozenset[str]:
    """The GGUF architectures transformers' loader reads."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    names = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}
    with contextlib.suppress(ImportError):  # transformers >= 5: the architectures its own GGUF reader adds
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS

        names |= set(GGUF_CONFIG_ARCHS)
    return frozenset(names)


def is_supported(name: str) -> bool:
    """Whether transformers de-quantises GGUF architecture `name` (llama.cpp spells some names differently:
    `qwen2moe` is transformers' `qwen2_moe`)."""
    return bool({name, name.replace("-", "_"), re.sub("moe$", "_moe", name)} & supported_architectures())


def check_gguf(file: Path, label: str) -> None:
    """Refuse, before any work, a missing file, a file that is not GGUF, or an architecture this transformers
    cannot de-quantise, saying what to do instead."""
    from transformers import __version__ as transformers_version

    check_gguf_file(file, label)
    name = architecture(file)
    if not is_supported(name):
        raise UserError(
            f"{label}: {file}: transformers {transformers_version} cannot de-quantise GGUF architecture {name!r} "
            f"(it reads {', '.join(sorted(supported_architectures()))}); give the model's safetensors folder or hub "
            "id instead, or upgrade transformers if a newer version reads it")


@functools.lru_cache(maxsize=16)
def _header(path: str, size: int, mtime_ns: int) -> dict[str, Any]:
    from gguf import GGUFReader, GGUFValueType, LlamaFileType

    reader = GGUFReader(path)
    metadata: dict[str, Any] = {}
    for key, item in reader.fields.items():
        if item.types and item.types[0] == GGUFValueType.STRING:
            metadata[key] = bytes(item.parts[item.data[0]]).decode("utf-8", errors="replace")
        elif item.types and item.types[0] != GGUFValueType.ARRAY and item.data:
            metadata[key] = item.parts[item.data[0]].tolist()[0]
    arch, file_type = metadata.get("general.architecture"), metadata.get("general.file_type")
    try:
        quantization = LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        quantization = f"file type {file_type}"
    tokens, eos = reader.fields.get("tokenizer.ggml.tokens"), metadata.get("tokenizer.ggml.eos_token_id")
    eos_token = None
    if tokens is not None and isinstance(eos, int) and 0 <= eos < len(tokens.data):
        eos_token = bytes(tokens.parts[tokens.data[eos]]).decode("utf-8", errors="replace")
    return {
        "architecture": arch,
        "name": metadata.get("general.name"),
        "quantization": quantization,
        "tensor_types": dict(Counter(tensor.tensor_type.name for tensor in reader.tensors)),
        "vocab_size": len(tokens.data) if tokens is not None else None,
        "context_length": metadata.get(f"{arch}.context_length"),
        "chat_template": metadata.get("tokenizer.chat_template"),
        "eos_token": eos_token,
    }


def info(file: Path) -> dict[str, Any]:
    """What a GGUF file holds, from its header (no tensor data is read): architecture, name, quantisation
    (llama.cpp's file type, e.g. Q4_K_M), tensor types, vocabulary size, context length, chat template and the
    end-of-sequence token. Read once per file version (size, modification time): a model named in several
    places is read once. The one reader of GGUF metadata (the export record, the model checks)."""
    stat = file.stat()
    return dict(_header(str(file.resolve()), stat.st_size, stat.st_mtime_ns))


def export_gguf(file: str | Path, out: str | Path, dtype: str = "float32", label: str | None = None,
                replace: bool = False) -> tuple[dict[str, Any], bool]:
    """Write `file` de-quantised into the model folder `out` (atomically: a killed export leaves no folder):
    (the record written to `out/polyfuse_export.json`, whether it was written now). An `out` that already holds
    this file's export in `dtype` is kept; any other non-empty `out` is refused unless `replace`."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file, out = Path(file).expanduser(), Path(out).expanduser()
    label = label or file.stem
    check_gguf(file, label)
    previous = read_record(out)
    if previous is not None and (previous.get("sha256"), previous.get("dtype")) == (sha256(file), dtype):
        return previous, False
    if out.is_dir() and any(out.iterdir()) and not replace:
        raise UserError(f"{out}: the folder exists and holds something other than this file's {dtype} export; "
                        "give a new or empty folder")
    try:
        details = info(file)
    except (ValueError, OSError, IndexError) as err:
        raise UserError(f"{file}: not a readable GGUF file ({err})") from None
    record = {"source": str(file.resolve()), "sha256": sha256(file), "bytes": file.stat().st_size,
              **{key: value for key, value in details.items() if key not in ("chat_template", "eos_token")},
              "chat_template": details["chat_template"] is not None, "dtype": dtype,
              "transformers": transformers.__version__, "polyfuse": __version__}

    def write(folder: Path) -> None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
            model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=getattr(torch, dtype))
        except (OSError, ValueError, KeyError, NotImplementedError) as err:
            raise UserError(f"{label}: {file}: transformers cannot load this GGUF file as a causal LM: {err}") from None
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        config = json.loads((folder / "config.json").read_text())
        config.pop("quantization_config", None)
        write_json(folder / "config.json", config)
        write_json(folder / RECORD, record)

    atomic_write_folder(out, write)
    return record, True


def read_record(folder: str | Path) -> dict[str, Any] | None:
    """The export record of a folder `export_gguf` wrote, else None."""
    try:
        return json.loads((Path(folder) / RECORD).read_text())
    except (OSError, ValueError):
        return None


def cached_export(file: Path, label: str, export: bool = True) -> Path | None:
    """The folder of `file`'s export in the cache: made on first use (one process exports, the others wait
    for it), or, with `export=False`, only if it exists already (None otherwise)."""
    from filelock import FileLock

    folder = cache_dir() / sha256(file)
    if read_record(folder) is not None:
        return folder
    if not export:
        return None
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(folder.parent / f".{folder.name}.lock"):
        if read_record(folder) is None:
            remove_stale_temporaries(folder.parent)  # what an export killed here earlier left
            note(f"{label}: exporting {file} once to {folder} (de-quantised float32 safetensors, tokenizer, "
                 "chat template); later runs load that folder")
            export_gguf(file, folder, label=label, replace=True)
    return folder


def resolve_model_path(ref: str, where: str) -> str:
    """A model reference as the merge and other folder readers want it: a `.gguf` file becomes the folder of
    its cached export, anything else is returned as it is."""
    if not is_gguf_path(ref):
        return ref
    file = Path(ref.rstrip("/")).expanduser()
    check_gguf(file, where)
    return str(cached_export(file, where))
