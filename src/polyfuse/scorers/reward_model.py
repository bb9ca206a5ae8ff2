"""Generic reward models: any `AutoModelForSequenceClassification` checkpoint with one output.

The input is the whole conversation (prompt messages + the response as the assistant turn) tokenised
by `polyfuse.models.encode`: the RM tokenizer's own chat template when it has one, else the plain
`"User: ...\\n\\nAssistant: ..."` format. Batches are right-padded, so positions match the unpadded
sequence, and transformers reads the score at the last non-pad token; the result does not depend on
batch size or order. The score is the raw logit, or its sigmoid with `normalize: sigmoid`.

ArmoRM (`RLHFlow/ArmoRM-Llama3-8B-v0.1`) is not supported here: its score comes from a custom gating
head (`LlamaForRewardModelWithGating`, remote code), and loading it as a generic classifier silently
gives wrong numbers, so such checkpoints are refused.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from polyfuse.data.schemas import SampleRow
from polyfuse.errors import ConfigError
from polyfuse.lazy import inference_mode, lazy_import
from polyfuse.models import ModelSpec, encode, load_model, load_tokenizer
from polyfuse.models.checks import SEQUENCE_CLASSIFIER
from polyfuse.scorers.base import SCORERS, Scorer, ScorerSettings

torch = lazy_import("torch")

_CUSTOM_HEADS = ("ArmoRM", "RewardModelWithGating")


class RewardModelConfig(ScorerSettings):
    type: Literal["reward_model"] = "reward_model"
    model: ModelSpec = Field(description="A sequence-classification model with one output (a reward head).",
                             json_schema_extra=SEQUENCE_CLASSIFIER)
    normalize: Literal["none", "sigmoid"] = Field(default="none", description="sigmoid maps rewards into (0, 1).")
    batch_size: int = Field(default=8, ge=1, description="Responses per forward.")
    max_length: int | None = Field(default=None, ge=2, description="Keep only the last tokens of longer inputs.")


def _refuse_custom_heads(spec: ModelSpec) -> None:
    """Refuse ArmoRM-like checkpoints from their name or config, before loading any weights."""
    from transformers import AutoConfig

    folder, gguf = spec.location()
    names = [spec.path]
    try:
        names += AutoConfig.from_pretrained(folder, revision=spec.revision, gguf_file=gguf).architectures or []
    except (OSError, ValueError):
        pass  # an unreadable checkpoint is reported by load_model
    if any(head in name for head in _CUSTOM_HEADS for name in names):
        raise ConfigError(
            f"{spec.label}: ArmoRM uses a custom gating head (remote code) that the generic reward_model "
            "scorer cannot reproduce; it is not supported"
        )


@SCORERS.register("reward_model")
class RewardModelScorer(Scorer):
    Config = RewardModelConfig
    config: RewardModelConfig
    kind = "reward"

    def __init__(self, config: RewardModelConfig, device: str | None = None):
        super().__init__(config, device)
        spec = config.model if device is None else config.model.model_copy(update={"device": device})
        _refuse_custom_heads(spec)
        self.tokenizer = load_tokenizer(spec, padding_side="right")
        self.model = load_model(spec, task="sequence-classification")
        if self.model.config.num_labels != 1:
            raise ConfigError(f"{spec.label}: a reward model needs num_labels=1, got {self.model.config.num_labels}")
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def _ids(self, row: SampleRow) -> tuple[list[int], bool]:
        ids = encode(self.tokenizer, row.prompt, row.response).input_ids
        limit = self.config.max_length
        return (ids[-limit:], True) if limit and len(ids) > limit else (ids, False)

    @inference_mode
    def score(self, rows: list[SampleRow]) -> list[tuple[float | bool, dict[str, Any]]]:
        encoded = [self._ids(row) for row in rows]
        order = sorted(range(len(rows)), key=lambda i: len(encoded[i][0]))
        scores = [0.0] * len(rows)
        device = next(self.model.parameters()).device
        pad_id = self.model.config.pad_token_id
        for start in range(0, len(order), self.config.batch_size):
            batch = order[start : start + self.config.batch_size]
            width = max(len(encoded[i][0]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                seq = encoded[i][0]
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].float()
            if self.config.normalize == "sigmoid":
                logits = logits.sigmoid()
            for i, value in zip(batch, logits.tolist(), strict=True):
                scores[i] = value
        return [(scores[i], {"truncated": True} if encoded[i][1] else {}) for i in range(len(rows))]
