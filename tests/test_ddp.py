"""Data-parallel training: 2 CPU processes under `accelerate launch` against one process with the same
global batch (2 per device x 2 processes = 2 per device x 2 accumulation steps). The preference stage is
InfiFPO with two (synthetic) sources, so the fused reference columns travel through DDP too; the
distillation stage is unified ULD with uncertainty weights over two stored teachers. The same three
stages under FSDP2 (2 CPU processes, gloo) give the same losses and a gathered plain HF folder equal
to the single-process weights. `polyfuse teacher`
under 2 processes writes the same outputs as one."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import warm_python
from ddp_train import main as train_locally
from polyfuse.data import PreferenceRow, SFTRow, read_rows, write_rows
from polyfuse.data.io import write_metadata
from polyfuse.models import ModelSpec
from polyfuse.teacher import TeacherConfig, open_stores, run_teacher
from tiny_lm import build_tiny_model, sentence, source_columns

HERE = Path(__file__).parent
FSDP2_CONFIG = HERE.parent / "examples" / "accelerate" / "fsdp2.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_inputs(folder: Path, teachers: list[str]) -> None:
    rng = random.Random(0)
    # Completions of very different lengths: each rank sees its own token count, so SFT is only right if
    # the count is summed over processes.
    write_rows(
        folder / "sft.jsonl",
        [SFTRow(id=f"s{i}", prompt=sentence(rng), completion=sentence(rng, 1, 25)) for i in range(8)],
    )
    write_rows(
        folder / "pairs.jsonl",
        [
            PreferenceRow(
                id=f"p{i}", prompt=sentence(rng), chosen=sentence(rng), rejected=sentence(rng),
                **source_columns(rng, sources=2),
            )
            for i in range(8)
        ],
    )
    write_metadata(folder / "pairs.jsonl", {"sources": [{"name": "src-a"}, {"name": "src-b"}]})
    # Plain SGD without clipping: the update is -lr * gradient, so a wrong loss scale cannot hide.
    common = {"batch_size": 2, "epochs": 1, "warmup_ratio": 0.0, "lr_scheduler": "constant", "optim": "sgd",
              "max_grad_norm": 0.0, "learning_rate": 0.5}  # fmt: skip
    (folder / "sft.json").write_text(json.dumps(common))
    (folder / "preference.json").write_text(json.dumps({**common, "beta": 0.5, "objective": "infifpo"}))
    (folder / "distill.json").write_text(json.dumps(
        {**common, "objective": "uld", "objective_args": {"top_k": 4, "weighting": "uncertainty"}}
    ))
    specs = [ModelSpec(name=f"teacher-{i}", path=path) for i, path in enumerate(teachers)]
    run_teacher(read_rows(folder / "sft.jsonl", SFTRow), TeacherConfig(models=specs, top_k=4, chunk_size=3),
                folder / "teacher", quiet=True)



def params(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def losses(path: Path) -> list[float]:
    history = json.loads((path / "polyfuse_training.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def launch(script_args: list[str], config: list[str] | None = None) -> subprocess.CompletedProcess:
    """2 CPU processes under `accelerate launch`: plain DDP, or what the accelerate `config` file says."""
    how = ["--config_file", *config] if config else ["--multi_gpu"]
    command = [  # the launcher in a warm child (`warm_python`); the processes it starts are new interpreters
        "-m", "accelerate.commands.launch", *how, "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), *script_args,
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    return warm_python.run(command, env=env, timeout=400)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Models, data and teacher store, and the single-process run the launched runs are compared with."""
    folder = tmp_path_factory.mktemp("distributed")
    model_dir = build_tiny_model(folder / "pivot")
    teachers = [build_tiny_model(folder / f"teacher-{i}", seed=i + 1) for i in range(2)]
    write_inputs(folder, teachers)
    train_locally(model_dir, str(folder), str(folder / "single"), "2")
    return folder


