"""mergekit 0.1.5's own merge configurations (its tests/test_basic_merges.py, tests/test_tokenizer.py and
examples/*.yml, on tiny local models built like its tests/common.py) through `polyfuse merge` and through
mergekit itself (installed by the README's test command), compared tensor by tensor.

Deterministic methods must agree to fp32 rounding; DARE/DELLA draw different random masks (mergekit: one
global torch seed; polyfuse: per tensor and model), so they are checked for shape and key set here and
statistically in bench/merge_vs_mergekit.py. Tokenizer configs are compared row by token string, since
mergekit numbers union tokens in hash order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from polyfuse.errors import ConfigError
from polyfuse.merge import MergeOptions, run_merge
from polyfuse.merge.config import parse_merge_config

RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}
FAST = MergeOptions(quiet=True, smoke_check=False)
TOLERANCE = 1e-5  # fp32 rounding on weights of order 0.1


def pico_llama(path: Path, seed: int, vocab_size: int = 64, layers: int = 2, layer_types: bool = False) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    extra = {"layer_types": ["full_attention"] * layers} if layer_types else {}
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_attention_heads=16,
                      num_hidden_layers=layers, **extra)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def pico_granite(path: Path, seed: int) -> str:
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(seed)
    cfg = GraniteConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                        num_key_value_heads=2, num_hidden_layers=2)
    GraniteForCausalLM(cfg).save_pretrained(path)
    return str(path)


def pico_gpt2(path: Path, seed: int) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_ctx=64, n_embd=32, n_head=2, n_layer=2, n_positions=64, vocab_size=64)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return str(path)


def pico_llava(path: Path, seed: int) -> str:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(image_size=32, patch_size=4, num_hidden_layers=2, num_attention_heads=2,
                              hidden_size=64, intermediate_size=128)
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=16,
                       num_hidden_layers=2)
    LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                              image_seq_length=16)).save_pretrained(path)
    return str(path)


def bpe_tokenizer(vocab_size: int, added: list[str]):
    """mergekit's tests/test_tokenizer.py tokenizer: <unk>, <s>, </s>, _tok_3 ... plus added tokens."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokens = ["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, vocab_size)]
    data = {"version": "1.0", "model": {"type": "BPE", "vocab": dict(zip(tokens, range(vocab_size), strict=True)), "merges": []},
            "added_tokens": []}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)),
                                        bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.add_tokens(added)
    return tokenizer


@pytest.fixture(scope="module")
def pico(tmp_path_factory):
    root = tmp_path_factory.mktemp("pico")
    models = {name: pico_llama(root / name, seed) for name, seed in (("a", 1), ("b", 2), ("c", 3), ("d", 12))}
    models |= {f"deep_{n}": pico_llama(root / f"deep_{n}", s, layers=4) for n, s in (("a", 4), ("b", 5))}
    models["deep_typed"] = pico_llama(root / "deep_typed", 13, layers=4, layer_types=True)
    models |= {f"granite_{n}": pico_granite(root / f"granite_{n}", s) for n, s in (("a", 6), ("b", 7))}
    models["gpt2"] = pico_gpt2(root / "gpt2", 8)
    models |= {f"vlm_{n}": pico_llava(root / f"vlm_{n}", s) for n, s in (("a", 9), ("b", 10), ("c", 11))}
    for name, rows, added in (("tok_base", 64, []), ("tok_chatml", 66, ["<|im_start|>", "<|im_end|>"]),
                              ("tok_padded", 64, [f"<UNUSED_{i}>" for i in range(4)])):
        models[name] = pico_llama(root / name, 20 + rows + len(added), vocab_size=rows)
        bpe_tokenizer(64, added).save_pretrained(models[name])
    return models


def weights(folder: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(file))
    return out


def run_both(tmp_path: Path, config: dict, smoke: bool = False) -> tuple[Path, Path]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions as MergekitOptions
    from mergekit.merge import run_merge as mergekit_merge

    ours, theirs = tmp_path / "polyfuse", tmp_path / "mergekit"
    run_merge(parse_merge_config(json.loads(json.dumps(config)), "config"), ours, "config",
              MergeOptions(quiet=True, smoke_check=smoke))
    mergekit_merge(MergeConfiguration.model_validate(config), str(theirs), MergekitOptions(quiet=True))
    return ours, theirs


