"""The shared forward kernel: the head-only path, the one check that guards it, and the pad-id rule."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from polyfuse.models.forward import (
    checked_response_topk,
    forward_logps,
    head_only_check,
    pad_batch,
    pad_token_id,
    response_logps,
    response_topk,
)


def _batch(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = random.Random(seed)
    sequences = [[rng.randrange(1, vocab) for _ in range(rng.randint(4, 12))] for _ in range(5)]
    return pad_batch(sequences, [2] * len(sequences), pad_id=0, side="left")


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _softcapped_gemma():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=16, vocab_size=60, final_logit_softcapping=0.5)
    return Gemma2ForCausalLM(config).eval()


def test_head_only_path_equals_the_models_own_forward_and_the_check_says_so():
    model, batch = _llama(), _batch(60)
    with torch.inference_mode():
        fast, fast_counts = response_logps(model, batch)
        slow, slow_counts, _ = forward_logps(model, batch)
        assert head_only_check(model, batch)[0]
    assert torch.equal(fast_counts, slow_counts)
    assert torch.allclose(fast, slow.float(), atol=1e-4)


def test_the_check_refuses_a_model_that_post_processes_its_logits(caplog):
    model, batch = _softcapped_gemma(), _batch(60)
    with torch.inference_mode():
        assert not head_only_check(model, batch)[0]
        fast, _ = response_logps(model, batch)
        slow, _, _ = forward_logps(model, batch)
    assert (fast - slow).abs().max() > 1e-2  # the two paths really differ: the check is not vacuous
    assert "post-processes its logits" in caplog.text


@pytest.mark.parametrize(("build", "head_only"), [(_llama, True), (_softcapped_gemma, False)])
@pytest.mark.parametrize("rows", [3, 5], ids=["scored-by-the-check", "larger-than-the-check"])
def test_the_first_top_k_batch_is_checked_and_scored_by_the_path_chosen(build, head_only, rows):
    """The top-K scorer decides the path on a model's first batch (its first `CHECK_ROWS` rows; a batch of no more
    rows is scored by the check's own two passes, not a third) and returns that path's outputs; later batches keep
    the decision."""
    model = build()
    batch = {name: value[:rows] for name, value in _batch(60).items()}
    with torch.inference_mode():
        outputs, positions, chosen = checked_response_topk(model, batch, 5, None)
        expected, expected_positions = response_topk(model, batch, 5, head_only)
        again = checked_response_topk(model, batch, 5, chosen)
    assert chosen is head_only and again[2] is head_only and torch.equal(positions, expected_positions)
    for name, value in expected.items():
        assert torch.equal(outputs[name], value) and torch.equal(again[0][name], value), name


@pytest.mark.parametrize(("pad", "eos", "expected"), [(3, 7, 3), (None, 7, 7), (0, 7, 0)])
def test_pad_id_is_the_pad_token_else_eos(pad, eos, expected):
    assert pad_token_id(SimpleNamespace(pad_token_id=pad, eos_token_id=eos)) == expected


def test_prefix_groups_batch_prompts_that_share_a_prefix():
    from polyfuse.models.forward import common_prefix, prefix_groups

    shot = list(range(100, 140))  # a 40-token few-shot head
    prompts = [shot + [1, 2], [7, 8, 9], shot + [1, 3, 4], shot[:20] + [5], shot + [2], [7, 8]]
    assert common_prefix([prompts[0], prompts[2]]) == 41 and common_prefix(prompts) == 0
    assert common_prefix([[1, 2], [1, 2, 3]]) == 2
    # 0, 2, 4 share 40 >= 32 tokens; 3 shares only 20 with them and goes with the rest, in index order
    assert prefix_groups(prompts) == [[0, 2, 4], [1, 3, 5]]
    assert prefix_groups(prompts, min_shared=2) == [[1, 5], [0, 2, 3, 4]]  # groups in the order of their prompts
