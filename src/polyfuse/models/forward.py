"""The forward kernel shared by scoring, teacher outputs, training and sampling.

One way to lay out sequences and run a causal LM over their responses:

- `pad_batch`: prompt + response ids padded into a batch whose labels hold the response tokens only;
  position ids count real tokens, so left padding gives the same positions as none;
- `plan_batches`: batches cut by a **token budget** over length-sorted sequences, so a batch pads only to
  the next-longest sequence (`padded_batches`: both, on the model's device, for the scoring loops);
- the **response-only head**: the LM head runs only on positions that predict a response token, either
  through the model's own forward (`forward_response`, `logits_to_keep`) or, for inference, straight from
  the decoder's hidden states through the output embeddings `HEAD_CHUNK` positions at a time
  (`scored_hidden_states` + `head_logits`), so prompts and padding are never projected onto the vocabulary
  and fp32 logits never exceed one chunk x vocabulary (a 262k vocabulary makes the head the larger half
  of a small model's work);
- `head_only_check`: the one check that the hidden-state path reproduces the model's own forward (a model
  that post-processes its logits, e.g. Gemma's soft-capping, does not), run on the first rows of the first batch a
  model scores and remembered for that model object (an in-process teacher is asked once per training step:
  checking every call ran its first batch three times);
- `pad_token_id`: the pad id of a tokenizer without one is its EOS (the padding is masked out anyway);
- `prefill` and `continuation_logps`: one KV cache of a batch of prompts serving both the scoring of given
  continuations (evaluation's gold answers) and greedy generation from the same prompts (`generate` goes on
  from the cache), so evaluation runs each prompt through the model once.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

from polyfuse.errors import DataError
from polyfuse.lazy import lazy_import
from polyfuse.objectives.distill import logit_std
from polyfuse.objectives.logps import IGNORE_INDEX, sequence_logps, token_logps_of

torch = lazy_import("torch")

logger = logging.getLogger(__name__)

DEFAULT_TOKEN_BUDGET = 4096
HEAD_CHUNK = 512  # scored positions per LM-head call
HEAD_ATOL, HEAD_RTOL = 1e-3, 1e-4  # per-token log-prob agreement of the two head paths (fp32)
CHECK_ROWS = 4  # rows of a model's first batch on which `head_only_check` compares the two paths
MIN_SHARED_PREFIX = 32  # prompt tokens that prompts must share for `prefix_groups` to batch them together
_HEAD_ONLY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> `head_only_check`'s verdict on its first batch


def pad_token_id(tokenizer: Any) -> int:
    """The id padding is written with: the tokenizer's pad token, else its EOS token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def length_limit(model_config: Any, max_length: int | None) -> int:
    """The longest sequence to score or train on: `max_length`, capped at the model's context size."""
    context = getattr(model_config, "max_position_embeddings", None) or 10**9
    return context if max_length is None else min(max_length, context)