LLAVA_NAMES = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
               ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."))


def canonical(name: str) -> str:
    """transformers 5 saves LLaVA under its legacy names (polyfuse keeps the input's), mergekit under the new ones."""
    for old, new in LLAVA_NAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def assert_same(ours: Path, theirs: Path, method: str) -> float:
    a = {canonical(k): v for k, v in weights(ours).items()}
    b = {canonical(k): v for k, v in weights(theirs).items()}
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    worst = 0.0
    for key in a:
        assert a[key].shape == b[key].shape, key
        if method not in RANDOM:
            worst = max(worst, float((a[key].float() - b[key].float()).abs().max()))
    assert worst <= TOLERANCE, worst
    return worst


def two_models(a: str, b: str, method: str, base: str | None = None, params: dict | None = None) -> dict:
    """mergekit's `two_model_config` (weights 0.6 / 0.4), in float32 for parity."""
    config = {"merge_method": method, "models": [{"model": a, "parameters": {"weight": 0.6}},
                                                 {"model": b, "parameters": {"weight": 0.4}}],
              "dtype": "float32"}
    if base:
        config["base_model"] = base
    if params:
        config["parameters"] = params
    return config


NUSLERP = [(base, {"nuslerp_row_wise": row, "nuslerp_flatten": flat})
           for base in (False, True) for row in (False, True) for flat in (False, True)]
BASIC = [  # (id, method, first, second, base, parameters): tests/test_basic_merges.py
    ("linear", "linear", "a", "b", None, None),
    ("slerp", "slerp", "a", "b", "a", {"t": 0.35}),
    *[(f"nuslerp-{i}", "nuslerp", "a", "b", "c" if base else None, p) for i, (base, p) in enumerate(NUSLERP)],
    ("task_arithmetic", "task_arithmetic", "a", "b", "c", None),
    ("breadcrumbs", "breadcrumbs", "a", "b", "c", None),
    ("ties", "ties", "a", "b", "c", {"density": 0.3}),
    ("sce", "sce", "a", "b", "c", {"select_topk": 0.5}),
    ("ram", "ram", "a", "b", "c", None),
    ("ramplus_tl", "ramplus_tl", "a", "b", "c", {"r": 0.05, "alpha": 1.0}),
    ("multislerp", "multislerp", "a", "b", "c", None),
    ("dare_ties", "dare_ties", "a", "b", "c", {"density": 0.66}),
    ("model_stock", "model_stock", "b", "c", "a", None),
    ("model_stock_filterwise", "model_stock", "b", "c", "a", {"filter_wise": True}),
    ("arcee_fusion", "arcee_fusion", "a", "b", "a", None),
    ("nearswap", "nearswap", "a", "b", "a", {"t": 0.0001}),
    ("della", "della", "a", "b", "c", {"density": 0.66, "epsilon": 0.05, "lambda": 0.5}),
    ("karcher", "karcher", "a", "b", "c", {"max_iter": 5, "tol": 1e-5}),
    ("granite_linear", "linear", "granite_a", "granite_b", None, None),
    ("granite_slerp", "slerp", "granite_a", "granite_b", "granite_a", {"t": 0.5}),
]
VLM = [  # the *_VLM_merge tests: LLaVA checkpoints (language model, vision tower, projector)
    ("linear", "linear", None, None),
    ("slerp", "slerp", "vlm_a", {"t": 0.35}),
    ("nuslerp", "nuslerp", "vlm_c", {"nuslerp_row_wise": True, "nuslerp_flatten": False}),
    ("task_arithmetic", "task_arithmetic", "vlm_c", None),
    ("breadcrumbs", "breadcrumbs", "vlm_c", None),
    ("ties", "ties", "vlm_c", {"density": 0.3}),
    ("dare_ties", "dare_ties", "vlm_c", {"density": 0.66}),
]


