"""`polyfuse merge`: validate, plan, then merge tensor by tensor in bounded memory (spec section 12).

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
from polyfuse.merge.config import MergeConfig
from polyfuse.merge.methods.base import MergeMethod, TensorTask
from polyfuse.merge.output import write_extras
from polyfuse.merge.plan import MergePlan, TensorPlan, build_plan, describe
from polyfuse.merge.smoke import SmokeResult, smoke_check
from polyfuse.merge.sources import FLOAT_DTYPES, ModelReader, fetch_weights
from polyfuse.merge.vocab import remap_rows
from polyfuse.merge.writer import ShardWriter, parse_size
from polyfuse.models.loader import DTYPES
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
    method = cfg.method()()
    plan = build_plan(cfg, source, options.allow_pickle)
    limit = parse_size(options.max_shard_size)
    writer = ShardWriter(out, [(t.name, t.nbytes) for t in plan.tensors], limit, _fingerprint(cfg, plan, limit))
    writer.open()  # the last check before reading tensors: folder ours, writable, enough disk
    estimate = memory_estimate(plan, limit)
    console.print(f"merge {cfg.merge_method}: {len(plan.merged)} models, {len(plan.tensors)} tensors, "
                  f"{len(writer.files)} shards ({_size(sum(writer.sizes.values()))} on disk); "
                  f"peak memory estimate {_size(estimate)} "
                  f"(({len(plan.merged)}+1) x {_size(plan.largest * 4)} largest fp32 tensor x {WORKING_COPIES}"
                  f" + one {_size(min(limit, sum(writer.sizes.values())))} shard)")
    for model in plan.inputs:
        fetch_weights(model)
    pending = set(writer.pending())
    if writer.done:
        state = "resuming" if pending else "already merged"
        console.print(f"{state}: {len(writer.done)} of {len(writer.files)} shards finished and kept")
    readers = [ModelReader(s) for s in plan.inputs]
    try:
        with progress_bar(disable=options.quiet) as bar:
            statistics = _statistics_pass(method, plan, readers, bar) if pending else {}
            task = bar.add_task(f"merge {cfg.merge_method}", total=len(pending))
            for tensor in plan.tensors:
                if tensor.name in pending:
                    writer.add(tensor.name, merge_tensor(method, plan, readers, tensor, statistics))
                    bar.advance(task)
    finally:
        for reader in readers:
            reader.close()
    writer.finish()
    write_extras(cfg, plan, out)
    report = method.report()
    if report:
        write_json(out / "merge_report.json", report)
        if "realised_density" in report:
            densities = ", ".join(f"{d:.3f}" for d in report["realised_density"])
            console.print(f"{report['method']}: realised density per model {densities} (merge_report.json)")
    smoke = None
    if options.smoke_check:
        smoke = smoke_check(str(out), str(plan.inputs[0].folder), options.allow_pickle)
        reference = "base" if plan.has_base else "first model"
        console.print(f"smoke check: finite logits; perplexity {smoke.perplexity:.3f} "
                      f"({reference} {smoke.base_perplexity:.3f})")
    return MergeResult(out, writer.files, estimate, len(pending), smoke)


def memory_estimate(plan: MergePlan, shard_limit: int) -> int:
    """(K + 1) x the largest tensor in fp32 x the working-copy budget, plus one output shard."""
    total = sum(t.nbytes for t in plan.tensors)
    return (len(plan.merged) + 1) * plan.largest * 4 * WORKING_COPIES + min(shard_limit, total)


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000:
            return f"{nbytes:.3g} {unit}"
        nbytes /= 1000
    return f"{nbytes:.3g} TB"


def read_task(method: MergeMethod, plan: MergePlan, readers: list[ModelReader], tensor: TensorPlan,
              statistics: dict[str, Any]) -> TensorTask:
    """Read one tensor from every input (fp32, rows in the output vocabulary) as a `TensorTask` that owns them:
    nothing else holds these tensors, so the method may overwrite them."""
    remap = tensor.vocab and plan.vocab is not None and plan.vocab.remaps
    with_base = plan.has_base and (method.requires_base or remap)
    indices = ([0] if with_base else []) + plan.merged
    values = [readers[i].read(tensor.keys[i]).float() for i in indices]
    if remap:
        values = remap_rows(values, [plan.vocab.maps[i] for i in indices], plan.vocab.rows, with_base)
    base = values.pop(0) if with_base else None
    resolver = plan.resolver
    return TensorTask(
        name=tensor.name, base=base if method.requires_base else None, models=values,
        model_params=resolver.model_params(tensor.name), params=resolver.params(tensor.name),
        seed=resolver.seed(), statistics=statistics, owned=True,
    )


def merge_tensor(method: MergeMethod, plan: MergePlan, readers: list[ModelReader], tensor: TensorPlan,
                 statistics: dict[str, Any]) -> torch.Tensor:
    if tensor.dtype not in FLOAT_DTYPES:  # integer buffers are not weights: the base's, as is
        return readers[0].read(tensor.keys[0])
    result = method.merge(read_task(method, plan, readers, tensor, statistics))
    if tuple(result.shape) != tensor.shape:
        raise RuntimeError(f"{method.name} returned shape {list(result.shape)} for {tensor.name}, "
                           f"expected {list(tensor.shape)}")
    return result.to(DTYPES[plan.out_dtype])


def _statistics_pass(method: MergeMethod, plan: MergePlan, readers: list[ModelReader], bar) -> dict[str, Any]:
    """Pass 1 for two-pass methods (RSAF): small per-tensor statistics, then whole-model ones."""
    if type(method).tensor_statistics is MergeMethod.tensor_statistics:
        return {}
    floats = [t for t in plan.tensors if t.dtype in FLOAT_DTYPES]
    task = bar.add_task("statistics", total=len(floats))
    per_tensor = {}
    for tensor in floats:
        stats = method.tensor_statistics(read_task(method, plan, readers, tensor, {}))
        if stats is not None:
            per_tensor[tensor.name] = stats
        bar.advance(task)
    return method.finish_statistics(per_tensor)


def _fingerprint(cfg: MergeConfig, plan: MergePlan, limit: int) -> str:
    """Config, plan, shard limit and the inputs' files (size, mtime; a hub snapshot's path names its commit):
    a resume must merge the same thing."""
    files = sorted({(info.file, s.hub) for s in plan.inputs for info in s.tensors.values()})
    stamp = [[str(f)] if hub else [str(f), f.stat().st_size, f.stat().st_mtime_ns] for f, hub in files]
    data = {"config": cfg.model_dump(mode="json"), "plan": describe(plan), "limit": limit, "files": stamp,
            "out_dtype": plan.out_dtype}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