def pad_batch(
    sequences: list[list[int]],
    prompt_lengths: list[int],
    pad_id: int,
    side: Literal["right", "left"] = "right",
) -> dict[str, torch.Tensor]:
    """Padded `input_ids`, `attention_mask`, `position_ids` and `labels` (IGNORE_INDEX on prompt and
    padding). Position ids count real tokens only, so left padding gives the same positions as none."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for i, (seq, prompt_length) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        start = width - len(seq) if side == "left" else 0
        ids = torch.tensor(seq, dtype=torch.long)
        input_ids[i, start : start + len(seq)] = ids
        attention_mask[i, start : start + len(seq)] = 1
        labels[i, start + prompt_length : start + len(seq)] = ids[prompt_length:]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "labels": labels}


def plan_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Indices of `lengths` grouped longest first so that `rows x longest row <= token_budget` (a
    sequence longer than the budget gets a batch of its own). Memory problems show on the first batch."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= token_budget:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def padded_batches(model: Any, sequences: Sequence[tuple[list[int], int]], pad_id: int, token_budget: int
                   ) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """The `(input ids, prompt length)` sequences in `plan_batches` order, left-padded on the model's device:
    (indices into `sequences`, batch). The scoring loops of the log-prob engine, the teacher store and the
    on-policy teachers; the caller holds inference mode around the loop (a generator must not hold it across
    yields)."""
    device = next(model.parameters()).device
    for indices in plan_batches([len(ids) for ids, _ in sequences], token_budget):
        chunk = [sequences[i] for i in indices]
        batch = pad_batch([ids for ids, _ in chunk], [p for _, p in chunk], pad_id, side="left")
        yield indices, {name: value.to(device) for name, value in batch.items()}


def forward_response(model: Any, batch: dict[str, torch.Tensor]) -> tuple[Any, torch.Tensor]:
    """The model's own forward with the LM head only where it predicts a scored token (`logits_to_keep`),
    so prompts are never projected onto the vocabulary. Returns the outputs and the labels cut to the kept
    positions (kept position k predicts label k + 1). A padded batch keeps its last positions from the
    first one that predicts a scored token of some row (with left padding: the longest response + 1); a
    packed one (`layouts.pack_batch`, no attention mask) keeps exactly the predicting positions plus the
    last one, and its labels become [ignored, their targets...] (`label_groups` likewise)."""
    outputs, keep = _forward_kept(model, batch)
    return outputs, cut_to_kept(batch["labels"], keep)


def _forward_kept(model: Any, batch: dict[str, torch.Tensor]) -> tuple[Any, int | torch.Tensor]:
    keep = _kept_positions(batch["labels"], packed="attention_mask" not in batch)
    outputs = model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch["position_ids"],
        logits_to_keep=keep if isinstance(keep, int) else keep[1:],
        use_cache=False,
    )
    return outputs, keep


def _kept_positions(labels: torch.Tensor, packed: bool) -> int | torch.Tensor:
    """How many last positions keep their logits, or (packed) the kept positions' indices after a leading
    -1 (the index of the ignored first label)."""
    scored = (labels[:, 1:] != IGNORE_INDEX).any(0)
    if packed:
        predicting = scored.nonzero().squeeze(-1)
        last = torch.tensor([labels.shape[1] - 1], device=labels.device)
        return torch.cat([torch.tensor([-1], device=labels.device), predicting, last])
    first = int(scored.int().argmax()) if bool(scored.any()) else 0
    return labels.shape[1] - first


def cut_to_kept(values: torch.Tensor, keep: int | torch.Tensor) -> torch.Tensor:
    """A label-aligned tensor cut as `forward_response` cuts the labels."""
    if isinstance(keep, int):
        return values[:, -keep:] if keep else values[:, :0]
    return torch.cat([values.new_full((values.shape[0], 1), IGNORE_INDEX), values[:, keep[1:-1] + 1]], dim=1)


def forward_logps(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(S, n) of every sequence of a batch on the model's device, and the model outputs
    (`forward_response`): one per row of a padded batch, one per `label_groups` index of the layouts that
    hold several sequences in a row (`polyfuse.models.layouts`)."""
    outputs, keep = _forward_kept(model, batch)
    labels = cut_to_kept(batch["labels"], keep)
    if "label_groups" not in batch:
        sums, counts = sequence_logps(outputs.logits, labels)
        return sums, counts, outputs
    groups = cut_to_kept(batch["label_groups"], keep)[:, 1:]
    tokens, mask = token_logps_of(outputs.logits, labels)
    size = int(batch["label_groups"].max()) + 1
    index = groups.clamp(min=0)[mask]
    sums = tokens.new_zeros(size).index_add(0, index, tokens[mask])
    counts = torch.zeros(size, dtype=torch.long, device=index.device).index_add(0, index, torch.ones_like(index))
    return sums, counts, outputs