@pytest.mark.parametrize(("method", "first", "second", "base", "params"), [c[1:] for c in BASIC],
                         ids=[c[0] for c in BASIC])
def test_basic_merges_match_mergekit(tmp_path, pico, method, first, second, base, params):
    config = two_models(pico[first], pico[second], method, pico[base] if base else None, params)
    assert_same(*run_both(tmp_path, config), method)


BASE_USERS = [c for c in BASIC if c[4] is not None and not c[0].startswith("granite")]


@pytest.mark.parametrize(("method", "first", "second", "base", "params"), [c[1:] for c in BASE_USERS],
                         ids=[c[0] for c in BASE_USERS])
def test_the_base_listed_under_models_without_parameters_matches_mergekit(tmp_path, pico, method, first, second,
                                                                          base, params):
    """mergekit's idiom `- model: BASE` (no parameters) first under `models:`, for every method that takes a base:
    the base is the base, not one more model that lacks a weight (polyfuse crashed there); where the base was
    not listed already, the merge is the one without the listing."""
    config = two_models(pico[first], pico[second], method, pico[base], params)
    listed = base not in (first, second)
    if listed:
        config["models"].insert(0, {"model": pico[base]})
    ours, theirs = run_both(tmp_path, config)
    assert_same(ours, theirs, method)
    if listed and method not in RANDOM | {"karcher"}:  # karcher: the same mean, summed in another order
        del config["models"][0]
        unlisted = run_merge(parse_merge_config(config, "c"), tmp_path / "unlisted", "c", FAST).out
        a, b = weights(ours), weights(unlisted)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_nuslerp_weights_summing_to_zero_match_mergekit(tmp_path, pico):
    config = two_models(pico["a"], pico["b"], "nuslerp", pico["c"],
                        {"nuslerp_row_wise": False, "nuslerp_flatten": False})
    config["models"][0]["parameters"]["weight"] = -0.5
    config["models"][1]["parameters"]["weight"] = 0.5
    assert_same(*run_both(tmp_path, config), "nuslerp")


def test_della_invalid_epsilon_is_refused(tmp_path, pico):
    config = two_models(pico["a"], pico["b"], "della", pico["c"], {"density": 0.66, "epsilon": 1.35, "lambda": 0.5})
    with pytest.raises(ConfigError, match="epsilon"):
        run_merge(parse_merge_config(config, "config"), tmp_path / "out", "config", MergeOptions(quiet=True))


@pytest.mark.parametrize(("method", "base", "params"), [c[1:] for c in VLM], ids=[c[0] for c in VLM])
def test_vlm_merges_match_mergekit_and_load(tmp_path, pico, method, base, params):
    config = two_models(pico["vlm_a"], pico["vlm_b"], method, pico[base] if base else None, params)
    ours, theirs = run_both(tmp_path, config, smoke=method == "ties")
    a = {canonical(k): v for k, v in weights(ours).items()}
    b = {canonical(k): v for k, v in weights(theirs).items()}
    # mergekit 0.1.5 infers LLaVA's modules from the new tensor names, but transformers 5 saves the legacy ones
    # (language_model.model.*): it drops the language model and writes only the vision tower and projector.
    assert a.keys() == {canonical(k) for k in weights(pico["vlm_a"])} and set(b) < set(a)
    assert any(k.startswith("model.vision_tower.") for k in b)
    for key in b:
        if method not in RANDOM:
            torch.testing.assert_close(a[key], b[key], atol=TOLERANCE, rtol=0, msg=key)
    out = json.loads((ours / "config.json").read_text())
    assert out["tie_word_embeddings"] is False and out["text_config"]["tie_word_embeddings"] is False


def test_vlm_smoke_check_loads_the_multimodal_class(tmp_path, pico):
    result = run_merge(parse_merge_config(two_models(pico["vlm_a"], pico["vlm_b"], "linear"), "config"),
                       tmp_path / "out", "config", MergeOptions(quiet=True))
    assert result.smoke is not None and not result.smoke.skipped
    assert result.smoke.perplexity > 1 and "no tokenizer" in result.smoke.detail


