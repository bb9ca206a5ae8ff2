"""polyfuse's `kto` against TRL 1.16's KTOTrainer, run in the test on the same tiny model and rows.

TRL prepares the rows (EOS appended, tokens, the in-block rotation of the KL completions, the precomputed
reference sums); polyfuse takes the same token ids and does the rest its own way: the reference sums from
its own forward (`forward_logps`, left padding, compared with TRL's), the policy's sums of both roles in one
forward, the loss from the `kto` objective. Compared: the KL rows, the loss and every parameter's gradient
on one micro-batch, and every parameter and logged metric after 4 AdamW steps.
"""

from __future__ import annotations

import random

import pytest
import torch
from datasets import Dataset
from trl import KTOConfig, KTOTrainer

from polyfuse.models import ModelSpec, load_model
from polyfuse.models.forward import forward_logps
from polyfuse.objectives import COMPLETION, KL_COMPLETION, KTO, UnpairedBatch
from polyfuse.pairs import kl_partners
from polyfuse.trainers.collate import SequenceCollator
from tiny_lm import build_tiny_model, build_tokenizer, sentence

BATCH = 4
# Four micro-batches: mostly U, mostly U, mixed, D only (TRL's empty-class branch). Training on U rows first
# lowers the mismatched rows' likelihood too, so the raw KL estimate of steps 3 and 4 is negative and the
# clamp at 0 matters (checked below).
LABELS = [False, False, True, False, False, False, False, True, True, False, True, False, True, True, True, True]
LR = 1e-3
ROLES = (COMPLETION, KL_COMPLETION)
# Sums of ~20-50 log-probs in fp32 agree to a few ulps (3.8e-6 at 32) between TRL's fused LM head and
# polyfuse's forward; what beta scales (losses, rewards, gradients) agrees to 1e-6.
SUM_TOLERANCE = 2e-5


def tolerance(metric: str) -> float:
    return SUM_TOLERANCE if metric == "kl" or metric.startswith("logps/") else 1e-6


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("kto") / "tiny")


def kto_rows() -> list[dict]:
    """TRL's unpaired rows with distinct prompts (TRL's rotation does not look at prompts; polyfuse's skips a
    partner of the same prompt, so distinct prompts make the two the same rule)."""
    rng, prompts = random.Random(3), set()
    while len(prompts) < len(LABELS):
        prompts.add(sentence(rng, 3, 8))
    return [{"prompt": p, "completion": " " + sentence(rng, 2, 8), "label": label}
            for p, label in zip(sorted(prompts), LABELS, strict=True)]  # fmt: skip


def trl_trainer(folder, tmp_path, loss_type, desirable_weight, undesirable_weight, steps=len(LABELS) // BATCH, lr=LR) -> KTOTrainer:
    from transformers import AutoModelForCausalLM

    args = KTOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=BATCH, max_steps=steps,
        learning_rate=lr, lr_scheduler_type="constant", optim="adamw_torch", gradient_checkpointing=False,
        bf16=False, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, precompute_ref_log_probs=True,
        loss_type=loss_type, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
        max_length=64, seed=0, disable_tqdm=True,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(folder)
    return KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(kto_rows()),
                      processing_class=build_tokenizer())  # fmt: skip


def roles_of(rows: list[dict]) -> tuple[str, ...]:
    """TRL writes KL completions only for `loss_type="kto"`."""
    return ROLES if "KL_completion_ids" in rows[0] else (COMPLETION,)


def polyfuse_batch(rows: list[dict]) -> dict[str, torch.Tensor]:
    """TRL's token ids in polyfuse's layout: every role of every row in one left-padded batch."""
    ids = {COMPLETION: "completion_ids", KL_COMPLETION: "KL_completion_ids"}
    features = [
        {key: value for role in roles_of(rows)
         for key, value in ((f"{role}_input_ids", row["prompt_ids"] + row[ids[role]]),
                            (f"{role}_prompt_length", len(row["prompt_ids"])))}
        for row in rows
    ]  # fmt: skip
    return SequenceCollator(build_tokenizer().pad_token_id, roles_of(rows))(features)


