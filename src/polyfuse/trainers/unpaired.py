"""Training on unpaired rows with an objective of `polyfuse.objectives.UNPAIRED_OBJECTIVES`: KTO (as TRL's
KTOTrainer), CGPO and FuseSFT.

As for preference objectives no reference or source model is loaded: M0's `ref_*` columns are precomputed
(missing ones are scored with the model about to be trained, before its first step), CGPO's `aligned_consensus`
comes from the consensus step. Each micro-batch is one forward over the completions with gradients and, for the
reference point z0, one without over the `kl_completion`s (as TRL). What each objective needs of the sampling:

- `kto`: the rows in their order (shuffled when they were built), so each micro-batch is the block TRL's rotation
  of the KL completions ran in; rows that carry other KL completions are refused, rows without any get TRL's
  (a seeded shuffle, then the rotation in blocks of `batch_size`).
- `cgpo`: class-conditional sampling, as the reference release: every micro-batch holds `batch_size / 2`
  desirable and as many undesirable rows, each drawn with replacement with probability proportional to its
  `source_allocation_weight` within its class (uniform, with a warning, when the rows have none), seeds `seed`
  (D) and `seed + 1` (U); an epoch is as many micro-batches as the larger class fills.
- `fusesft`: each row weighted within its prompt by its reward (`FuseSFT.row_weights`, over the whole data set
  before training); rows of weight 0 (verifier-failed) are left out.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from polyfuse.data.schemas import UnpairedRow, unpaired_columns
from polyfuse.errors import DataError, named_data_errors
from polyfuse.logprobs import LogpReport, calibration_prompt_ids, check_logp_columns, fusion_sources
from polyfuse.models import ModelSpec, load_model, load_tokenizer
from polyfuse.models.forward import forward_logps, length_limit, pad_token_id
from polyfuse.objectives import KL_COMPLETION, UnpairedBatch, UnpairedObjective
from polyfuse.objectives.fusesft import WEIGHT_COLUMN
from polyfuse.pairs import rotation_mismatch, with_kl_completions
from polyfuse.trainers.checkpoints import data_fingerprint
from polyfuse.trainers.collate import SequenceCollator, collator_for
from polyfuse.trainers.config import UnpairedTrainConfig
from polyfuse.trainers.memory import check_memory
from polyfuse.trainers.preference import ensure_reference_columns, tokenize_pairs
from polyfuse.trainers.run import TrainingRun
from polyfuse.trainers.trainer import PolyfuseTrainer

logger = logging.getLogger(__name__)

LABEL = "desirable"  # the feature holding each row's label (True: D), `UnpairedRow.desirable`
SAMPLING_WEIGHT = "source_allocation_weight"


@dataclass
class UnpairedCollator:
    """The completions (with the columns) as `grad` lays them out, and the roles scored without gradients under
    `detached` in their own batch."""

    grad: SequenceCollator
    detached: SequenceCollator | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = self.grad(features)
        if self.detached is not None:
            batch["detached"] = self.detached(features)
        return batch


class ClassBalancedSampler(torch.utils.data.Sampler):
    """Indices of micro-batches of `per_class` desirable then `per_class` undesirable rows, each class drawn with
    replacement in proportion to its `weights` (CGPO's class-conditional sampler), seeded by `seed` (D) and
    `seed + 1` (U) and the epoch; an epoch is as many micro-batches as the larger class fills."""

    def __init__(self, labels: list[bool], weights: list[float], per_class: int, seed: int):
        self.classes = [[i for i, label in enumerate(labels) if label == wanted] for wanted in (True, False)]
        self.weights = [torch.tensor([weights[i] for i in rows], dtype=torch.float64) for rows in self.classes]
        self.per_class, self.seed, self.epoch = per_class, seed, 0
        self.steps = max(math.ceil(len(rows) / per_class) for rows in self.classes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps * 2 * self.per_class

    def __iter__(self):
        draws = []
        for offset, (rows, weights) in enumerate(zip(self.classes, self.weights, strict=True)):
            generator = torch.Generator().manual_seed(self.seed + offset + 1_000_003 * self.epoch)
            picked = torch.multinomial(weights, self.steps * self.per_class, replacement=True, generator=generator)
            draws.append([rows[i] for i in picked.tolist()])
        self.epoch += 1  # unless the trainer sets it, the next epoch draws anew
        for step in range(self.steps):
            window = slice(step * self.per_class, (step + 1) * self.per_class)
            yield from draws[0][window] + draws[1][window]


class UnpairedTrainer(PolyfuseTrainer):
    """Hands the objective an `UnpairedBatch`: the policy's sums and counts per role (the detached roles scored
    under `no_grad`), the columns it reads, the labels, the step and the mean over processes."""

    def __init__(self, *args: Any, objective: UnpairedObjective, sampler: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.grad_roles = tuple(r for r in objective.scored_roles() if r not in objective.detached_roles)
        self.detached_roles = tuple(r for r in objective.scored_roles() if r in objective.detached_roles)
        self.sampler = sampler

    def _get_train_sampler(self, train_dataset=None):
        if self.sampler is None:
            return super()._get_train_sampler(train_dataset)
        return self.sampler(self.train_dataset if train_dataset is None else train_dataset)

    def micro_batch_loss(self, model, inputs):
        logps, ntokens, outputs = forward_logps(model, inputs)
        per_role = {"logps": {}, "ntokens": {}}
        rows = len(inputs[LABEL])
        for role, values, counts in zip(self.grad_roles, logps.split(rows), ntokens.split(rows), strict=True):
            per_role["logps"][role], per_role["ntokens"][role] = values, counts
        if self.detached_roles:
            with torch.no_grad():
                logps, ntokens, _ = forward_logps(model, inputs["detached"])
            for role, values, counts in zip(self.detached_roles, logps.split(rows), ntokens.split(rows), strict=True):
                per_role["logps"][role], per_role["ntokens"][role] = values.detach(), counts
        many = self.accelerator.num_processes > 1
        batch = UnpairedBatch(
            **per_role, columns={c: inputs[c] for c in self.objective.required_columns()},
            labels=inputs[LABEL].bool(), step=self.state.global_step, total_steps=max(self.state.max_steps, 1),
            rank_mean=(lambda z: self.accelerator.reduce(z, "mean")) if many else None,
        )
        losses, metrics = self.objective(batch)
        return losses.sum(), metrics, outputs

    def count_items(self, inputs: dict[str, Any]) -> torch.Tensor:
        return self.objective.items(inputs, len(inputs[LABEL])).to(inputs[LABEL].device)


def prepare_rows(rows: list[UnpairedRow], config: UnpairedTrainConfig, objective: UnpairedObjective,
                 data_path: str | Path | None) -> tuple[list[UnpairedRow], dict[str, Any]]:
    """The rows as the objective trains on them, checked before any model is loaded (every problem one line):
    the KL completions its z0 needs, FuseSFT's weights, CGPO's classes and sampling weights, the precomputed
    columns only other steps write. Returns the rows and what the run's summary records about them."""
    summary: dict[str, Any] = {}
    held = calibration_prompt_ids(data_path) if data_path is not None else set()
    overlap = sorted(held & {row.prompt_id for row in rows})
    if overlap:
        raise DataError(f"{len(overlap)} prompts of the training rows are in the consensus step's calibration split "
                        f"(e.g. {overlap[0]!r}); calibration prompts must be held out of training")
    if KL_COMPLETION in objective.scored_roles():
        rows, summary["kl_completion"] = _kl_completions(rows, config)
    if config.objective == "fusesft":
        weights = objective.row_weights([r.prompt_id for r in rows], [r.reward for r in rows], [r.correct for r in rows])
        rows = [row.model_copy(update={WEIGHT_COLUMN: float(w)}) for row, w in zip(rows, weights.tolist(), strict=True) if w > 0]
        summary["fusesft_rows"] = len(rows)
    if not rows:
        raise DataError("no training rows left (every row has FuseSFT weight 0: no response passed its verifiers)")
    unscorable = [c for c in objective.required_columns() if not c.startswith("ref_")]
    unpaired_columns(rows, unscorable, f"objective {config.objective!r}")
    check_logp_columns(rows, "ref")
    check_logp_columns(rows, "fuse")
    if config.objective == "cgpo":
        summary["sampling"] = _check_classes(rows)
    if config.objective == "kto":
        _kto_weight_guidance(rows, objective)
    return rows, summary


