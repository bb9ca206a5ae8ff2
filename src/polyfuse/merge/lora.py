"""LoRA adapters applied on the fly: mergekit's `model+lora` references.

mergekit loads the model and the adapter with peft and merges them (`merge_and_unload`) into a cache folder
before merging. polyfuse applies the adapter to each tensor as it is read, with peft's merge rule, so the
adapted model is never written out or held whole:

- LoRA (`lora_A` [r, in], `lora_B` [out, r]): W + s B A, or W + s (B A)^T for a layer stored [in, out]
  (GPT-2's Conv1D; peft sets fan_in_fan_out by layer type, polyfuse tells it from the shapes, and from the
  config's `fan_in_fan_out` for a square layer); embedding LoRA (`lora_embedding_A` [r, vocab],
  `lora_embedding_B` [dim, r]): W + s (B A)^T;
- s = alpha / r, or alpha / sqrt(r) with `use_rslora`; r and alpha per module from `rank_pattern` /
  `alpha_pattern` (peft's rule: the first pattern the module name ends with, as a regex);
- DoRA (`use_dora`, `lora_magnitude_vector` m): m / ||W + s B A||_row * (W + s B A), per output row;
- `lora_B.bias` (`lora_bias: true`): bias + s b; without `lora_bias` peft does not load these keys, so they are
  left out with a warning, as mergekit (through peft) does;
- `modules_to_save` tensors and embeddings saved whole (`save_embedding_layers`, `base_layer.weight`) replace
  the model's tensor; a module both saved and adapted gets its LoRA on top of the saved tensor.

A tied head (no `lm_head.weight` in the model) is the embedding, so an adapter on `lm_head` applies to it, as it
would to peft's shared parameter. Everything is checked against the model's headers before any tensor is
read; an adapter feature polyfuse does not apply is refused by name.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from polyfuse.errors import ConfigError
from polyfuse.merge.reference import ModelReference
from polyfuse.merge.sources import ModelSource, TensorInfo, pickle_tensors, safetensors_header

logger = logging.getLogger(__name__)
PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PARTS = {  # key suffix after the module name -> the part of a LoRA module it holds
    "lora_A.weight": "a", "lora_B.weight": "b", "lora_embedding_A": "a", "lora_embedding_B": "b",
    "lora_B.bias": "bias", "lora_magnitude_vector": "magnitude", "lora_magnitude_vector.weight": "magnitude",
}
REFUSED = {  # adapter_config.json keys whose non-empty value changes what merging means
    "layer_replication": "peft's layer_replication (duplicated layers)",
    "target_parameters": "LoRA on bare parameters (peft's target_parameters, e.g. MoE experts)",
    "trainable_token_indices": "peft's trainable tokens (trainable_token_indices)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora)",
}


@dataclass
class LoraPatch:
    """One adapted module's effect on one model tensor."""

    a: str | None = None  # adapter keys
    b: str | None = None
    bias: str | None = None
    magnitude: str | None = None
    embedding: bool = False  # an embedding LoRA
    transposed: bool = False  # the weight is stored [in, out]: delta = (B A)^T
    scale: float = 1.0


@dataclass
class LoraAdapter:
    """A peft LoRA adapter matched against one model's tensors: what to do to each tensor the merge reads."""

    config: dict[str, Any]
    weights: ModelSource  # the adapter's weight file, read like a model's
    patches: dict[str, list[LoraPatch]] = field(default_factory=dict)  # model tensor key -> LoRA modules on it
    replacements: dict[str, str] = field(default_factory=dict)  # model tensor key -> adapter key of a saved tensor

    def touches(self, key: str) -> bool:
        return key in self.patches or key in self.replacements

    def apply(self, key: str, tensor: torch.Tensor, read) -> torch.Tensor:
        """The adapted tensor `key` in fp32 (a new tensor); `read(adapter_key)` reads an adapter tensor."""
        if key in self.replacements:
            tensor = read(self.replacements[key])
        tensor = tensor.float()
        for patch in self.patches.get(key, []):
            if key.endswith(".bias"):
                tensor = tensor + read(patch.bias).float() * patch.scale
                continue
            delta = read(patch.b).float() @ read(patch.a).float()
            if patch.transposed:
                delta = delta.T
            delta = delta * patch.scale
            if patch.magnitude is None:
                tensor = tensor + delta
                continue
            adapted = tensor + delta  # DoRA: each output's norm set to its magnitude
            rows = adapted.T if patch.transposed else adapted
            factor = read(patch.magnitude).float() / torch.linalg.norm(rows, dim=1)
            tensor = factor.view(1, -1) * adapted if patch.transposed else factor.view(-1, 1) * adapted
        return tensor


