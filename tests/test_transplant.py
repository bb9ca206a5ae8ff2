"""`polyfuse transplant` (the `transplant` stage's command; `polyfuse.merge.transplant`): mergekit-tokensurgeon run on a toy-world pair (the pivot,
SentencePiece-style BPE, given the byte-level BPE vocabulary of `llama-compare`) and, in the slow lane, on
SmolLM2-135M given Gemma-3's 262k vocabulary; its inputs refused before any work, its record, its rerun."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from polyfuse.merge import transplant as transplant_module
from polyfuse.merge.transplant import TransplantOptions, token_breakdown, transplant
from tiny_lm import build_tiny_model

TOY_K = 16


@pytest.fixture(scope="module")
def toy_transplant(tiny_world, tmp_path_factory):
    model, donor = tiny_world.pivot_path, tiny_world.source_paths["llama-compare"]
    out = tmp_path_factory.mktemp("transplant") / "pivot-llama-vocab"
    start = time.perf_counter()
    result = transplant(model, donor, out, TransplantOptions(k=TOY_K, quiet=True))  # k <= the donor's width 32
    return model, donor, result, time.perf_counter() - start


def _embeddings(folder: Path) -> torch.Tensor:
    return load_file(next(folder.glob("*.safetensors")))["model.embed_tokens.weight"]


def test_toy_transplant_gives_the_donor_vocabulary_and_keeps_shared_rows(toy_transplant):
    model, donor, result, _ = toy_transplant
    out = result.out
    donor_vocab = AutoTokenizer.from_pretrained(donor).get_vocab()
    assert AutoTokenizer.from_pretrained(out).get_vocab() == donor_vocab
    old, new = _embeddings(model), _embeddings(out)
    assert new.shape == (len(donor_vocab), old.shape[1]) and torch.isfinite(new).all()
    model_vocab = AutoTokenizer.from_pretrained(model).get_vocab()
    shared = [(model_vocab[token], donor_id) for token, donor_id in donor_vocab.items() if token in model_vocab]
    assert len(shared) > 50
    assert all(torch.equal(new[donor_id], old[model_id]) for model_id, donor_id in shared)  # copied, not approximated
    # approximated rows on the model's scale (k above the donor's width gave norms ~1e6)
    assert new.norm(dim=1).max() < 4 * old.norm(dim=1).max()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = AutoTokenizer.from_pretrained(out)("12 < 47", return_tensors="pt").input_ids
    logits = loaded(ids).logits
    assert logits.shape[-1] == len(donor_vocab) and torch.isfinite(logits).all()


def test_toy_transplant_records_what_it_did(toy_transplant):
    model, donor, result, _ = toy_transplant
    manifest = json.loads((result.out / "transplant.json").read_text())
    assert manifest == result.manifest and not result.skipped
    assert manifest["mergekit"] == "0.1.5" and manifest["method"] == "omp" and manifest["k"] == TOY_K
    assert manifest["command"][:4] == ["mergekit-tokensurgeon", str(model), str(donor), str(result.out)]
    (breakdown,) = manifest["token_breakdown"]  # tied embeddings: one matrix rebuilt
    assert breakdown["total"] == breakdown["exact_matches"] + breakdown["tokens_to_approximate"] == 512
    assert "Token Breakdown" in (result.out / "transplant.log").read_text()
    assert not list(result.out.parent.glob(".*.tmp"))


def test_rerun_skips_a_finished_transplant_and_redoes_it_when_an_input_changed(toy_transplant, tmp_path, monkeypatch):
    model, donor, result, _ = toy_transplant
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("tokensurgeon ran again"))
    again = transplant(model, donor, result.out, TransplantOptions(k=TOY_K, quiet=True))
    assert again.skipped and again.manifest == result.manifest
    copy = tmp_path / "pivot"
    shutil.copytree(model, copy)
    out = tmp_path / "out"
    shutil.copytree(result.out, out)
    calls = []

    def fake_run(command, folder, quiet):
        calls.append(command)
        shutil.copytree(result.out, folder, dirs_exist_ok=True)
        return "Token Breakdown:\n  Exact matches: 1\n  Total: 1\n"

    monkeypatch.setattr(transplant_module, "_run_tokensurgeon", fake_run)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    redone = transplant(copy, donor, out, TransplantOptions(k=TOY_K, quiet=True))
    assert len(calls) == 1 and not redone.skipped and redone.manifest["fingerprint"] != result.manifest["fingerprint"]
    assert json.loads((out / "transplant.json").read_text())["token_breakdown"] == [{"exact_matches": 1, "total": 1}]


def test_token_breakdown_reads_every_block():
    log = ("INFO:x:Token Breakdown:\n  Exact matches: 3\n  Tokens to approximate: 2\n  Total: 5\nINFO:x:other\n"
           "INFO:x:Token Breakdown:\n  Exact matches: 4\n  Byte matches: 1\n  Total: 5\n")
    assert token_breakdown(log) == [{"exact_matches": 3, "tokens_to_approximate": 2, "total": 5},
                                    {"exact_matches": 4, "byte_matches": 1, "total": 5}]


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("transplant-inputs")
    model = Path(build_tiny_model(root / "model"))
    pickled = root / "pickled"
    shutil.copytree(model, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    (root / "model.gguf").write_bytes(b"GGUF")
    (root / "busy").mkdir()
    (root / "busy" / "notes.txt").write_text("mine")
    return root


@pytest.mark.parametrize("args, message", [
    ("--model {root}/missing --donor {root}/model -o {root}/out", "MODEL {root}/missing: no such folder"),
    ("--model {root}/model.gguf --donor {root}/model -o {root}/out", "MODEL {root}/model.gguf: a GGUF file; tokensurgeon reads model folders"),
    ("--model {root}/model --donor {root}/pickled -o {root}/out", "DONOR {root}/pickled: no .safetensors weights (pickle checkpoints are not"),
    ("--model {root}/model --donor {root}/model -o {root}/out", "have the same vocabulary: nothing to transplant"),
    ("--model {root}/model --donor {root}/model -o {root}/busy", "OUT {root}/busy: exists and is not a polyfuse transplant"),
    ("--model {root}/model --donor {root}/model -o {root}/out --set method=nearest", "--set method=nearest: invalid config method: Input should be 'omp',"),
    ("--model {root}/model --donor {root}/model -o {root}/out --set k=0", "--set k=0: invalid config k: Input should be greater than or equal to 1 (got 0)"),
    ("--model {root}/model --donor {root}/model -o {root}/out --set donor={root}/model", "donor: only a recipe's section reads"),
])
def test_bad_inputs_are_one_line_and_exit_2(polyfuse_cli, tiny_folders, args, message):
    result = polyfuse_cli("transplant", *args.format(root=tiny_folders).split(), "-q")
    assert result.returncode == 2, result.stderr
    assert message.format(root=tiny_folders) in " ".join(result.stderr.split())
    lines = 2 if "invalid config" in message else 1  # a config's errors: its name, then one line per key
    assert len(result.stderr.strip().splitlines()) == lines and "Traceback" not in result.stderr
    assert not (tiny_folders / "out").exists()


def test_an_omp_k_above_the_donor_width_is_one_line_and_exit_2(polyfuse_cli, tiny_world, tmp_path):
    """tokensurgeon 0.1.5's OMP with more atoms than the donor's 32 dimensions gives embeddings of norm ~1e6."""
    donor = tiny_world.source_paths["llama-compare"]
    result = polyfuse_cli("transplant", "--model", tiny_world.pivot_path, "--donor", donor, "-o", tmp_path / "out",
                          "--set", "k=33", "-q")
    assert result.returncode == 2, result.stderr
    assert f"transplant k 33 is larger than DONOR {donor}'s hidden size 32" in " ".join(result.stderr.split())
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_mergekit_other_than_the_pinned_one_is_refused(polyfuse_cli, tiny_folders, monkeypatch):
    monkeypatch.setattr(transplant_module.metadata, "version", lambda name: "0.2.0")
    result = polyfuse_cli("transplant", "--model", tiny_folders / "model", "--donor", tiny_folders / "model", "-o",
                          tiny_folders / "out")
    assert result.returncode == 2
    assert "pinned to mergekit 0.1.5" in result.stderr and "found 0.2.0" in result.stderr


def _bits_per_byte(folder: Path, text: str) -> float:
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    return loss * (ids.shape[1] - 1) / len(text.encode()) / math.log(2)


@pytest.mark.slow
def test_smollm2_given_the_gemma3_vocabulary(smollm2_folder, gemma3_twin, tmp_path):
    """The real pair, 49k -> 262k tokens. `subword` (each new token from its SmolLM2 pieces) takes minutes on
    CPU; the default `omp` (k 64) needs a GPU for this vocabulary (about 21 h on 2 loaded cores, extrapolated,
    docs/performance.md). The transplanted model still reads English: measured 1.36 bits per byte on this text,
    against 0.79 for SmolLM2 with its own vocabulary. `subword` reads only the donor's vocabulary (its embeddings
    give no more than their row count), so the donor is Gemma-3's random twin (its real tokenizer): the same
    output without reading and hashing 1 GB of Gemma-3 weights."""
    out = tmp_path / "smollm2-gemma3-vocab"
    result = transplant(smollm2_folder, gemma3_twin, out, TransplantOptions(method="subword", quiet=True))
    gemma_vocab = AutoTokenizer.from_pretrained(gemma3_twin).get_vocab()
    assert AutoTokenizer.from_pretrained(out).get_vocab() == gemma_vocab
    new = _embeddings(out)
    assert new.shape == (len(gemma_vocab), 576) and torch.isfinite(new).all()
    breakdown = result.manifest["token_breakdown"][0]
    assert breakdown["total"] == len(gemma_vocab) and breakdown["exact_matches"] > 45000
    text = ("The capital of France is Paris. It is known for the Eiffel Tower, museums such as the Louvre, and its "
            "cafes. Water boils at 100 degrees Celsius at sea level.")
    assert _bits_per_byte(out, text) < 2 * _bits_per_byte(smollm2_folder, text)
    print(f"SmolLM2 <- Gemma-3 vocabulary (subword): {result.manifest['seconds']} s, {breakdown}")
