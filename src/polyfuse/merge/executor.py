"""`polyfuse merge`: validate, plan, then merge tensor by tensor in bounded memory.

At any moment the engine holds one tensor per input (fp32), the method's working copies, and one
output shard, whatever the model size. Tensors are read one at a time into memory the task owns (one
shard handle per model; `sources.ModelReader`), so methods work on them in place.
Methods that need whole-model statistics get a read-only statistics pass first.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from polyfuse.data.io import write_json
from polyfuse.errors import ConfigError
from polyfuse.merge.config import MergeConfig, OutputSlice
from polyfuse.merge.methods.base import MergeMethod, TensorTask
from polyfuse.merge.output import EXTRA_FILES, REPORT, write_extras
from polyfuse.merge.plan import MergePlan, TensorPlan, build_plan, describe
from polyfuse.merge.smoke import SmokeResult, smoke_check
from polyfuse.merge.sources import FLOAT_DTYPES, ModelReader, fetch_weights, file_stamp
from polyfuse.merge.vocab import remap_rows
from polyfuse.merge.writer import ShardWriter, parse_size
from polyfuse.progress import progress_bar

WORKING_COPIES = 3  # stacked deltas, masks and the result: the method's budget per input tensor


@dataclass
class MergeOptions:
    allow_pickle: bool = False
    max_shard_size: str | int = "5GB"
    smoke_check: bool = True
    quiet: bool = False


@dataclass
class MergeResult:
    out: Path
    files: list[str]
    peak_memory_estimate: int  # bytes
    merged: int  # tensors merged by this run (a resumed run skips finished shards)
    smoke: SmokeResult | None


def run_merge(cfg: MergeConfig, out: str | Path, source: str = "config", options: MergeOptions | None = None,
              console: Console | None = None) -> MergeResult:
    options = options or MergeOptions()
    console = console or Console()
    out = Path(out)
    if out.exists() and not out.is_dir():  # before the headers are read: the cheapest refusal first
        raise ConfigError(f"{out}: is a file, expected an output folder (a new or empty folder, or one holding "
                          f"this merge to resume)")
    plan = build_plan(cfg, source, options.allow_pickle)
    methods = [piece.method() for piece in plan.slices]
    limit = parse_size(options.max_shard_size)
    writer = ShardWriter(out, [(t.name, t.nbytes) for t in plan.tensors], limit, _fingerprint(cfg, plan, limit),
                         EXTRA_FILES)
    writer.open()  # the last check before reading tensors: folder ours, writable, enough disk
    try:
        pending = _merge(cfg, plan, methods, writer, limit, options, console)
    except BaseException:
        writer.abandon()  # no temporary file left; a folder this run made and filled with nothing goes too
        raise
    writer.finish()
    write_extras(cfg, plan, out)
    reports = [m.report() for m in methods]
    if any(reports):
        report = reports[0] if len(reports) == 1 else {"slices": reports}
        write_json(out / REPORT, report)
        for item in reports:
            if "realised_density" in item:
                densities = ", ".join(f"{d:.3f}" for d in item["realised_density"])
                console.print(f"{item['method']}: realised density per model {densities} ({REPORT})")
    smoke = None
    if options.smoke_check:
        smoke = smoke_check(str(out), str(plan.inputs[0].folder), options.allow_pickle)
        if smoke.skipped:
            console.print(f"smoke check skipped: {smoke.skipped}")
        else:
            reference = "base" if plan.has_base else "first model"
            reference += " without its LoRA" if plan.inputs[0].lora else ""
            console.print(f"smoke check: finite logits; perplexity {smoke.perplexity:.3f} "
                          f"({reference} {smoke.base_perplexity:.3f}){smoke.detail}")
    return MergeResult(out, writer.files, memory_estimate(plan, limit), len(pending), smoke)


def _merge(cfg: MergeConfig, plan: MergePlan, methods: list[MergeMethod], writer: ShardWriter, limit: int,
           options: MergeOptions, console: Console) -> set[str]:
    """Fetch hub weights, then merge and write every pending tensor; returns the tensor names merged."""
    estimate = memory_estimate(plan, limit)
    layout = f"{len(plan.slices)} slices, {plan.num_layers} layers" if cfg.slices else _inputs(plan.slices[0])
    console.print(f"merge {cfg.merge_method}: {layout}, {len(plan.tensors)} tensors, "
                  f"{len(writer.files)} shards ({_size(sum(writer.sizes.values()))} on disk); "
                  f"peak memory estimate {_size(estimate)} "
                  f"({plan.widest} inputs x {_size(plan.largest * 4)} largest fp32 tensor x {WORKING_COPIES}"
                  f" + one {_size(min(limit, sum(writer.sizes.values())))} shard)")
    for note in plan.vocab.notes if plan.vocab is not None else []:
        console.print(f"tokenizer: {note}")
    for model in plan.inputs:
        fetch_weights(model)
    pending = set(writer.pending())
    if writer.done:
        state = "resuming" if pending else "already merged"
        console.print(f"{state}: {len(writer.done)} of {len(writer.files)} shards finished and kept")
    readers = [ModelReader(s) for s in plan.inputs]
    try:
        with progress_bar(disable=options.quiet) as bar:
            statistics = [_statistics_pass(m, plan, readers, bar, i) if pending else {}
                          for i, m in enumerate(methods)]
            task = bar.add_task(f"merge {cfg.merge_method}", total=len(pending))
            for tensor in plan.tensors:
                if tensor.name in pending:
                    method = methods[tensor.slice]
                    writer.add(tensor.name, merge_tensor(method, plan, readers, tensor, statistics[tensor.slice]))
                    bar.advance(task)
    finally:
        for reader in readers:
            reader.close()
    return pending


def _inputs(piece: OutputSlice) -> str:
    """How many inputs each tensor of a `models:` merge reads (the memory estimate's count too), and what they are:
    the base, the models, and how many distinct models when one is listed twice."""
    count, distinct = len(piece.inputs), len({entry.model for entry in piece.inputs})
    parts = [f"the base and {_plural(count - 1, 'model')}"] if piece.base is not None else []
    parts += [f"{_plural(distinct, 'distinct model')}"] if distinct < count else []
    return _plural(count, "input") + (f" ({'; '.join(parts)})" if parts else "")


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def memory_estimate(plan: MergePlan, shard_limit: int) -> int:
    """(inputs of the widest tensor) x the largest tensor in fp32 x the working-copy budget, plus one shard."""
    total = sum(t.nbytes for t in plan.tensors)
    return plan.widest * plan.largest * 4 * WORKING_COPIES + min(shard_limit, total)


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000:
            return f"{nbytes:.3g} {unit}"
        nbytes /= 1000
    return f"{nbytes:.3g} TB"


def read_task(method: MergeMethod, plan: MergePlan, readers: list[ModelReader], tensor: TensorPlan,
              statistics: dict[str, Any]) -> TensorTask:
    """Read one tensor from every input of its slice (fp32, rows in the output vocabulary) as a `TensorTask`
    that owns them: nothing else holds these tensors, so the method may overwrite them."""
    remap = tensor.vocab and plan.vocab is not None and plan.vocab.remaps
    inputs = [i for i, _ in tensor.sources]
    values = [readers[i].read(key).float() for i, key in tensor.sources]
    if remap:
        values = remap_rows(values, inputs, plan.vocab, tensor.base)
    base = values.pop(tensor.base) if tensor.base is not None else None
    resolver = plan.resolvers[tensor.slice]
    return TensorTask(
        name=tensor.name, base=base, models=values,
        model_params=resolver.model_params(tensor.keys, tensor.t), params=resolver.params(tensor.name, tensor.t),
        seed=resolver.seed(), statistics=statistics, owned=True,
    )


def merge_tensor(method: MergeMethod, plan: MergePlan, readers: list[ModelReader], tensor: TensorPlan,
                 statistics: dict[str, Any]) -> torch.Tensor:
    if tensor.dtype not in FLOAT_DTYPES:  # integer buffers are not weights: the base's (or first input's), as is
        index, key = tensor.sources[tensor.base or 0]
        return readers[index].read(key)
    result = method.merge(read_task(method, plan, readers, tensor, statistics))
    if tuple(result.shape) != tensor.shape:
        raise RuntimeError(f"{method.name} returned shape {list(result.shape)} for {tensor.name}, "
                           f"expected {list(tensor.shape)}")
    return result.to(getattr(torch, plan.out_dtype))


def _statistics_pass(method: MergeMethod, plan: MergePlan, readers: list[ModelReader], bar,
                     piece: int = 0) -> dict[str, Any]:
    """Pass 1 for two-pass methods (RSAF): small per-tensor statistics of one slice, then whole-slice ones."""
    if type(method).tensor_statistics is MergeMethod.tensor_statistics:
        return {}
    floats = [t for t in plan.tensors if t.dtype in FLOAT_DTYPES and t.slice == piece]
    task = bar.add_task("statistics", total=len(floats))
    per_tensor = {}
    for tensor in floats:
        stats = method.tensor_statistics(read_task(method, plan, readers, tensor, {}))
        if stats is not None:
            per_tensor[tensor.name] = stats
        bar.advance(task)
    return method.finish_statistics(per_tensor)


def _fingerprint(cfg: MergeConfig, plan: MergePlan, limit: int) -> str:
    """Config, plan, shard limit and what the inputs' files hold (`sources.file_stamp`: never their paths' mtimes,
    so touching or copying an input keeps a resume valid; a hub snapshot's path names its commit): a resume must
    merge the same thing."""
    files = {(info.file, s.hub) for s in plan.inputs for info in s.tensors.values()}
    files |= {(info.file, False) for s in plan.inputs if s.lora for info in s.lora.weights.tensors.values()}
    stamp = [[str(f)] if hub else [str(f), file_stamp(f)] for f, hub in sorted(files)]
    data = {"config": cfg.model_dump(mode="json"), "plan": describe(plan), "limit": limit, "files": stamp,
            "out_dtype": plan.out_dtype, "adapters": [s.lora.config if s.lora else None for s in plan.inputs]}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
