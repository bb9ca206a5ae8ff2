"""The merge plan: inputs indexed from headers, every compatibility check, and the output tensor list.

`build_plan` is the last step before any tensor is read. Its output order follows the base, so the
shard layout, and therefore resume, is deterministic. A tied model's head is an alias of its
embedding; if any input has a separate head, the output has one (spec section 11).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from polyfuse.errors import ConfigError
from polyfuse.merge.config import MergeConfig, ParamResolver, layer_index, same_model
from polyfuse.merge.sources import DTYPE_BYTES, ModelSource, TensorInfo, index_model
from polyfuse.merge.vocab import VocabPlan, embed_key, head_key, plan_vocab

OUT_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_ARCH_KEYS = ("architectures", "model_type", "num_hidden_layers", "hidden_size")


@dataclass
class TensorPlan:
    name: str  # output name
    keys: list[str]  # per input: the key to read (an alias for a tied head)
    shape: tuple[int, ...]  # output shape
    dtype: str  # output dtype (safetensors spelling)
    vocab: bool  # rows follow the vocabulary (embedding, head)

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * DTYPE_BYTES[self.dtype]


@dataclass
class MergePlan:
    inputs: list[ModelSource]  # inputs[0] is the reference: the base, or the first model without one
    has_base: bool
    merged: list[int]  # indices into inputs of the non-base models, in config order
    tensors: list[TensorPlan]
    vocab: VocabPlan | None
    out_dtype: str  # torch name: float32, bfloat16, float16
    num_layers: int
    has_head: bool
    resolver: ParamResolver
    tokenizer_input: int  # index into inputs of the tokenizer source

    @property
    def largest(self) -> int:
        """Entries of the largest tensor; sets the memory estimate."""
        return max(t.nbytes // DTYPE_BYTES[t.dtype] for t in self.tensors)


def build_plan(cfg: MergeConfig, source: str, allow_pickle: bool = False) -> MergePlan:
    inputs, has_base, merged = _index_inputs(cfg, allow_pickle)
    reference = inputs[0]
    _check_architectures(inputs)
    num_layers = _num_layers(reference)
    out_dtype = cfg.out_dtype or cfg.dtype or _storage_dtype(reference)
    heads = [head_key(s) for s in inputs]
    has_head = any(heads)
    names = list(reference.tensors)
    if has_head and heads[0] is None:
        names.append(next(h for h in heads if h))  # the base is tied, another input is not
    tokenizer_input = _tokenizer_input(cfg, inputs, source)
    vocab = _plan_vocab(cfg, inputs, tokenizer_input, source)
    tensors = [_tensor_plan(name, inputs, heads, vocab, OUT_DTYPES[out_dtype]) for name in names]
    _check_key_sets(inputs, heads, set(names))
    resolver = ParamResolver(cfg, num_layers, source)
    for tensor in tensors:  # every parameter resolves for every tensor, or we stop here
        resolver.params(tensor.name)
        resolver.model_params(tensor.name)
    resolver.seed()
    return MergePlan(inputs, has_base, merged, tensors, vocab, out_dtype, num_layers, has_head, resolver,
                     tokenizer_input)


def _index_inputs(cfg: MergeConfig, allow_pickle: bool) -> tuple[list[ModelSource], bool, list[int]]:
    inputs: list[ModelSource] = []
    if cfg.base_model is not None:
        inputs.append(index_model(cfg.base_model, "base_model", allow_pickle))
    merged = []
    for i, entry in cfg.merged_models():
        merged.append(len(inputs))
        inputs.append(index_model(entry.model, f"models[{i}]", allow_pickle))
    return inputs, cfg.base_model is not None, merged


def _check_architectures(inputs: list[ModelSource]) -> None:
    reference = inputs[0]
    for source in inputs[1:]:
        for key in _ARCH_KEYS:
            ours, theirs = reference.config.get(key), source.config.get(key)
            if ours != theirs:
                raise ConfigError(f"{source.label}: config.json {key} is {theirs!r} but the base's is {ours!r}; "
                                  f"merging needs one architecture")


def _num_layers(source: ModelSource) -> int:
    layers = {layer_index(name) for name in source.tensors} - {None}
    return int(source.config.get("num_hidden_layers") or (max(layers) + 1 if layers else 1))


def _storage_dtype(source: ModelSource) -> str:
    """The base's float storage dtype, the default of out_dtype when the config sets neither dtype."""
    counts: dict[str, int] = {}
    for info in source.tensors.values():
        if info.floating:
            counts[info.dtype] = counts.get(info.dtype, 0) + info.numel
    dtype = max(counts, key=counts.__getitem__, default="F32")
    return {v: k for k, v in OUT_DTYPES.items()}.get(dtype, "float32")


