"""Is the fusion gym's merging failure a polyfuse bug or the method? The same merges of the gym's LoRA specialists
by `polyfuse merge` and by mergekit's own `mergekit-yaml`, compared tensor by tensor and scored on the same
validation items; plus a check that each specialist is its base plus a rank-r update in the LoRA'd layers only.

    python bench/gym_merge_parity.py --cache-dir /tmp/gymcal/cache --out docs/gym/merge_parity.json
    python bench/gym_merge_parity.py --smoke        # gym-tiny, 4 items per domain: that it runs

The merges are `gym_merge_check.METHODS` (task arithmetic at lambda 1 and 0.5, TIES at density 0.5, linear);
each config is written once and given to both tools (CLI against CLI: each tool's command-line entry point, called
in this process, which has imported torch and transformers already; a new interpreter per merge would spend 5-7 CPU
seconds importing them again, most of the smoke run). Reported per method: the largest
|polyfuse - mergekit| over all tensors (and per tensor in the JSON), and validation accuracy per domain of both
outputs (`--per-domain` items, seed 0: gym_merge_check's items). Work is cached under `--work-dir`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch
import yaml
from _gym import gym_arguments
from gym_merge_check import METHODS, accuracy
from merge_methods_toy import weights

from polyfuse.data.io import atomic_write_text, write_json
from polyfuse.toyworld import ToyWorldConfig, build_world


def polyfuse_merge(config: Path, out: Path) -> None:
    """`polyfuse merge CONFIG OUT --quiet`."""
    from polyfuse.cli.main import main

    main(["merge", str(config), str(out), "--quiet"])


def mergekit_yaml(config: Path, out: Path) -> None:
    """`mergekit-yaml CONFIG OUT --random-seed 0 --quiet` (the console script's click command)."""
    from mergekit.scripts.run_yaml import main

    main([str(config), str(out), "--random-seed", "0", "--quiet"])


TOOLS = {"polyfuse": polyfuse_merge, "mergekit": mergekit_yaml}  # tool -> its command on CONFIG OUT


def run_tool(tool: str, config: Path, out: Path) -> None:
    """A tool's command in this process, its report to stdout dropped; an exit code other than 0 stops the bench."""
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            TOOLS[tool](config, out)
    except SystemExit as stop:  # click's commands end with SystemExit, 0 on success
        if stop.code not in (0, None):
            raise SystemExit(f"{tool} on {config} failed (exit {stop.code})") from None


def lora_check(base: Path, specialist: Path, rank: int) -> dict:
    """Where the specialist differs from its base, and the numerical rank of each 2-D difference (a merged LoRA of
    rank r has rank <= r; a tensor outside the LoRA'd layers must be unchanged)."""
    theta, tuned = weights(base), weights(specialist)
    changed, ranks = {}, {}
    for name, value in theta.items():
        delta = (tuned[name] - value).double()
        changed[name] = float(delta.abs().max())
        if delta.ndim == 2 and changed[name] > 0:
            sv = torch.linalg.svdvals(delta)
            ranks[name] = int((sv > sv[0] * 1e-6).sum())
    return {"max_abs_change": changed, "rank": ranks, "max_rank": max(ranks.values(), default=0), "lora_rank": rank,
            "unchanged": sorted(n for n, c in changed.items() if c == 0)}


def parity(name: str, spec: tuple, base: Path, models: list[Path], folder: Path) -> dict:
    method, model_parameters, parameters = spec
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "merge.yaml"
    # linear ignores a base: polyfuse drops a weightless base_model (logged), mergekit stops with 'missing
    # parameter weight' there, so the shared config leaves it out (the mean of the specialists either way)
    atomic_write_text(config, yaml.safe_dump({
        "merge_method": method, **({"base_model": str(base)} if method != "linear" else {}), "dtype": "float32",
        "models": [{"model": str(m), "parameters": model_parameters} for m in models], "parameters": parameters,
    }, sort_keys=False))
    outs = {}
    for tool in TOOLS:
        out = folder / tool
        if not any(out.glob("*.safetensors")):
            run_tool(tool, config, out)
        outs[tool] = out
    ours, theirs = weights(outs["polyfuse"]), weights(outs["mergekit"])
    if set(ours) != set(theirs):
        raise SystemExit(f"{name}: tensor names differ: {sorted(set(ours) ^ set(theirs))}")
    diff = {k: float((ours[k] - theirs[k]).abs().max()) for k in sorted(ours)}
    return {"outputs": {t: str(p) for t, p in outs.items()}, "max_abs_diff": max(diff.values()), "per_tensor": diff}


def main() -> None:
    args = gym_arguments(__doc__, "gym-merge-parity", "docs/gym/merge_parity.json", "parity.json")
    started = time.perf_counter()
    config = ToyWorldConfig.preset(args.preset)
    world = build_world(config, cache_dir=args.cache_dir)
    work = args.work_dir / world.root.name
    prompts = world.prompts("validation", per_domain=args.per_domain, seed=0)
    base, specialists = world.merge_base_path, world.specialist_paths
    report: dict = {"world": str(world.root), "per_domain": args.per_domain, "lora": {}, "specialists": {}, "merges": {}}
    for domain, path in specialists.items():
        report["lora"][domain] = lora_check(base, path, config.gym.specialist.rank)
        report["specialists"][domain] = accuracy(domain, path, prompts, work / "eval" / f"specialist-{domain}.json")
    for name, spec in METHODS.items():
        slug = name.split()[0] + "-" + "".join(c for c in name.split("(")[1] if c.isalnum())
        row = parity(name, spec, base, list(specialists.values()), work / slug)
        row["accuracy"] = {tool: accuracy(f"{name} [{tool}]", Path(out), prompts, work / "eval" / f"{slug}-{tool}.json")
                           for tool, out in row["outputs"].items()}
        report["merges"][name] = row
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_json(args.out, report)
    print(f"LoRA check (rank {config.gym.specialist.rank}): " + ", ".join(
        f"{d}: max rank {r['max_rank']}, unchanged {len(r['unchanged'])} tensors" for d, r in report["lora"].items()))
    domains = world.domains
    print("| merge | max abs diff | " + " | ".join(f"{d} polyfuse / mergekit" for d in domains) + " |")
    for name, row in report["merges"].items():
        acc = row["accuracy"]
        print(f"| {name} | {row['max_abs_diff']:.2e} | "
              + " | ".join(f"{acc['polyfuse'][d]:.1f} / {acc['mergekit'][d]:.1f}" for d in domains) + " |")
    print(json.dumps({d: {k: round(v, 1) for k, v in s.items()} for d, s in report["specialists"].items()}))


if __name__ == "__main__":
    main()
