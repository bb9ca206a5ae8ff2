"""Everything in the output folder besides the weights: config.json, tokenizer, chat template,
generation config, and the resolved merge config that explains each value in plain words.

mergekit users often do not know what `weight`, `density` or `rescale` did to their merge; the
resolved config answers that next to the weights, and it is itself a runnable config.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from polyfuse.data.io import atomic_write_text, write_json
from polyfuse.merge.config import CHAT_TEMPLATES, ENGINE_PARAMETERS, FilterValue, MergeConfig, OutputSlice
from polyfuse.merge.methods.base import Param
from polyfuse.merge.plan import LAYER_COUNT_KEYS, MergePlan, layer_stacks

RESOLVED = "merge_config.resolved.yaml"
REPORT = "merge_report.json"  # what a method decided while merging (RSAF's keep ratios)
EXTRA_FILES = ("config.json", "generation_config.json", RESOLVED, REPORT)  # written atomically, beside the shards


def write_extras(cfg: MergeConfig, plan: MergePlan, out: Path) -> None:
    reference = plan.inputs[0]
    config = output_config(plan)
    write_json(out / "config.json", config)
    generation = reference.folder / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, out / "generation_config.json")
    _write_tokenizer(cfg, plan, out)
    atomic_write_text(out / RESOLVED, render_resolved(cfg, plan))


def _sections(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The config and its text model's section (multimodal configs keep the decoder under text_config)."""
    text = config.get("text_config")
    return [config] + ([text] if isinstance(text, dict) else [])


def output_config(plan: MergePlan) -> dict[str, Any]:
    """The reference's config.json with the output's dtype, vocabulary rows, head tying and, for slices, the
    layer count and every per-layer list (e.g. `layer_types`) rebuilt from the source layers."""
    reference = plan.inputs[0]
    config = json.loads(json.dumps(reference.config))
    config["dtype"] = plan.out_dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = plan.out_dtype
    if plan.vocab is not None:
        sections = [c for c in _sections(config) if "vocab_size" in c] or [config]
        for section in sections:
            section["vocab_size"] = plan.vocab.rows
        tied = [c for c in _sections(config) if "tie_word_embeddings" in c] or [config]
        for section in tied:
            section["tie_word_embeddings"] = not plan.has_head
    if plan.output_layers is not None:
        before = plan.inputs[0]
        count = max(layer_stacks(before).values())
        for section, sources in zip(_sections(config), _source_sections(plan), strict=False):
            for key, value in list(section.items()):
                if key in LAYER_COUNT_KEYS and value == count:
                    section[key] = len(plan.output_layers)
                elif isinstance(value, list) and len(value) == count and key != "architectures":
                    section[key] = [sources[i].get(key, value)[layer] if isinstance(sources[i].get(key), list)
                                    and len(sources[i][key]) > layer else value[min(layer, count - 1)]
                                    for i, layer in plan.output_layers]
    return config


def _source_sections(plan: MergePlan) -> list[list[dict[str, Any]]]:
    """Per section of the config (top, text_config): every input's section, by input index."""
    out = []
    for depth in range(len(_sections(plan.inputs[0].config))):
        out.append([(_sections(s.config) + [{}])[depth] for s in plan.inputs])
    return out


def _write_tokenizer(cfg: MergeConfig, plan: MergePlan, out: Path) -> None:
    from transformers import AutoTokenizer

    folder = plan.inputs[plan.tokenizer_input].folder
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return  # the tokenizer source has no tokenizer files: the output has none either (said in the resolved config)
    if plan.vocab is not None and plan.vocab.added_tokens:
        tokenizer.add_tokens(plan.vocab.added_tokens)
    template = cfg.chat_template
    if template in CHAT_TEMPLATES:
        tokenizer.chat_template = CHAT_TEMPLATES[template]
    elif template not in (None, "auto"):
        tokenizer.chat_template = template
    tokenizer.save_pretrained(str(out))


def explain(param: Param | None, name: str, value: Any, given: bool, num_layers: int) -> str:
    """What a parameter's value did, in words (`Param.explained`; gradients and filter lists in general terms)."""
    origin = "" if given else " (default)"
    if isinstance(value, FilterValue) or (isinstance(value, list) and value and isinstance(value[0], FilterValue)):
        return f"{name}: chosen per tensor; the first filter contained in the tensor name wins{origin}"
    if isinstance(value, list):
        return (f"{name}: a gradient over the {num_layers} layers, {value[0]} at layer 0 to {value[-1]} at layer "
                f"{num_layers - 1}; embeddings, final norm and lm_head get {value[0]}{origin}")
    text = param.explained(value) if param is not None else f"{name} {value} = read by another merge method only"
    return text + origin


