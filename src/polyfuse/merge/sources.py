"""Input models for the merge: find the folder, read config.json and the safetensors HEADERS, read tensors.

Indexing reads only the first bytes of every shard (the JSON header: names, dtypes, shapes), so every
compatibility check runs before any tensor data is touched; for a hub model the headers come over HTTP
range requests and the weights are downloaded only after the checks passed. Reading keeps one open
shard per model and reopens only when a key lives in another shard. Pickle checkpoints (`.bin`) are
read only with `allow_pickle`, memory-mapped, like `polyfuse.models.loader`.

A tensor is read into fresh memory with one positioned read, not memory-mapped: a mapped shard keeps
every page it served resident until the shard is closed (up to a shard per model on top of the merge's
own tensors), and a method could not write to mapped tensors in place (writes to a
private mapping would show in a later read of the same key, e.g. a tied head). A read tensor belongs
to its caller and is freed when the caller drops it.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import torch

from polyfuse.errors import ConfigError
from polyfuse.merge.reference import ModelReference
from polyfuse.models.gguf import resolve_model_path

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
TORCH_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}
SAFETENSORS_DTYPES = {name: dtype for dtype, name in TORCH_NAMES.items()} | {"F8_E4M3": torch.float8_e4m3fn,
                                                                            "F8_E5M2": torch.float8_e5m2}
_HUB_FILES = ["*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]  # no weights


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors spelling: F32, BF16, ...

    @property
    def floating(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


class Adapter(Protocol):
    """What changes a model's tensors as they are read (`merge.lora.LoraAdapter`)."""

    weights: ModelSource  # the adapter's own tensors

    def touches(self, key: str) -> bool: ...

    def apply(self, key: str, tensor: torch.Tensor, read) -> torch.Tensor: ...


@dataclass
class ModelSource:
    """One input model as its headers describe it; `where` names its config key in messages."""

    where: str
    reference: ModelReference
    folder: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)  # in file order
    pickle: bool = False
    hub: bool = False  # a hub snapshot: headers read remotely, weights fetched after validation
    lora: Adapter | None = None  # mergekit's `model+lora`: the adapter applied while reading (`merge.lora`)

    @property
    def ref(self) -> str:
        return str(self.reference)

    @property
    def repo(self) -> str:
        """The hub id (without `@revision`) or local path of the model itself."""
        return self.reference.path.partition("@")[0] if self.hub else self.reference.path

    @property
    def label(self) -> str:
        return f"{self.where} ({self.ref})"


def index_model(reference: ModelReference, where: str, allow_pickle: bool = False) -> ModelSource:
    """A model's config and weight headers; its adapter, if any, is matched by the plan (`plan.index_input`)."""
    folder, hub = model_folder(reference.path, where)
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{where}: {config_file}: model config not readable ({err})") from None
    source = ModelSource(where, reference, folder, config, hub=hub)
    if not (hub and _hub_headers(source)):
        _local_headers(source, allow_pickle)
    _check_index(folder, source, where)
    return source


def fetch_weights(source: ModelSource) -> None:
    """Download a hub model's safetensors shards; only after every check passed on the headers."""
    if not source.hub:
        return
    from huggingface_hub import snapshot_download

    names = sorted({info.file.name for info in source.tensors.values()})
    snapshot_download(source.repo, revision=source.folder.name, allow_patterns=names)
    for name in names:  # the data lengths, now that the files are here
        safetensors_header(source.folder / name, source.where)


def _local_headers(source: ModelSource, allow_pickle: bool) -> None:
    folder, where = source.folder, source.where
    safetensors = _shard_files(folder, "model.safetensors")
    if safetensors:
        for file in safetensors:
            source.tensors.update(safetensors_header(file, where))
        return
    pickles = _shard_files(folder, "pytorch_model.bin")
    if not pickles:
        raise ConfigError(f"{where}: {folder}: no model.safetensors (or index) found")
    if not allow_pickle:
        raise ConfigError(f"{where}: {folder} has only pickle weights ({pickles[0].name}); pickles can run "
                          f"code when loaded, so they are read only with --allow-pickle")
    if source.hub:
        from huggingface_hub import snapshot_download

        snapshot_download(source.repo, revision=folder.name, allow_patterns=["*.bin"])
    source.pickle = True
    for file in pickles:
        source.tensors.update(pickle_tensors(file, where))


