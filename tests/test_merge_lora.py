"""LoRA in the merge engine: mergekit's `model+lora` references applied while reading (against peft's own
merge_and_unload and against mergekit), and `polyfuse merge extract-lora` (against the truncated-SVD error
computed by hand, and against mergekit-extract-lora's output)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from polyfuse.errors import ConfigError
from polyfuse.merge import MergeOptions, load_merge_config, run_merge
from polyfuse.merge.extract import ExtractOptions, extract_lora
from polyfuse.merge.sources import ModelReader
from tiny_lm import build_tiny_model

FAST = MergeOptions(smoke_check=False, quiet=True)
SINGULAR = [4.0, 3.0, 2.0, 1.0]  # planted in every linear weight's fine-tuning delta


def weights(folder: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(file))
    return out


def orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=generator))[0]


def planted(base: str, folder: Path, seed: int) -> str:
    """A fine-tune of `base` whose every linear weight moved by U diag(SINGULAR) V^T (orthonormal U, V), so a
    rank-k LoRA of it misses by exactly sqrt(sum of the other squared singular values); the other tensors
    (embeddings, norms, head) are nudged by noise."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.weight"):
                k = len(SINGULAR)
                u, v = orthonormal(param.shape[0], k, generator), orthonormal(param.shape[1], k, generator)
                param.add_(u @ torch.diag(torch.tensor(SINGULAR)) @ v.T)
            else:
                param.add_(torch.randn(param.shape, generator=generator) * 0.01)
    model.save_pretrained(folder)
    return str(folder)


