"""A tiny random Llama written as a GGUF file with gguf-py's writer (Q8_0 and F32 tensors, a byte-level BPE
vocabulary, a chat template): a real GGUF that transformers de-quantises in a second, for the export tests.
The real models (SmolLM2, Gemma-3) take the same path in the slow tests."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MERGES = ["h e", "l l", "Ġ w"]
SPECIALS = ["<|end|>", "<|user|>", "<|assistant|>"]
HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2


def byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: one token per byte, so any text tokenizes without merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def write_tiny_gguf(path: Path, architecture: str = "llama", seed: int = 0) -> Path:
    import gguf
    import numpy as np

    tokens = byte_tokens() + [merge.replace(" ", "") for merge in MERGES] + SPECIALS
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * (256 + len(MERGES)) + [gguf.TokenType.CONTROL] * len(SPECIALS))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(len(tokens) - 2)
    writer.add_eos_token_id(len(tokens) - 3)
    writer.add_chat_template(CHAT_TEMPLATE)

    def tensor(name: str, *shape: int, quantize: bool = True) -> None:
        data = rng.normal(0, 0.2, size=shape).astype(np.float32)
        if quantize:
            writer.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, 1 + data)

    head = HIDDEN // HEADS
    tensor("token_embd.weight", len(tokens), HIDDEN)
    for layer in range(LAYERS):
        tensor(f"blk.{layer}.attn_norm.weight", HIDDEN, quantize=False)
        tensor(f"blk.{layer}.attn_q.weight", HIDDEN, HIDDEN)
        tensor(f"blk.{layer}.attn_k.weight", KV_HEADS * head, HIDDEN)
        tensor(f"blk.{layer}.attn_v.weight", KV_HEADS * head, HIDDEN)
        tensor(f"blk.{layer}.attn_output.weight", HIDDEN, HIDDEN)
        tensor(f"blk.{layer}.ffn_norm.weight", HIDDEN, quantize=False)
        tensor(f"blk.{layer}.ffn_gate.weight", FFN, HIDDEN)
        tensor(f"blk.{layer}.ffn_up.weight", FFN, HIDDEN)
        tensor(f"blk.{layer}.ffn_down.weight", HIDDEN, FFN)
    tensor("output_norm.weight", HIDDEN, quantize=False)
    tensor("output.weight", len(tokens), HIDDEN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
