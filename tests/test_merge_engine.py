"""The streaming merge engine: config resolution and refusals, header checks, tied heads, vocabulary remap,
sharded resumable output, the memory bound, extras and the CLI, on tiny Llama "fine-tunes"."""

from __future__ import annotations

import json
import random
import re
import weakref
from pathlib import Path

import pytest
import torch
import yaml

from polyfuse.errors import ConfigError
from polyfuse.merge import MergeOptions, load_merge_config, run_merge
from polyfuse.merge.config import MergeConfig, ParamResolver
from polyfuse.merge.methods.base import MERGE_METHODS, MergeMethod, Param, TensorTask
from polyfuse.merge.reference import ModelReference
from polyfuse.merge.sources import ModelReader, index_model
from polyfuse.merge.writer import INDEX, MANIFEST
from tiny_lm import CHAT_TEMPLATE, SPECIALS, WORDS, build_tiny_model


class WeightedSum(MergeMethod):
    """th0 + scale * sum_i w_i tau_i: simple enough to check by hand (test-only method)."""

    name = "engine_test_sum"
    description = "test: weighted sum of task vectors"
    parameters = (Param("weight", per_model=True), Param("density", 1.0, per_model=True), Param("scale", 1.0))

    def merge(self, task: TensorTask) -> torch.Tensor:
        deltas = task.deltas()
        total = sum(p["weight"] * d for p, d in zip(task.model_params, deltas, strict=True))
        return task.base + task.params["scale"] * total


if WeightedSum.name not in MERGE_METHODS:
    MERGE_METHODS.register(WeightedSum.name)(WeightedSum)

FAST = MergeOptions(smoke_check=False, quiet=True, max_shard_size="1GB")


def finetune(base: str, folder: Path, seed: int, tokenizer=None, shard: str = "20KB") -> str:
    """A copy of `base` with every weight nudged; saved in several shards."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    model.save_pretrained(folder, max_shard_size=shard)
    (tokenizer or AutoTokenizer.from_pretrained(base)).save_pretrained(folder)
    return str(folder)


def weights(folder: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(file))
    return out


def write_config(folder: Path, config: dict, name: str = "merge.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(config))
    return path


def merge(tmp_path: Path, config: dict, out: str = "out", options: MergeOptions = FAST):
    path = write_config(tmp_path, config)
    return run_merge(load_merge_config(path), tmp_path / out, source=str(path), options=options)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    base = build_tiny_model(root / "base", seed=0)
    return {"base": base, "ft1": finetune(base, root / "ft1", 1), "ft2": finetune(base, root / "ft2", 2)}


def sum_config(zoo, **extra) -> dict:
    config = {
        "merge_method": WeightedSum.name,
        "base_model": zoo["base"],
        "models": [{"model": zoo["ft1"], "parameters": {"weight": 1.0}},
                   {"model": zoo["ft2"], "parameters": {"weight": 0.5}}],
    }
    config.update(extra)
    return config


@pytest.fixture
def no_tensor_reads(monkeypatch):
    def read(self, key):
        raise AssertionError(f"a tensor was read ({key}) before validation finished")

    monkeypatch.setattr(ModelReader, "read", read)


# ----------------------------------------------------------------------------- config and resolution


def test_gradient_filter_and_precedence():
    cfg = MergeConfig.model_validate({
        "merge_method": WeightedSum.name, "base_model": "b",
        "models": [{"model": "m1", "parameters": {"weight": [0.0, 1.0]}},
                   {"model": "m2", "parameters": {"density": [{"filter": "mlp", "value": 0.2}, {"value": 0.7}]}}],
        "parameters": {"weight": 2.0, "density": 0.9,
                       "scale": [{"filter": "self_attn", "value": [1.0, 3.0]}, {"filter": "*", "value": 0.5}]},
    })
    resolver = ParamResolver.of(cfg)
    up = "model.layers.0.mlp.up_proj.weight"
    assert resolver.model_params([up, up], 0.0) == [{"weight": 0.0, "density": 0.9}, {"weight": 2.0, "density": 0.2}]
    middle = "model.layers.1.self_attn.q_proj.weight"
    assert resolver.model_params([middle, middle], 0.5)[0]["weight"] == pytest.approx(0.5)
    assert resolver.params(middle, 0.5)["scale"] == pytest.approx(2.0)  # gradient inside a filter entry
    assert resolver.params("model.layers.2.self_attn.o_proj.weight", 1.0)["scale"] == pytest.approx(3.0)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert resolver.params(name, 0.0)["scale"] == 0.5  # the `*` fallback
        assert resolver.model_params([name, name], 0.0)[1]["density"] == 0.7


@pytest.mark.parametrize(("entries", "mlp", "attn"), [
    ([{"value": 0.5}, {"filter": "mlp", "value": 1.0}], 0.5, 0.5),  # a fallback listed first shadows the filter
    ([{"filter": "mlp", "value": 1.0}, {"value": 0.5}], 1.0, 0.5),
    ([{"filter": "*", "value": 0.25}, {"filter": "mlp", "value": 1.0}], 0.25, 0.25),
    ([{"filter": "layers.0", "value": 2.0}, {"filter": "mlp", "value": 1.0}, {"value": 0.0}], 2.0, 2.0),
])
def test_filter_lists_take_the_first_entry_that_applies(entries, mlp, attn):
    """mergekit's `evaluate_setting`: entries are tried in list order; the first that applies wins."""
    cfg = MergeConfig.model_validate({"merge_method": WeightedSum.name, "base_model": "b",
                                      "models": [{"model": "m1", "parameters": {"weight": entries}}]})
    resolver = ParamResolver.of(cfg)
    assert resolver.model_params(["model.layers.0.mlp.up_proj.weight"], 0.0)[0]["weight"] == mlp
    assert resolver.model_params(["model.layers.0.self_attn.q_proj.weight"], 0.0)[0]["weight"] == attn