def _kl_completions(rows: list[UnpairedRow], config: UnpairedTrainConfig) -> tuple[list[UnpairedRow], dict[str, Any]]:
    """The rows with the KL completions z0 needs: as they come when every row has one (kto: TRL's rotation in
    blocks of `batch_size`, else refused), else assigned here by the objective's rule, seeded by `seed`."""
    present = [row.kl_completion is not None for row in rows]
    rule = "rotation" if config.objective == "kto" else "anchor"
    if not any(present):
        return with_kl_completions(rows, rule, config.batch_size, config.seed), {
            "assigned": rule, "block": config.batch_size, "seed": config.seed}
    if not all(present):
        first = rows[present.index(False)].id
        raise DataError(f"row {first!r} has no kl_completion while others have one; give every row one (`polyfuse "
                        "pairs` with unpaired.kl_completion) or none (the trainer then assigns them)")
    if rule == "rotation" and (problem := rotation_mismatch(rows, config.batch_size)) is not None:
        raise DataError(f"kto compares each row with the KL completions of its micro-batch, rotated by one as TRL "
                        f"does, and {problem} (batch_size {config.batch_size}); build the rows with "
                        f"pairs.unpaired.kl_completion: rotation and kl_block: {config.batch_size}, or leave "
                        "kl_completion out and the trainer rotates them")
    return rows, {"assigned": "with the data"}


