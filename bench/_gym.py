"""What the fusion-gym merge benches share (gym_merge_check, gym_merge_diagnose, gym_merge_parity): their
options and `--smoke`, which runs the same steps on the gym-tiny world with 4 validation items per domain,
writing under runs/ instead of docs/, in seconds."""

from __future__ import annotations

import argparse
from pathlib import Path


def gym_arguments(doc: str, name: str, out: str, smoke_file: str, per_domain: int = 300,
                  seeds: list[int] | None = None) -> argparse.Namespace:
    """The bench's options, parsed: `--per-domain`, `--work-dir` (runs/NAME), `--cache-dir`, `--out` (OUT), `--smoke`,
    and `--seeds` (world seeds) when `seeds` gives their default; `preset` is the world's (`gym`, smoke: `gym-tiny`).
    A smoke run takes seed 0, 4 items per domain, and writes runs/NAME-smoke/SMOKE_FILE."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if seeds is not None:
        parser.add_argument("--seeds", type=int, nargs="+", default=seeds, help="World seeds.")
    parser.add_argument("--per-domain", type=int, default=per_domain, help="Validation items per domain.")
    parser.add_argument("--work-dir", type=Path, default=Path("runs") / name)
    parser.add_argument("--cache-dir", type=Path, default=None, help="Toy world cache (default: polyfuse's).")
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--smoke", action="store_true",
                        help=f"gym-tiny, {'seed 0, ' if seeds is not None else ''}4 items per domain, under runs/.")
    args = parser.parse_args()
    args.preset = "gym"
    if args.smoke:
        args.preset, args.per_domain = "gym-tiny", 4
        if seeds is not None:
            args.seeds = [0]
        args.work_dir = Path("runs") / f"{name}-smoke"
        args.out = args.work_dir / smoke_file
    return args