def test_single_filter_entry_and_discrete_gradients():
    """A lone `{filter, value}` mapping is a one-entry list; a gradient of booleans picks int(t * (n - 1))."""
    from polyfuse.merge.config import resolve_value

    cfg = MergeConfig.model_validate({"merge_method": WeightedSum.name, "base_model": "b",
                                      "models": [{"model": "m1", "parameters": {
                                          "weight": {"filter": "mlp", "value": 3.0}}}],
                                      "parameters": {"weight": 1.0}})
    resolver = ParamResolver.of(cfg)
    assert resolver.model_params(["a.mlp.w"], 0.0)[0]["weight"] == 3.0
    assert resolver.model_params(["a.attn.w"], 0.0)[0]["weight"] == 1.0  # no entry applies: the next level
    assert resolve_value([False, True, True], "x", 0.49) is False
    assert resolve_value([False, True, True], "x", 0.5) is True
    assert resolve_value([0.0, 1.0, 3.0], "x", 0.75) == pytest.approx(2.0)


def test_required_weight_and_overrides(tmp_path):
    config = {"merge_method": WeightedSum.name, "base_model": "b", "models": [{"model": "m1"}]}
    with pytest.raises(ConfigError, match=r"models\[0\]\.parameters\.weight: required by engine_test_sum"):
        load_merge_config(write_config(tmp_path, config))
    cfg = load_merge_config(write_config(tmp_path, config), ["parameters.weight=0.3", "parameters.scale=2"])
    assert cfg.parameters == {"weight": 0.3, "scale": 2}
    with pytest.raises(ConfigError, match=r"parameters\.scale: expected a number \(got 'high'\)"):
        ParamResolver.of(load_merge_config(write_config(tmp_path, config), ["parameters.weight=1",
                                                                            "parameters.scale=high"])).params("x", 0)
    with pytest.raises(ConfigError, match=r"parameters\.densty: unknown parameter"):
        load_merge_config(write_config(tmp_path, config), ["parameters.weight=1", "parameters.densty=0.5"])


