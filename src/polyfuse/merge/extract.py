"""`polyfuse merge extract-lora`: a LoRA adapter for the difference between a fine-tune and its base, with
mergekit-extract-lora's semantics, written as a peft adapter folder (adapter_config.json and
adapter_model.safetensors).

The model's modules come from its transformers class, built on the meta device (no weights), as mergekit does;
the weights are read one tensor at a time from the safetensors files. For every module with a weight:
- embeddings (the input and output embeddings, any nn.Embedding) are saved whole (`modules_to_save`) unless
  `embed_lora`; a module named in `modules_to_save` (by full name or last part) is saved whole too;
- a module matching `include` (if given) and no `exclude` regex is decomposed when it is a linear or embedding
  layer: delta = tuned - base (fp32), transposed for an embedding; U S V^T = svd(delta); rank
  r = min(max_rank, len(S)), and the number of singular values above `sv_epsilon` when that is > 0;
  A = sqrt(S_r) V_r^T and B = U_r sqrt(S_r) (`distribute_scale`), else A = S_r V_r^T and B = U_r. A bias delta is
  saved as `lora_B.bias`;
- any other module with a weight (norms, GPT-2's Conv1D) is saved whole, or skipped with `skip_undecomposable`.
The adapter config has r = the largest rank used and lora_alpha = r, with `rank_pattern` / `alpha_pattern` for
modules of another rank, so every module's scale alpha / r is 1 and peft's merge gives W + B A.

Where polyfuse differs from mergekit 0.1.5: a tied head (no `lm_head.weight` stored) is left to the embedding
instead of being saved or decomposed a second time (peft would apply both to the one shared weight); a module
whose every singular value is at most `sv_epsilon` is left out (mergekit writes a rank-0 module that peft refuses
to load); `lora_bias: true` is set when every decomposed module has a bias delta (mergekit never sets it, so peft
drops those deltas); the SVD input is the fp32 difference whatever the storage dtype.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from polyfuse.data.io import atomic_write_folder, remove_stale_temporaries, write_json
from polyfuse.errors import ConfigError
from polyfuse.merge.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX
from polyfuse.merge.plan import index_input
from polyfuse.merge.reference import ModelReference
from polyfuse.merge.sources import SAFETENSORS_DTYPES, ModelReader, ModelSource
from polyfuse.progress import progress_bar

ADAPTER_FILES = {ADAPTER_CONFIG, ADAPTER_WEIGHTS[0], "README.md"}
logger = logging.getLogger(__name__)


@dataclass
class ExtractOptions:
    """mergekit-extract-lora's options, with its defaults."""

    max_rank: int = 128
    distribute_scale: bool = True
    embed_lora: bool = False
    modules_to_save: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)  # regexes, searched in module names
    include: list[str] = field(default_factory=list)
    sv_epsilon: float = 0.0
    skip_undecomposable: bool = False
    allow_pickle: bool = False
    quiet: bool = False


@dataclass
class ExtractResult:
    out: Path
    ranks: dict[str, int]  # decomposed module -> its rank
    modules_to_save: list[str]
    worst_error: float  # the largest relative truncation error ||delta - B A||_F / ||delta||_F over the modules


@dataclass
class _Module:
    name: str
    kind: str  # "lora", "embedding" (LoRA of the transposed weight), "save"
    bias: bool  # the module has a bias tensor stored


