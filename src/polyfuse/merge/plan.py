"""The merge plan: inputs indexed from headers, every compatibility check, and the output tensor list.

`build_plan` is the last step before any tensor is read. The config is taken as mergekit normalises it,
a list of output slices (`MergeConfig.output_slices`); a `models:` config is one slice over every model's full
depth and keeps the base's tensor order. With `slices:`, output layer j of a slice merges layer
`start_k + j` of every source k; the tensors outside the layers come from the first slice (embeddings) or
the last one (final norm, head), as in mergekit. Either way the order is deterministic, so the shard
layout, and therefore resume, is. A tied model's head is an alias of its embedding; if any input has a
separate head, the output has one (as mergekit).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from polyfuse.errors import ConfigError
from polyfuse.merge.config import MergeConfig, OutputSlice, ParamResolver, layer_position
from polyfuse.merge.lora import read_adapter
from polyfuse.merge.reference import ModelReference
from polyfuse.merge.sources import DTYPE_BYTES, ModelSource, TensorInfo, index_model
from polyfuse.merge.vocab import HEAD_NAMES, VocabPlan, embed_key, head_key, plan_vocab

OUT_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_ARCH_KEYS = ("architectures", "model_type", "hidden_size")
_STACK = re.compile(r"^(.*?(?:^|\.)(?:layers|h|blocks|layer)\.)(\d+)\.(.+)$")
PRE_WORDS = ("embed", "wte.", "wpe.")  # tensors before the layers (token, position embeddings); the rest follow them
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def split_layer(name: str) -> tuple[str, int, str] | None:
    """(stack prefix, layer index, suffix) of a layer tensor, e.g. ('model.layers.', 3, 'mlp.up_proj.weight')."""
    match = _STACK.match(name)
    return (match.group(1), int(match.group(2)), match.group(3)) if match else None


def layer_stacks(source: ModelSource) -> dict[str, int]:
    """Layer count of every layer stack of a model, by prefix (a LLaVA has the text decoder's and the
    vision tower's)."""
    stacks: dict[str, int] = {}
    for name in source.tensors:
        parts = split_layer(name)
        if parts:
            stacks[parts[0]] = max(stacks.get(parts[0], 0), parts[1] + 1)
    return stacks


@dataclass
class TensorPlan:
    name: str  # output name
    sources: list[tuple[int, str]]  # (index into plan.inputs, key to read), in the slice's input order
    base: int | None  # position in `sources` of the base (methods that treat it as the base), else None
    slice: int  # index into plan.slices: the method and parameters that merge it
    t: float  # gradient position (mergekit: layer / (slice layers - 1); 0 outside the layers)
    shape: tuple[int, ...]  # output shape
    dtype: str  # output dtype (safetensors spelling)
    vocab: bool  # rows follow the vocabulary (embedding, head)

    @property
    def keys(self) -> list[str]:
        return [key for _, key in self.sources]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * DTYPE_BYTES[self.dtype]


@dataclass
class MergePlan:
    inputs: list[ModelSource]  # every model the config references, once; inputs[0] is the reference
    slices: tuple[OutputSlice, ...]
    resolvers: list[ParamResolver]  # per slice
    tensors: list[TensorPlan]
    vocab: VocabPlan | None
    out_dtype: str  # torch name: float32, bfloat16, float16
    has_head: bool
    tokenizer_input: int  # index into inputs of the tokenizer source (the base unless a model is named)
    has_base: bool
    output_layers: list[tuple[int, int]] | None = None  # slices: (input, source layer) per output layer
    notes: list[str] = field(default_factory=list)  # decisions to state in the resolved config

    @property
    def largest(self) -> int:
        """Entries of the largest tensor; sets the memory estimate."""
        return max(t.nbytes // DTYPE_BYTES[t.dtype] for t in self.tensors)

    @property
    def widest(self) -> int:
        """Most inputs one tensor reads; sets the memory estimate."""
        return max(len(t.sources) for t in self.tensors)

    @property
    def num_layers(self) -> int:
        if self.output_layers is not None:
            return len(self.output_layers)
        return max(layer_stacks(self.inputs[0]).values(), default=1)


def build_plan(cfg: MergeConfig, source: str, allow_pickle: bool = False) -> MergePlan:
    refs = cfg.referenced_models()
    inputs = [index_input(ref, where, allow_pickle) for ref, where in refs.items()]
    position = {ref: i for i, ref in enumerate(refs)}  # model -> index into inputs
    pieces = cfg.output_slices
    reference = inputs[0]
    _check_architectures(inputs, compare_depth=not cfg.slices)
    out_dtype = cfg.out_dtype or cfg.dtype or _storage_dtype(reference)
    heads = [head_key(s) for s in inputs]
    has_head = any(heads)
    tokenizer_input = _tokenizer_input(cfg, position, source)
    vocab = _plan_vocab(cfg, inputs, position, tokenizer_input, source)
    dtype = OUT_DTYPES[out_dtype]
    if cfg.slices:
        tensors, output_layers = _sliced_tensors(pieces, position, inputs, heads, vocab, dtype, source)
    else:
        tensors, output_layers = _whole_tensors(pieces[0], position, inputs, heads, vocab, dtype), None
    resolvers = [ParamResolver(cfg, piece, source) for piece in pieces]
    for tensor in tensors:  # every parameter resolves to a usable value for every tensor, or we stop here
        resolvers[tensor.slice].check(tensor.name, tensor.keys, tensor.t)
    resolvers[0].seed()
    return MergePlan(inputs, pieces, resolvers, tensors, vocab, out_dtype, has_head, tokenizer_input,
                     cfg.base_model is not None, output_layers)


def index_input(reference: ModelReference, where: str, allow_pickle: bool = False) -> ModelSource:
    """A model from its headers, with its `+lora` adapter (if any) matched to them: a LoRA on a tied head applies
    to the embedding, as to peft's shared parameter."""
    source = index_model(reference, where, allow_pickle)
    if reference.lora is not None:
        embed = embed_key(source)
        aliases = dict.fromkeys(HEAD_NAMES, embed) if head_key(source) is None and embed else {}
        source.lora = read_adapter(reference.lora, source, aliases, allow_pickle)
    return source


def _check_architectures(inputs: list[ModelSource], compare_depth: bool) -> None:
    reference = inputs[0]
    keys = _ARCH_KEYS + (("num_hidden_layers",) if compare_depth else ())
    for source in inputs[1:]:
        for key in keys:
            ours, theirs = reference.config.get(key), source.config.get(key)
            if ours != theirs:
                raise ConfigError(f"{source.label}: config.json {key} is {theirs!r} but the base's is {ours!r}; "
                                  f"merging needs one architecture")


def _storage_dtype(source: ModelSource) -> str:
    """The base's float storage dtype, the default of out_dtype when the config sets neither dtype."""
    counts: dict[str, int] = {}
    for info in source.tensors.values():
        if info.floating:
            counts[info.dtype] = counts.get(info.dtype, 0) + info.numel
    dtype = max(counts, key=counts.__getitem__, default="F32")
    return {v: k for k, v in OUT_DTYPES.items()}.get(dtype, "float32")


def _plan_vocab(cfg: MergeConfig, inputs: list[ModelSource], position: dict[ModelReference, int],
                tokenizer_input: int, where: str) -> VocabPlan | None:
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
    return plan_vocab(inputs, rows, cfg, position, tokenizer_input, where)


def _tokenizer_input(cfg: MergeConfig, position: dict[ModelReference, int], where: str) -> int:
    """The input whose tokenizer the output gets: the base unless the tokenizer source names a model."""
    choice = cfg.token_source()
    if not isinstance(choice, ModelReference):
        return 0
    if choice not in position:
        key = "tokenizer.source" if cfg.tokenizer is not None else "tokenizer_source"
        raise ConfigError(f"{where}: {key}: {str(choice)!r} is not one of the config's models; "
                          f"expected base, union or a model listed in the config")
    return position[choice]


def _whole_tensors(piece: OutputSlice, position: dict[ModelReference, int], inputs: list[ModelSource],
                   heads: list[str | None], vocab: VocabPlan | None, dtype: str) -> list[TensorPlan]:
    """`models:` syntax: every tensor of the reference, read under the same name from every input."""
    indices = [position[e.model] for e in piece.inputs]
    reference = inputs[0]
    names = list(reference.tensors)
    if any(heads) and heads[0] is None:
        names.append(next(h for h in heads if h))  # the base is tied, another input is not
    stacks = layer_stacks(reference)
    tensors = []
    for name in names:
        parts = split_layer(name)
        t = layer_position(parts[1], stacks[parts[0]]) if parts else 0.0
        tensors.append(_tensor_plan(name, _sources(piece, position, inputs, heads, name), piece, t, inputs, heads,
                                    vocab, dtype))
    _check_key_sets([inputs[i] for i in indices], [heads[i] for i in indices], set(names))
    return tensors


def _sources(piece: OutputSlice, position: dict[ModelReference, int], inputs: list[ModelSource],
             heads: list[str | None], name: str, offset: int | None = None) -> list[tuple[int, str]]:
    """(index into inputs, key read) of output tensor `name` for every input of `piece`; a layer tensor of a slice
    (`offset` into the slice) is read from each source's own layer."""
    sources = []
    for entry in piece.inputs:
        i = position[entry.model]
        parts = split_layer(name) if offset is not None else None
        layer_name = f"{parts[0]}{entry.layer_range[0] + offset}.{parts[2]}" if parts else None
        sources.append((i, _key(inputs[i], name, heads[i], layer_name)))
    return sources


def _key(source: ModelSource, name: str, head: str | None, layer_name: str | None = None) -> str:
    """The key of output tensor `name` in `source`: itself, or the embedding for a tied head."""
    key = layer_name or name
    if key not in source.tensors and head is None and _is_head(name):
        key = embed_key(source) or key  # tied: the head is the embedding
    if key not in source.tensors:
        raise ConfigError(f"{source.label}: tensor {key} is missing (the base has {name}); "
                          f"the tensor key sets must match")
    return key


def _is_head(name: str) -> bool:
    return name in HEAD_NAMES or name.endswith(tuple(f".{h}" for h in HEAD_NAMES))


def _sliced_tensors(pieces: tuple[OutputSlice, ...], position: dict[ModelReference, int], inputs: list[ModelSource],
                    heads: list[str | None], vocab: VocabPlan | None, dtype: str,
                    where: str) -> tuple[list[TensorPlan], list[tuple[int, int]]]:
    """`slices:` syntax: validated from headers (one layer stack per model, ranges inside it, the same layer
    tensors in every source), then embeddings from the first slice, layers slice by slice, the rest from the
    last slice."""
    stacks = [layer_stacks(s) for s in inputs]
    prefix = _single_stack(inputs[0], stacks[0], where)
    for piece in pieces:
        for entry in piece.inputs:
            i = position[entry.model]
            count = stacks[i].get(prefix)
            if count is None or len(stacks[i]) != 1:
                _single_stack(inputs[i], stacks[i], where)
                raise ConfigError(f"{inputs[i].label}: its layers are not under {prefix!r} like the base's")
            start, end = entry.layer_range
            if end > count:
                raise ConfigError(f"{where}: {entry.where}.layer_range: [{start}, {end}] is outside "
                                  f"{entry.model}'s {count} layers (0 to {count - 1})")
    reference = inputs[0]
    outside = [n for n in reference.tensors if not split_layer(n)]
    if any(heads) and heads[0] is None:
        outside.append(next(h for h in heads if h))
    first, last = pieces[0], pieces[-1]
    pre = [n for n in outside if n == embed_key(reference) or any(w in n for w in PRE_WORDS)]
    post = [n for n in outside if n not in pre]
    tensors = [_tensor_plan(name, _sources(first, position, inputs, heads, name), first, 0.0, inputs, heads, vocab,
                            dtype) for name in pre]
    output_layers: list[tuple[int, int]] = []
    for piece in pieces:
        length = piece.inputs[0].layer_range[1] - piece.inputs[0].layer_range[0]
        for offset in range(length):
            j = len(output_layers)
            lead = piece.inputs[0]
            lead_layer = lead.layer_range[0] + offset
            output_layers.append((position[lead.model], lead_layer))
            suffixes = [split_layer(n)[2] for n in inputs[position[lead.model]].tensors
                        if split_layer(n) and split_layer(n)[:2] == (prefix, lead_layer)]
            for name in (f"{prefix}{j}.{suffix}" for suffix in suffixes):
                tensors.append(_tensor_plan(name, _sources(piece, position, inputs, heads, name, offset), piece,
                                            layer_position(offset, length), inputs, heads, vocab, dtype))
    tensors += [_tensor_plan(name, _sources(last, position, inputs, heads, name), last, 0.0, inputs, heads, vocab,
                             dtype) for name in post]
    return tensors, output_layers


def _single_stack(source: ModelSource, stacks: dict[str, int], where: str) -> str:
    if len(stacks) != 1:
        found = ", ".join(f"{p}* ({n} layers)" for p, n in stacks.items()) or "none"
        raise ConfigError(f"{where}: slices: {source.label} has {len(stacks)} layer stacks ({found}); "
                          f"slices need exactly one; mergekit's `modules:` syntax for several stacks is not "
                          f"supported")
    return next(iter(stacks))


def _tensor_plan(name: str, keys: list[tuple[int, str]], piece: OutputSlice, t: float,
                 inputs: list[ModelSource], heads: list[str | None], vocab: VocabPlan | None,
                 dtype: str) -> TensorPlan:
    infos = [inputs[i].tensors[k] for i, k in keys]
    is_vocab = vocab is not None and (_is_head(name) or name == embed_key(inputs[0]))
    _check_tensor(name, [inputs[i] for i, _ in keys], infos, is_vocab)
    shape = (vocab.rows, *infos[0].shape[1:]) if is_vocab else infos[0].shape
    return TensorPlan(name, keys, piece.base, piece.index, t, shape,
                      dtype if infos[0].floating else infos[0].dtype, is_vocab)


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
        "tensors": [[t.name, list(t.shape), t.dtype, t.sources] for t in plan.tensors],
        "remap": plan.vocab is not None and plan.vocab.remaps,
    }
