"""Two batch layouts that compute no padding and no repeated prompt, beside `forward.pad_batch`.

- `pack_batch` (SFT, distillation): the sequences of a micro-batch back to back in one row, position ids
  restarting at 0 at each sequence and no attention mask, as transformers' `DataCollatorWithFlattening`
  and TRL's `padding_free`: transformers reads the sequence boundaries from the position ids (a
  block-diagonal causal mask for sdpa and eager attention, variable-length kernels for flash attention).
- `shared_prompt_batch` (preference objectives): one row per pair holding the prompt once and every
  response behind it, under a 4D mask in which each response sees the prompt and itself only. The last
  prompt token is repeated in front of each response (at its own position), so that every response token
  is predicted by the position just before it, as in a plain sequence: the labels keep the usual shift
  and the LM head runs only where `forward_response` keeps it. `label_groups` says which output sequence
  each label belongs to (role by role, as `pad_batch`'s rows), so the per-sequence log-probs come out
  in the unshared path's order.

Both are exact: a sequence's log-probs equal those of `pad_batch` up to float summation order (tested on
Llama, Mistral, Qwen3 and GPT-2). A model that cannot take them (an attention kernel without custom
masks, sliding windows, an architecture that ignores position ids) is found before training by
`layout_problem`, which also runs the first micro-batch both ways and compares; the trainer then uses
`pad_batch` and says why.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from polyfuse.objectives.logps import IGNORE_INDEX

NO_GROUP = -1
SEGMENT_ATTENTION = "polyfuse_segments"
# Largest per-token difference of a sequence's log-prob between two layouts that counts as agreement:
# float summation order in fp32; half precision rounds every activation.
AGREEMENT = {torch.float32: 1e-4, torch.float64: 1e-8}
HALF_AGREEMENT = 2e-2


def pack_batch(sequences: list[list[int]], prompt_lengths: list[int]) -> dict[str, torch.Tensor]:
    """`input_ids`, `position_ids`, `labels` and `label_groups` of shape (1, total length): no padding, no
    attention mask (its absence is what tells transformers to read the packing from the position ids)."""
    ids, positions, labels, groups = [], [], [], []
    for index, (seq, prompt_length) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        ids += seq
        positions += range(len(seq))
        labels += [IGNORE_INDEX] * prompt_length + seq[prompt_length:]
        groups += [NO_GROUP] * prompt_length + [index] * (len(seq) - prompt_length)
    as_row = lambda values: torch.tensor([values], dtype=torch.long)  # noqa: E731
    return {"input_ids": as_row(ids), "position_ids": as_row(positions), "labels": as_row(labels),
            "label_groups": as_row(groups)}  # fmt: skip


def segment_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """sdpa run once per packed sequence (causal, no mask), registered with transformers'
    `AttentionInterface` as `SEGMENT_ATTENTION`. Under plain sdpa a packed row gets a dense
    block-diagonal mask and attention over the whole row (its length squared: four times the padded
    layout's attention time in a SmolLM2 SFT step on CPU, docs/performance.md); here each sequence attends
    within itself only, as flash attention's variable-length kernels do on a GPU. Only a packed run
    switches to it (`set_attn_implementation`): transformers builds no mask for it, so every batch must be
    a packed row whose sequences start where the position ids are 0."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None or position_ids is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    bounds = [*(position_ids[0] == 0).nonzero().squeeze(-1).tolist(), query.shape[2]]
    parts = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, **kwargs)[0]
             for a, b in zip(bounds, bounds[1:], strict=False) if b > a]  # fmt: skip
    return torch.cat(parts, dim=1), None


def _register_segment_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)


_register_segment_attention()