def test_map_models_reaches_every_model_the_config_names(tmp_path):
    """`map_models` rewrites the base, `models:`, slice sources and bases, the tokenizer source and per-token sources
    (either side of MODEL+LORA), never `union` or `base`; the normal form is rebuilt from the result."""
    cfg = MergeConfig.model_validate({
        "merge_method": "linear", "base_model": "b", "parameters": {"weight": 1.0},
        "slices": [{"base_model": "s", "sources": [{"model": "m1+l1", "layer_range": [0, 1]},
                                                    {"model": "m2", "layer_range": [0, 1]}]}],
        "tokenizer": {"source": "m2", "tokens": {"<x>": {"source": "m1+l1"}, "<z>": {"source": {"kind": "zero"}},
                                                 "<y>": {"source": {"kind": "model_token", "model": "m2", "token_id": 1}}}}})
    assert [str(r) for r in cfg.named_models()] == ["b", "s", "m1+l1", "m2", "m2", "m1+l1", "m2"]
    mapped = cfg.map_models(lambda r: ModelReference(f"/p/{r.path}", r.lora and f"/a/{r.lora}"))
    assert [str(r) for r in mapped.named_models()] == ["/p/b", "/p/s", "/p/m1+/a/l1", "/p/m2", "/p/m2", "/p/m1+/a/l1",
                                                       "/p/m2"]
    assert mapped.referenced_models() == {ModelReference("/p/b"): "base_model", ModelReference("/p/s"): "slices[0].base_model",
                                          ModelReference("/p/m1", "/a/l1"): "slices[0].sources[0]",
                                          ModelReference("/p/m2"): "slices[0].sources[1]"}
    assert mapped.output_slices[0].inputs[0].model == ModelReference("/p/m1", "/a/l1")
    union = MergeConfig.model_validate({"merge_method": "linear", "models": [{"model": "m"}], "tokenizer_source": "union"})
    assert union.map_models(lambda r: ModelReference("/p")).tokenizer_source == "union"
    folder = tmp_path / "a+b"  # an existing path is a model even with a '+'; spellings of one folder are one model
    folder.mkdir()
    assert ModelReference.parse(str(folder)) == ModelReference.parse(f"{folder}/") != ModelReference.parse("a+b")
    assert ModelReference.parse("a+b") == ModelReference("a", "b") and ModelReference.parse("org/name/") == ModelReference("org/name")


def test_each_parameter_is_declared_once_and_read_by_checks_docs_and_config_show():
    """A method's `Param`s are its parameters everywhere: required ones are refused when missing, defaults are what
    a merge gets, and docs/merge-compat.md's table and `polyfuse config show merge` are generated from them."""
    from polyfuse.cli.config_docs import stage_config_yaml
    from polyfuse.merge.config import parameter_reference

    builtin = [n for n in MERGE_METHODS.names() if MERGE_METHODS.get(n).__module__.startswith("polyfuse.merge.methods.")]
    table = ["| parameter | given | what it is | default, by method |", "|---|---|---|---|"]
    for param, defaults in parameter_reference(builtin):
        scope = "per model (or for all)" if param.per_model else "for the merge"
        where = "; ".join(f"{default} {', '.join(f'`{m}`' if ' ' not in m else m for m in owners)}"
                          for default, owners in defaults.items())
        table.append(f"| `{param.name}` | {scope} | {param.description.replace('|', chr(92) + '|')} | {where} |")
    assert "\n".join(table) + "\n" in (Path(__file__).parents[1] / "docs" / "merge-compat.md").read_text()
    shown = " ".join(line.lstrip("#").strip() for line in stage_config_yaml("merge").splitlines())
    for name in builtin:
        method = MERGE_METHODS.get(name)
        required = {p.name: 0.5 for p in method.parameters if p.required}
        config = {"merge_method": name, "base_model": "b", "models": [{"model": "m1"}, {"model": "m2"}],
                  "parameters": required}
        resolver = ParamResolver.of(MergeConfig.model_validate(config))
        resolver.check_given()
        for param in method.parameters:
            assert f"{param.name} ({'per model' if param.per_model else 'for the merge'}): {param.description};" in shown
            if param.required:
                lacking = MergeConfig.model_validate(
                    {**config, "parameters": {k: v for k, v in required.items() if k != param.name}})
                where = "models[0].parameters" if param.per_model else "parameters"
                with pytest.raises(ConfigError, match=rf"{re.escape(where)}\.{param.name}: required by {name}"):
                    ParamResolver.of(lacking).check_given()
            elif param.per_model:
                assert all(p[param.name] == param.default for p in resolver.model_params(["x", "x", "x"], 0.0))
            else:
                assert resolver.params("x", 0.0)[param.name] == param.default
    with pytest.raises(TypeError, match="declare parameters as `parameters = "):
        type("Legacy", (MergeMethod,), {"defaults": {"t": None}, "merge": lambda self, task: task.base})


