"""Per-sequence log-probs from logits: the one implementation shared by the trainers and the log-prob
engine, so training and reference scoring count exactly the same tokens."""

from __future__ import annotations

from polyfuse.lazy import lazy_import

torch = lazy_import("torch")

IGNORE_INDEX = -100


def token_logps_of(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of every scored token (0 elsewhere), and the mask of scored tokens, both (rows, length - 1).

    `labels` is aligned with the input ids (`IGNORE_INDEX` on prompt and padding); token k is predicted by
    `logits[k-1]`. The logits are upcast to fp32 one row at a time, which bounds the extra memory to one
    row's vocabulary matrix.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    safe_targets = targets.masked_fill(~mask, 0)
    rows = []
    for row_logits, row_targets in zip(logits[:, :-1], safe_targets, strict=True):
        row = row_logits.float()
        rows.append(row.gather(-1, row_targets[:, None]).squeeze(-1) - torch.logsumexp(row, dim=-1))
    return torch.stack(rows) * mask, mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log-probs of the scored tokens of each row (`token_logps_of`), and their count."""
    token_logps, mask = token_logps_of(logits, labels)
    return token_logps.sum(-1), mask.sum(-1)