def sums(model, batch, roles) -> dict[str, torch.Tensor]:
    logps, _, _ = forward_logps(model, batch)
    return dict(zip(roles, logps.split(len(logps) // len(roles)), strict=True))


def polyfuse_loss(policy, initial, rows, objective) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The micro-batch loss from polyfuse's own forwards: M0's sums as the `ref_*` columns, then `kto`."""
    batch, roles = polyfuse_batch(rows), roles_of(rows)
    with torch.no_grad():
        reference = sums(initial, batch, roles)
    losses, metrics = objective(UnpairedBatch(
        logps=sums(policy, batch, roles),
        ntokens={},
        columns={f"ref_{role}_logps": reference[role] for role in roles},
        labels=torch.tensor([row["label"] for row in rows]),
    ))  # fmt: skip
    return losses.sum() / objective.items({}, len(rows)), metrics


def test_kl_rows_and_reference_sums_are_trls(folder, tmp_path):
    trainer = trl_trainer(folder, tmp_path, "kto", 1.0, 1.0)
    data = trainer.train_dataset
    partners = kl_partners([str(i) for i in range(len(data))], BATCH)
    assert [data[p]["completion_ids"] for p in partners] == data["KL_completion_ids"]
    initial = load_model(ModelSpec(path=folder))
    with torch.no_grad():
        reference = sums(initial, polyfuse_batch(list(data)), ROLES)
    torch.testing.assert_close(reference[COMPLETION], torch.tensor(data["ref_logps"]), rtol=0, atol=SUM_TOLERANCE)
    torch.testing.assert_close(reference[KL_COMPLETION], torch.tensor(data["ref_KL_logps"]), rtol=0, atol=SUM_TOLERANCE)


@pytest.mark.parametrize(
    ("loss_type", "desirable_weight", "undesirable_weight"),
    [("kto", 1.33, 1.0), ("apo_zero_unpaired", 1.0, 0.7)],
)
def test_loss_and_gradients_equal_trls_after_a_step(folder, tmp_path, loss_type, desirable_weight, undesirable_weight):
    """On the second micro-batch, after one large step moved the policy off M0 (at M0 every row's loss is
    0.5 and z0 is 0, which would hide a wrong z0 or sign)."""
    trainer = trl_trainer(folder, tmp_path, loss_type, desirable_weight, undesirable_weight, steps=1, lr=3e-2)
    trainer.train()
    rows = [trainer.train_dataset[i] for i in range(BATCH, 2 * BATCH)]
    trl_model = trainer.model
    trl_model.zero_grad()
    trl_loss = trainer.compute_loss(trl_model, trainer.data_collator(rows))
    trl_loss.backward()

    policy = load_model(ModelSpec(path=folder))
    policy.load_state_dict(trl_model.state_dict())
    objective = KTO(loss_type=loss_type, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    loss, metrics = polyfuse_loss(policy, load_model(ModelSpec(path=folder)), rows, objective)
    loss.backward()

    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    assert loss.item() != pytest.approx(0.5 * (3 * desirable_weight + undesirable_weight) / 4, abs=1e-3)  # moved
    if loss_type == "kto":
        assert trainer._metrics["train"]["kl"][-1] == pytest.approx(metrics["kl"].item(), abs=SUM_TOLERANCE)
    grads = dict(trl_model.named_parameters())
    for name, parameter in policy.named_parameters():
        expected = grads[name].grad
        scale = expected.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(parameter.grad, expected, rtol=0, atol=3e-6 * max(scale, 1e-3), msg=name)


def test_four_adamw_steps_give_trls_parameters_and_metrics(folder, tmp_path):
    objective = KTO(desirable_weight=1.33)
    trainer = trl_trainer(folder, tmp_path, "kto", 1.33, 1.0)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]

    policy, initial = load_model(ModelSpec(path=folder)), load_model(ModelSpec(path=folder))
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    data = trainer.train_dataset
    for step in range(len(LABELS) // BATCH):
        loss, metrics = polyfuse_loss(policy, initial, [data[i] for i in range(step * BATCH, (step + 1) * BATCH)], objective)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), trainer.args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        assert loss.item() == pytest.approx(logged[step]["loss"], abs=1e-6)
        for name, value in metrics.items():
            assert value.item() == pytest.approx(logged[step][name], abs=tolerance(name)), (step, name)
        assert set(metrics) == {"kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                                "logps/rejected"} & set(logged[step])  # fmt: skip
    assert logged[1]["kl"] > 0 and logged[2]["kl"] == 0 == logged[3]["kl"]  # z0 above and at the clamp
    assert "rewards/rejected" not in logged[3]  # the D-only micro-batch

    # Adam divides by sqrt(v) + 1e-8: where a gradient entry is near 0, its fp32 noise (1e-7 relative) moves the
    # weight by up to lr * 1e-3; a handful of 20k entries differ by ~1e-6, the rest by under 1e-7.
    trained = dict(trainer.model.named_parameters())
    diffs = torch.cat([(p - trained[name]).detach().abs().flatten() for name, p in policy.named_parameters()])
    moved = torch.cat([(p - initial.get_parameter(name)).detach().abs().flatten() for name, p in policy.named_parameters()])
    assert diffs.max() < 1e-5 and (diffs > 1e-7).float().mean() < 1e-3
    assert moved.max() > 1e-3  # four steps at lr 1e-3 moved the weights far more than the tolerance


def test_polyfuse_train_kto_gives_trls_parameters_losses_and_metrics(folder, tmp_path):
    """The whole `polyfuse train kto` path against TRL's KTOTrainer on the same conversational rows: polyfuse's own
    template encoding, its reference columns (scored by M0 before training), the sequential micro-batches of the
    rotation, the detached KL forward, the packed layout, four AdamW steps; TRL's rows keep their order, so the
    polyfuse rows carry the KL completions of TRL's rotation."""
    import json

    from polyfuse.data import UnpairedRow
    from polyfuse.trainers import UnpairedTrainConfig, train_unpaired

    rows = kto_rows()
    conversational = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                       "completion": [{"role": "assistant", "content": r["completion"].strip()}], "label": r["label"]}
                      for r in rows]  # fmt: skip
    args = KTOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=BATCH, max_steps=len(LABELS) // BATCH,
        learning_rate=LR, lr_scheduler_type="constant", optim="adamw_torch", gradient_checkpointing=False, bf16=False,
        use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, precompute_ref_log_probs=True,
        desirable_weight=1.33, max_length=64, seed=0, disable_tqdm=True,
    )  # fmt: skip
    from transformers import AutoModelForCausalLM

    trainer = KTOTrainer(model=AutoModelForCausalLM.from_pretrained(folder), args=args,
                         train_dataset=Dataset.from_list(conversational), processing_class=build_tokenizer())
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]

    partners = kl_partners([str(i) for i in range(len(rows))], BATCH)
    unpaired = [UnpairedRow(id=f"r{i}", prompt=c["prompt"], completion=c["completion"], label=c["label"],
                            kl_completion=conversational[partners[i]]["completion"])
                for i, c in enumerate(conversational)]  # fmt: skip
    config = UnpairedTrainConfig(objective="kto", objective_args={"desirable_weight": 1.33}, learning_rate=LR,
                                 batch_size=BATCH, epochs=1, lr_scheduler="constant", warmup_ratio=0.0, max_length=64,
                                 save_steps=0, logging_steps=1)  # fmt: skip
    out = train_unpaired(ModelSpec(path=folder), unpaired, config, tmp_path / "polyfuse")
    ours = [entry for entry in json.loads((out / "polyfuse_training.json").read_text())["log_history"] if "loss" in entry]
    assert len(ours) == len(logged) == len(LABELS) // BATCH
    for step, (mine, theirs) in enumerate(zip(ours, logged, strict=True)):
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-6), step
        for name in ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen"):
            if name in theirs:
                assert mine[name] == pytest.approx(theirs[name], abs=tolerance(name)), (step, name)
    trained = dict(trainer.model.named_parameters())
    policy = load_model(ModelSpec(path=str(out)))
    diffs = torch.cat([(p - trained[name]).detach().abs().flatten() for name, p in policy.named_parameters()])
    moved = torch.cat([(p - load_model(ModelSpec(path=folder)).get_parameter(name)).detach().abs().flatten()
                       for name, p in policy.named_parameters()])  # fmt: skip
    assert diffs.max() < 1e-5 and (diffs > 1e-7).float().mean() < 1e-3
    assert moved.max() > 1e-3
