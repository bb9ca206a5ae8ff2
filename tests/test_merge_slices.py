"""Slices from headers first, streaming and resumable; models without tokenizer files; the smoke check's probe
when the tokenizer encodes its text to no ids; multimodal layouts slices cannot take."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from polyfuse.errors import ConfigError
from polyfuse.merge import MergeOptions, run_merge
from polyfuse.merge.config import parse_merge_config
from polyfuse.merge.sources import ModelReader
from polyfuse.merge.writer import MANIFEST
from test_merge_mergekit_configs import pico_llama, pico_llava, weights

FAST = MergeOptions(quiet=True, smoke_check=False)


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    root = tmp_path_factory.mktemp("deep")
    return {name: pico_llama(root / name, seed, layers=4) for name, seed in (("a", 1), ("b", 2))} | {
        "wide": _wide(root / "wide"), "vlm": pico_llava(root / "vlm", 3)}


def _wide(path: Path) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=48, num_attention_heads=16,
                                 num_hidden_layers=4)).save_pretrained(path)
    return str(path)


@pytest.fixture
def no_tensor_reads(monkeypatch):
    def read(self, key):
        raise AssertionError(f"a tensor was read ({key}) before validation finished")

    monkeypatch.setattr(ModelReader, "read", read)


def stack(a: str, b: str, a_range=(0, 3), b_range=(1, 4), method="passthrough") -> dict:
    return {"merge_method": method, "dtype": "float32",
            "slices": [{"sources": [{"model": a, "layer_range": list(a_range)}]},
                       {"sources": [{"model": b, "layer_range": list(b_range)}]}]}


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: stack(d["a"], d["b"], b_range=(2, 6)), r"slices\[1\]\.sources\[0\]\.layer_range: \[2, 6\] is outside"),
    (lambda d: stack(d["a"], d["wide"]), r"hidden_size is 48 but the base's is 32"),
    (lambda d: stack(d["vlm"], d["vlm"], (0, 2), (0, 2)), r"2 layer stacks .*`modules:` syntax"),
    (lambda d: {"merge_method": "slerp", "base_model": d["a"], "parameters": {"t": 0.5},
                "slices": [{"sources": [{"model": d["b"], "layer_range": [0, 4]}]}]},
     r"slices\[0\]: the base model .* must be one of the slice's sources"),
    (lambda d: {"merge_method": "linear", "slices": [{"sources": [{"model": d["a"], "layer_range": [0, 2]},
                                                                 {"model": d["b"], "layer_range": [0, 3]}]}]},
     r"same number of layers"),
])
def test_slices_are_checked_from_headers_before_any_read(tmp_path, deep, no_tensor_reads, change, message):
    with pytest.raises(ConfigError, match=message):
        run_merge(parse_merge_config(change(deep), "c"), tmp_path / "out", "c", FAST)


def test_per_slice_parameters_and_methods(tmp_path, deep):
    """Slice parameters sit between the per-model and the global ones (mergekit's precedence); a slice may name
    its own method (a polyfuse extension); gradients run over each slice's own layers."""
    config = {"merge_method": "linear", "dtype": "float32", "parameters": {"weight": 1.0},
              "slices": [{"sources": [{"model": deep["a"], "layer_range": [0, 2], "parameters": {"weight": 3.0}},
                                      {"model": deep["b"], "layer_range": [0, 2]}]},
                         {"sources": [{"model": deep["b"], "layer_range": [2, 4]}], "merge_method": "passthrough",
                          "parameters": {"scale": [2.0, 4.0]}}]}
    out = weights(run_merge(parse_merge_config(config, "c"), tmp_path / "out", "c", FAST).out)
    a, b = weights(deep["a"]), weights(deep["b"])
    key = "model.layers.{}.mlp.up_proj.weight"
    torch.testing.assert_close(out[key.format(0)], (3 * a[key.format(0)] + b[key.format(0)]) / 4)
    torch.testing.assert_close(out[key.format(2)], 2.0 * b[key.format(2)])  # t = 0: first gradient value
    torch.testing.assert_close(out[key.format(3)], 4.0 * b[key.format(3)])  # t = 1: last
    torch.testing.assert_close(out["model.embed_tokens.weight"],
                               (3 * a["model.embed_tokens.weight"] + b["model.embed_tokens.weight"]) / 4)
    for name in ("model.norm.weight", "lm_head.weight"):  # after the layers: the last slice's method, t = 0
        torch.testing.assert_close(out[name], 2.0 * b[name])


def test_sliced_merge_resumes_after_a_crash(tmp_path, deep, monkeypatch):
    from polyfuse.merge.methods.passthrough import Passthrough

    config = parse_merge_config(stack(deep["a"], deep["b"]), "c")
    options = MergeOptions(quiet=True, smoke_check=False, max_shard_size="40KB")
    calls = {"n": 0}
    original = Passthrough.merge

    def crashing(self, task):
        calls["n"] += 1
        if calls["n"] == 40:
            raise RuntimeError("power cut")
        return original(self, task)

    monkeypatch.setattr(Passthrough, "merge", crashing)
    with pytest.raises(RuntimeError, match="power cut"):
        run_merge(config, tmp_path / "out", "c", options)
    done = json.loads((tmp_path / "out" / MANIFEST).read_text())["done"]
    assert done and not json.loads((tmp_path / "out" / MANIFEST).read_text())["complete"]
    monkeypatch.setattr(Passthrough, "merge", original)
    result = run_merge(config, tmp_path / "out", "c", options)
    fresh = run_merge(config, tmp_path / "fresh", "c", options)
    assert result.merged < fresh.merged  # the finished shards were kept
    a, b = weights(result.out), weights(fresh.out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_models_without_tokenizer_files_merge_and_say_so(tmp_path, deep):
    config = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": deep["a"], "parameters": {"weight": 1.0}},
                         {"model": deep["b"], "parameters": {"weight": 1.0}}]}
    result = run_merge(parse_merge_config(config, "c"), tmp_path / "out", "c", MergeOptions(quiet=True))
    resolved = (result.out / "merge_config.resolved.yaml").read_text()
    assert "no tokenizer files; embedding rows merged by index (no tokenizer decision needs them)" in resolved
    assert not (result.out / "tokenizer.json").exists()
    assert "no tokenizer: probed with ids 0..31" in result.smoke.detail


def test_smoke_check_probes_with_ids_when_the_text_encodes_to_none(tmp_path, deep):
    from tokenizers import Regex, Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "x": 1}, unk_token="<unk>"))
    core.normalizer = normalizers.Replace(Regex(r"[\s\S]"), "")  # every character removed: no ids at all
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    assert tokenizer("The quick brown fox").input_ids == []
    model = tmp_path / "silent"
    pico_llama(model, 5)
    tokenizer.save_pretrained(model)
    config = {"merge_method": "passthrough", "models": [{"model": str(model)}]}
    result = run_merge(parse_merge_config(config, "c"), tmp_path / "out", "c", MergeOptions(quiet=True))
    assert "encodes the probe text to fewer than 2 ids: probed with ids 0..31" in result.smoke.detail
    assert result.smoke.perplexity == pytest.approx(result.smoke.base_perplexity)