@pytest.mark.parametrize(("change", "message"), [
    ({"slices": [{"sources": [{"model": "x", "layer_range": [0, 2]}]}]}, r"exactly one of `models` and `slices`"),
    ({"modules": {"text": {}}}, r"modules: not supported: mergekit's per-module sections"),
    ({"models": [{"model": "x", "layer_range": [0, 1]}]}, r"models\.0\.layer_range"),
    ({"merge_method": "frankenmerge"}, r"merge_method: unknown merge method 'frankenmerge'"),
    ({"models": []}, r"give exactly one of `models` and `slices`"),
    ({"base_model": None}, r"base_model: required by engine_test_sum"),
])
def test_refused_by_name_before_reading(tmp_path, zoo, no_tensor_reads, change, message):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(Path(zoo["base"], "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\xff" * 64)  # reading it would fail loudly
    config = sum_config(zoo)
    config["models"][0]["model"] = str(broken)
    config.update(change)
    with pytest.raises(ConfigError, match=message):
        load_merge_config(write_config(tmp_path, config))


def test_unreadable_safetensors_is_a_config_error(tmp_path, zoo, no_tensor_reads):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(Path(zoo["base"], "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\xff" * 64)
    config = sum_config(zoo)
    config["models"][1]["model"] = str(broken)
    with pytest.raises(ConfigError, match=r"models\[1\]: .*model.safetensors: not a readable safetensors"):
        merge(tmp_path, config)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"models\[1\]: .*config.json: model config not readable"):
        merge(tmp_path, config)
    assert not (tmp_path / "out").exists()


def variant(base: str, folder: Path, **changes) -> str:
    """A model of another shape: the base's config with `changes`, random weights, the base's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(base)
    for key, value in changes.items():
        setattr(config, key, value)
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return str(folder)


def test_shape_and_architecture_mismatch_from_headers(tmp_path, zoo, no_tensor_reads):
    config = sum_config(zoo)
    config["models"][1]["model"] = variant(zoo["base"], tmp_path / "wide", intermediate_size=48)
    with pytest.raises(ConfigError, match=r"models\[1\].*mlp\.\w+_proj\.weight has shape \[\d+, \d+\] but the base"):
        merge(tmp_path, config)
    config["models"][1]["model"] = variant(zoo["base"], tmp_path / "deep", num_hidden_layers=3)
    with pytest.raises(ConfigError, match=r"num_hidden_layers is 3 but the base's is 2"):
        merge(tmp_path, config)


def test_hub_models_checked_from_remote_headers_before_download(tmp_path, zoo, monkeypatch):
    """A hub model's shapes are checked from its safetensors headers (range requests); the weights are
    fetched only once every check passed. The hub is faked by local folders."""
    import fnmatch
    import shutil

    import huggingface_hub
    from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata
    from huggingface_hub.utils import TensorInfo as HubTensor

    repos = {"org/ft2": Path(zoo["ft2"]), "org/wide": Path(variant(zoo["base"], tmp_path / "wide", intermediate_size=48))}
    downloaded: list[str] = []
    revisions: list[str | None] = []

    def snapshot_download(repo, revision=None, allow_patterns=(), **_):
        revisions.append(revision)
        folder = tmp_path / "hub" / repo.replace("/", "--") / "snapshots" / "c0ffee"
        folder.mkdir(parents=True, exist_ok=True)
        for file in repos[repo].iterdir():
            if any(fnmatch.fnmatch(file.name, pattern) for pattern in allow_patterns):
                shutil.copy(file, folder / file.name)
                downloaded.append(file.name)
        return str(folder)

    def get_safetensors_metadata(repo, revision=None, **_):
        assert revision == "c0ffee"
        files = {}
        for file in repos[repo].glob("*.safetensors"):
            header = json.loads(file.read_bytes()[8: 8 + int.from_bytes(file.read_bytes()[:8], "little")])
            header.pop("__metadata__", None)
            files[file.name] = SafetensorsFileMetadata(metadata={}, tensors={
                k: HubTensor(dtype=v["dtype"], shape=v["shape"], data_offsets=tuple(v["data_offsets"]))
                for k, v in header.items()})
        weight_map = {key: name for name, meta in files.items() for key in meta.tensors}
        return SafetensorsRepoMetadata(metadata=None, sharded=len(files) > 1, weight_map=weight_map,
                                       files_metadata=files)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", get_safetensors_metadata)
    config = sum_config(zoo)
    config["models"][1]["model"] = "org/wide"
    with pytest.raises(ConfigError, match=r"models\[1\] \(org/wide\): model.layers.0.mlp"):
        merge(tmp_path, config)
    assert downloaded and not [name for name in downloaded if name.endswith(".safetensors")]
    config["models"][1]["model"] = "org/ft2@v1"  # mergekit's revision syntax: pinned, then fetched by commit
    revisions.clear()
    hub = weights(merge(tmp_path, config).out)
    assert [name for name in downloaded if name.endswith(".safetensors")] and revisions == ["v1", "c0ffee"]
    for key, value in weights(merge(tmp_path, sum_config(zoo), out="local").out).items():
        torch.testing.assert_close(hub[key], value)


# ----------------------------------------------------------------------------- heads and vocabularies


def tied_copy(base: str, folder: Path) -> str:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(base)
    config.tie_word_embeddings = True
    model = LlamaForCausalLM(config)
    state = {k: v for k, v in weights(base).items() if k != "lm_head.weight"}
    model.load_state_dict(state, strict=False)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return str(folder)


def test_tied_base_and_untied_model_give_a_head(tmp_path, zoo):
    tied = tied_copy(zoo["base"], tmp_path / "tied")
    assert "lm_head.weight" not in weights(tied)
    config = {"merge_method": WeightedSum.name, "base_model": tied,
              "models": [{"model": zoo["ft1"], "parameters": {"weight": 0.5}}]}
    result = merge(tmp_path, config)
    out, base, ft = weights(result.out), weights(tied), weights(zoo["ft1"])
    embed = base["model.embed_tokens.weight"]
    torch.testing.assert_close(out["lm_head.weight"], embed + 0.5 * (ft["lm_head.weight"] - embed))
    torch.testing.assert_close(out["model.embed_tokens.weight"], embed + 0.5 * (ft["model.embed_tokens.weight"] - embed))
    assert json.loads((result.out / "config.json").read_text())["tie_word_embeddings"] is False


def permuted_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(SPECIALS + words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS[4:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def test_vocabulary_remapped_by_token_string(tmp_path, zoo):
    """ft2's vocabulary is shuffled, lacks "cat" and has "zebra": rows must meet by token, not by index."""
    from transformers import AutoTokenizer

    words = [w for w in WORDS if w != "cat"] + ["zebra"]
    random.Random(0).shuffle(words)
    shuffled = permuted_tokenizer(words)
    folder = Path(finetune(zoo["base"], tmp_path / "shuffled", 5, tokenizer=shuffled))
    base_vocab = AutoTokenizer.from_pretrained(zoo["base"]).get_vocab()
    new_vocab = shuffled.get_vocab()
    tuned = weights(folder)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):  # same tokens, same meaning: rows follow ids
        rows = tuned[key].clone()
        for token, new_id in new_vocab.items():
            rows[new_id] = tuned[key][base_vocab[token]] if token in base_vocab else torch.randn(rows.shape[1])
        tuned[key] = rows
    from safetensors.torch import save_file

    for file in folder.glob("*.safetensors"):
        file.unlink()
    (folder / "model.safetensors.index.json").unlink()
    save_file(tuned, folder / "model.safetensors", metadata={"format": "pt"})

    config = sum_config(zoo)
    config["models"][1] = {"model": str(folder), "parameters": {"weight": 0.5}}
    with pytest.raises(ConfigError, match=r"different vocabulary.*tokenizer_source: base"):
        merge(tmp_path, config)
    result = merge(tmp_path, {**config, "tokenizer_source": "base"})
    out, base, ft1 = weights(result.out), weights(zoo["base"]), weights(zoo["ft1"])
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        for token, idx in base_vocab.items():
            row2 = tuned[key][new_vocab[token]] if token in new_vocab else base[key][idx]  # lacking: base row
            expected = base[key][idx] + (ft1[key][idx] - base[key][idx]) + 0.5 * (row2 - base[key][idx])
            torch.testing.assert_close(out[key][idx], expected, msg=f"{key} row of {token!r}")
    key = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(out[key], base[key] + (ft1[key] - base[key]) + 0.5 * (tuned[key] - base[key]))
    assert AutoTokenizer.from_pretrained(result.out).get_vocab() == base_vocab

    union = merge(tmp_path, {**config, "tokenizer_source": "union"}, out="union")
    merged, vocab = weights(union.out), AutoTokenizer.from_pretrained(union.out).get_vocab()
    assert vocab["zebra"] == len(base_vocab) and json.loads((union.out / "config.json").read_text())["vocab_size"] == 32
    for key in ("model.embed_tokens.weight", "lm_head.weight"):  # only ft2 has zebra: its row, whatever the weights
        torch.testing.assert_close(merged[key][vocab["zebra"]], tuned[key][new_vocab["zebra"]])
        torch.testing.assert_close(merged[key][: len(base_vocab)], out[key])