def pickle_tensors(file: Path, where: str) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of a pickle checkpoint (memory-mapped, weights_only)."""
    try:
        state = _load_pickle(file)
    except (OSError, RuntimeError, pickle.UnpicklingError) as err:
        raise ConfigError(f"{where}: {file}: not a readable checkpoint ({err})") from None
    return {key: TensorInfo(file, tuple(tensor.shape), TORCH_NAMES.get(tensor.dtype, "?")) for key, tensor in state.items()}


def _hub_headers(source: ModelSource) -> bool:
    """Headers of a hub model's safetensors over HTTP range requests, without downloading the weights;
    False when the repo has no safetensors (pickles are then the local path's business)."""
    from huggingface_hub import get_safetensors_metadata
    from huggingface_hub.errors import NotASafetensorsRepoError

    try:
        metadata = get_safetensors_metadata(source.repo, revision=source.folder.name)
    except NotASafetensorsRepoError:
        return False
    except Exception as err:  # network, auth: the user's to fix
        raise ConfigError(f"{source.where}: cannot read the safetensors headers of {source.repo!r}: {err}") from None
    for name, file in metadata.files_metadata.items():
        ordered = sorted(file.tensors.items(), key=lambda item: item[1].data_offsets[0])
        source.tensors.update({key: TensorInfo(source.folder / name, tuple(info.shape), info.dtype)
                               for key, info in ordered})
    return True


def model_folder(ref: str, where: str) -> tuple[Path, bool]:
    """(local folder, is it a hub snapshot): the one place a merge turns a model path into a folder, so every
    kind of model reference (a folder, a hub id, and any other form polyfuse learns to read) is accepted or
    refused here. A hub model (`org/name`, or mergekit's `org/name@revision`) is fetched without its weights:
    config, index and tokenizer files only; the snapshot folder's name is the commit, pinned for later fetches.
    A `.gguf` file is its export, made once into the cache."""
    ref = resolve_model_path(ref, where)
    path = Path(ref).expanduser()
    if path.is_dir():
        return path, False
    repo, _, revision = ref.partition("@")
    if path.exists() or ref.startswith((".", "/", "~")) or repo.count("/") != 1:
        raise ConfigError(f"{where}: {ref}: not a model folder (expected a local folder, a .gguf file or a hub id org/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision or None, allow_patterns=_HUB_FILES)), True
    except Exception as err:  # network, auth, missing repo: all the user's to fix
        raise ConfigError(f"{where}: cannot download {ref!r} from the hub: {err}") from None


def _shard_files(folder: Path, single: str) -> list[Path]:
    index = folder / f"{single}.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(f"{index}: not a readable shard index ({err})") from None
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    return [folder / single] if (folder / single).is_file() else []


def _check_index(folder: Path, source: ModelSource, where: str) -> None:
    """Every key the index promises must be in the shard it names."""
    for single in ("model.safetensors", "pytorch_model.bin"):
        index = folder / f"{single}.index.json"
        if index.is_file() and source.pickle == single.endswith(".bin"):
            for key, name in json.loads(index.read_text())["weight_map"].items():
                info = source.tensors.get(key)
                if info is None or info.file.name != name:
                    raise ConfigError(f"{where}: {index}: {key} is not in {name}")


def _read_header(handle: BinaryIO) -> tuple[int, dict[str, Any]]:
    """(offset of the data, {key: {"dtype", "shape", "data_offsets"}}) of an open safetensors file."""
    (length,) = struct.unpack("<Q", handle.read(8))
    if length > 100_000_000:
        raise ValueError(f"header length {length} is implausible")
    header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return 8 + length, header


def safetensors_header(file: Path, where: str) -> dict[str, TensorInfo]:
    """Parse the header only: 8 bytes of length, then JSON; ordered by data offset (the file's order). Every
    tensor's byte range must fit its dtype and shape and lie inside the file, so a truncated or damaged shard is
    refused here, before any tensor is merged, not found half-way through the merge."""
    try:
        with open(file, "rb") as handle:
            start, header = _read_header(handle)
        ordered = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
        tensors = {key: TensorInfo(file, tuple(meta["shape"]), meta["dtype"]) for key, meta in ordered}
        _check_data_lengths(file, start, {key: meta["data_offsets"] for key, meta in ordered}, tensors, where)
        return tensors
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as err:
        raise ConfigError(f"{where}: {file}: not a readable safetensors file ({err!r})") from None


def _check_data_lengths(file: Path, start: int, offsets: dict[str, list[int]], tensors: dict[str, TensorInfo],
                       where: str) -> None:
    """Each tensor's [begin, end) holds exactly numel x dtype bytes and ends inside the file (its size on disk)."""
    size = file.stat().st_size
    for key, (begin, end) in offsets.items():
        info = tensors[key]
        if info.dtype not in SAFETENSORS_DTYPES:
            raise ConfigError(f"{where}: {file}: tensor {key} has dtype {info.dtype}, which polyfuse cannot merge "
                              f"(expected one of {', '.join(SAFETENSORS_DTYPES)})")
        expected = info.numel * DTYPE_BYTES[info.dtype]
        if end - begin != expected or begin < 0:
            raise ConfigError(f"{where}: {file}: tensor {key} has {end - begin} bytes of data for {info.dtype} "
                              f"{list(info.shape)} ({expected} expected); the file is damaged")
        if start + end > size:
            raise ConfigError(f"{where}: {file}: tensor {key} ends at byte {start + end} but the file has "
                              f"{size} bytes: the file is truncated (an interrupted download or copy?)")


STAMP_BYTES = 64  # per tensor: a retrained model of the same shapes differs in the first entries of its tensors


def file_stamp(file: Path) -> str:
    """What a weights file holds, cheaply: its size plus a hash of its safetensors header and the first bytes of
    every tensor (one small read each, never the weights); for a pickle, its size plus a hash of the zip's end,
    whose directory lists a CRC of every stored tensor. Unchanged by touching or copying the file."""
    digest = hashlib.sha256(str(file.stat().st_size).encode())
    with open(file, "rb") as handle:
        if file.suffix == ".safetensors":
            start, header = _read_header(handle)
            handle.seek(0)
            digest.update(handle.read(start))
            for begin, end in sorted(meta["data_offsets"] for meta in header.values()):
                handle.seek(start + begin)
                digest.update(handle.read(min(STAMP_BYTES, end - begin)))
        else:
            handle.seek(max(0, file.stat().st_size - (1 << 16)))
            digest.update(handle.read())
    return digest.hexdigest()


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    return torch.load(file, map_location="cpu", mmap=True, weights_only=True)


class ModelReader:
    """Reads one model's tensors with one open shard at a time; every read returns a tensor of its own."""

    def __init__(self, source: ModelSource):
        self.source = source
        self._adapter: ModelReader | None = None  # reads the LoRA adapter's tensors, when the model has one
        self._file: Path | None = None
        self._handle: Any = None
        self._start = 0  # safetensors: where the data begins
        self._offsets: dict[str, Any] = {}  # safetensors: key -> its header entry

    def read(self, key: str) -> torch.Tensor:
        """Tensor `key` as stored, or adapted by the model's LoRA adapter (then in fp32)."""
        tensor = self._read(key)
        lora = self.source.lora
        if lora is not None and lora.touches(key):
            self._adapter = self._adapter or ModelReader(lora.weights)
            tensor = lora.apply(key, tensor, self._adapter.read)
        return tensor

    def _read(self, key: str) -> torch.Tensor:
        info = self.source.tensors[key]
        if info.file != self._file:
            self.close()  # release the previous shard before opening the next
            if self.source.pickle:
                self._handle = _load_pickle(info.file)
            else:
                self._handle = open(info.file, "rb")  # kept open across reads; closed by close()
                self._start, self._offsets = _read_header(self._handle)
            self._file = info.file
        if self.source.pickle:
            return self._handle[key].clone()  # mapped storage: a write would show in later reads
        return self._read_safetensors(key, info)

    def _read_safetensors(self, key: str, info: TensorInfo) -> torch.Tensor:
        begin, end = self._offsets[key]["data_offsets"]
        tensor = torch.empty(info.shape, dtype=SAFETENSORS_DTYPES[info.dtype])
        if end > begin:
            self._handle.seek(self._start + begin)
            read = self._handle.readinto(tensor.reshape(-1).view(torch.uint8).numpy())
            if read != end - begin:
                raise ConfigError(f"{self.source.where}: {info.file}: {key} is truncated ({read} of {end - begin} "
                                  f"bytes)")
        return tensor

    def close(self) -> None:
        if self._adapter is not None:
            self._adapter.close()
        if self._handle is not None and not self.source.pickle:
            self._handle.close()
        self._handle = self._file = None
        self._offsets = {}
