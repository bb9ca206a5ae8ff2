"""GGUF in, safetensors out (`polyfuse.models.gguf`): `polyfuse export`, the export a `.gguf` model gets once in
the cache wherever a model folder is accepted, and the refusals of files that are not GGUF or not readable.

The fast tests use a tiny Llama written as a real GGUF (`tiny_gguf`: Q8_0 tensors, byte-level BPE, chat
template); the slow ones the real SmolLM2-135M-Instruct (Q4_1) and Gemma-3-270M (Q4_K_M) GGUFs, each
compared with transformers' own `gguf_file=` load. The vLLM engine loading an export is checked in
tests/test_engines.py, on the engine its other SmolLM2 checks start."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from polyfuse.errors import UserError
from polyfuse.models import ModelSpec, load_model, load_tokenizer, packaged
from polyfuse.models.gguf import RECORD, check_gguf, resolve_model_path
from polyfuse.models.loader import resolved
from tiny_gguf import write_tiny_gguf

TEXTS = ["Hello world", "héllo wörld, 東京 🙂\n\tdef f(x): return x", "the cat sat on the mat"]
CHAT = [{"role": "user", "content": "What is 12 times 12?"}]


@pytest.fixture
def tiny(tmp_path) -> Path:
    return write_tiny_gguf(tmp_path / "tiny.gguf")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("POLYFUSE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gguf"


def transformers_gguf_load(file: Path):
    """transformers' own reading of a GGUF file, the reference every export must equal."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name))