def extract_lora(base: str, tuned: str, out: str | Path, options: ExtractOptions | None = None,
                 console: Console | None = None) -> ExtractResult:
    options = options or ExtractOptions()
    console = console or Console()
    out = Path(out)
    _check_output(out)
    if options.max_rank < 1:
        raise ConfigError(f"--max-rank: expected a positive rank (got {options.max_rank})")
    for flag, patterns in (("--include-regex", options.include), ("--exclude-regex", options.exclude)):
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"{flag}: {pattern!r} is not a regular expression ({err})") from None
    base_model = index_input(ModelReference.parse(base), "base", options.allow_pickle)
    tuned_model = index_input(ModelReference.parse(tuned), "tuned", options.allow_pickle)
    modules, saved = _plan(base_model, tuned_model, options)
    if not any(m.kind != "save" for m in modules):
        raise ConfigError(f"{tuned}: no linear or embedding module to decompose (check --include-regex / "
                          f"--exclude-regex)")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    errors: list[float] = []
    readers = ModelReader(base_model), ModelReader(tuned_model)
    try:
        with progress_bar(disable=options.quiet) as bar:
            task = bar.add_task("extract-lora", total=len(modules))
            for module in modules:
                _extract(module, readers, options, tensors, ranks, errors)
                bar.advance(task)
    finally:
        for reader in readers:
            reader.close()
    if not ranks:
        raise ConfigError(f"{tuned}: every decomposed module differs from the base by singular values of at most "
                          f"--sv-epsilon {options.sv_epsilon}: there is no adapter to write")
    rank = max(ranks.values())
    others = {name: r for name, r in ranks.items() if r != rank}
    decomposed = [m for m in modules if m.name in ranks]
    lora_bias = all(m.bias and m.kind == "lora" for m in decomposed)
    biased = [m.name for m in decomposed if m.bias]
    if biased and not lora_bias:
        logger.warning("%d decomposed modules have a bias delta (e.g. %s), saved as lora_B.bias as mergekit does; "
                       "peft applies those only with lora_bias, which needs a bias on every target module",
                       len(biased), biased[0])
    config = {
        "base_model_name_or_path": base,
        "peft_type": "LORA",
        "use_rslora": False,
        "target_modules": sorted({m.name.rsplit(".", 1)[-1] for m in decomposed}),
        "modules_to_save": saved,
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": others,
        "alpha_pattern": others,
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "lora_bias": lora_bias,
    }

    def write(folder: Path) -> None:
        from safetensors.torch import save_file

        save_file(tensors, str(folder / ADAPTER_WEIGHTS[0]), metadata={"format": "pt"})
        write_json(folder / ADAPTER_CONFIG, config)

    remove_stale_temporaries(out.parent)  # a killed run's temporary folder
    atomic_write_folder(out, write)
    worst = max(errors, default=0.0)
    console.print(f"extract-lora: {len(ranks)} modules decomposed (rank {min(ranks.values())}-{rank}), "
                  f"{len(saved)} module names saved whole; largest relative truncation error {worst:.3g}")
    return ExtractResult(out, ranks, saved, worst)


def _check_output(out: Path) -> None:
    """A new or empty folder, or one holding an adapter (replaced whole); never a folder with other files."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: is a file, expected an output folder for the adapter")
    other = sorted(p.name for p in out.iterdir() if p.name not in ADAPTER_FILES) if out.is_dir() else []
    if other:
        raise ConfigError(f"{out}: holds other files than a LoRA adapter ({other[0]}); choose a new or empty folder")


def _plan(base: ModelSource, tuned: ModelSource, options: ExtractOptions) -> tuple[list[_Module], list[str]]:
    """The modules to decompose or save, in the model's module order, checked from the headers; and the
    `modules_to_save` names (mergekit's list: the given ones, then each embedding's and undecomposable module's
    last name part)."""
    model = _meta_model(tuned)
    embed_in, embed_out = model.get_input_embeddings(), model.get_output_embeddings()
    embed_lora = options.embed_lora
    key = next((f"{n}.weight" for n, m in model.named_modules() if m is embed_in), None)
    if embed_lora and key in base.tensors and key in tuned.tensors and base.tensors[key].shape != tuned.tensors[key].shape:
        logger.warning("the vocabulary changed (%s is %s in the base, %s tuned): the embeddings are saved whole, as "
                       "mergekit does", key, list(base.tensors[key].shape), list(tuned.tensors[key].shape))
        embed_lora = False
    saved = list(options.modules_to_save)
    modules: list[_Module] = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        key = f"{name}.weight"
        if key not in tuned.tensors:
            if embed_out is not None and module is embed_out and weight is embed_in.weight:
                continue  # a tied head is the embedding
            raise ConfigError(f"{tuned.label}: the {type(module).__name__} {name} has no tensor {key} in the "
                              f"checkpoint")
        last = name.rsplit(".", 1)[-1]
        bias = f"{name}.bias" in tuned.tensors
        embedding = module is embed_in or module is embed_out or isinstance(module, torch.nn.Embedding)
        if embedding and not embed_lora and not any(re.search(r, name) for r in options.exclude):
            saved += [last] if last not in saved else []
        if name in saved or last in saved:
            modules.append(_Module(name, "save", bias))
        elif (not options.include or any(re.search(r, name) for r in options.include)) and \
                not any(re.search(r, name) for r in options.exclude):
            if isinstance(module, torch.nn.Linear | torch.nn.Embedding) and len(weight.shape) == 2:
                modules.append(_Module(name, "embedding" if isinstance(module, torch.nn.Embedding) else "lora", bias))
                _check_shapes(base, tuned, key, bias)
            elif not options.skip_undecomposable:
                saved += [last] if last not in saved else []
                modules.append(_Module(name, "save", bias))
    return modules, saved


def _meta_model(source: ModelSource) -> torch.nn.Module:
    """The model's transformers class, built on the meta device: module names and types, no weights."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(source.folder), trust_remote_code=False)
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise ConfigError(f"{source.label}: config.json names no transformers class ({names or 'no architectures'}); "
                          f"extract-lora needs the model's layer types (custom code is not run)")
    with torch.device("meta"):
        return cls._from_config(config)