def _plan_vocab(cfg: MergeConfig, inputs: list[ModelSource], tokenizer_input: int, where: str) -> VocabPlan | None:
    embeds = [embed_key(s) for s in inputs]
    if embeds[0] is None:
        return None
    if None in embeds:
        raise ConfigError(f"{inputs[embeds.index(None)].label}: no embedding tensor, unlike the base")
    rows = [s.tensors[k].shape[0] for s, k in zip(inputs, embeds, strict=True)]
    for source, rows_i in zip(inputs, rows, strict=True):
        head = head_key(source)
        if head and source.tensors[head].shape[0] != rows_i:
            raise ConfigError(f"{source.label}: lm_head has {source.tensors[head].shape[0]} rows but the "
                              f"embedding has {rows_i}")
    return plan_vocab(inputs, rows, cfg.tokenizer_source, tokenizer_input, where)


def _tokenizer_input(cfg: MergeConfig, inputs: list[ModelSource], where: str) -> int:
    """The input whose tokenizer the output gets: the base unless `tokenizer_source` names a model."""
    choice = cfg.tokenizer_source
    if choice in (None, "base", "union"):
        return 0
    index = next((i for i, s in enumerate(inputs) if same_model(s.ref, choice)), -1)
    if index < 0:
        raise ConfigError(f"{where}: tokenizer_source: {choice!r} is not one of the config's models; "
                          f"expected base, union or a model listed in the config")
    return index


def _tensor_plan(name: str, inputs: list[ModelSource], heads: list[str | None], vocab: VocabPlan | None,
                 out_dtype: str) -> TensorPlan:
    is_head = name in heads
    keys = []
    for source, head in zip(inputs, heads, strict=True):
        key = name
        if name not in source.tensors and is_head and head is None:
            key = embed_key(source)  # tied: the head is the embedding
        if key is None or key not in source.tensors:
            raise ConfigError(f"{source.label}: tensor {name} is missing (the base has it); "
                              f"the tensor key sets must match")
        keys.append(key)
    infos = [s.tensors[k] for s, k in zip(inputs, keys, strict=True)]
    is_vocab = vocab is not None and (is_head or name == embed_key(inputs[0]))
    _check_tensor(name, inputs, infos, is_vocab)
    shape = (vocab.rows, *infos[0].shape[1:]) if is_vocab else infos[0].shape
    return TensorPlan(name, keys, shape, out_dtype if infos[0].floating else infos[0].dtype, is_vocab)


def _check_tensor(name: str, inputs: list[ModelSource], infos: list[TensorInfo], is_vocab: bool) -> None:
    first = infos[0]
    for source, info in zip(inputs[1:], infos[1:], strict=True):
        same = info.shape[1:] == first.shape[1:] if is_vocab else info.shape == first.shape
        if not same:
            raise ConfigError(f"{source.label}: {name} has shape {list(info.shape)} but the base's is "
                              f"{list(first.shape)}")
        if info.floating != first.floating or (not first.floating and info.dtype != first.dtype):
            raise ConfigError(f"{source.label}: {name} is {info.dtype} but the base's is {first.dtype}")


def _check_key_sets(inputs: list[ModelSource], heads: list[str | None], names: set[str]) -> None:
    for source, head in zip(inputs, heads, strict=True):
        extra = sorted(set(source.tensors) - names - {head})
        if extra:
            raise ConfigError(f"{source.label}: tensor {extra[0]} is not in the base "
                              f"({len(extra)} extra tensors); the tensor key sets must match")


def describe(plan: MergePlan) -> dict[str, Any]:
    """What the fingerprint and the report need to know about the plan."""
    return {
        "inputs": [s.ref for s in plan.inputs],
        "tensors": [[t.name, list(t.shape), t.dtype] for t in plan.tensors],
        "remap": plan.vocab is not None and plan.vocab.remaps,
    }