def read_adapter(ref: str, model: ModelSource, aliases: dict[str, str], allow_pickle: bool) -> LoraAdapter:
    """Index an adapter folder (config and weight headers) and match it to `model`'s tensors, or refuse with the
    file and key that does not fit. `aliases`: other names of the model's tensors (a tied head's embedding)."""
    label = f"{model.where}: LoRA adapter {ref}"
    folder = _adapter_folder(ref, label)
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{label}: {folder / ADAPTER_CONFIG} not readable ({err})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{label}: a {config.get('peft_type')} adapter; mergekit's model+lora (and polyfuse) "
                          f"apply LoRA adapters (peft_type LORA) only")
    for key, what in REFUSED.items():
        if config.get(key):
            raise ConfigError(f"{label}: {ADAPTER_CONFIG} sets {key}: {what} is not applied by polyfuse; merge the "
                              f"adapter with peft's merge_and_unload and give that folder")
    file = next((folder / n for n in ADAPTER_WEIGHTS if (folder / n).is_file()), None)
    if file is None:
        raise ConfigError(f"{label}: no {ADAPTER_WEIGHTS[0]} in {folder}")
    weights = ModelSource(label, ModelReference(ref), folder, config)
    if file.suffix == ".bin":
        if not allow_pickle:
            raise ConfigError(f"{label}: {file.name} is a pickle, which can run code when loaded; it is read only "
                              f"with --allow-pickle")
        weights.pickle = True
        weights.tensors = pickle_tensors(file, label)
    else:
        weights.tensors = safetensors_header(file, label)
    adapter = LoraAdapter(config, weights)
    _match(adapter, label, file, model.tensors, aliases)
    return adapter


