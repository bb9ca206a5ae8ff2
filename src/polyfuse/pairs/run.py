"""The pairs engine (`polyfuse pairs`, a recipe's `pairs` stage): the rules of `polyfuse.pairs.rules` applied
to a scored file, written as SFT rows, preference rows and the counts report."""

from __future__ import annotations

import warnings
from pathlib import Path

from polyfuse.data.io import write_json, write_metadata, write_rows
from polyfuse.data.schemas import SampleRow
from polyfuse.pairs.rules import PairsConfig, build_pairs, unpaired_rows
from polyfuse.progress import note


def run_pairs(samples: list[SampleRow], config: PairsConfig, out_dir: str | Path) -> dict[str, Path]:
    """Write `sft.jsonl`, `preference.jsonl` and `report.json` into `out_dir` (and `unpaired.jsonl` with its
    metadata when `config.unpaired` is set); say how the prompts were split."""
    out_dir = Path(out_dir)
    sft_rows, pair_rows, report = build_pairs(samples, config)
    unpaired, counts = unpaired_rows(samples, config)
    report.update(counts)
    paths = {"sft": out_dir / "sft.jsonl", "preference": out_dir / "preference.jsonl", "report": out_dir / "report.json"}
    write_rows(paths["sft"], sft_rows)
    write_rows(paths["preference"], pair_rows)
    if config.unpaired is not None:
        paths["unpaired"] = out_dir / "unpaired.jsonl"
        write_rows(paths["unpaired"], unpaired)
        write_metadata(paths["unpaired"], {"unpaired": config.unpaired.model_dump(), "seed": config.seed,
                                           "sft_fraction": config.sft_fraction})
    write_json(paths["report"], report)
    unpaired_note = (f", {len(unpaired)} unpaired rows ({counts['unpaired_desirable']} D / "
                     f"{counts['unpaired_undesirable']} U)" if config.unpaired is not None else "")
    note(f"pairs: {report.get('prompts', 0)} prompts split {report.get('sft_prompts', 0)} SFT / "
         f"{report.get('po_prompts', 0)} preference (sft_fraction {config.sft_fraction:g}); {len(sft_rows)} SFT rows, "
         f"{len(pair_rows)} pairs{unpaired_note}, ranked by {report['ranked_by']}")
    for kind, rows, prompts in (("SFT rows", sft_rows, "sft_prompts"), ("preference pairs", pair_rows, "po_prompts")):
        if report.get(prompts) and not rows:
            reasons = ", ".join(f"{k} {v}" for k, v in report.items() if k.startswith(("dropped", "candidates")))
            warnings.warn(f"pairs: 0 {kind} from {report[prompts]} prompts ({reasons}); see {paths['report']}", stacklevel=2)
    return paths
