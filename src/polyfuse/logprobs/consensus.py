"""CGPO's consensus step (`polyfuse consensus`, a recipe's `consensus` stage): from unpaired rows that M0 and every
source scored (`polyfuse logprobs`: `ref_mean_completion_logps`, `fuse_mean_completion_logps`,
`fuse_completion_entropy`), the columns CGPO trains against: `source_consensus`, `baseline_shift`,
`aligned_consensus`, `source_weights` and `calibrated_entropies` (the reference release's names; the formulas
are `polyfuse.objectives.consensus`).

The entropy calibration is fitted on rows that training never sees: a held-out split of the data's prompts
(whole prompts, seeded, at least `calibration_fraction` of them and `calibration_min_rows` rows; project decision
CGPO-b), or a calibration file the user scored the same way, refused when it shares a prompt with the data or
lists other sources (or the same ones in another order). The training rows, the held-out rows and the summary
(split seed and prompts, mean weight per source, weight percentiles, share of clipped entropies, mean shift,
share of single-row prompts) are written separately.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from polyfuse.data.io import read_metadata, write_json, write_metadata, write_rows
from polyfuse.data.schemas import UnpairedRow, unpaired_columns
from polyfuse.errors import DataError, named_data_errors
from polyfuse.lazy import lazy_import
from polyfuse.logprobs.run import fusion_sources
from polyfuse.objectives.cgpo import PIVOT_COLUMN
from polyfuse.objectives.consensus import (
    ConsensusSettings,
    build_consensus,
    calibration_prompts,
    check_disjoint,
)
from polyfuse.progress import note

torch = lazy_import("torch")

SCORES, ENTROPIES = "fuse_mean_completion_logps", "fuse_completion_entropy"


class ConsensusConfig(ConsensusSettings):
    """`polyfuse consensus --config` and a recipe's `consensus` section: how CGPO's aligned source consensus is built
    and which rows calibrate it."""

    calibration: str | None = Field(
        default=None, description="A calibration file: unpaired rows scored by the same M0 and sources (`polyfuse "
        "logprobs`; its metadata lists the sources in the data's order), sharing no prompt with the data. None: "
        "hold out calibration_fraction of the data's prompts (at least calibration_min_rows rows); they are kept "
        "out of training.")


def run_consensus(config: ConsensusConfig, rows: list[UnpairedRow], data_path: str | Path, out_dir: str | Path,
                  calibration_rows: list[UnpairedRow] | None = None) -> dict[str, Path]:
    """Write `unpaired.jsonl` (the training rows with the consensus columns; its metadata the data's, plus the
    consensus summary), `consensus.json` and, for a held-out split, `calibration.jsonl` into `out_dir`.
    `calibration_rows`: the rows of `config.calibration`, read by the caller."""
    with named_data_errors(data_path, config.calibration):
        return _run_consensus(config, rows, data_path, Path(out_dir), calibration_rows)


def _run_consensus(config: ConsensusConfig, rows: list[UnpairedRow], data_path: str | Path, out_dir: Path,
                   calibration_rows: list[UnpairedRow] | None) -> dict[str, Path]:
    sources = fusion_sources(data_path, rows)
    if not sources:
        raise DataError(f"{data_path}: the rows have no source scores (fuse_* columns); the consensus needs every "
                        "source's: score them with `polyfuse logprobs` and its sources")
    if calibration_rows is None:
        held = set(calibration_prompts([row.prompt_id for row in rows], config.calibration_fraction,
                                       config.calibration_min_rows, config.calibration_seed))
        calibration = [row for row in rows if row.prompt_id in held]
        rows = [row for row in rows if row.prompt_id not in held]
        split = {"from": str(data_path), "seed": config.calibration_seed, "prompts": sorted(held)}
    else:
        calibration = calibration_rows
        others = fusion_sources(config.calibration, calibration)
        if others != sources:
            raise DataError(f"{config.calibration}: scored by the sources {others}, the data by {sources}; the "
                            "calibration file must list the same sources in the same order")
        check_disjoint([row.prompt_id for row in calibration], [row.prompt_id for row in rows])
        split = {"from": config.calibration, "prompts": sorted({row.prompt_id for row in calibration})}
    calibrated = config.aggregation == "calibrated_entropy"
    needed = "the CGPO consensus"
    train = unpaired_columns(rows, [PIVOT_COLUMN, SCORES, *([ENTROPIES] if calibrated else [])], needed)
    held_out = unpaired_columns(calibration, [ENTROPIES], f"{needed} (its calibration rows)") if calibrated else {}
    tensor = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
    consensus = build_consensus(
        [row.prompt_id for row in rows], tensor(train[PIVOT_COLUMN]), tensor(train[SCORES]),
        tensor(train[ENTROPIES]) if calibrated else None,
        tensor(held_out[ENTROPIES]) if calibrated else None, config,
    )
    columns = {name: getattr(consensus, name).tolist() for name in
               ("source_consensus", "baseline_shift", "aligned_consensus", "source_weights", "calibrated_entropies")}
    scored = [row.model_copy(update={name: values[i] for name, values in columns.items()}) for i, row in enumerate(rows)]
    summary = {"sources": sources, **consensus.summary, "calibration_rows": len(calibration), "training_rows": len(rows)}
    paths = {"unpaired": out_dir / "unpaired.jsonl", "summary": out_dir / "consensus.json"}
    write_rows(paths["unpaired"], scored)
    record = {"settings": config.model_dump(), "summary": summary, "calibration": split}
    write_metadata(paths["unpaired"], {**read_metadata(data_path), "consensus": record})
    if calibration_rows is None:
        paths["calibration"] = out_dir / "calibration.jsonl"
        write_rows(paths["calibration"], calibration)
    write_json(paths["summary"], record)
    weights = ", ".join(f"{name} {summary[f'source_weight/{i}']:.3f}" for i, name in enumerate(sources))
    note(f"consensus: {len(rows)} training rows, {len(calibration)} calibration rows; mean source weights {weights}; "
         f"mean |shift| {summary['mean_abs_shift']:.4f}")
    return paths


def calibration_prompt_ids(data_path: str | Path) -> set[str]:
    """The prompts a consensus step held out (or read as its calibration file) for the rows of `data_path`, from its
    metadata; empty when the consensus step did not write it."""
    record = read_metadata(data_path).get("consensus") or {}
    return set((record.get("calibration") or {}).get("prompts", []))