def _adapter_folder(ref: str, label: str) -> Path:
    """A local adapter folder, or a hub adapter's snapshot with its (small) weights."""
    folder = Path(ref).expanduser()
    if folder.is_dir():
        return folder
    repo, _, revision = ref.partition("@")  # mergekit's org/name@revision
    if folder.exists() or ref.startswith((".", "/", "~")) or repo.count("/") != 1:
        raise ConfigError(f"{label}: not a folder (expected a peft adapter folder with {ADAPTER_CONFIG}, or a hub id)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision or None, allow_patterns=[ADAPTER_CONFIG, *ADAPTER_WEIGHTS]))
    except Exception as err:  # network, auth, missing repo: all the user's to fix
        raise ConfigError(f"{label}: cannot download {ref!r} from the hub: {err}") from None


def _match(adapter: LoraAdapter, label: str, file: Path, model: dict[str, TensorInfo], aliases: dict[str, str]) -> None:
    config = adapter.config
    saved = config.get("modules_to_save") or []
    modules: dict[str, LoraPatch] = {}
    for key, info in adapter.weights.tensors.items():
        if not key.startswith(PREFIX):
            raise ConfigError(f"{label}: {file}: tensor {key} does not start with {PREFIX!r}: not a peft adapter")
        name = key[len(PREFIX):]
        suffix = next((s for s in _PARTS if name.endswith("." + s)), None)
        owner = name.rsplit(".", 1)[0]
        if suffix is not None:
            patch = modules.setdefault(name[: -len(suffix) - 1], LoraPatch())
            setattr(patch, _PARTS[suffix], key)
            patch.embedding |= suffix.startswith("lora_embedding_")
        elif owner.endswith(".base_layer"):  # an embedding saved whole (peft's save_embedding_layers)
            _replace(adapter, label, file, model, aliases, name.replace(".base_layer.", "."), key, info)
        elif any(owner == s or owner.endswith("." + s) for s in saved):
            _replace(adapter, label, file, model, aliases, name, key, info)
        else:
            raise ConfigError(f"{label}: {file}: tensor {key} is neither a LoRA matrix nor one of modules_to_save; "
                              f"polyfuse applies LoRA, DoRA and modules_to_save only")
    left_out = []
    for module, patch in modules.items():
        if patch.a is None or patch.b is None:
            raise ConfigError(f"{label}: {file}: module {module} has no lora_{'A' if patch.a is None else 'B'}")
        a, b = adapter.weights.tensors[patch.a].shape, adapter.weights.tensors[patch.b].shape
        if len(a) != 2 or len(b) != 2:
            raise ConfigError(f"{label}: {file}: {module} is not a linear or embedding LoRA (lora_A shape {list(a)}); "
                              f"polyfuse applies those only")
        r, alpha = _rank_and_alpha(config, module)
        if a[0] != r or b[1] != r:
            raise ConfigError(f"{label}: {file}: {module}: lora_A is {list(a)} and lora_B {list(b)} but "
                              f"{ADAPTER_CONFIG} gives it rank {r}")
        patch.scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        target = f"{module}.weight" if f"{module}.weight" in model else aliases.get(f"{module}.weight")
        if target is None:
            raise ConfigError(f"{label}: adapts {module}, but the model has no tensor {module}.weight")
        stored, out_in = tuple(model[target].shape), (b[0], a[1])
        patch.transposed = patch.embedding or (stored == out_in[::-1] and (stored != out_in or
                                                                             bool(config.get("fan_in_fan_out"))))
        if stored != (out_in[::-1] if patch.transposed else out_in):
            raise ConfigError(f"{label}: {module}: its LoRA update is {list(out_in)} but the model's {target} is "
                              f"{list(stored)}")
        if patch.magnitude is not None and (patch.embedding or
                                            tuple(adapter.weights.tensors[patch.magnitude].shape) != (out_in[0],)):
            raise ConfigError(f"{label}: {module}: DoRA is applied to linear layers only, one magnitude per output")
        adapter.patches.setdefault(target, []).append(patch)
        if patch.bias is None:
            continue
        if not config.get("lora_bias"):
            left_out.append(module)
        elif f"{module}.bias" not in model:
            raise ConfigError(f"{label}: {module} has lora_B.bias but the model has no {module}.bias (peft refuses "
                              f"this merge too)")
        else:
            adapter.patches.setdefault(f"{module}.bias", []).append(patch)
    if left_out:
        logger.warning("%s: %d modules have lora_B.bias (e.g. %s) but %s does not set lora_bias: peft does not load "
                       "them, and neither does polyfuse", label, len(left_out), left_out[0], ADAPTER_CONFIG)


def _rank_and_alpha(config: dict[str, Any], module: str) -> tuple[int, float]:
    """peft's `get_pattern_key`: the first pattern key the module name ends with (as a regex), else the default."""

    def pick(patterns: dict[str, Any], default: Any) -> Any:
        key = next((k for k in patterns if re.match(rf"(.*\.)?({k})$", module)), None)
        return default if key is None else patterns[key]

    r = int(pick(config.get("rank_pattern") or {}, config.get("r", 8)))
    return r, float(pick(config.get("alpha_pattern") or {}, config.get("lora_alpha", 8)))


def _replace(adapter: LoraAdapter, label: str, file: Path, model: dict[str, TensorInfo], aliases: dict[str, str],
             name: str, key: str, info: TensorInfo) -> None:
    target = name if name in model else aliases.get(name)
    if target is None:
        raise ConfigError(f"{label}: saves {name} whole, but the model has no such tensor")
    if tuple(info.shape) != tuple(model[target].shape):
        raise ConfigError(f"{label}: {file}: {key} is {list(info.shape)} but the model's {target} is "
                          f"{list(model[target].shape)} (a resized vocabulary? resize the model's embeddings first, "
                          f"as peft needs too)")
    adapter.replacements[target] = key