def test_identical_tokenizer_files_are_not_loaded_and_a_changed_one_is(tmp_path, zoo, monkeypatch):
    """No tokenizer setting and byte-identical tokenizer files: the rows match by index without loading any
    tokenizer (time and memory); one changed file and the vocabularies are read and compared again."""
    import shutil

    import polyfuse.merge.vocab as vocab

    copies = {name: Path(shutil.copytree(zoo[name], tmp_path / name)) for name in ("ft1", "ft2")}
    for copy in copies.values():  # the base's tokenizer files, byte for byte
        for file in Path(zoo["base"]).iterdir():
            if file.name in vocab.TOKENIZER_FILES:
                shutil.copyfile(file, copy / file.name)
    loaded = []
    real = vocab.read_vocab
    monkeypatch.setattr(vocab, "read_vocab", lambda source: loaded.append(source.ref) or real(source))
    config = sum_config({**zoo, **{k: str(v) for k, v in copies.items()}})
    merge(tmp_path, config)
    assert loaded == []
    config_file = copies["ft2"] / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "model_max_length": 7}))
    merge(tmp_path, config, out="changed")
    assert len(loaded) == 3


def test_padding_rows_beyond_the_tokenizer(tmp_path, zoo):
    """The base pads its embedding to 40 rows (its tokenizer has 31 tokens); an unpadded fine-tune merges
    without a tokenizer rule, and the output keeps the base's 40 rows, padding rows the base's own."""
    import shutil

    from safetensors.torch import save_file

    padded = tmp_path / "padded"
    shutil.copytree(zoo["base"], padded)
    tensors = weights(padded)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[key] = torch.cat([tensors[key], torch.randn(9, tensors[key].shape[1])])
    save_file(tensors, padded / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((padded / "config.json").read_text())
    (padded / "config.json").write_text(json.dumps({**config, "vocab_size": 40}))
    result = merge(tmp_path, {"merge_method": WeightedSum.name, "base_model": str(padded),
                              "models": [{"model": zoo["ft1"], "parameters": {"weight": 1.0}}]})
    out, ft1 = weights(result.out), weights(zoo["ft1"])
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[key].shape[0] == 40
        torch.testing.assert_close(out[key][:31], ft1[key])
        torch.testing.assert_close(out[key][31:], tensors[key][31:])
    assert json.loads((result.out / "config.json").read_text())["vocab_size"] == 40


# ----------------------------------------------------------------------------- output, resume, memory


def test_sharded_output_respects_byte_limit_and_resumes(tmp_path, zoo, monkeypatch):
    limit = 10_000
    options = MergeOptions(smoke_check=False, quiet=True, max_shard_size=limit)
    calls, armed = [], [True]
    original = WeightedSum.merge

    def crashing(self, task):
        calls.append(task.name)
        if armed[0] and len(calls) == 12:
            raise RuntimeError("simulated crash")
        return original(self, task)

    monkeypatch.setattr(WeightedSum, "merge", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        merge(tmp_path, sum_config(zoo), options=options)
    out = tmp_path / "out"
    done = json.loads((out / MANIFEST).read_text())["done"]
    assert done and not (out / INDEX).exists()
    stamps = {f: ((out / f).stat().st_mtime_ns, (out / f).stat().st_ino) for f in done}

    calls.clear()
    armed[0] = False
    result = merge(tmp_path, sum_config(zoo), options=options)
    assert {f: ((out / f).stat().st_mtime_ns, (out / f).stat().st_ino) for f in done} == stamps
    total = len(weights(zoo["base"]))
    assert len(calls) == result.merged < total  # finished shards were neither re-read nor re-merged
    index = json.loads((out / INDEX).read_text())
    assert sorted(set(index["weight_map"].values())) == result.files and len(result.files) > 2
    from safetensors import safe_open

    for file in result.files:
        with safe_open(str(out / file), framework="pt") as handle:
            assert sum(handle.get_tensor(k).nbytes for k in handle.keys()) <= limit
    monkeypatch.setattr(WeightedSum, "merge", original)
    fresh = merge(tmp_path, sum_config(zoo), out="fresh", options=options)
    resumed, clean = weights(out), weights(fresh.out)
    assert resumed.keys() == clean.keys()
    for key in clean:
        torch.testing.assert_close(resumed[key], clean[key])


def test_changed_config_does_not_resume_into_old_output(tmp_path, zoo):
    merge(tmp_path, sum_config(zoo))
    with pytest.raises(ConfigError, match="holds a merge of a different config"):
        merge(tmp_path, sum_config(zoo, parameters={"scale": 0.5}))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty and holds no polyfuse merge"):
        merge(tmp_path, sum_config(zoo), out="other")


def test_at_most_one_tensor_per_model_alive(tmp_path, zoo, monkeypatch):
    """Instrument the reader: when a model reads a tensor, none of its earlier ones may still be alive."""
    alive: dict[int, list[weakref.ref]] = {}
    peak = [0]
    original = ModelReader.read

    def tracked(self, key):
        refs = alive.setdefault(id(self), [])
        refs[:] = [r for r in refs if r() is not None]
        assert not refs, f"{self.source.where}: a previous tensor is still alive when reading {key}"
        tensor = original(self, key)
        refs.append(weakref.ref(tensor))
        peak[0] = max(peak[0], sum(1 for rs in alive.values() for r in rs if r() is not None))
        return tensor

    monkeypatch.setattr(ModelReader, "read", tracked)
    merge(tmp_path, sum_config(zoo))
    assert peak[0] == 3  # base + two models, never more


def test_a_read_tensor_is_the_callers_to_overwrite(zoo):
    """Methods work in place on what the reader returns: a write must reach neither the file nor a later read of
    the same key (a tied head reads `embed_tokens` a second time)."""
    reader = ModelReader(index_model(ModelReference.parse(zoo["base"]), "base_model"))
    key = next(iter(reader.source.tensors))
    first = reader.read(key)
    expected = first.clone()
    first.add_(1.0)
    assert torch.equal(reader.read(key), expected)
    reader.close()
    assert torch.equal(weights(zoo["base"])[key], expected)


def test_pickle_checkpoints_need_allow_pickle(tmp_path, zoo):
    import shutil

    pickled = tmp_path / "pickled"
    shutil.copytree(zoo["ft2"], pickled, ignore=shutil.ignore_patterns("*.safetensors*"))
    torch.save(weights(zoo["ft2"]), pickled / "pytorch_model.bin")
    config = sum_config(zoo)
    config["models"][1]["model"] = str(pickled)
    with pytest.raises(ConfigError, match=r"models\[1\]: .* has only pickle weights .*--allow-pickle"):
        merge(tmp_path, config)
    allowed = merge(tmp_path, config, options=MergeOptions(smoke_check=False, quiet=True, allow_pickle=True))
    reference = merge(tmp_path, sum_config(zoo), out="reference")
    for key, value in weights(reference.out).items():
        torch.testing.assert_close(weights(allowed.out)[key], value)


class TwoPass(WeightedSum):
    """A statistics pass first: every tensor's size, summed; merge checks it saw the whole model."""

    name = "engine_test_two_pass"

    def tensor_statistics(self, task: TensorTask) -> dict:
        return {"numel": task.base.numel()}

    def finish_statistics(self, per_tensor: dict) -> dict:
        return {"total": sum(s["numel"] for s in per_tensor.values()), "tensors": len(per_tensor)}

    def merge(self, task: TensorTask) -> torch.Tensor:
        assert task.statistics["tensors"] == 21, task.statistics
        return super().merge(task)


if TwoPass.name not in MERGE_METHODS:
    MERGE_METHODS.register(TwoPass.name)(TwoPass)


def test_two_pass_method_gets_whole_model_statistics(tmp_path, zoo):
    two = weights(merge(tmp_path, sum_config(zoo, merge_method=TwoPass.name)).out)
    one = weights(merge(tmp_path, sum_config(zoo), out="one").out)
    for key in one:
        torch.testing.assert_close(two[key], one[key])


# ----------------------------------------------------------------------------- real methods, extras, CLI


@pytest.mark.parametrize("name", [n for n in MERGE_METHODS.names() if not n.startswith("engine_test")])
def test_every_registered_method_runs_end_to_end(tmp_path, zoo, name):
    method = MERGE_METHODS.get(name)
    sources = [zoo["ft1"], zoo["ft2"]][: method.max_models or 2]
    per_model = {k: v for k, v in {"weight": 1.0, "density": 0.7}.items() if k in method.model_defaults}
    config = {"merge_method": name, "models": [{"model": m, "parameters": per_model} for m in sources],
              "parameters": {"t": 0.5} if "t" in method.defaults else {}}
    if name != "passthrough":  # passthrough takes one input, and mergekit appends the base to the inputs
        config["base_model"] = zoo["base"]
    out, base = weights(merge(tmp_path, config).out), weights(zoo["base"])
    assert out.keys() == base.keys()
    for key, value in out.items():
        assert value.shape == base[key].shape and torch.isfinite(value).all(), key


def test_rsaf_reports_keep_ratios_and_realised_density(tmp_path, zoo):
    config = {"merge_method": "rsaf", "base_model": zoo["base"],
              "models": [{"model": zoo["ft1"]}, {"model": zoo["ft2"]}], "parameters": {"k_min": 0.2, "k_max": 0.8}}
    out = merge(tmp_path, config).out
    report = json.loads((out / "merge_report.json").read_text())
    sizes = {k: v.numel() for k, v in weights(zoo["base"]).items() if v.is_floating_point()}
    assert report["method"].startswith("RSAF (polyfuse reconstruction)")
    assert set(report["keep_ratios"]) <= set(sizes) and report["keep_ratios"]
    for i, density in enumerate(report["realised_density"]):
        ratios = {name: ks[i] for name, ks in report["keep_ratios"].items()}
        assert all(0.2 <= k <= 0.8 for k in ratios.values())
        expected = sum(k * sizes[n] for n, k in ratios.items()) / sum(sizes[n] for n in ratios)
        assert density == pytest.approx(expected)


def test_linear_is_the_weighted_average(tmp_path, zoo):
    config = {"merge_method": "linear", "base_model": zoo["base"],
              "models": [{"model": zoo["ft1"], "parameters": {"weight": 1.0}},
                         {"model": zoo["ft2"], "parameters": {"weight": 3.0}}]}
    out, a, b = weights(merge(tmp_path, config).out), weights(zoo["ft1"]), weights(zoo["ft2"])
    for key in a:
        torch.testing.assert_close(out[key], (a[key] + 3 * b[key]) / 4)


def test_ties_output_loads_generates_and_explains_itself(tmp_path, zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = {"merge_method": "ties", "base_model": zoo["base"], "out_dtype": "bfloat16",
              "models": [{"model": zoo["ft1"], "parameters": {"weight": 1.0, "density": 0.5}},
                         {"model": zoo["ft2"], "parameters": {"weight": [0.5, 1.0], "density": 0.5}}]}
    result = merge(tmp_path, config, options=MergeOptions(quiet=True))
    assert result.smoke is not None and torch.isfinite(torch.tensor(result.smoke.perplexity))
    model = AutoModelForCausalLM.from_pretrained(result.out)
    assert model.dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(result.out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "the cat"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    assert (result.out / "generation_config.json").is_file()
    out, base = weights(result.out), weights(zoo["base"])
    ties = MERGE_METHODS.get("ties")()
    for key, weight2 in (("model.layers.1.mlp.up_proj.weight", 1.0), ("model.embed_tokens.weight", 0.5)):
        task = TensorTask(name=key, base=base[key], models=[weights(zoo["ft1"])[key], weights(zoo["ft2"])[key]],
                          model_params=[{"weight": 1.0, "density": 0.5}, {"weight": weight2, "density": 0.5}],
                          params=dict(ties.defaults))
        torch.testing.assert_close(out[key], ties.merge(task).to(torch.bfloat16))  # gradient read per layer

    resolved = (result.out / "merge_config.resolved.yaml").read_text()
    assert "density 0.5 = keep 50% of each task vector's entries" in resolved
    assert "normalize true = divide by the sum of the weights" in resolved and "(default)" in resolved
    assert "a gradient over the 2 layers" in resolved and "seed: 0" in resolved
    again = load_merge_config(result.out / "merge_config.resolved.yaml")  # itself a runnable config
    assert again.parameters["normalize"] is True and again.models[1].parameters["weight"] == [0.5, 1.0]


def test_cli_bad_config_exits_2(polyfuse_cli, tmp_path, zoo):
    path = write_config(tmp_path, sum_config(zoo, merge_method="frankenmerge"))
    proc = polyfuse_cli("merge", path, tmp_path / "out")
    assert proc.returncode == 2
    assert "merge_method: unknown merge method 'frankenmerge'" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
