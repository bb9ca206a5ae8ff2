"""Experiment tracking: with `report_to: [tensorboard]` the event file exists in `logging_dir` and holds
the loss series Trainer logged, under TRL's metric names plus polyfuse's fusion metrics (InfiFPO)."""

from __future__ import annotations

import json
import random

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from polyfuse.data import PreferenceRow
from polyfuse.models import ModelSpec
from polyfuse.trainers import PreferenceTrainConfig, SFTTrainConfig, train_preference
from tiny_lm import build_tiny_model, sentence, source_columns


def test_tensorboard_event_file_holds_the_loss_series(tmp_path):
    spec = ModelSpec(path=build_tiny_model(tmp_path / "pivot"))
    rng = random.Random(2)
    rows = [PreferenceRow(id=f"p{i}", prompt=sentence(rng), chosen=sentence(rng), rejected=sentence(rng),
                          **source_columns(rng, sources=2)) for i in range(8)]  # fmt: skip
    config = PreferenceTrainConfig(objective="infifpo", batch_size=2, learning_rate=1e-2, warmup_ratio=0.0,
                                   report_to="tensorboard", run_name="tb-test", logging_dir=str(tmp_path / "tb"))  # fmt: skip
    out = train_preference(spec, rows, config, tmp_path / "model", source_names=["a", "b"])

    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1
    accumulator = EventAccumulator(str(tmp_path / "tb"))
    accumulator.Reload()
    history = [e for e in json.loads((out / "polyfuse_training.json").read_text())["log_history"] if "loss" in e]
    assert len(history) == 4
    tags = set(accumulator.Tags()["scalars"])
    trl_names = {f"train/{n}" for n in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                                        "rewards/accuracies", "logps/chosen", "logps/rejected")}  # fmt: skip
    assert trl_names <= tags
    assert {"train/fusion/selected/M0", "train/fusion/selected/a", "train/fusion/ref_margin"} <= tags
    for tag, key in (("train/loss", "loss"), ("train/rewards/margins", "rewards/margins")):
        series = accumulator.Scalars(tag)
        assert [s.step for s in series] == [1, 2, 3, 4]
        assert [s.value for s in series] == pytest.approx([e[key] for e in history], rel=1e-6)  # float32 storage


def test_report_to_accepts_trainers_spellings_of_installed_trackers():
    from pydantic import ValidationError
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    assert SFTTrainConfig().report_to == [] and SFTTrainConfig(report_to="none").report_to == []
    assert SFTTrainConfig(report_to="tensorboard").report_to == ["tensorboard"]
    assert SFTTrainConfig(report_to=["all"]).report_to == ["all"]
    missing = sorted(set(INTEGRATION_TO_CALLBACK) - set(get_available_reporting_integrations()))
    with pytest.raises(ValidationError, match=f"'{missing[0]}': its package is not installed"):
        SFTTrainConfig(report_to=["tensorboard", missing[0]])  # refused before training, not by Trainer
    with pytest.raises(ValidationError, match="'tensorbored' is not a tracker of transformers"):
        SFTTrainConfig(report_to="tensorbored")