def peft_adapter(base: str, folder: Path, seed: int, model_cls: str = "LlamaForCausalLM", **lora) -> str:
    """A peft adapter with random (non-zero) LoRA matrices and perturbed modules_to_save copies."""
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(getattr(transformers, model_cls).from_pretrained(base),
                           LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(torch.randn(param.shape) * 0.1)
    model.save_pretrained(folder)
    return str(folder)


def peft_merged(base: str, adapter: str, model_cls: str = "LlamaForCausalLM") -> dict[str, torch.Tensor]:
    import transformers
    from peft import PeftModel

    model = PeftModel.from_pretrained(getattr(transformers, model_cls).from_pretrained(base), adapter)
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


def tiny_gpt2(folder: Path) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(5)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_head=2, n_layer=2, n_positions=64, vocab_size=64)).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = build_tiny_model(root / "base", seed=0)
    gpt2 = tiny_gpt2(root / "gpt2")
    return {
        "root": root, "base": base, "gpt2": gpt2,
        "tuned": planted(base, root / "tuned", 1),
        "lora": peft_adapter(base, root / "lora", 2, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                             rank_pattern={"model.layers.0.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3}),
        "rslora": peft_adapter(base, root / "rslora", 3, r=4, lora_alpha=8, use_rslora=True,
                               target_modules=["embed_tokens", "o_proj"], modules_to_save=["lm_head"]),
        "dora": peft_adapter(base, root / "dora", 4, r=4, lora_alpha=8, use_dora=True,
                             target_modules=["q_proj", "down_proj"]),
        "gpt2_lora": peft_adapter(gpt2, root / "gpt2_lora", 6, "GPT2LMHeadModel", r=4, lora_alpha=8,
                                  target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
    }


def passthrough(tmp_path: Path, ref: str, out: str = "out") -> dict[str, torch.Tensor]:
    config = tmp_path / f"{out}.yaml"
    config.write_text(yaml.safe_dump({"merge_method": "passthrough", "models": [{"model": ref}], "dtype": "float32"}))
    return weights(run_merge(load_merge_config(config), tmp_path / out, str(config), FAST).out)


@pytest.mark.parametrize(("adapter", "base", "model_cls", "changed"), [
    ("lora", "base", "LlamaForCausalLM", 6),  # rank and alpha patterns
    ("rslora", "base", "LlamaForCausalLM", 4),  # rsLoRA, embedding LoRA with the embedding saved, modules_to_save
    ("dora", "base", "LlamaForCausalLM", 4),
    ("gpt2_lora", "gpt2", "GPT2LMHeadModel", 8),  # Conv1D layers stored [in, out], attn.c_proj square
])
def test_model_plus_lora_equals_peft_merge_and_unload(tmp_path, models, adapter, base, model_cls, changed):
    ours = passthrough(tmp_path, f"{models[base]}+{models[adapter]}")
    reference = peft_merged(models[base], models[adapter], model_cls)
    original = weights(models[base])
    assert ours.keys() == original.keys()
    for key, value in ours.items():
        torch.testing.assert_close(value, reference[key], atol=1e-6, rtol=0, msg=key)
    assert sum(not torch.equal(ours[k], original[k]) for k in ours) == changed


def test_lora_on_a_tied_head_changes_the_embedding_like_peft(tmp_path, models):
    """GPT-2 ties lm_head to wte (no lm_head.weight stored): peft merges a head LoRA into the one shared weight."""
    adapter = peft_adapter(models["gpt2"], tmp_path / "head", 7, "GPT2LMHeadModel", r=2, lora_alpha=2,
                           target_modules=["lm_head"])
    ours = passthrough(tmp_path, f"{models['gpt2']}+{adapter}")
    reference = peft_merged(models["gpt2"], adapter, "GPT2LMHeadModel")
    assert "lm_head.weight" not in ours
    torch.testing.assert_close(ours["transformer.wte.weight"], reference["lm_head.weight"], atol=1e-6, rtol=0)
    assert not torch.equal(ours["transformer.wte.weight"], weights(models["gpt2"])["transformer.wte.weight"])


def test_model_plus_lora_in_a_ties_merge_matches_mergekit(tmp_path, models):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions as MergekitOptions
    from mergekit.merge import run_merge as mergekit_merge

    config = {"merge_method": "ties", "base_model": models["base"], "dtype": "float32",
              "models": [{"model": f"{models['base']}+{models['lora']}", "parameters": {"weight": 0.7, "density": 0.5}},
                         {"model": f"{models['base']}+{models['dora']}", "parameters": {"weight": 0.3, "density": 0.5}}]}
    path = tmp_path / "ties.yaml"
    path.write_text(yaml.safe_dump(config))
    ours = weights(run_merge(load_merge_config(path), tmp_path / "ours", str(path), FAST).out)
    mergekit_merge(MergeConfiguration.model_validate(config), str(tmp_path / "theirs"),
                   MergekitOptions(lora_merge_cache=str(tmp_path / "cache"), quiet=True))
    theirs = weights(tmp_path / "theirs")
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=0, msg=key)


def test_adapter_problems_are_refused_from_headers_naming_file_and_key(tmp_path, models, monkeypatch):
    monkeypatch.setattr(ModelReader, "read", lambda self, key: pytest.fail(f"{key} was read before validation"))
    from safetensors.torch import load_file, save_file

    def broken(name: str, change) -> str:
        folder = tmp_path / name
        folder.mkdir()
        config = json.loads(Path(models["lora"], "adapter_config.json").read_text())
        tensors = load_file(Path(models["lora"], "adapter_model.safetensors"))
        change(config, tensors)
        (folder / "adapter_config.json").write_text(json.dumps(config))
        save_file(tensors, folder / "adapter_model.safetensors")
        return f"{models['base']}+{folder}"

    cases = [
        (broken("ia3", lambda c, t: c.update(peft_type="IA3")), "a IA3 adapter"),
        (broken("tokens", lambda c, t: c.update(trainable_token_indices=[1, 2])), "trainable tokens"),
        (broken("rank", lambda c, t: c.update(r=3, rank_pattern={})), "gives it rank 3"),
        (broken("extra", lambda c, t: t.update({"base_model.model.model.norm.lora_E": torch.ones(2)})),
         "model.norm.lora_E is neither a LoRA matrix"),
        (broken("shape", lambda c, t: t.update({
            "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": torch.ones(5, 4)})), "up_proj: its LoRA update"),
        (broken("gone", lambda c, t: t.update({"base_model.model.model.layers.9.mlp.up_proj.lora_A.weight": torch.ones(4, 32),
                                               "base_model.model.model.layers.9.mlp.up_proj.lora_B.weight": torch.ones(64, 4)})),
         "the model has no tensor model.layers.9.mlp.up_proj.weight"),
        (f"{models['base']}+{tmp_path / 'missing'}", "not a folder"),
        (f"{models['base']}+{models['lora']}+{models['dora']}", "expected MODEL\\+LORA"),
    ]
    for ref, message in cases:
        with pytest.raises(ConfigError, match=message):
            passthrough(tmp_path, ref)
        assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- extract-lora


def frobenius_misses(adapted: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(torch.linalg.norm(adapted[k] - tuned[k])) for k in tuned if k.endswith("proj.weight")}


@pytest.mark.parametrize("rank", [2, 3])
def test_extract_then_apply_misses_by_the_truncated_singular_values(tmp_path, models, rank):
    """Eckart-Young: the best rank-k approximation of U diag(4, 3, 2, 1) V^T misses by sqrt(sum_{i>k} s_i^2) in
    Frobenius norm: sqrt(2^2 + 1^2) = 2.236068 for k = 2, 1 for k = 3."""
    expected = math.sqrt(sum(s * s for s in SINGULAR[rank:]))
    result = extract_lora(models["base"], models["tuned"], tmp_path / "adapter", ExtractOptions(max_rank=rank, quiet=True))
    assert set(result.ranks.values()) == {rank} and len(result.ranks) == 14
    assert result.modules_to_save == ["embed_tokens", "input_layernorm", "post_attention_layernorm", "norm", "lm_head"]
    assert result.worst_error == pytest.approx(expected / math.sqrt(sum(s * s for s in SINGULAR)), rel=1e-4)
    tuned = weights(models["tuned"])
    by_peft = peft_merged(models["base"], str(result.out))
    by_polyfuse = passthrough(tmp_path, f"{models['base']}+{result.out}")
    for adapted in (by_peft, by_polyfuse):
        misses = frobenius_misses(adapted, tuned)
        assert len(misses) == 14
        for key, miss in misses.items():
            assert miss == pytest.approx(expected, rel=1e-4, abs=1e-5), key
        for key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):  # saved whole
            torch.testing.assert_close(adapted[key], tuned[key], atol=0, rtol=0)


@pytest.mark.parametrize(("max_rank", "sv_epsilon", "embed_lora", "rank", "others"), [
    (16, 1e-3, False, 4, {}),  # the planted rank 4 found: singular values beyond it are fp32 rounding
    (32, 0.0, True, 32, {"model.embed_tokens": 31, "lm_head": 31,  # everything at full rank, embeddings too
                         **{f"model.layers.{i}.self_attn.{p}_proj": 16 for i in (0, 1) for p in "kv"}}),
])
def test_full_rank_extraction_is_exact(tmp_path, models, max_rank, sv_epsilon, embed_lora, rank, others):
    result = extract_lora(models["base"], models["tuned"], tmp_path / "adapter",
                          ExtractOptions(max_rank=max_rank, sv_epsilon=sv_epsilon, embed_lora=embed_lora, quiet=True))
    config = json.loads((result.out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == rank and config["rank_pattern"] == config["alpha_pattern"] == others
    assert ("embed_tokens" in config["target_modules"]) == embed_lora
    tuned = weights(models["tuned"])
    for adapted in (passthrough(tmp_path, f"{models['base']}+{result.out}"), peft_merged(models["base"], str(result.out))):
        for key in tuned:
            torch.testing.assert_close(adapted[key], tuned[key], atol=3e-6, rtol=0, msg=key)


@pytest.mark.parametrize("flags", [["--max-rank", "3"], ["--max-rank", "5", "--embed-lora", "--no-distribute-scale"],
                                   ["--max-rank", "8", "--sv-epsilon", "2.5", "-e", "mlp"]])
def test_extract_matches_mergekit_extract_lora(tmp_path, models, flags):
    from mergekit.scripts.extract_lora import main as mergekit_extract

    mergekit_extract.main(["--model", models["tuned"], "--base-model", models["base"], "--out-path",
                           str(tmp_path / "theirs"), *flags], standalone_mode=False)
    options = ExtractOptions(max_rank=int(flags[1]), embed_lora="--embed-lora" in flags,
                             distribute_scale="--no-distribute-scale" not in flags, quiet=True,
                             sv_epsilon=float(flags[flags.index("--sv-epsilon") + 1]) if "--sv-epsilon" in flags else 0,
                             exclude=["mlp"] if "-e" in flags else [])
    extract_lora(models["base"], models["tuned"], tmp_path / "ours", options)
    ours, theirs = weights(tmp_path / "ours"), weights(tmp_path / "theirs")
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=0, msg=key)
    a, b = (json.loads((tmp_path / side / "adapter_config.json").read_text()) for side in ("ours", "theirs"))
    assert sorted(a.pop("target_modules")) == sorted(b.pop("target_modules"))
    assert a.pop("lora_bias") is False and a == b  # the only key mergekit leaves out


def test_bias_deltas_are_applied_when_every_decomposed_module_has_a_bias(tmp_path, caplog):
    """Qwen2 has biases on q, k and v only. Restricted to those, the adapter sets lora_bias and peft (and
    `BASE+OUT`) restore the tuned biases; over every linear layer it cannot (o_proj and the MLP have none), so the
    bias deltas are saved as mergekit does but peft, and polyfuse with it, leaves them out."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "base")
    model = Qwen2ForCausalLM.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape) * 0.05)
    model.save_pretrained(tmp_path / "tuned")
    base, tuned = str(tmp_path / "base"), str(tmp_path / "tuned")
    qkv = extract_lora(base, tuned, tmp_path / "qkv", ExtractOptions(max_rank=32, include=["_proj$"], quiet=True,
                                                                    exclude=["o_proj", "mlp"]))
    assert json.loads((qkv.out / "adapter_config.json").read_text())["lora_bias"] is True
    wanted = weights(tuned)
    for adapted in (peft_merged(base, str(qkv.out), "Qwen2ForCausalLM"), passthrough(tmp_path, f"{base}+{qkv.out}")):
        for key in ("model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.v_proj.weight"):
            torch.testing.assert_close(adapted[key], wanted[key], atol=3e-6, rtol=0, msg=key)
    every = extract_lora(base, tuned, tmp_path / "all", ExtractOptions(max_rank=32, quiet=True))
    assert "saved as lora_B.bias as mergekit does" in caplog.text
    assert json.loads((every.out / "adapter_config.json").read_text())["lora_bias"] is False
    by_peft = peft_merged(base, str(every.out), "Qwen2ForCausalLM")
    by_polyfuse = passthrough(tmp_path, f"{base}+{every.out}", "all_out")
    assert "peft does not load them, and neither does polyfuse" in caplog.text
    key = "model.layers.0.self_attn.k_proj.bias"
    torch.testing.assert_close(by_polyfuse[key], by_peft[key], atol=0, rtol=0)
    torch.testing.assert_close(by_polyfuse[key], weights(base)[key], atol=0, rtol=0)
