"""The memory estimate printed before loading weights: 16 bytes per trainable parameter (AdamW) divided
by the shards, activations and logits of the largest micro-batch; a run that cannot fit is refused
unless forced. LoRA under sharded weights is refused before any model is loaded."""

from __future__ import annotations

import random

import pytest

from polyfuse.data import SFTRow
from polyfuse.errors import UserError
from polyfuse.models import ModelSpec, load_model
from polyfuse.trainers import SFTTrainConfig, train_sft
from polyfuse.trainers import memory as memory_module
from polyfuse.trainers.distributed import check_lora_supported
from polyfuse.trainers.memory import estimate_memory
from tiny_lm import build_tiny_model, sentence


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return ModelSpec(path=build_tiny_model(tmp_path_factory.mktemp("pivot")))


def test_estimate_counts_16_bytes_per_parameter_divided_by_shards(spec, monkeypatch):
    parameters = sum(p.numel() for p in load_model(spec).parameters())
    config = SFTTrainConfig(batch_size=2, max_length=16)
    single = estimate_memory(spec, config, sequences_per_item=1)
    assert single.parameters == single.trainable == parameters
    assert (single.parts["gradients"], single.parts["optimizer"]) == (4 * parameters, 8 * parameters)
    assert single.parts["weights"] == 4 * parameters  # fp32
    assert single.parts["loading copy"] == 4 * parameters  # CPU: the loaded state dict beside the model
    assert single.parts["logits"] == 2 * 16 * 31 * 12  # tokens x vocab x 12 bytes
    assert estimate_memory(spec, config, sequences_per_item=2).parts["activations"] == 2 * single.parts["activations"]

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    sharded = estimate_memory(spec, config, sequences_per_item=1)
    assert sharded.sharding["type"] == "FSDP"
    assert (sharded.parts["gradients"], sharded.parts["optimizer"]) == (2 * parameters, 4 * parameters)

    lora = estimate_memory(spec, SFTTrainConfig(lora={"r": 4, "target_modules": ["q_proj"]}, max_length=16), 1)
    assert lora.trainable == 2 * 4 * (32 + 32)  # 2 layers x r x (in + out)


def test_each_part_is_labelled_by_what_it_counts_for_smollm2_135m(tmp_path):
    """SmolLM2-135M's shapes (a config alone: the estimate builds the model on the meta device): 134,515,008
    parameters, so 0.50 GiB of fp32 weights and, on CPU, a 0.50 GiB copy while they load; never "weights 1.00"."""
    import json

    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
              "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
              "max_position_embeddings": 8192, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    estimate = estimate_memory(ModelSpec(path=str(tmp_path)), SFTTrainConfig(batch_size=1, max_length=16), 1)
    embeddings, layer = 49152 * 576, 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576
    assert estimate.parameters == embeddings + 30 * layer + 576 == 134_515_008
    assert (estimate.parts["weights"], estimate.parts["loading copy"]) == (4 * 134_515_008, 4 * 134_515_008)
    assert "weights 0.50, gradients 0.50, optimizer 1.00, " in estimate.describe()
    assert "loading copy 0.50" in estimate.describe() and "134.5M parameters" in estimate.describe()


def test_a_run_that_cannot_fit_is_refused_unless_forced(spec, tmp_path, monkeypatch):
    rng = random.Random(0)
    rows = [SFTRow(id=f"s{i}", prompt=sentence(rng), completion=sentence(rng)) for i in range(2)]
    monkeypatch.setattr(memory_module, "RUNTIME_BYTES", 10**15)  # a petabyte of runtime: nothing fits
    with pytest.raises(UserError, match="needs about .* GiB per CPU process .* --force"):
        train_sft(spec, rows, SFTTrainConfig(batch_size=2), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    assert (train_sft(spec, rows, SFTTrainConfig(batch_size=2, force=True), tmp_path / "forced") / "config.json").exists()


def test_lora_with_sharded_weights_is_refused(monkeypatch):
    lora = SFTTrainConfig(lora={"r": 4}).lora
    check_lora_supported(lora)  # one process: fine
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UserError, match="LoRA with sharded weights .* not supported"):
        check_lora_supported(lora)
    check_lora_supported(None)