def _check_shapes(base: ModelSource, tuned: ModelSource, key: str, bias: bool) -> None:
    for name in [key] + ([key.removesuffix(".weight") + ".bias"] if bias else []):
        if name not in base.tensors:
            raise ConfigError(f"{base.label}: has no tensor {name}, which {tuned.label} has: not its base")
        if base.tensors[name].shape != tuned.tensors[name].shape:
            raise ConfigError(f"{tuned.label}: {name} is {list(tuned.tensors[name].shape)} but the base's is "
                              f"{list(base.tensors[name].shape)}; a changed shape cannot be a LoRA (for embeddings, "
                              f"leave --embed-lora off to save them whole)")


def _extract(module: _Module, readers: tuple[ModelReader, ModelReader], options: ExtractOptions,
             tensors: dict[str, torch.Tensor], ranks: dict[str, int], errors: list[float]) -> None:
    """One module: saved whole, or decomposed into A and B stored in the tuned weight's dtype."""
    base, tuned = readers
    prefix = f"{PREFIX}{module.name}"
    names = [f"{module.name}.weight"] + ([f"{module.name}.bias"] if module.bias else [])
    dtype = SAFETENSORS_DTYPES[tuned.source.tensors[names[0]].dtype]
    if module.kind == "save":
        for name in names:
            tensors[f"{PREFIX}{name}"] = tuned.read(name).contiguous()
        return
    delta = tuned.read(names[0]).float() - base.read(names[0]).float()
    if module.kind == "embedding":
        delta = delta.T
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    rank = min(options.max_rank, s.shape[0])
    if options.sv_epsilon > 0:
        rank = min(int((s > options.sv_epsilon).sum()), rank)
    if rank == 0:
        return
    if options.distribute_scale:
        root = s[:rank].sqrt()
        weight_a, weight_b = root[:, None] * vh[:rank], u[:, :rank] * root
    else:
        weight_a, weight_b = s[:rank, None] * vh[:rank], u[:, :rank].clone()
    total = float(s.square().sum())
    errors.append(math.sqrt(float(s[rank:].square().sum()) / total) if total > 0 else 0.0)
    kind = "lora_embedding" if module.kind == "embedding" else "lora"
    suffix = "" if module.kind == "embedding" else ".weight"
    tensors[f"{prefix}.{kind}_A{suffix}"] = weight_a.to(dtype).contiguous()
    tensors[f"{prefix}.{kind}_B{suffix}"] = weight_b.to(dtype).contiguous()
    if module.bias:
        tensors[f"{prefix}.lora_B.bias"] = (tuned.read(names[1]).float() - base.read(names[1]).float()).to(dtype)
    ranks[module.name] = rank