def shared_prompt_batch(items: list[tuple[list[int], list[list[int]]]], pad_id: int,
                        mask_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """`items`: (prompt ids, [response ids per role]) per pair. Rows are left-padded; `attention_mask` is
    4D (rows, 1, length, length): boolean (True: attend) for sdpa, or additive in `mask_dtype` (0 or the
    dtype's minimum) for eager attention. A padding position attends to itself only, so no row of the
    mask is empty."""
    layouts = [_shared_layout(prompt, responses) for prompt, responses in items]
    width = max(len(ids) for ids, *_ in layouts)
    rows = len(items)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((rows, width), dtype=torch.long)
    labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    groups = torch.full((rows, width), NO_GROUP, dtype=torch.long)
    blocks = torch.full((rows, width), -1, dtype=torch.long)  # -1 padding, 0 the shared prompt, r + 1 role r
    for row, (ids, positions, row_labels, block) in enumerate(layouts):
        start = width - len(ids)
        input_ids[row, start:] = torch.tensor(ids)
        position_ids[row, start:] = torch.tensor(positions)
        labels[row, start:] = torch.tensor(row_labels)
        blocks[row, start:] = torch.tensor(block)
        scored = labels[row] != IGNORE_INDEX
        groups[row, scored] = (blocks[row, scored] - 1) * rows + row  # role by role, as pad_batch's rows
    query, key = blocks[:, :, None], blocks[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = causal & (key >= 0) & ((key == query) | ((key == 0) & (query > 0)))
    mask |= torch.eye(width, dtype=torch.bool)  # padding attends to itself
    mask = mask[:, None]
    if mask_dtype is not None:
        mask = torch.zeros(mask.shape, dtype=mask_dtype).masked_fill(~mask, torch.finfo(mask_dtype).min)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids, "labels": labels,
            "label_groups": groups}  # fmt: skip


def _shared_layout(prompt: list[int], responses: list[list[int]]) -> tuple[list[int], ...]:
    """ids, positions, labels and block of each token for one pair: prompt[:-1] (block 0), then for role r
    the last prompt token and its response (block r + 1, positions continuing the prompt's)."""
    head, last = prompt[:-1], prompt[-1]
    ids, positions, labels, block = list(head), list(range(len(head))), [IGNORE_INDEX] * len(head), [0] * len(head)
    for role, response in enumerate(responses):
        ids += [last, *response]
        positions += range(len(head), len(head) + 1 + len(response))
        labels += [IGNORE_INDEX, *response]
        block += [role + 1] * (1 + len(response))
    return ids, positions, labels, block


def shared_tokens(items: list[tuple[list[int], list[list[int]]]]) -> tuple[int, int]:
    """(tokens of the shared layout, tokens of one sequence per role) over `items`: what sharing saves."""
    shared = sum(len(p) - 1 + sum(1 + len(r) for r in rs) for p, rs in items)
    plain = sum(len(p) + len(r) for p, rs in items for r in rs)
    return shared, plain


def mask_problem(model: Any, length: int) -> str | None:
    """Why `model` cannot take `shared_prompt_batch`'s custom 4D mask (None: it can, so far as its config
    says): an attention kernel without custom masks, or sliding-window layers shorter than `length`
    (a custom mask is used as given, without the window)."""
    config = model.config.get_text_config()
    kernel = attention_of(model)
    if kernel not in ("sdpa", "eager"):
        return f"attention implementation {kernel!r} takes no custom 4D attention mask (sdpa and eager do)"
    window = getattr(config, "sliding_window", None)
    if isinstance(window, int) and window < length:
        return f"sliding-window attention ({window} tokens) is not applied to a custom mask; rows reach {length}"
    return None


def mask_dtype(model: Any) -> torch.dtype | None:
    """None (a boolean mask) for sdpa; the model's dtype (an additive mask) for eager attention."""
    return None if attention_of(model) == "sdpa" else model.dtype


def attention_of(model: Any) -> str:
    return getattr(model.config.get_text_config(), "_attn_implementation", None) or "eager"


def layouts_disagree(model: Any, plain: dict[str, torch.Tensor], other: dict[str, torch.Tensor],
                     logps: Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor, Any]],
                     attention: str | None = None) -> str | None:
    """Run one batch in both layouts (eval mode, no gradient, the model's device; `other` under the
    attention implementation `attention` when given, which the model keeps if they agree) and compare each
    sequence's log-prob and token count: None when they agree, else what differs."""
    device = next(model.parameters()).device
    was_training, kernel = model.training, attention_of(model)
    model.eval()
    try:
        with torch.no_grad():
            a_sums, a_counts, _ = logps(model, {k: v.to(device) for k, v in plain.items()})
            if attention is not None:
                model.set_attn_implementation(attention)
            b_sums, b_counts, _ = logps(model, {k: v.to(device) for k, v in other.items()})
    finally:
        model.train(was_training)
    problem = None
    if not torch.equal(a_counts.cpu(), b_counts.cpu()):
        problem = f"token counts differ ({a_counts.tolist()} vs {b_counts.tolist()})"
    else:
        tolerance = AGREEMENT.get(model.dtype, HALF_AGREEMENT)
        per_token = ((a_sums - b_sums).abs() / a_counts.clamp(min=1)).max().item()
        if per_token > tolerance:
            problem = f"log-probs differ by {per_token:.2g} per token (> {tolerance:g})"
    if problem is not None and attention is not None:
        model.set_attn_implementation(kernel)
    return problem