def _check_classes(rows: list[UnpairedRow]) -> dict[str, Any]:
    """CGPO's sampler needs both classes and, within each, sampling weights with a positive sum (or none)."""
    weights = [row.source_allocation_weight for row in rows]
    given = [w is not None for w in weights]
    if any(given) and not all(given):
        first = rows[given.index(False)].id
        raise DataError(f"row {first!r} has no source_allocation_weight while others have one; give every row one or "
                        "none (uniform sampling)")
    for label, name in (("D", "desirable"), ("U", "undesirable")):
        members = [row for row in rows if row.label == label]
        if not members:
            raise DataError(f"cgpo samples desirable and undesirable rows in every micro-batch, and the rows have no "
                            f"{name} ({label}) one")
        if all(given) and sum(row.source_allocation_weight for row in members) <= 0:
            raise DataError(f"the source_allocation_weight of every {name} ({label}) row is 0; cgpo samples each "
                            "class in proportion to them, so each class needs a positive sum")
    if not all(given):
        warnings.warn("cgpo: the rows have no source_allocation_weight, so each class is sampled uniformly (the "
                      "reference release's no_source_guidance sampling); give pairs.unpaired.allocation_weights for "
                      "source-informed sampling", stacklevel=3)
        return {"weights": "uniform"}
    return {"weights": SAMPLING_WEIGHT}


def _kto_weight_guidance(rows: list[UnpairedRow], objective: UnpairedObjective) -> None:
    """TRL's warning (KTO paper, Eq. 8): desirable_weight * n_D / (undesirable_weight * n_U) should lie in
    [1, 4/3]."""
    n_d = sum(row.label == "D" for row in rows)
    n_u = len(rows) - n_d
    if not n_d or not n_u or not objective.undesirable_weight:
        return
    ratio = objective.desirable_weight * n_d / (objective.undesirable_weight * n_u)
    if not 1 <= ratio <= 4 / 3:
        low, high = objective.undesirable_weight * n_u / n_d, 4 / 3 * objective.undesirable_weight * n_u / n_d
        warnings.warn(f"kto: {n_d} desirable and {n_u} undesirable rows give desirable_weight * n_D / "
                      f"(undesirable_weight * n_U) = {ratio:.3f}, outside [1, 4/3] (the KTO paper's guidance); "
                      f"desirable_weight in [{low:.3f}, {high:.3f}] would meet it", stacklevel=3)