def test_passthrough_copy_and_scale_match_mergekit(tmp_path, pico):
    copy = {"merge_method": "passthrough", "models": [{"model": pico["gpt2"]}], "dtype": "float32"}
    ours, theirs = run_both(tmp_path / "copy", copy)
    assert_same(ours, theirs, "passthrough")
    assert all(torch.equal(v, weights(pico["gpt2"])[k]) for k, v in weights(ours).items())
    scaled = {"merge_method": "passthrough", "dtype": "float32",
              "models": [{"model": pico["a"], "parameters": {"scale": [{"filter": "o_proj", "value": 0},
                                                                       {"value": 1}]}}]}
    ours, theirs = run_both(tmp_path / "scale", scaled)
    assert_same(ours, theirs, "passthrough")
    out = weights(ours)
    assert all((v == 0).all() for k, v in out.items() if "o_proj" in k)
    assert out["lm_head.weight"].count_nonzero() > 0


def test_gpt2_stack_matches_mergekit(tmp_path, pico):
    """tests/test_basic_merges.py::test_gpt2_stack: two copies of the layers, n_layer doubled."""
    piece = {"sources": [{"model": pico["gpt2"], "layer_range": [0, 2]}]}
    config = {"merge_method": "passthrough", "slices": [piece, piece], "dtype": "float32"}
    ours, theirs = run_both(tmp_path, config, smoke=True)
    assert_same(ours, theirs, "passthrough")
    assert json.loads((ours / "config.json").read_text())["n_layer"] == 4
    source, out = weights(pico["gpt2"]), weights(ours)
    for j in range(4):
        assert torch.equal(out[f"transformer.h.{j}.mlp.c_fc.weight"], source[f"transformer.h.{j % 2}.mlp.c_fc.weight"])