def forward_scored_logits(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, tokens, rows) at the positions that predict a scored token, row-major, by the model's own
    forward: the same layout as `scored_hidden_states`, for models whose head path cannot be used."""
    outputs, labels = forward_response(model, batch)
    targets = labels[:, 1:]
    rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    return outputs.logits[rows, cols], targets[rows, cols], rows


def scored_hidden_states(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(states, tokens, rows): the decoder's last hidden states at the positions that predict a scored
    token, those tokens, and the row of each, in row-major order (position k predicts token k + 1)."""
    hidden = model.get_decoder()(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    return hidden[rows, cols], targets[rows, cols], rows


def head_logits(model: Any, states: torch.Tensor) -> Iterator[torch.Tensor]:
    """fp32 logits of `states` through the output embeddings, `HEAD_CHUNK` positions at a time, so the
    logits never exceed one chunk x vocabulary."""
    head = model.get_output_embeddings()
    for i in range(0, len(states), HEAD_CHUNK):
        yield head(states[i : i + HEAD_CHUNK]).float()


def token_logps(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) at each position, fp32 log-softmax."""
    logits = logits.float()
    return logits.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H / ln V at each position: the full-vocabulary entropy of the next-token distribution in fp32, divided
    by the log of the logits' width V (the LM head's), so it lies in [0, 1] (CGPO's Hbar terms)."""
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.special.entr(probs).sum(-1) / math.log(logits.shape[-1])


def head_token_logps(model: Any, batch: dict[str, torch.Tensor], entropy: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(log-probs, rows, normalised entropies or None) of every scored token by the hidden-state path,
    row-major."""
    states, tokens, rows = scored_hidden_states(model, batch)
    logps, entropies = [], []
    for i, logits in enumerate(head_logits(model, states)):
        logps.append(token_logps(logits, tokens[i * HEAD_CHUNK : i * HEAD_CHUNK + len(logits)]))
        if entropy:
            entropies.append(normalized_entropy(logits))
    joined = [torch.cat(parts) if parts else states.new_zeros(0, dtype=torch.float32) for parts in (logps, entropies)]
    return joined[0], rows, joined[1] if entropy else None


def response_logps(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, n) of every row of a padded batch: the decoder's hidden states at the positions that predict a
    scored token, through the output embeddings chunk by chunk, fp32 log-softmax. Inference only: it calls
    the decoder and the head directly, past any wrapper's forward."""
    logps, rows, _ = head_token_logps(model, batch)
    return _row_sums(logps, rows, batch), (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1)


def _row_sums(values: torch.Tensor, rows: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.zeros(batch["labels"].shape[0], dtype=torch.float32, device=values.device).index_add_(0, rows, values)


def forward_token_logps(model: Any, batch: dict[str, torch.Tensor], entropy: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`head_token_logps` by the model's own forward (for a model that post-processes its logits)."""
    logits, tokens, rows = forward_scored_logits(model, batch)
    return token_logps(logits, tokens), rows, normalized_entropy(logits) if entropy else None


def head_only_check(model: Any, batch: dict[str, torch.Tensor], entropy: bool = False
                    ) -> tuple[bool, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Whether the hidden-state head path gives the model's own per-token log-probs (`|a - b| <= HEAD_ATOL +
    HEAD_RTOL |b|`; a model that post-processes its logits fails, and is then scored by its own forward), and
    `batch`'s (log-probs, rows, entropies or None) by the path to use from now on. The
    paths are compared on the first `CHECK_ROWS` rows (a model that post-processes its logits fails on any row; on a
    whole token-budget batch the check cost as much as scoring it); a batch of no more rows is scored by the check."""
    few = {name: value[:CHECK_ROWS] for name, value in batch.items()}
    fast = head_token_logps(model, few, entropy)
    slow = forward_token_logps(model, few, entropy)
    agrees = _paths_agree(model, fast[0], slow[0])
    if len(batch["input_ids"]) <= CHECK_ROWS:
        return agrees, fast if agrees else slow
    return agrees, (head_token_logps if agrees else forward_token_logps)(model, batch, entropy)


def _paths_agree(model: Any, fast: torch.Tensor, slow: torch.Tensor) -> bool:
    """Whether the head path's per-token log-probs `fast` match the model's own forward's `slow`; remembered
    for `model`."""
    agrees = bool(((fast - slow).abs() <= HEAD_ATOL + HEAD_RTOL * slow.abs()).all())
    if not agrees:
        logger.warning("%s post-processes its logits: scoring with its own forward", type(model).__name__)
    _HEAD_ONLY[model] = agrees
    return agrees


def topk_outputs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """What a teacher gives at each position [N, V] that predicts `tokens` [N]: the top-K ids, their raw logits
    and normalised log-probs (descending), the log-normaliser (`logsumexp`), the std of the logits (`logit_std`)
    and the log-prob of the token itself; fp32."""
    logits = logits.float()
    normaliser = torch.logsumexp(logits, dim=-1)
    values, ids = logits.topk(min(k, logits.shape[-1]), dim=-1)
    return {"topk_ids": ids, "topk_logits": values, "topk_logprobs": values - normaliser[:, None],
            "logsumexp": normaliser, "std": logit_std(logits),
            "token_logps": logits.gather(-1, tokens[:, None]).squeeze(-1) - normaliser}


def response_topk(model: Any, batch: dict[str, torch.Tensor], k: int, head_only: bool
                  ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """`topk_outputs` at every position that predicts a response token (row-major), and each one's row.
    `head_only`: decoder states through the output embeddings (`head_logits`); otherwise the model's own
    forward, for models that post-process their logits."""
    if head_only:
        states, tokens, rows = scored_hidden_states(model, batch)
        chunks = [topk_outputs(logits, tokens[i * HEAD_CHUNK : i * HEAD_CHUNK + len(logits)], k)
                  for i, logits in enumerate(head_logits(model, states))]
    else:
        positions, tokens, rows = forward_scored_logits(model, batch)
        chunks = [topk_outputs(positions[i : i + HEAD_CHUNK], tokens[i : i + HEAD_CHUNK], k)
                  for i in range(0, len(tokens), HEAD_CHUNK)]
    if not chunks:
        raise DataError("a batch has no response tokens")
    return {name: torch.cat([c[name] for c in chunks]) for name in chunks[0]}, rows


def checked_response_topk(model: Any, batch: dict[str, torch.Tensor], k: int, head_only: bool | None
                          ) -> tuple[dict[str, torch.Tensor], torch.Tensor, bool]:
    """`response_topk` and the `head_only` to use from now on. None (a model's first batch): both paths run on its
    first `CHECK_ROWS` rows, their token log-probs are `head_only_check`'s comparison, and a batch of no more rows
    is scored by the check (before, the check's two passes were followed by a third)."""
    if head_only is None:
        few = {name: value[:CHECK_ROWS] for name, value in batch.items()}
        fast, slow = response_topk(model, few, k, True), response_topk(model, few, k, False)
        head_only = _paths_agree(model, fast[0]["token_logps"], slow[0]["token_logps"])
        if len(batch["input_ids"]) <= CHECK_ROWS:
            return (*(fast if head_only else slow), head_only)
    return (*response_topk(model, batch, k, head_only), head_only)


def score_topk(model: Any, sequences: list[tuple[list[int], int]], pad_id: int, k: int,
               token_budget: int = DEFAULT_TOKEN_BUDGET) -> list[dict[str, torch.Tensor]]:
    """`topk_outputs` over the response positions of each `(input ids, prompt length)` sequence, in input order,
    under `model` in eval mode (token-budget batches, the head-only path where it agrees with the model's own
    forward, as `score_sequences`)."""
    results: list[dict[str, torch.Tensor]] = [{}] * len(sequences)
    head_only = _HEAD_ONLY.get(model)
    training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for indices, batch in padded_batches(model, sequences, pad_id, token_budget):
                outputs, rows, head_only = checked_response_topk(model, batch, k, head_only)
                for position, index in enumerate(indices):
                    mine = rows == position
                    results[index] = {name: value[mine].cpu() for name, value in outputs.items()}
    finally:
        model.train(training)
    return results


def score_sequences(
    model: Any,
    sequences: list[tuple[list[int], int]],
    pad_id: int,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    progress: Callable[[int], None] | None = None,
    entropy: bool = False,
) -> list[tuple[float, ...]]:
    """(S, n) of each `(input ids, prompt length)` sequence, in input order, under `model` in eval mode; with
    `entropy`, (S, n, sum of H / ln V over the scored positions) (`normalized_entropy`, exact)."""
    results: list[tuple[float, ...]] = [(0.0, 0)] * len(sequences)
    head_only = _HEAD_ONLY.get(model)  # whether the head path reproduces the model's forward (None: not checked yet)
    model.eval()
    with torch.inference_mode():
        for indices, batch in padded_batches(model, sequences, pad_id, token_budget):
            if head_only is None:  # the check's own results score the first batch
                head_only, (logps, rows, entropies) = head_only_check(model, batch, entropy)
            else:
                logps, rows, entropies = (head_token_logps if head_only else forward_token_logps)(model, batch, entropy)
            columns = [_row_sums(logps, rows, batch), (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1)]
            if entropies is not None:
                columns.append(_row_sums(entropies, rows, batch))
            for index, *values in zip(indices, *(c.tolist() for c in columns), strict=True):
                results[index] = tuple(values)
            if progress is not None:
                progress(len(indices))
    return results


def cache_argument(model: Any) -> str:
    """The name under which `model`'s forward and `generate` take a KV cache: `cache` since transformers 5.x
    renamed `past_key_values` (the old name still works there, with a warning)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model: its transformers model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def common_prefix(sequences: Sequence[Sequence[int]]) -> int:
    """The length of the longest prefix all `sequences` share."""
    shortest = min(len(seq) for seq in sequences)
    return next((k for k in range(shortest) if len({seq[k] for seq in sequences}) > 1), shortest)


def prefix_groups(prompts: Sequence[Sequence[int]], min_shared: int = MIN_SHARED_PREFIX) -> list[list[int]]:
    """Indices of `prompts` grouped so that a group's prompts share a prefix of at least `min_shared` tokens (the
    few-shot examples and system prompt of one task), each group in index order; the prompts that share none go
    together in one last group. Batches cut within a group let `prefill` compute that prefix once."""
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])  # lexicographic: shared prefixes are neighbours
    runs: list[list[int]] = []
    for index in order:
        if runs and common_prefix([prompts[runs[-1][-1]], prompts[index]]) >= min_shared:
            runs[-1].append(index)
        else:
            runs.append([index])
    loose = sorted(i for run in runs if len(run) == 1 for i in run)
    return [sorted(run) for run in runs if len(run) > 1] + ([loose] if loose else [])


def prefill(model: Any, prompts: list[list[int]], pad_id: int, extra: int = 0
            ) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """A batch of prompts laid out for `generate` and the KV cache of all but their last column: (cache,
    input_ids, attention_mask) on the model's device. `generate(input_ids, attention_mask, cache=...)` runs the
    last token itself and goes on; `continuation_logps` scores continuations from the same cache. The prefix all
    prompts share is computed once (one row) and copied to every row, the rest left-padded after it: the layout
    is [shared prefix | padding | the rest of the prompt], positions counting real tokens (as `generate` counts
    them). A model with a sliding attention window narrower than the batch's width (`extra`: the tokens to come)
    gets plain left padding, since the window counts padded columns."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    shared = min(common_prefix(prompts), min(len(p) for p in prompts) - 1)
    window = getattr(model.config, "sliding_window", None)
    if window and max(len(p) for p in prompts) + extra > window:
        shared = 0
    rest = [p[shared:] for p in prompts]
    width = max(len(r) for r in rest)
    input_ids = torch.full((len(prompts), shared + width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), shared + width), dtype=torch.long)
    input_ids[:, :shared] = torch.tensor(prompts[0][:shared], dtype=torch.long)
    attention_mask[:, :shared] = 1
    for row, tokens in enumerate(rest):
        input_ids[row, shared + width - len(tokens) :] = torch.tensor(tokens, dtype=torch.long)
        attention_mask[row, shared + width - len(tokens) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    argument = {cache_argument(model): cache}
    if shared:
        model(input_ids=input_ids[:1, :shared], position_ids=position_ids[:1, :shared], use_cache=True,
              logits_to_keep=1, **argument)
        cache.batch_repeat_interleave(len(prompts))
    if width > 1:
        model(input_ids=input_ids[:, shared:-1], attention_mask=attention_mask[:, :-1],
              position_ids=position_ids[:, shared:-1], use_cache=True, logits_to_keep=1, **argument)
    return cache, input_ids, attention_mask


def continuation_logps(model: Any, cache: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       continuations: list[list[int]]) -> list[tuple[float, int]]:
    """(sum of log p, token count) of each row's `continuations` (empty: (0, 0)) after its prompt, from the
    `prefill` cache of the same batch (its `input_ids` and `attention_mask`), which is left as it was (each chunk
    of rows scores on a copy). The model's own forward gives the logits (whatever it does to them), `HEAD_CHUNK` scored positions
    at a time; fp32 log-softmax as `token_logps`."""
    results: list[tuple[float, int]] = [(0.0, 0)] * len(continuations)
    rows = [i for i, tokens in enumerate(continuations) if tokens]
    width = max((len(continuations[i]) for i in rows), default=1)
    per_chunk = max(1, HEAD_CHUNK // width)
    device = input_ids.device
    for start in range(0, len(rows), per_chunk):
        chunk = rows[start : start + per_chunk]
        # the input: each row's last prompt token, then its continuation but the last (right-padded)
        ids = torch.zeros((len(chunk), width), dtype=torch.long, device=device)
        mask = torch.zeros((len(chunk), width), dtype=torch.long, device=device)
        for r, i in enumerate(chunk):
            tokens = continuations[i]
            ids[r, : len(tokens)] = torch.tensor([int(input_ids[i, -1]), *tokens[:-1]], device=device)
            mask[r, : len(tokens)] = 1
        index = torch.tensor(chunk, device=device)
        prompt_mask = attention_mask[index]
        start_position = prompt_mask.sum(-1, keepdim=True) - 1
        rows_cache = copy.deepcopy(cache)
        if rows_cache.get_seq_length() > 0:  # an empty cache (one-token prompts) has no rows to pick
            rows_cache.batch_select_indices(index)
        logits = model(input_ids=ids, attention_mask=torch.cat([prompt_mask[:, :-1], mask], dim=1),
                       position_ids=start_position + torch.arange(width, device=device), use_cache=True,
                       **{cache_argument(model): rows_cache}).logits
        for r, i in enumerate(chunk):
            tokens = continuations[i]
            target = torch.tensor(tokens, device=device)
            results[i] = (float(token_logps(logits[r, : len(tokens)], target).sum()), len(tokens))
    return results