def train_unpaired(
    model_spec: ModelSpec,
    rows: list[UnpairedRow],
    config: UnpairedTrainConfig,
    out_dir: str | Path,
    callbacks: list[TrainerCallback] | None = None,
    resume: bool | None = None,
    data_path: str | Path | None = None,
) -> Path:
    """Train `model_spec` (the initial pivot M0) with `config.objective` on the unpaired `rows` and save a plain HF
    folder at `out_dir`. Missing `ref_*` columns are computed first; the others must be there (`polyfuse logprobs`,
    `polyfuse consensus`). `data_path`, the file the rows came from, names the sources and the calibration split
    (its metadata) and prefixes the errors. The rows are checked before any model is loaded."""
    objective = config.build_objective()
    with named_data_errors(data_path):
        sources = fusion_sources(data_path, rows) if data_path is not None else []
        rows, prepared = prepare_rows(rows, config, objective, data_path)
    data_hash = data_fingerprint(rows)
    tokenizer = load_tokenizer(model_spec)
    run = TrainingRun(config, Path(out_dir), callbacks, resume)
    check_memory(model_spec, config, len(objective.scored_roles()))
    model = load_model(model_spec).to(run.device)  # score the references where training will run
    max_length = length_limit(model.config, config.max_length)
    report = LogpReport()
    rows = ensure_reference_columns(model, tokenizer, rows, objective, config.reference_token_budget, max_length, report)
    columns = (*objective.required_columns(), LABEL, *((SAMPLING_WEIGHT,) if prepared.get("sampling") == {
        "weights": SAMPLING_WEIGHT} else ()))
    features, dropped = tokenize_pairs(tokenizer, rows, objective.scored_roles(), max_length, columns)
    dropped = report.dropped + dropped
    if dropped:
        logger.warning("unpaired training: dropped %d rows longer than max_length %d", len(dropped), max_length)
        if config.objective == "kto" and rows[0].kl_completion is not None:
            kept = [row for row in rows if row.id not in set(dropped)]
            if rotation_mismatch(kept, config.batch_size) is not None:
                raise DataError(f"kto: {len(dropped)} rows longer than max_length {max_length} were dropped, which "
                                "breaks the blocks their KL completions rotate in; raise max_length")
    grad = tuple(r for r in objective.scored_roles() if r not in objective.detached_roles)
    detached = tuple(r for r in objective.scored_roles() if r in objective.detached_roles)
    padded = SequenceCollator(pad_token_id(tokenizer), grad, columns)
    collator, layout = collator_for(model, features, padded, config.padding_free)
    detached_collator = SequenceCollator(pad_token_id(tokenizer), detached, padding_free=layout == "packed") if detached else None
    sampler = _sampler(config, features)
    summary = {
        "stage": "unpaired",
        "objective": objective.model_dump(),
        "model": model_spec.model_dump(),
        "data": data_hash,
        "dropped": dropped,
        "sources": sources,
        "layout": layout,
        **prepared,
    }
    return run.train(UnpairedTrainer, model, tokenizer, features, UnpairedCollator(collator, detached_collator),
                     summary, objective=objective, sampler=sampler)


def _sampler(config: UnpairedTrainConfig, features: list[dict[str, Any]]) -> Any:
    """How the trainer draws micro-batches (a function of the dataset), or None for Trainer's own (fusesft)."""
    if config.objective == "kto":
        return torch.utils.data.SequentialSampler
    if config.objective == "cgpo":
        labels = [bool(f[LABEL]) for f in features]
        weights = [f.get(SAMPLING_WEIGHT, 1.0) for f in features]
        if len(set(labels)) < 2:
            raise DataError("cgpo: after dropping rows longer than max_length one class has no row left; raise "
                            "max_length")
        return lambda dataset: ClassBalancedSampler(labels, weights, config.batch_size // 2, config.seed)
    return None