def compare_with_single_process(world: Path, launched: Path, kind: str) -> dict[str, tuple[float, float]]:
    """Per stage: (max loss difference, max weight difference) against the single process; asserts the
    bounds, that the replicas agree, and what `polyfuse_training.json` records as used."""
    figures = {}
    for stage in ("sft", "preference", "distill"):
        rank0 = torch.load(launched / f"{stage}.rank0.pt")
        rank1 = torch.load(launched / f"{stage}.rank1.pt")
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), f"{stage}: replicas diverged"
        for rank in (0, 1):  # parameters each rank held while training, of all parameters
            held, total = map(int, (launched / f"{stage}.rank{rank}.numel").read_text().split())
            assert held < 0.6 * total if kind == "FSDP" else held == total, (stage, rank, held, total)
        folder, single = launched / stage, params(world / "single" / stage)
        saved = {k: v.detach() for k, v in AutoModelForCausalLM.from_pretrained(folder).state_dict().items()}
        assert saved.keys() == single.keys()
        initial = params(world / "single" / "sft") if stage == "preference" else params(world / "pivot")
        weight_difference = max((saved[k] - single[k]).abs().max().item() for k in single)
        assert weight_difference < 1e-5, stage
        assert max((single[k] - initial[k]).abs().max().item() for k in single) > 1e-3, f"{stage} did not train"
        launched_losses, single_losses = losses(folder), losses(world / "single" / stage)
        assert len(launched_losses) == len(single_losses) == 2
        assert launched_losses == pytest.approx(single_losses, abs=1e-5), stage  # summation order differs
        distributed = json.loads((folder / "polyfuse_training.json").read_text())["distributed"]
        assert distributed["type"] == kind and distributed["processes"] == 2, distributed
        figures[stage] = (max(abs(a - b) for a, b in zip(launched_losses, single_losses, strict=True)), weight_difference)
    print(kind, {stage: f"loss {a:.2e}, weights {b:.2e}" for stage, (a, b) in figures.items()})
    return figures


def test_two_process_ddp_matches_single_process(world):
    result = launch([str(HERE / "ddp_train.py"), str(world / "pivot"), str(world), str(world / "ddp"), "1"])
    assert result.returncode == 0, result.stderr[-4000:]
    compare_with_single_process(world, world / "ddp", "DDP")
    history = json.loads((world / "ddp" / "preference" / "polyfuse_training.json").read_text())["log_history"]
    picked = [sum(v for k, v in entry.items() if k.startswith("fusion/selected/")) for entry in history if "loss" in entry]
    assert picked == pytest.approx([1.0, 1.0])  # fractions over M0, src-a and src-b, gathered over both ranks


@pytest.mark.slow
def test_two_process_fsdp2_shards_and_matches_single_process(world):
    """`accelerate launch --config_file examples/accelerate/fsdp2.yaml` on CPU processes really shards
    (accelerate alone would train plain DDP there), and the gathered final model equals one process's."""
    result = launch([str(HERE / "ddp_train.py"), str(world / "pivot"), str(world), str(world / "fsdp"), "1"],
                    [str(FSDP2_CONFIG)])  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    compare_with_single_process(world, world / "fsdp", "FSDP")


def test_teacher_under_two_processes_stores_what_one_process_stores(tmp_path):
    teachers = [build_tiny_model(tmp_path / f"teacher-{i}", seed=i + 1) for i in range(2)]
    rng = random.Random(1)
    write_rows(tmp_path / "sft.jsonl", [SFTRow(id=f"s{i}", prompt=sentence(rng), completion=sentence(rng)) for i in range(7)])
    config = {"top_k": 3, "chunk_size": 2, "models": [{"name": f"t{i}", "path": p} for i, p in enumerate(teachers)]}
    (tmp_path / "teacher.yaml").write_text(json.dumps(config))
    cli = ["-m", "polyfuse", "teacher", "-c", str(tmp_path / "teacher.yaml"), "--data", str(tmp_path / "sft.jsonl"), "-q"]
    result = launch([*cli, "-o", str(tmp_path / "ddp")])
    assert result.returncode == 0, result.stderr[-4000:]
    single = warm_python.run([*cli, "-o", tmp_path / "single"])
    assert single.returncode == 0, single.stderr[-4000:]
    for ddp, one in zip(open_stores(tmp_path / "ddp"), open_stores(tmp_path / "single"), strict=True):
        assert ddp.manifest["examples"] == one.manifest["examples"] and len(ddp.shards()) == 4
        for (id_a, a), (id_b, b) in zip(ddp.examples(), one.examples(), strict=True):
            assert id_a == id_b
            assert all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("token_ids", "spans", "topk_ids", "topk_logits"))
            assert np.allclose(a.token_logps, b.token_logps, atol=1e-6)