def render_resolved(cfg: MergeConfig, plan: MergePlan) -> str:
    """The config with every default filled in, one explanation per value as a YAML comment."""
    method = cfg.method()
    layers = plan.num_layers
    lines = [
        "# Resolved by `polyfuse merge`: every default filled in; this file is itself a valid config.",
        "# Arithmetic always runs in float32; out_dtype is how the merged tensors are stored.",
        f"merge_method: {cfg.merge_method}  # {method.description or method.name}",
    ]
    if cfg.base_model is not None:
        role = ("task vectors are taken against this model" if method.base_policy == "required" else
                "the base of the interpolation" if method.base_policy == "optional" else
                "one more input (as mergekit appends it), unless it has no value for a required parameter")
        lines.append(f"base_model: {_value(cfg.base_model)}  # {role}")
    if cfg.slices:
        lines.append(f"slices:  # {len(plan.slices)} output slices, {layers} layers in all")
        for piece, entry in zip(plan.slices, cfg.slices, strict=True):
            lines.append(f"  - sources:  # output layers from {piece.method.name}")
            for k, source in enumerate(entry.sources):
                lines.append(f"      - model: {_value(source.model)}")
                lines.append(f"        layer_range: {json.dumps(list(source.layer_range))}")
                if k != piece.base and piece.method.model_defaults:
                    lines.append("        parameters:")
                    lines += _model_lines(piece.method, [source.parameters, entry.parameters, cfg.parameters],
                                          layers, "          ")
            if entry.base_model is not None:
                lines.append(f"    base_model: {_value(entry.base_model)}")
            if entry.merge_method is not None:
                lines.append(f"    merge_method: {entry.merge_method}  # polyfuse extension: this slice's method")
            if entry.parameters:
                lines.append("    parameters:")
                for key, value in entry.parameters.items():
                    lines.append(f"      {key}: {_value(value)}  # "
                                 f"{explain(_find(key, [piece]), key, value, True, layers)}")
    else:
        lines.append("models:")
        for _, entry in plan.slices[0].merged():
            if entry.where == "base_model":  # appended by the normal form: named once, as base_model
                continue
            lines.append(f"  - model: {_value(str(entry.model))}")
            if method.model_defaults:
                lines.append("    parameters:")
            lines += _model_lines(method, [entry.parameters, cfg.parameters], layers, "      ")
    lines.append("parameters:")
    shared = {p.name: p for piece in plan.slices for p in piece.method.parameters if not p.per_model}
    for param in [*shared.values(), *ENGINE_PARAMETERS]:
        value = cfg.parameters.get(param.name, param.default)
        lines.append(f"  {param.name}: {_value(value)}  # "
                     f"{explain(param, param.name, value, param.name in cfg.parameters, layers)}")
    lines.append("dtype: float32  # compute dtype: polyfuse computes in float32 whatever this says")
    lines.append(f"out_dtype: {plan.out_dtype}  # the merged tensors are saved as {plan.out_dtype}")
    remap = "rows remapped by token string" if plan.vocab is not None and plan.vocab.remaps else "no remap needed"
    choice = cfg.token_source()
    origin = plan.inputs[plan.tokenizer_input].ref
    what = ("the base's tokenizer plus every model's other tokens" if choice == "union"
            else f"the output tokenizer is {origin}'s")
    if cfg.tokenizer is not None:
        lines.append("tokenizer:")
        lines.append(f"  source: {_value(cfg.tokenizer.source)}  # {what}; {remap}")
        if cfg.tokenizer.tokens:
            tokens = {k: v.model_dump(exclude_none=True) for k, v in cfg.tokenizer.tokens.items()}
            lines.append(f"  tokens: {json.dumps(tokens)}  # per-token embedding sources")
        if cfg.tokenizer.pad_to_multiple_of:
            lines.append(f"  pad_to_multiple_of: {cfg.tokenizer.pad_to_multiple_of}  # {plan.vocab.rows} rows; "
                         f"padding rows are each model's mean token row")
    else:
        lines.append(f"tokenizer_source: {_value(cfg.tokenizer_source or 'base')}  # {what}; {remap}")
    for note in plan.vocab.notes if plan.vocab is not None else []:
        lines.append(f"# tokenizer: {note}")
    lines.append(f"chat_template: {_value(cfg.chat_template or 'auto')}  # auto = the tokenizer source's template")
    return "\n".join(lines) + "\n"


def _model_lines(method, layers_of_params: list[dict[str, Any]], num_layers: int, indent: str) -> list[str]:
    lines = []
    for param in (p for p in method.parameters if p.per_model):
        given = next((p for p in layers_of_params if param.name in p), None)
        value = given[param.name] if given is not None else param.default
        lines.append(f"{indent}{param.name}: {_value(value)}  # "
                     f"{explain(param, param.name, value, given is not None, num_layers)}")
    return lines


def _find(name: str, pieces: list[OutputSlice]) -> Param | None:
    """The declaration of parameter `name` for these slices' methods, or the engine's."""
    found = (piece.method.parameter(name) for piece in pieces)
    return next((p for p in found if p is not None), None) or next((p for p in ENGINE_PARAMETERS if p.name == name), None)


def _value(value: Any) -> str:
    """JSON is valid YAML flow style: one line per value, whatever its type."""
    if isinstance(value, FilterValue):
        value = [value]
    if isinstance(value, list):
        return json.dumps([v.model_dump(exclude_none=True) if isinstance(v, FilterValue) else v for v in value])
    return json.dumps(value)