TIES_EXAMPLE = [  # examples/ties.yml's models: the base, then three fine-tunes
    {"model": "d"},  # "no parameters necessary for base model" (listed until mergekit e52a51b)
    {"model": "a", "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
    {"model": "b", "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
    {"model": "c", "parameters": {"density": 0.33, "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]}},
]


def ties_example(m: dict, base_listed: bool, first_density: list[float] | None = None, sliced: bool = False) -> dict:
    """examples/ties.yml on pico models: with the base listed under `models:` or not, another density gradient
    for the first fine-tune, or as one slice of every model's layers."""
    models = [dict(e, model=m[e["model"]]) for e in TIES_EXAMPLE[0 if base_listed else 1:]]
    if first_density is not None:
        models[int(base_listed)]["parameters"] = dict(models[int(base_listed)]["parameters"], density=first_density)
    layout = {"slices": [{"sources": [dict(e, layer_range=[0, 2]) for e in models]}]} if sliced else {"models": models}
    return {**layout, "merge_method": "ties", "base_model": m["d"], "parameters": {"normalize": True, "int8_mask": True},
            "dtype": "float32"}


EXAMPLES = {  # examples/*.yml with local models (13B -> pico, 40 layers -> 4)
    "arcee_fusion": lambda m: {"models": [{"model": m["a"]}, {"model": m["b"]}], "merge_method": "arcee_fusion",
                               "base_model": m["a"], "dtype": "float32"},
    "bio-merge": lambda m: {"models": [{"model": m["a"], "parameters": {"density": 0.5, "weight": 0.5}},
                                       {"model": m["b"], "parameters": {"density": 0.5, "weight": 0.5}}],
                            "merge_method": "ties", "base_model": m["c"],
                            "parameters": {"normalize": False, "int8_mask": True}, "dtype": "float32"},
    "gradient-slerp": lambda m: {
        "slices": [{"sources": [{"model": m["deep_a"], "layer_range": [0, 4]},
                                {"model": m["deep_b"], "layer_range": [0, 4]}]}],
        "merge_method": "slerp", "base_model": m["deep_a"],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
        "dtype": "float32"},
    "linear": lambda m: {"models": [{"model": m["a"], "parameters": {"weight": 1.0}},
                                    {"model": m["b"], "parameters": {"weight": 0.3}},
                                    {"model": m["c"], "parameters": {"weight": 0.5}}],
                         "merge_method": "linear", "dtype": "float32"},
    "orcamini-platy-44layer": lambda m: {
        "slices": [{"sources": [{"model": m["deep_a"], "layer_range": [0, 3]}]},
                   {"sources": [{"model": m["deep_b"], "layer_range": [1, 4]}]}],
        "merge_method": "passthrough", "dtype": "float32"},
    "ties": lambda m: ties_example(m, base_listed=False),
    # The examples that list the base under `models:` with no parameters, mergekit's idiom: arcee_fusion above;
    # ties.yml as it was at mergekit e10dc5e (and c3661c8, whose density gradient ends at 0); the slices form of
    # it (4643a47, there with a broken method and layer range); gradient-slerp.yml's "equivalent models: syntax".
    "ties-base-listed": lambda m: ties_example(m, base_listed=True),
    "ties-base-listed-density-0": lambda m: ties_example(m, base_listed=True, first_density=[1, 0.7, 0]),
    "ties-base-listed-slices": lambda m: ties_example(m, base_listed=True, sliced=True),
    "gradient-slerp-models": lambda m: {**{k: v for k, v in EXAMPLES["gradient-slerp"](m).items() if k != "slices"},
                                        "models": [{"model": m["deep_a"]}, {"model": m["deep_b"]}]},
}


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_examples_match_mergekit(tmp_path, pico, name):
    config = EXAMPLES[name](pico)
    ours, theirs = run_both(tmp_path, config, smoke=name.startswith(("gradient", "orcamini")))
    assert_same(ours, theirs, config["merge_method"])
    out = json.loads((ours / "config.json").read_text())
    if name == "orcamini-platy-44layer":
        assert out["num_hidden_layers"] == 6
        a, b, merged = weights(pico["deep_a"]), weights(pico["deep_b"]), weights(ours)
        sources = [(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3)]
        for j, (model, layer) in enumerate(sources):
            key = "model.layers.{}.self_attn.q_proj.weight"
            assert torch.equal(merged[key.format(j)], model[key.format(layer)])
        assert torch.equal(merged["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
        assert torch.equal(merged["lm_head.weight"], b["lm_head.weight"])


def test_slices_rebuild_per_layer_config_lists(tmp_path, pico):
    """mergekit 0.1.5 leaves `layer_types` at the source length, which transformers 5 refuses to load; polyfuse
    rebuilds every per-layer list from the source layers."""
    config_file = Path(pico["deep_typed"], "config.json")
    typed = json.loads(config_file.read_text())
    assert typed["layer_types"] == ["full_attention"] * 4
    config = {"merge_method": "passthrough", "dtype": "float32",
              "slices": [{"sources": [{"model": pico["deep_typed"], "layer_range": [0, 4]}]},
                         {"sources": [{"model": pico["deep_typed"], "layer_range": [2, 4]}]}]}
    result = run_merge(parse_merge_config(config, "c"), tmp_path / "out", "c", MergeOptions(quiet=True))
    out = json.loads((result.out / "config.json").read_text())
    assert out["num_hidden_layers"] == 6 and out["layer_types"] == ["full_attention"] * 6
    assert result.smoke is not None and result.smoke.perplexity > 1


def test_slices_syntax_equals_models_syntax(tmp_path, pico):
    """examples/gradient-slerp.yml: 'or, the equivalent models: syntax'."""
    sliced = EXAMPLES["gradient-slerp"](pico)
    whole = dict(sliced, slices=None)
    del whole["slices"]
    whole["models"] = [{"model": pico["deep_a"]}, {"model": pico["deep_b"]}]
    a = run_merge(parse_merge_config(sliced, "c"), tmp_path / "sliced", "c", MergeOptions(quiet=True, smoke_check=False))
    b = run_merge(parse_merge_config(whole, "c"), tmp_path / "whole", "c", MergeOptions(quiet=True, smoke_check=False))
    wa, wb = weights(a.out), weights(b.out)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# --- tests/test_tokenizer.py ---------------------------------------------------------------------------------

def token_rows(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(str(folder)).get_vocab()
    embed = weights(folder)["model.embed_tokens.weight"]
    return {token: embed[i] for token, i in vocab.items() if i < embed.shape[0]}


def tokenizer_config(models: list[str], base: str, **extra) -> dict:
    return {"merge_method": "linear", "base_model": base, "dtype": "float32",
            "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models], **extra}


def assert_same_by_token(ours: Path, theirs: Path) -> None:
    a, b = token_rows(ours), token_rows(theirs)
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for token in a:
        torch.testing.assert_close(a[token], b[token], atol=TOLERANCE, rtol=0, msg=token)


@pytest.mark.parametrize("source", ["base", "union", "tok_chatml"])
def test_tokenizer_sources_match_mergekit(tmp_path, pico, source):
    models = [pico["tok_base"], pico["tok_padded"], pico["tok_chatml"]]
    config = tokenizer_config(models, pico["tok_base"], tokenizer_source=pico.get(source, source))
    ours, theirs = run_both(tmp_path, config)
    assert_same_by_token(ours, theirs)


def test_legacy_mode_keeps_the_base_tokenizer(tmp_path, pico):
    """No tokenizer setting: the base's tokenizer. The padded model's added tokens have ids beyond its 64 rows,
    so its rows are the base's tokens and merge by index, as in mergekit. A model whose extra rows are real
    tokens (chatml) is refused: polyfuse never merges different tokens by row index."""
    config = tokenizer_config([pico["tok_base"], pico["tok_padded"]], pico["tok_base"])
    ours, theirs = run_both(tmp_path / "padded", config)
    assert_same(ours, theirs, "linear")
    assert len(__import__("transformers").AutoTokenizer.from_pretrained(str(ours))) == 64
    config = tokenizer_config([pico["tok_base"], pico["tok_padded"], pico["tok_chatml"]], pico["tok_base"])
    with pytest.raises(ConfigError, match="different vocabulary"):
        run_merge(parse_merge_config(config, "c"), tmp_path / "out", "c", MergeOptions(quiet=True))


def test_slerp_union_matches_mergekit(tmp_path, pico):
    config = tokenizer_config([pico["tok_base"], pico["tok_chatml"]], pico["tok_base"], tokenizer_source="union",
                              merge_method="slerp", parameters={"t": 0.5})
    assert_same_by_token(*run_both(tmp_path, config))


def test_force_token_and_model_token_match_mergekit(tmp_path, pico):
    base, chatml = pico["tok_base"], pico["tok_chatml"]
    forced = tokenizer_config([base, chatml], base, tokenizer={"source": "union", "tokens": {
        "_tok_10": {"source": chatml, "force": True}, "_tok_11": {"source": base, "force": True}}})
    ours, theirs = run_both(tmp_path / "force", forced)
    assert_same_by_token(ours, theirs)
    out, rows_chatml, rows_base = token_rows(ours), token_rows(Path(chatml)), token_rows(Path(base))
    torch.testing.assert_close(out["_tok_10"], rows_chatml["_tok_10"])
    torch.testing.assert_close(out["_tok_11"], rows_base["_tok_11"])
    by_id = tokenizer_config([base, chatml], base, tokenizer={"source": "base", "tokens": {
        "_tok_20": {"source": {"kind": "model_token", "model": chatml, "token_id": 64}, "force": True},
        "_tok_21": {"source": {"kind": "model_token", "model": base, "token": "<s>"}, "force": True}}})
    ours, theirs = run_both(tmp_path / "by_id", by_id)
    assert_same_by_token(ours, theirs)
    out = token_rows(ours)
    torch.testing.assert_close(out["_tok_20"], weights(chatml)["model.embed_tokens.weight"][64])
    torch.testing.assert_close(out["_tok_21"], rows_base["<s>"])


def test_pad_to_multiple_of_matches_mergekit(tmp_path, pico):
    config = tokenizer_config([pico["tok_chatml"]], pico["tok_chatml"],
                              tokenizer={"source": "base", "pad_to_multiple_of": 16})
    ours, theirs = run_both(tmp_path, config)
    assert_same_by_token(ours, theirs)
    a, b = weights(ours)["model.embed_tokens.weight"], weights(theirs)["model.embed_tokens.weight"]
    assert a.shape[0] == b.shape[0] == 80 and json.loads((ours / "config.json").read_text())["vocab_size"] == 80
    torch.testing.assert_close(a[66:], b[66:], atol=TOLERANCE, rtol=0)  # padding: the mean token row


# --- tests/test_chat_template.py -----------------------------------------------------------------------------

@pytest.mark.parametrize(("template", "needle"), [("chatml", "<|im_start|>"),
                                                  ("{{messages[0]['content']}}", "{{messages[0]['content']}}")])
def test_chat_templates_match_mergekit(tmp_path, pico, template, needle):
    """bfloat16, as mergekit's test: mergekit rounds the inputs to bf16 before its fp32 sum, polyfuse only the
    result, so the weights agree to one bf16 rounding step."""
    from transformers import AutoTokenizer

    config = {"merge_method": "linear", "base_model": pico["tok_base"], "dtype": "bfloat16", "chat_template": template,
              "models": [{"model": pico["tok_base"], "parameters": {"weight": 0.5}},
                         {"model": pico["a"], "parameters": {"weight": 0.5}}]}
    ours, theirs = run_both(tmp_path, config)
    a, b = weights(ours), weights(theirs)
    assert a.keys() == b.keys()
    for key in a:  # one bf16 step at the inputs' scale (|w| < 1/16: 2^-12 = 2.4e-4; the largest difference seen)
        torch.testing.assert_close(a[key].float(), b[key].float(), atol=2**-12, rtol=0, msg=key)
    for folder in (ours, theirs):
        assert needle in AutoTokenizer.from_pretrained(str(folder)).chat_template


# --- SmolLM2-135M-Instruct's layout (the report) -------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_finetunes(smollm2_twin, tmp_path_factory) -> dict[str, str]:
    """SmolLM2 and two "fine-tunes" of it (every tensor nudged by seeded noise of 1% of its mean magnitude), stored
    in bfloat16 so that both tools read the same numbers, then compute in float32. SmolLM2 is its random twin
    (`smollm2_twin`: its architecture, tensor names, tied embeddings and tokenizer, 2 layers of width 64): the
    report's IndexError came from the config's layout, and both tools merge the same tensors, whatever they hold
    (the real 135M weights cost ~20 CPU s more here)."""
    import shutil

    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("smollm2-finetunes")
    base = load_file(Path(smollm2_twin) / "model.safetensors")
    folders = {}
    for name, seed in (("base", None), ("ft1", 1), ("ft2", 2)):
        folder = root / name
        shutil.copytree(smollm2_twin, folder, ignore=shutil.ignore_patterns("*.safetensors"))
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        save_file({k: (v if generator is None else v + torch.randn(v.shape, generator=generator) * 0.01 * v.abs().mean())
                   .to(torch.bfloat16) for k, v in base.items()}, folder / "model.safetensors", metadata={"format": "pt"})
        folders[name] = str(folder)
    return folders


@pytest.mark.slow  # SmolLM2 exported from its GGUF on a machine's first run (its twin's tokenizer)
@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_the_base_listed_under_models_on_smollm2_matches_mergekit(tmp_path, smollm2_finetunes, method):
    """The issue's report: `- model: BASE` with no parameters under `models:`, TIES and task arithmetic on
    SmolLM2 fine-tunes, was an IndexError; now mergekit's numbers (TIES at density 1: mergekit breaks ties at
    the trim cut differently, tested on the pico models above)."""
    models = smollm2_finetunes
    config = {"merge_method": method, "base_model": models["base"], "dtype": "float32",
              "models": [{"model": models["base"]}, {"model": models["ft1"], "parameters": {"weight": 0.6}},
                         {"model": models["ft2"], "parameters": {"weight": 0.4}}]}
    assert_same(*run_both(tmp_path, config, smoke=method == "ties"), method)
