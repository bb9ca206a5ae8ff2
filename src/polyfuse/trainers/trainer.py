"""`PolyfuseTrainer`: a thin `transformers.Trainer` whose loss is normalised by the items of the whole step.

Its loss is a *sum* over the micro-batch divided by the number of items (response tokens for SFT, pairs
for preference objectives) of the whole optimiser step on all processes. Trainer counts those items over
the accumulated micro-batches and passes the count to `compute_loss` as `num_items_in_batch`, so gradient
accumulation and data parallelism do not change the loss: batch 1 x accumulation 4 gives the same update
as batch 4 x accumulation 1.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from polyfuse.models.forward import forward_logps
from polyfuse.trainers.distributed import enable_fsdp_on_cpu


class PolyfuseTrainer(Trainer):
    """Subclasses define `summed_loss(inputs, logps, ntokens) -> (loss summed over the micro-batch's items,
    metrics)` (or override `micro_batch_loss`) and `count_items(inputs) -> tensor` (how many items a
    micro-batch holds: response tokens for SFT and distillation, pairs for preference objectives)."""

    loss_is_scaled_for_ga = True  # normalised by the items of the whole step, see `compute_loss`

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._metric_sums: dict[str, torch.Tensor] = {}
        self._metric_counts: dict[str, int] = {}

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled:
            enable_fsdp_on_cpu(self.accelerator, self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        if not batch_samples:
            return None
        count = sum(self.count_items(b) for b in batch_samples).to(device)
        return self.accelerator.reduce(count, "sum") if self.accelerator.num_processes > 1 else count

    def micro_batch_loss(self, model, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor], Any]:
        """(loss summed over the micro-batch's items, metrics, model outputs); per-sequence log-probs by
        default, which distillation overrides because it needs the logits themselves."""
        logps, ntokens, outputs = forward_logps(model, inputs)
        return *self.summed_loss(inputs, logps, ntokens), outputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        total, metrics, outputs = self.micro_batch_loss(model, inputs)
        if num_items_in_batch is None:  # outside the training loop: this micro-batch alone
            num_items_in_batch = self.count_items(inputs)
        # DDP averages gradients over processes; scale back up so the step's loss is sum / items.
        loss = total / num_items_in_batch * self.accelerator.num_processes
        self._record(metrics)
        return (loss, outputs) if return_outputs else loss

    def _record(self, metrics: dict[str, torch.Tensor]) -> None:
        for name, value in metrics.items():
            if value.numel() == 0:  # nothing measured in this micro-batch (no aligned group): not a 0/0 mean
                continue
            value = value.detach().float()
            self._metric_sums[name] = self._metric_sums.get(name, 0) + value.sum()
            self._metric_counts[name] = self._metric_counts.get(name, 0) + value.numel()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean of each recorded metric since the last log, over all processes."""
        if self._metric_sums:
            names = sorted(self._metric_sums)
            sums = torch.stack([self._metric_sums[n] for n in names]).to(self.args.device)
            counts = torch.tensor([float(self._metric_counts[n]) for n in names], device=self.args.device)
            if self.accelerator.num_processes > 1:
                sums, counts = self.accelerator.reduce(sums, "sum"), self.accelerator.reduce(counts, "sum")
            logs.update({n: (s / c).item() for n, s, c in zip(names, sums, counts, strict=True)})
            self._metric_sums, self._metric_counts = {}, {}
        super().log(logs, start_time)
