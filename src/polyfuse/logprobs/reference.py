"""Stage `reference`: score a preference file with the initial pivot M0 once, before any training run.

The output is the input rows plus the `ref_*` columns (spec section 7), and a `.meta.json` sidecar that
records which model scored them and how, so a later run can tell whether the columns still apply.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from polyfuse.config import StrictModel
from polyfuse.data.io import write_metadata, write_rows
from polyfuse.data.schemas import PreferenceRow, response_text
from polyfuse.logprobs.engine import LogpReport, compute_reference_logps, progress_bar, roles_of
from polyfuse.models import ModelSpec, encode, load_model, load_tokenizer

# Version of the sequence convention (spec section 6) the columns were computed with.
CONVENTION = "polyfuse-logps-1"


class ReferenceConfig(StrictModel):
    batch_size: int = Field(default=8, ge=1, description="Sequences per forward.")
    max_length: int | None = Field(default=None, ge=2, description="None: the model's context size.")
    overflow: Literal["drop", "error"] = "drop"


def add_reference_columns(
    model_spec: ModelSpec,
    rows: list[PreferenceRow],
    config: ReferenceConfig,
    out: str | Path,
    quiet: bool = False,
) -> Path:
    """Write `rows` with M0's S, A and n columns to `out` (format by suffix) and its metadata sidecar."""
    tokenizer = load_tokenizer(model_spec)
    model = load_model(model_spec)
    report = LogpReport()
    total = sum(len(roles_of(row)) for row in rows)
    with progress_bar("reference log-probs", total, disable=quiet) as advance:
        scored = compute_reference_logps(
            model, tokenizer, rows, config.batch_size, config.max_length, config.overflow, advance, report
        )
    out = Path(out)
    write_rows(out, scored)
    mode = encode(tokenizer, rows[0].prompt, response_text(rows[0].chosen)).mode if rows else None
    write_metadata(
        out,
        {
            "reference": {**model_spec.model_dump(), "label": model_spec.label, "template_mode": mode},
            "convention": CONVENTION,
            "backend": "transformers",
            "rows": len(scored),
            "dropped": report.dropped,
        },
    )
    return out