def assert_export_equals_gguf_load(folder: Path, file: Path) -> None:
    """The folder loads in plain transformers (safetensors only) with the tokenizer, chat template, generation
    config and logits of transformers' `gguf_file=` load, exactly; no quantization_config is left."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    reference, reference_tokenizer = transformers_gguf_load(file)
    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert not getattr(model, "is_quantized", False) and next(model.parameters()).dtype == torch.float32
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == reference_tokenizer(text)["input_ids"]
    assert tokenizer.chat_template == reference_tokenizer.chat_template
    if reference_tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert ids == reference_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True)["input_ids"]
    else:
        ids = tokenizer(TEXTS[1])["input_ids"]
    assert GenerationConfig.from_pretrained(folder).eos_token_id == reference.generation_config.eos_token_id
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([ids])).logits, reference(torch.tensor([ids])).logits)
    record = json.loads((folder / RECORD).read_text())
    assert record["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert record["bytes"] == file.stat().st_size and record["dtype"] == "float32"


def test_polyfuse_export_round_trip_equals_transformers_gguf_load(tiny, tmp_path, polyfuse_cli):
    out = tmp_path / "exported"
    result = polyfuse_cli("export", tiny, out)
    assert result.returncode == 0, result.stderr
    assert "exported" in result.stdout and "Q8_0 -> float32" in result.stdout
    assert_export_equals_gguf_load(out, tiny)
    record = json.loads((out / RECORD).read_text())
    assert (record["architecture"], record["quantization"], record["vocab_size"]) == ("llama", "Q8_0", 262)
    assert record["tensor_types"] == {"Q8_0": 16, "F32": 5} and record["chat_template"] is True

    written = (out / "model.safetensors").stat().st_mtime_ns
    again = polyfuse_cli("export", tiny, out)  # the same file again: kept, nothing rewritten
    assert again.returncode == 0 and "already exported" in again.stdout
    assert (out / "model.safetensors").stat().st_mtime_ns == written

    half = polyfuse_cli("export", tiny, tmp_path / "bf16", "--dtype", "bfloat16")
    assert half.returncode == 0, half.stderr
    with safe_open(out / "model.safetensors", "pt") as full, safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as small:
        key = "model.layers.0.mlp.up_proj.weight"
        assert small.get_tensor(key).dtype == torch.bfloat16
        assert torch.equal(small.get_tensor(key), full.get_tensor(key).to(torch.bfloat16))


def test_a_gguf_model_is_exported_once_into_the_cache_and_says_so(tiny, cache, capsys):
    spec = ModelSpec(path=str(tiny))
    tokenizer = load_tokenizer(spec)  # a tokenizer needs no weights: read from the GGUF, nothing exported
    assert not cache.exists()
    model = load_model(spec)
    folder = cache / hashlib.sha256(tiny.read_bytes()).hexdigest()
    assert f"exporting {tiny} once to {folder}" in capsys.readouterr().err
    written = (folder / "model.safetensors").stat().st_mtime_ns
    again = load_model(spec)
    assert "exporting" not in capsys.readouterr().err and (folder / "model.safetensors").stat().st_mtime_ns == written
    for name, weight in model.state_dict().items():
        assert torch.equal(weight, again.state_dict()[name])
    assert load_tokenizer(spec).name_or_path == str(folder)  # exported: the tokenizer comes from the folder now
    assert load_tokenizer(spec)(TEXTS[1])["input_ids"] == tokenizer(TEXTS[1])["input_ids"]
    assert resolved(spec).label == spec.label == "tiny"  # data rows keep the model's name, not the cache's
    assert_export_equals_gguf_load(folder, tiny)


def test_merge_reads_gguf_models_through_their_exports(tmp_path, cache, polyfuse_cli):
    """The merge takes `.gguf` models as it takes folders: a linear merge of two GGUFs is the mean of their
    de-quantised weights."""
    first, second = write_tiny_gguf(tmp_path / "a.gguf", seed=0), write_tiny_gguf(tmp_path / "b.gguf", seed=1)
    config = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": str(first), "parameters": {"weight": 0.5}},
                         {"model": str(second), "parameters": {"weight": 0.5}}]}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    result = polyfuse_cli("merge", tmp_path / "merge.yaml", tmp_path / "merged", "--no-smoke-check", "-q")
    assert result.returncode == 0, result.stderr
    a, b = (load_model(ModelSpec(path=str(file))).state_dict() for file in (first, second))
    merged = load_model(ModelSpec(path=str(tmp_path / "merged"))).state_dict()
    for name, weight in merged.items():
        torch.testing.assert_close(weight, 0.5 * a[name] + 0.5 * b[name], rtol=0, atol=1e-7)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_files_that_are_not_readable_gguf_are_refused_naming_them(tmp_path, cache, polyfuse_cli):
    zipped = tmp_path / "model.gguf"
    zipped.write_bytes(b"PK\x03\x04 a zip, not a GGUF")
    with pytest.raises(UserError, match=r"model\.gguf is not a GGUF file .*give a \.gguf file written by llama\.cpp"):
        check_gguf(zipped, "pivot")
    other = write_tiny_gguf(tmp_path / "rwkv.gguf", architecture="rwkv7")
    with pytest.raises(UserError, match=r"pivot: .*rwkv\.gguf: transformers .* cannot de-quantise GGUF architecture "
                                        r"'rwkv7' \(it reads .*llama.*\); give the model's safetensors folder"):
        check_gguf(other, "pivot")
    with pytest.raises(UserError, match=r"missing\.gguf: no such file"):
        load_model(ModelSpec(path=str(tmp_path / "missing.gguf")))

    for args, message in [
        ((zipped, tmp_path / "out"), "model.gguf is not a GGUF file"),
        ((other, tmp_path / "out"), "cannot de-quantise GGUF architecture 'rwkv7'"),
        ((write_tiny_gguf(tmp_path / "ok.gguf"), tmp_path), "the folder exists and holds something other than"),
    ]:
        result = polyfuse_cli("export", *args)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists() and not cache.exists()

    (tmp_path / "merge.yaml").write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(zipped), "parameters": {"weight": 1.0}}]}))
    result = polyfuse_cli("merge", tmp_path / "merge.yaml", tmp_path / "merged", "-q")
    assert result.returncode == 2 and "model.gguf is not a GGUF file" in result.stderr
    with pytest.raises(UserError, match=r"models\[0\]: .*nothing\.gguf: no such file"):
        resolve_model_path(str(tmp_path / "nothing.gguf"), "models[0]")


@pytest.fixture
def one_gguf_parse(monkeypatch):
    """gguf-py's `GGUFReader` of each file made once for the test: transformers' `gguf_file=` loads parse the whole
    file three times (tokenizer, config, weights), each a Python loop over every metadata entry (~9 CPU s for
    Gemma-3's 262k-token vocabulary); the reader is a read-only view of the file, so what they read is the same."""
    import gguf

    monkeypatch.setattr(gguf, "GGUFReader", functools.cache(gguf.GGUFReader))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_real_gguf_exports_equal_transformers_gguf_loads(model, one_gguf_parse):
    """SmolLM2-135M-Instruct (Q4_1, chat template) and Gemma-3-270M (Q4_K_M, Q5_0, Q6_K; no template): their
    exports (the cache's, as every stage loads them) against transformers' own de-quantisation."""
    file = getattr(packaged, model)()
    folder = Path(resolve_model_path(str(file), model))
    assert_export_equals_gguf_load(folder, file)
