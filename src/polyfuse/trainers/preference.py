"""Preference optimisation (DPO, LN-DPO, and any objective in `polyfuse.objectives.OBJECTIVES`).

No reference model is loaded while training: reference log-probs are precomputed `ref_*` columns.
When they are missing, `ensure_reference_columns` scores the rows with the initial pivot M0 (the model
about to be trained, before its first step). Each micro-batch is one forward over the concatenated
responses (chosen, rejected, and any other role the objective asks for).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from polyfuse.data.schemas import PreferenceRow, UnpairedRow, response_text
from polyfuse.errors import DataError, named_data_errors
from polyfuse.logprobs import (
    LogpReport,
    check_logp_columns,
    compute_reference_logps,
    fusion_sources,
    roles_of,
)
from polyfuse.models import ModelSpec, encode, load_model, load_tokenizer
from polyfuse.models.forward import length_limit, pad_token_id
from polyfuse.objectives import PreferenceBatch, PreferenceObjective, UnpairedObjective
from polyfuse.progress import progress_task
from polyfuse.trainers.checkpoints import data_fingerprint
from polyfuse.trainers.collate import SequenceCollator, collator_for
from polyfuse.trainers.config import PreferenceTrainConfig
from polyfuse.trainers.memory import check_memory
from polyfuse.trainers.run import TrainingRun
from polyfuse.trainers.trainer import PolyfuseTrainer

logger = logging.getLogger(__name__)

PRECOMPUTED_PREFIXES = ("ref_", "fuse_")


class PreferenceTrainer(PolyfuseTrainer):
    """Hands the objective the policy's sums and counts per role plus every precomputed column.

    Metrics an objective reports per fusion candidate (`fusion/selected/0`, ... with 0 the initial pivot
    and i the i-th source) are logged under the candidates' names (`fusion/selected/M0`, ...)."""

    def __init__(self, *args: Any, objective: PreferenceObjective, candidates: list[str], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.roles = objective.roles
        self.candidates = candidates

    def _named(self, metric: str) -> str:
        head, _, index = metric.rpartition("/")
        return f"{head}/{self.candidates[int(index)]}" if index.isdigit() and int(index) < len(self.candidates) else metric

    def summed_loss(self, inputs, logps, ntokens):
        pairs = len(logps) // len(self.roles)
        batch = PreferenceBatch(
            logps=dict(zip(self.roles, logps.split(pairs), strict=True)),
            ntokens=dict(zip(self.roles, ntokens.split(pairs), strict=True)),
            columns={k: v for k, v in inputs.items() if k.startswith(PRECOMPUTED_PREFIXES)},
            step=self.state.global_step,
            total_steps=max(self.state.max_steps, 1),
        )
        losses, metrics = self.objective(batch)
        return losses.sum(), {self._named(name): value for name, value in metrics.items()}

    def count_items(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pairs: rows per role, or rows of the shared-prompt layout (one per pair)."""
        rows = inputs["input_ids"].shape[0]
        return torch.tensor(rows if inputs["attention_mask"].dim() == 4 else rows // len(self.roles))


def ensure_reference_columns(
    model: Any,
    tokenizer: Any,
    rows: list[PreferenceRow] | list[UnpairedRow],
    objective: PreferenceObjective | UnpairedObjective,
    token_budget: int = 4096,
    max_length: int | None = None,
    report: LogpReport | None = None,
) -> list[PreferenceRow] | list[UnpairedRow]:
    """Rows with every column the objective reads (checked first by `check_preference_rows`, or the unpaired
    trainer's checks): missing `ref_*` columns are computed with `model`, which must be the initial pivot M0."""
    missing = {c for c in objective.required_columns() for row in rows if getattr(row, c, None) is None}
    if not missing:
        return rows
    logger.info(
        "scoring %d rows with the initial model for reference columns %s", len(rows), sorted(missing)
    )
    total = sum(len(roles_of(row)) for row in rows)
    with progress_task("reference log-probs", total) as advance:
        return compute_reference_logps(
            model,
            tokenizer,
            rows,
            token_budget=token_budget,
            max_length=max_length,
            progress=advance,
            report=report,
        )


def check_preference_rows(rows: list[PreferenceRow], objective: PreferenceObjective, name: str) -> None:
    """What the objective needs of the rows, checked before any model is loaded: every response it scores
    (WRPO's `chosen_source`), the precomputed columns it reads that only `polyfuse logprobs` writes, and the
    consistency of those present (mean * count = sum, one `fuse_*` value per source)."""
    roles = [role for role in objective.roles if role not in ("chosen", "rejected")]
    lacking = [row.id for row in rows if any(getattr(row, role, None) is None for role in roles)]
    if lacking:
        raise DataError(f"{len(lacking)} rows (the first: id {lacking[0]!r}) lack {' or '.join(roles)}, which "
                        f"objective {name!r} needs (`polyfuse pairs` writes it with `target:` set)")
    missing = {c for c in objective.required_columns() for row in rows if getattr(row, c, None) is None}
    unscorable = sorted(c for c in missing if not c.startswith("ref_"))
    if unscorable:
        raise DataError(f"the rows lack {unscorable}, which objective {name!r} reads; compute them with "
                        "`polyfuse logprobs`")
    check_logp_columns(rows, "ref")
    check_logp_columns(rows, "fuse")


def tokenize_pairs(
    tokenizer: Any, rows: list[PreferenceRow | UnpairedRow], roles: tuple[str, ...], max_length: int,
    columns: tuple[str, ...] | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Features for `SequenceCollator` (ids per role plus the precomputed `columns`, by default every `ref_*` /
    `fuse_*` column every row has), and the ids of rows dropped for exceeding `max_length`. A response whose
    token count differs from its `ref_*_ntokens` column means the references scored other tokens: that is an
    error."""
    if columns is None:
        candidates = rows[0].model_dump(exclude_none=True) if rows else {}
        columns = tuple(sorted(
            name
            for name in candidates
            if name.startswith(PRECOMPUTED_PREFIXES) and all(getattr(row, name, None) is not None for row in rows)
        ))
    features, dropped = [], []
    for row in rows:
        feature: dict[str, Any] = {name: getattr(row, name) for name in columns}
        for role in roles:
            encoded = encode(tokenizer, row.prompt, response_text(getattr(row, role)))  # present: checked before
            count = getattr(row, f"ref_{role}_ntokens", None)
            if count is not None and count != len(encoded.response_ids):
                raise DataError(
                    f"row {row.id!r}: the {role} response has {len(encoded.response_ids)} tokens under the pivot's "
                    f"tokenizer but ref_{role}_ntokens is {count}; the reference columns scored other tokens"
                )
            feature[f"{role}_input_ids"] = encoded.input_ids
            feature[f"{role}_prompt_length"] = len(encoded.prompt_ids)
        if max(len(feature[f"{role}_input_ids"]) for role in roles) > max_length:
            dropped.append(row.id)
        else:
            features.append(feature)
    return features, dropped


def train_preference(
    model_spec: ModelSpec,
    rows: list[PreferenceRow],
    config: PreferenceTrainConfig,
    out_dir: str | Path,
    callbacks: list[TrainerCallback] | None = None,
    resume: bool | None = None,
    source_names: list[str] | None = None,
    data_path: str | Path | None = None,
) -> Path:
    """Train `model_spec` (the initial pivot M0) with `config.objective` on `rows` and save a plain HF
    folder (model + tokenizer) at `out_dir`. Missing `ref_*` columns are computed first; `fuse_*` columns
    must be there already (`polyfuse logprobs`), their sources named by `source_names` in list order, or by
    the metadata of `data_path`, the file the rows came from (errors then name it). The rows are checked
    before any model is loaded."""
    objective = config.build_objective()
    with named_data_errors(data_path):
        if data_path is not None:
            source_names = fusion_sources(data_path, rows)
        check_preference_rows(rows, objective, config.objective)
    data_hash = data_fingerprint(rows)
    tokenizer = load_tokenizer(model_spec)
    run = TrainingRun(config, Path(out_dir), callbacks, resume)
    check_memory(model_spec, config, len(objective.roles))
    model = load_model(model_spec).to(run.device)  # score the references where training will run
    max_length = length_limit(model.config, config.max_length)
    report = LogpReport()
    rows = ensure_reference_columns(
        model, tokenizer, rows, objective, config.reference_token_budget, max_length, report
    )
    features, dropped = tokenize_pairs(tokenizer, rows, objective.roles, max_length)
    dropped = report.dropped + dropped
    if dropped:
        logger.warning(
            "preference training: dropped %d pairs longer than max_length %d", len(dropped), max_length
        )
    columns = tuple(name for name in features[0] if name.startswith(PRECOMPUTED_PREFIXES)) if features else ()
    padded = SequenceCollator(pad_token_id(tokenizer), objective.roles, columns)
    collator, layout = collator_for(model, features, padded, config.padding_free)
    summary = {
        "stage": "preference",
        "objective": objective.model_dump(),
        "model": model_spec.model_dump(),
        "data": data_hash,
        "dropped": dropped,
        "sources": source_names or [],
        "layout": layout,
    }
    return run.train(PreferenceTrainer, model, tokenizer, features, collator, summary,
                     objective=objective, candidates=["M0", *(source_names or [])])
