"""Explicit fusion end to end on tiny models: the teacher store (exact against the model's own forward,
resumable, per-model artefacts), the targets built from it (self-distillation invariants), and
`polyfuse train distill` (accumulation invariance, CE-only = SFT, LoRA, the CLI and its errors)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from polyfuse.alignment import response_spans
from polyfuse.data import SFTRow, response_text, write_rows
from polyfuse.errors import DataError
from polyfuse.models import ModelSpec, load_model, load_tokenizer
from polyfuse.objectives import (
    DISTILL_OBJECTIVES,
    AlignedRow,
    DistillBatch,
    DistillObjective,
    TargetField,
    logit_std,
    student_uld_probs,
    token_cross_entropy,
    uld_distance,
)
from polyfuse.teacher import (
    TeacherConfig,
    TeacherExample,
    open_stores,
    read_shard,
    run_teacher,
    write_shard,
)
from polyfuse.teacher.targets import distill_features, load_teachers
from polyfuse.trainers import DistillTrainConfig, SFTTrainConfig, train_distill, train_sft
from tiny_lm import build_tiny_model, sentence

EXACT_STEP = dict(optim="sgd", learning_rate=0.5, lr_scheduler="constant", warmup_ratio=0.0, max_grad_norm=0.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "pivot": ModelSpec(name="pivot", path=build_tiny_model(root / "pivot", seed=0)),
        "teacher-a": ModelSpec(name="teacher-a", path=build_tiny_model(root / "teacher-a", seed=1)),
        "teacher-b": ModelSpec(name="teacher-b", path=build_tiny_model(root / "teacher-b", seed=2)),
    }


def rows(count: int = 6, seed: int = 0) -> list[SFTRow]:
    rng = random.Random(seed)
    return [SFTRow(id=f"r{i}", prompt=sentence(rng), completion=sentence(rng, 1, 12)) for i in range(count)]


@pytest.fixture(scope="module")
def store(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "store"
    config = TeacherConfig(models=[models["pivot"], models["teacher-a"], models["teacher-b"]], top_k=5, chunk_size=4)
    run_teacher(rows(), config, out, quiet=True)
    return out


def response_logits(spec: ModelSpec, row: SFTRow) -> tuple[torch.Tensor, list[int]]:
    """fp32 logits at the positions predicting each response token, from one unpadded forward."""
    model, tokenizer = load_model(spec), load_tokenizer(spec)
    encoded, _ = response_spans(tokenizer, row.prompt, response_text(row.completion))
    ids = torch.tensor([encoded.input_ids])
    start = len(encoded.prompt_ids)
    with torch.no_grad():
        return model(input_ids=ids).logits[0, start - 1 : -1].float(), encoded.response_ids


def test_shard_round_trip_keeps_arrays_and_dtypes(tmp_path):
    rng = np.random.default_rng(0)

    def example(n: int) -> TeacherExample:
        return TeacherExample(
            token_ids=rng.integers(0, 100, n).astype(np.int32),
            spans=rng.integers(-1, 20, (n, 2)).astype(np.int32),
            topk_ids=rng.integers(0, 100, (n, 4)).astype(np.int32),
            topk_logits=rng.normal(size=(n, 4)).astype(np.float16),
            std=rng.random(n).astype(np.float32),
            token_logps=-rng.random(n).astype(np.float32),
        )

    written = {"a": example(3), "b": example(1), "c": example(5)}
    write_shard(tmp_path / "shard-00000.npz", written)
    back = read_shard(tmp_path / "shard-00000.npz")
    assert list(back) == ["a", "b", "c"]
    for key, original in written.items():
        for name in ("token_ids", "spans", "topk_ids", "topk_logits", "std", "token_logps"):
            assert getattr(back[key], name).dtype == getattr(original, name).dtype
            assert np.array_equal(getattr(back[key], name), getattr(original, name))
    assert [p.name for p in tmp_path.iterdir()] == ["shard-00000.npz"]  # no temporary file left


def test_stored_outputs_equal_the_models_own_forward(models, store):
    teacher = open_stores(store, ["teacher-a"])[0]
    assert teacher.top_k == 5 and teacher.manifest["model"]["name"] == "teacher-a"
    assert teacher.manifest["positions"] == sum(len(e.token_ids) for _, e in teacher.examples())
    stored = dict(teacher.examples())
    assert sorted(stored) == sorted(r.id for r in rows())
    for row in rows():
        logits, response_ids = response_logits(models["teacher-a"], row)
        example = stored[row.id]
        assert example.token_ids.tolist() == response_ids
        values, ids = logits.topk(5)
        assert np.array_equal(example.topk_ids, ids.numpy())
        assert np.allclose(example.topk_logits.astype(np.float32), values.numpy(), atol=2e-3, rtol=1e-3)
        assert np.allclose(example.std, logit_std(logits).numpy(), atol=1e-5)
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(response_ids)[:, None]).squeeze(-1)
        assert np.allclose(example.token_logps, expected.numpy(), atol=1e-5)
        assert example.cross_entropy == pytest.approx(-expected.mean().item(), abs=1e-5)


def test_a_rerun_computes_only_missing_shards_and_a_changed_setting_restarts_that_model(models, tmp_path):
    out = tmp_path / "store"
    config = TeacherConfig(models=[models["teacher-a"], models["teacher-b"]], top_k=3, chunk_size=2)
    run_teacher(rows(), config, out, quiet=True)
    shards = sorted(out.glob("*/shard-*.npz"))
    assert len(shards) == 6
    times = {p: p.stat().st_mtime_ns for p in shards}
    lost = out / "teacher-a" / "shard-00001.npz"
    lost.unlink()
    from polyfuse.data.io import _HOST

    killed = out / "teacher-a" / f".shard-00001.npz.{_HOST}-{2**22 + 7}-x1.tmp"  # a writer killed mid-shard
    killed.write_bytes(b"half a shard")
    run_teacher(rows(), config, out, quiet=True)
    assert lost.exists() and not killed.exists()
    assert all(p.stat().st_mtime_ns == t for p, t in times.items() if p != lost)

    # Another K for teacher-a only: teacher-b's folder is a separate artefact and stays as it was.
    run_teacher(rows(), TeacherConfig(models=[models["teacher-a"]], top_k=2, chunk_size=2), out, quiet=True)
    assert open_stores(out, ["teacher-a"])[0].top_k == 2
    assert all(p.stat().st_mtime_ns == t for p, t in times.items() if "teacher-b" in str(p))


def test_self_distillation_targets_are_the_pivots_own_distribution(models, store):
    """The pivot as its own teacher: ULD targets equal the student's own sorted probabilities (distance ~0),
    and FuseLLM's target is the pivot's own top-K softmax, under every alignment."""
    tokenizer = load_tokenizer(models["pivot"])
    pivot_store = open_stores(store, ["pivot"])
    data = rows()
    logits = {r.id: response_logits(models["pivot"], r)[0] for r in data}
    for alignment in ("positional", "offsets"):
        uld = DistillTrainConfig(objective="uld", objective_args={"top_k": 5, "weighting": "uncertainty"}).build_objective()
        teachers = load_teachers(pivot_store, tokenizer, alignment, None)
        features = list(distill_features(tokenizer, data, teachers, uld, 64, []))
        for row, feature in zip(data, features, strict=True):
            own = student_uld_probs(logits[row.id], k=5)
            stored = torch.tensor(feature["teacher_probs"])
            assert torch.tensor(feature["teacher_mask"]).all()
            assert uld_distance(own, stored).max() < 2e-3, alignment
        fusellm = DistillTrainConfig(objective="fusellm", objective_args={"top_k": 5}).build_objective()
        teachers = load_teachers(pivot_store, tokenizer, alignment, "mined")
        features = list(distill_features(tokenizer, data, teachers, fusellm, 64, []))
        for row, feature in zip(data, features, strict=True):
            values, ids = logits[row.id].topk(5)
            assert feature["target_ids"] == ids.tolist()
            assert np.allclose(feature["target_probs"], torch.softmax(values, -1).numpy(), atol=2e-3)


def test_min_ce_picks_the_candidate_with_the_lowest_ce_per_example(models, store):
    tokenizer = load_tokenizer(models["pivot"])
    stores = open_stores(store, ["teacher-a", "teacher-b"])
    objective = DistillTrainConfig(objective="fusellm", objective_args={"top_k": 5}).build_objective()
    teachers = load_teachers(stores, tokenizer, "offsets", "exact")
    features = list(distill_features(tokenizer, rows(), teachers, objective, 64, []))
    by_id = [dict(s.examples()) for s in stores]
    for row, feature in zip(rows(), features, strict=True):
        best = min(range(2), key=lambda t: by_id[t][row.id].cross_entropy)
        assert feature["target_ids"] == by_id[best][row.id].topk_ids.tolist()  # same vocabulary: ids unchanged


def trained(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def max_difference(a, b) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("objective", ["uld", "fusellm"])
def test_gradient_accumulation_and_batch_size_give_the_same_update(models, store, tmp_path, objective):
    args = {"objective": objective, "objective_args": {"top_k": 5}, "teachers": ["teacher-a", "teacher-b"], **EXACT_STEP}
    data = rows(4)
    micro = train_distill(models["pivot"], data, store, DistillTrainConfig(batch_size=1, grad_accum=4, **args), tmp_path / "m")
    full = train_distill(models["pivot"], data, store, DistillTrainConfig(batch_size=4, grad_accum=1, **args), tmp_path / "f")
    assert max_difference(trained(micro), trained(full)) < 1e-6
    assert max_difference(trained(full), load_file(f"{models['pivot'].path}/model.safetensors")) > 1e-3


def test_without_the_distillation_term_it_is_sft_exactly(models, store, tmp_path):
    data = rows(4)
    distilled = train_distill(
        models["pivot"], data, store,
        DistillTrainConfig(objective="uld", objective_args={"lambda_kd": 0.0, "top_k": 5}, batch_size=2, grad_accum=2,
                           **EXACT_STEP),
        tmp_path / "distill",
    )
    sft = train_sft(models["pivot"], data, SFTTrainConfig(batch_size=2, grad_accum=2, **EXACT_STEP), tmp_path / "sft")
    assert max_difference(trained(distilled), trained(sft)) < 1e-6
    summary = json.loads((distilled / "polyfuse_training.json").read_text())
    assert summary["teachers"] == ["pivot", "teacher-a", "teacher-b"] and summary["alignment"] == "positional"


def test_lora_distillation_saves_merged_weights(models, store, tmp_path):
    config = DistillTrainConfig(objective="uld", objective_args={"top_k": 5}, lora={"r": 2, "alpha": 4.0},
                                teachers=["teacher-a"], **EXACT_STEP)
    out = train_distill(models["pivot"], rows(4), store, config, tmp_path / "lora")
    weights = trained(out)
    assert not any("lora" in name for name in weights)
    assert max_difference(weights, load_file(f"{models['pivot'].path}/model.safetensors")) > 0


def test_outputs_for_other_data_are_refused(models, store, tmp_path):
    changed = [rows()[0].model_copy(update={"completion": "a different answer"})]
    with pytest.raises(DataError, match="have other text than when the teacher ran"):
        train_distill(models["pivot"], changed, store, DistillTrainConfig(teachers=["teacher-a"]), tmp_path / "y")
    other = [SFTRow(id="elsewhere", prompt="one two", completion="three")]
    with pytest.raises(DataError, match="were not in the data when the teacher ran"):
        train_distill(models["pivot"], other, store, DistillTrainConfig(teachers=["teacher-a"]), tmp_path / "x")


def test_cli_teacher_then_distill_and_exit_2_on_user_errors(polyfuse_cli, models, tmp_path):
    data = tmp_path / "sft.jsonl"
    write_rows(data, rows(3))
    config = tmp_path / "teacher.yaml"
    config.write_text(f"top_k: 4\nmodels:\n  - {{name: teacher-a, path: {models['teacher-a'].path}}}\n")
    store = tmp_path / "store"
    proc = polyfuse_cli("teacher", "-c", config, "--data", data, "-o", store, "-q")
    assert proc.returncode == 0, proc.stderr[-2000:]
    train = tmp_path / "train.yaml"
    train.write_text("objective: uld\nobjective_args: {top_k: 4}\nepochs: 1\nbatch_size: 3\n")
    proc = polyfuse_cli("train", "distill", "-c", train, "--data", data, "--teachers", store,
                        "--model", models["pivot"].path, "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out" / "model.safetensors").exists()

    for args, message in [
        (("train", "distill", "--data", data, "--teachers", tmp_path / "nowhere", "--model", models["pivot"].path,
          "-o", tmp_path / "o2"), "no teacher outputs"),
        (("train", "distill", "--set", "objective=kl", "--data", data, "--teachers", store, "--model",
          models["pivot"].path, "-o", tmp_path / "o3"), "unknown distillation objective"),
        (("teacher", "-c", config, "--set", "top_k=0", "--data", data, "-o", tmp_path / "s2"), "top_k"),
    ]:
        proc = polyfuse_cli(*args)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr


class SlowTokenizer:
    """A tokenizer without offsets (a "slow" one): everything but `is_fast` comes from the wrapped one."""

    is_fast = False

    def __init__(self, fast):
        self._fast = fast

    def __getattr__(self, name):
        return getattr(self._fast, name)

    def __call__(self, *args, **kwargs):
        return self._fast(*args, **kwargs)

    def __len__(self):
        return len(self._fast)


def test_a_teacher_without_offsets_is_aligned_by_the_edit_distance_dp(models, store, tmp_path, monkeypatch):
    """A model without offsets (a slow tokenizer) falls back to the DP; on the same tokenization the DP finds
    the same one-to-one groups as the offsets, so the targets are the same."""
    import polyfuse.teacher.run as teacher_run

    monkeypatch.setattr(teacher_run, "load_tokenizer", lambda spec: SlowTokenizer(load_tokenizer(spec)))
    slow_store = tmp_path / "slow"
    run_teacher(rows(), TeacherConfig(models=[models["teacher-a"]], top_k=5, chunk_size=4), slow_store, quiet=True)
    slow = open_stores(slow_store, ["teacher-a"])
    assert slow[0].manifest["model"]["offsets"] is False
    assert all((example.spans == -1).all() for _, example in slow[0].examples())

    tokenizer = load_tokenizer(models["pivot"])
    objective = DistillTrainConfig(objective="fusellm", objective_args={"top_k": 5}).build_objective()
    fast_teachers = load_teachers(open_stores(store, ["teacher-a"]), tokenizer, "offsets", "mined")
    slow_teachers = load_teachers(slow, tokenizer, "offsets", "mined")
    assert [t.alignment for t in slow_teachers] == ["dp"]
    by_offsets = list(distill_features(tokenizer, rows(), fast_teachers, objective, 64, []))
    by_dp = list(distill_features(tokenizer, rows(), slow_teachers, objective, 64, []))
    assert by_dp == by_offsets
    assert any(len(ids) > 1 for feature in by_dp for ids in feature["target_ids"])  # not all one-hot fallbacks


class ConfidenceCE(DistillObjective):
    """Written for the test below: CE weighted per position by how sure the aligned teachers were of their own
    token (the mean of their stored token probabilities; 1 where no teacher is aligned)."""

    target_fields = {"confidence": TargetField("float32")}
    default_alignment = "positional"

    def targets(self, row: AlignedRow) -> dict:
        confidence = []
        for j in range(len(row.labels)):
            probs = [float(np.exp(example.token_logps[right[0]]))
                     for example, groups in zip(row.examples, row.groups, strict=True) if example is not None
                     for left, right in groups if left[0] == j]
            confidence.append(sum(probs) / len(probs) if probs else 1.0)
        return {"confidence": confidence}

    def __call__(self, batch: DistillBatch):
        ce = token_cross_entropy(batch.logits, batch.labels)
        return batch.require("confidence") * ce, {"loss/ce": ce.detach()}


@pytest.fixture
def confidence_ce():
    DISTILL_OBJECTIVES.register("confidence_ce")(ConfidenceCE)
    yield
    del DISTILL_OBJECTIVES._items["confidence_ce"]


def test_a_new_distillation_objective_is_one_class_registered(confidence_ce, models, store, tmp_path):
    """Its declared targets are built from the store and batched for its loss; nothing else names it."""
    tokenizer = load_tokenizer(models["pivot"])
    objective = DistillTrainConfig(objective="confidence_ce").build_objective()
    teachers = load_teachers(open_stores(store, ["pivot"]), tokenizer, "positional", objective.vocabulary_map())
    features = list(distill_features(tokenizer, rows(), teachers, objective, 64, []))
    stored = dict(open_stores(store, ["pivot"])[0].examples())
    for row, feature in zip(rows(), features, strict=True):
        assert np.allclose(feature["confidence"], np.exp(stored[row.id].token_logps), atol=1e-6)
    args = {"objective": "confidence_ce", "teachers": ["teacher-a", "teacher-b"], **EXACT_STEP}
    micro = train_distill(models["pivot"], rows(4), store, DistillTrainConfig(batch_size=1, grad_accum=4, **args), tmp_path / "m")
    full = train_distill(models["pivot"], rows(4), store, DistillTrainConfig(batch_size=4, grad_accum=1, **args), tmp_path / "f")
    assert max_difference(trained(micro), trained(full)) < 1e-6
    assert max_difference(trained(full), load_file(f"{models['pivot'].path}/model.safetensors")) > 1e-3
