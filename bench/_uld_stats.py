"""What ULD's teacher weights and loss terms do on real teacher outputs (issue 21; bench/gym_protocol.py's
distill family writes it to `<out>/<preset>-distill-uld.json`): per domain, each teacher's aligned share, top-K
entropy and how often its top-1 is the text's next token, the uncertainty weights against plain averaging; then,
per trained student, CE against the distillation term (values, and gradient norms over the weights) and the
student's top-1 probability raw and after logit standardisation (what ULD compares), with its logit std."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from polyfuse.data.schemas import SFTRow
from polyfuse.models import ModelSpec, load_model, load_tokenizer
from polyfuse.models.forward import forward_response, pad_token_id
from polyfuse.objectives import IGNORE_INDEX, ULDObjective
from polyfuse.objectives.distill import AlignedRow, token_cross_entropy
from polyfuse.objectives.uld import average_weights, student_uld_probs, uld_distance, uncertainty_weights
from polyfuse.trainers import DistillTrainConfig
from polyfuse.trainers.distill import DistillCollator, build_features


def teacher_statistics(rows: list[AlignedRow], aligned: list[dict], names: list[str]) -> dict:
    """Per domain: each teacher's aligned share, mean top-K entropy and top-1 = its next text token rate where
    aligned; the mean uncertainty and average weights, and the weight each puts on teachers whose top-1 is right."""
    found: dict[str, dict[str, list]] = {}
    for row, features in zip(rows, aligned, strict=True):
        n, t = len(row.labels), len(names)
        entropy, mask, right = np.zeros((n, t)), np.zeros((n, t), bool), np.zeros((n, t))
        for i, (example, groups) in enumerate(zip(row.examples, row.groups, strict=True)):
            for left, right_idx in groups or []:
                j, k = left[0], right_idx[0]
                mask[j, i] = True
                right[j, i] = float(example.topk_ids[k, 0] == example.token_ids[k])
        entropy[:] = np.array(features["teacher_entropy"])
        for key, value in zip(("entropy", "mask", "right"), (entropy, mask, right), strict=True):
            found.setdefault(features["domain"], {}).setdefault(key, []).append(value)
    out = {}
    for domain, parts in sorted(found.items()):
        entropy, mask, right = (np.concatenate(parts[k]) for k in ("entropy", "mask", "right"))
        weights = {"uncertainty": uncertainty_weights(torch.tensor(entropy), torch.tensor(mask)).numpy(),
                   "average": average_weights(torch.tensor(mask)).numpy()}
        out[domain] = {
            "positions": len(mask),
            "no_teacher_aligned": int((mask.sum(1) == 0).sum()),
            "teachers": {name: {"aligned": round(float(mask[:, i].mean()), 3),
                                "entropy": round(float(entropy[mask[:, i], i].mean()), 3),
                                "top1_is_next_token": round(float(right[mask[:, i], i].mean()), 3),
                                **{f"weight_{k}": round(float(w[:, i].mean()), 3) for k, w in weights.items()}}
                         for i, name in enumerate(names)},
            **{f"weight_on_right_teachers_{k}": round(float((w * right).sum(1).mean()), 3) for k, w in weights.items()},
            "largest_uncertainty_weight_over_half": round(float((weights["uncertainty"].max(1) > 0.5).mean()), 3),
        }
    return out


def student_statistics(spec, batch: dict[str, torch.Tensor]) -> dict:
    """CE and the distillation term of one student on the batch (both weightings), their gradient norms, and its
    top-1 probability raw and standardised (ULD's view), with the mean full-vocabulary logit std."""
    model = load_model(spec)
    outputs, labels = forward_response(model, batch)
    targets = labels[:, 1:]
    rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    logits, gold = outputs.logits[rows, cols].float(), targets[rows, cols]
    mask = batch["teacher_mask"].bool()
    uld = uld_distance(student_uld_probs(logits), batch["teacher_probs"])
    terms = {"ce": token_cross_entropy(logits, gold).mean(),
             "kd_uncertainty": (uncertainty_weights(batch["teacher_entropy"], mask) * uld).sum(-1).mean(),
             "kd_average": (average_weights(mask) * uld).sum(-1).mean()}
    norms = {}
    for name, value in terms.items():
        model.zero_grad()
        value.backward(retain_graph=True)
        norms[name] = float(torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters() if p.grad is not None)))
    return {**{name: round(float(v.detach()), 4) for name, v in terms.items()},
            **{f"grad_{name}": round(v, 4) for name, v in norms.items()},
            "teacher_forced_accuracy": round(float((logits.argmax(-1) == gold).float().mean()), 4),
            "top1_raw": round(float(torch.softmax(logits, -1).max(-1).values.mean()), 4),
            "top1_standardised": round(float(student_uld_probs(logits)[:, 0].mean()), 4),
            "logit_std": round(float(logits.std(-1).mean()), 4)}


def uld_statistics(pivot: ModelSpec, sources: list[str], rows: list[SFTRow], store: Path, students: dict[str, Path],
                   work: Path) -> dict:
    """Teacher weights on `rows` (their targets built as the trainer builds them, uncertainty weighting), and each
    of `students` (label -> model folder; the pivot's settings) measured on the same positions."""
    tokenizer = load_tokenizer(pivot)
    config = DistillTrainConfig.model_validate({"objective": "uld", "objective_args": {"weighting": "uncertainty"},
                                                "teachers": sources, "max_length": 64})
    objective = config.build_objective()
    seen: list = []
    targets = ULDObjective.targets
    ULDObjective.targets = lambda self, row: (seen.append(row), targets(self, row))[1]  # keep the aligned rows
    try:
        features, names, dropped, _ = build_features(tokenizer, rows, store, config, 64, work)
    finally:
        ULDObjective.targets = targets
    kept = [row for row in rows if row.id not in set(dropped)]
    listed = [dict(features[i], domain=kept[i].domain) for i in range(len(features))]
    fields = {name: objective.target_fields[name] for name in objective.required_fields()}
    batch = DistillCollator(pad_token_id(tokenizer), ("completion",), fields=fields)(
        [features[i] for i in range(len(features))])
    return {"texts": len(kept), "teachers": teacher_statistics(seen, listed, names),
            "students": {label: student_statistics(pivot.model_copy(update={"path": str(path)}), batch)
                         for label, path in students.items()}}
