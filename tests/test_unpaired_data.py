"""Unpaired data end to end below the trainer: the D / U rows of the pairs stage (labels, counts, allocation weights,
KTO's rotation and CGPO's anchors), the sources' completion entropy of the log-prob engine (against scipy and a
naive forward, on both head paths, and the top-k estimate's bound against the exact value), and CGPO's consensus
step (its columns against `build_consensus` on the held-out split, the calibration-file rules)."""

from __future__ import annotations

import json
import math
import random
from collections import namedtuple

import pytest
import torch
from scipy.stats import entropy as scipy_entropy

from polyfuse.data import PreferenceRow, UnpairedRow, read_rows, response_text, write_rows
from polyfuse.data.io import read_metadata, write_metadata
from polyfuse.errors import ConfigError, DataError
from polyfuse.logprobs import ConsensusConfig, LogprobsConfig, run_consensus, run_logprobs
from polyfuse.models import ModelSpec, encode, load_model, load_tokenizer
from polyfuse.models.forward import normalized_entropy, score_sequences
from polyfuse.objectives import build_consensus, calibration_prompts
from polyfuse.pairs import (
    PairsConfig,
    UnpairedSettings,
    kl_partners,
    rotation_mismatch,
    run_pairs,
    sft_split,
    shuffled_order,
    unpaired_rows,
)
from polyfuse.sampling.vllm_backend import position_entropy, topk_entropy
from test_forward import _llama, _softcapped_gemma

# --- The unpaired rows of the pairs stage --------------------------------------------------------------------


def sample(prompt: str, model: str, k: int, reward: float, correct: bool | None = None, response: str | None = None):
    from polyfuse.data import SampleRow

    return SampleRow(id=f"{prompt}:{model}:{k}", prompt_id=prompt, model=model, sample_index=k, prompt="q " + prompt,
                     response=f"{model}-{k}" if response is None else response, rewards={"rm": reward},
                     verdicts={} if correct is None else {"check": correct})  # fmt: skip


def samples() -> list:
    """8 prompts x 2 models x 2 samples: verified on prompts 0-3, unverified on 4-7 (rewards 0.2 and 0.7)."""
    rows = []
    for i in range(8):
        for model in ("a", "b"):
            for k in range(2):
                verified = i < 4
                rows.append(sample(f"p{i}", model, k, 0.2 + 0.5 * k, (k == 0) if verified else None))
    return rows


def test_every_judged_response_of_the_preference_prompts_is_one_labelled_row():
    rows = samples()
    rows[1] = sample("p0", "a", 1, 0.7, None, response="  ")  # empty: never a row
    config = PairsConfig(reward="rm", sft_fraction=0.5, seed=3, unpaired=UnpairedSettings(threshold=0.5))
    unpaired, counts = unpaired_rows(rows, config)
    po = {f"p{i}" for i in range(8)} - sft_split([f"p{i}" for i in range(8)], 0.5, 3)
    expected = [r for r in rows if r.prompt_id in po and r.response.strip()]
    assert sorted(r.id for r in unpaired) == sorted(r.id for r in expected)  # the preference prompts' responses
    by_id = {r.id: r for r in unpaired}
    for sample_row in expected:
        row = by_id[sample_row.id]
        verdict = sample_row.correct
        label = ("D" if verdict else "U") if verdict is not None else ("D" if sample_row.rewards["rm"] >= 0.5 else "U")
        assert (row.label, row.source, row.reward, row.correct, row.prompt_id) == (
            label, sample_row.model, sample_row.rewards["rm"], verdict, sample_row.prompt_id)
        assert row.source_allocation_weight is None
        # anchors (the default rule): a completion of another prompt
        assert response_text(row.kl_completion) in {s.response for s in expected if s.prompt_id != row.prompt_id}
    assert counts == {
        "unpaired_rows": len(expected), "unpaired_desirable": sum(r.label == "D" for r in unpaired),
        "unpaired_undesirable": sum(r.label == "U" for r in unpaired), "unpaired_prompts": 4,
        "unpaired_prompts_one_class": 0, "fusesft_rows": sum(r.correct is not False for r in expected),
        **({"unpaired_dropped_empty": 1} if "p0" in po else {}),
    }  # fmt: skip
    # without a threshold the unverified responses judge nothing: no row, counted
    plain, counts = unpaired_rows(rows, config.model_copy(update={"unpaired": UnpairedSettings()}))
    assert all(r.correct is not None for r in plain)
    assert counts["unpaired_dropped_unjudged"] == sum(1 for r in expected if r.correct is None)


def test_rotation_writes_the_rows_shuffled_and_rotated_in_blocks():
    settings = UnpairedSettings(kl_completion="rotation", kl_block=4, kl_seed=11,
                                allocation_weights={"a": 2.0, "b": 0.5})
    config = PairsConfig(reward="rm", sft_fraction=0.0, unpaired=settings)
    unpaired, _ = unpaired_rows([r for r in samples() if r.correct is not None], config)
    judged = [r for r in samples() if r.correct is not None]
    assert [r.id for r in unpaired] == [judged[i].id for i in shuffled_order(len(judged), 11)]
    partners = kl_partners([r.prompt_id for r in unpaired], 4)
    assert [response_text(r.kl_completion) for r in unpaired] == [response_text(unpaired[p].completion) for p in partners]
    assert all(unpaired[p].prompt_id != r.prompt_id for r, p in zip(unpaired, partners, strict=True))
    assert rotation_mismatch(unpaired, 4) is None
    assert "in blocks of 3 rows" in rotation_mismatch(unpaired, 3)
    assert {r.source: r.source_allocation_weight for r in unpaired} == {"a": 2.0, "b": 0.5}


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="allocation_weights: no weight for b"):
        unpaired_rows(samples(), PairsConfig(reward="rm", unpaired=UnpairedSettings(allocation_weights={"a": 1.0})))
    with pytest.raises(ValueError, match="unpaired.threshold labels responses by their reward, and no reward is given"):
        PairsConfig(unpaired=UnpairedSettings(threshold=0.5))


def test_pairs_writes_the_unpaired_rows_beside_the_pairs_and_counts_both(tmp_path):
    config = PairsConfig(reward="rm", gap_window=None, sft_fraction=0.5, unpaired=UnpairedSettings(threshold=0.5))
    paths = run_pairs(samples(), config, tmp_path)
    rows = read_rows(paths["unpaired"], UnpairedRow)
    report = json.loads(paths["report"].read_text())
    assert report["unpaired_rows"] == len(rows) == 16 and report["pairs"] == len(read_rows(paths["preference"], PreferenceRow))
    assert read_metadata(paths["unpaired"])["unpaired"]["threshold"] == 0.5
    again = run_pairs(samples(), config, tmp_path / "again")  # the same rows, the same order
    assert paths["unpaired"].read_bytes() == again["unpaired"].read_bytes()
    assert "unpaired" not in run_pairs(samples(), config.model_copy(update={"unpaired": None}), tmp_path / "none")


# --- The completion entropy ---------------------------------------------------------------------------------


def test_normalized_entropy_is_scipys_over_ln_v():
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    logits[0] = 0.0  # uniform: 1
    logits[1, 7] = 1e4  # one token certain: 0
    got = normalized_entropy(logits)
    expected = [scipy_entropy(torch.softmax(row.double(), -1).numpy()) / math.log(50) for row in logits]
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    assert got[0].item() == pytest.approx(1.0, abs=1e-6) and got[1].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("build", [_llama, _softcapped_gemma], ids=["head-path", "own-forward"])
def test_scored_entropy_is_the_mean_over_the_scored_positions(build):
    """The head-only path (Llama) and the model's own forward (Gemma-2 soft-caps its logits) give the same
    entropy as a naive forward over the positions that predict the response tokens."""
    model = build()
    rng = random.Random(1)
    sequences = [([rng.randrange(1, 60) for _ in range(rng.randint(4, 12))], 2) for _ in range(5)]
    scores = score_sequences(model, sequences, pad_id=0, token_budget=24, entropy=True)
    plain = score_sequences(model, sequences, pad_id=0, token_budget=24)
    for (ids, prompt_length), (total, count, entropy), (total_plain, _) in zip(sequences, scores, plain, strict=True):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        positions = logits[prompt_length - 1 : len(ids) - 1]
        expected = sum(scipy_entropy(torch.softmax(row, -1).numpy()) for row in positions) / math.log(60)
        assert count == len(ids) - prompt_length and total == total_plain
        assert entropy == pytest.approx(expected, abs=1e-5)


Logprob = namedtuple("Logprob", "logprob rank")


@pytest.mark.parametrize("shape", ["peaked", "flat", "heavy-tail"])
def test_topk_estimate_is_within_its_bound_of_the_exact_entropy(shape):
    """vLLM's top-k prompt log-probs: the estimate from the k largest (and the scored token) is within its bound of
    the full-vocabulary entropy, the bound shrinks as k grows, and all V entries give the exact value."""
    generator = torch.Generator().manual_seed(4)
    vocab = 300
    scale = {"peaked": 6.0, "flat": 0.3, "heavy-tail": 2.0}[shape]
    for trial in range(20):
        logits = torch.randn(vocab, generator=generator, dtype=torch.float64) * scale
        if shape == "heavy-tail":
            logits[:5] += 8.0
        logps = torch.log_softmax(logits, -1)
        exact = scipy_entropy(logps.exp().numpy()) / math.log(vocab)
        order = torch.argsort(logps, descending=True).tolist()
        scored = order[trial * 7 % vocab]  # the token the position predicts, often outside the top k
        bounds = []
        for k in (1, 5, 20, 100):
            entries = {t: Logprob(logps[t].item(), rank + 1) for rank, t in enumerate(order[:k])}
            entries.setdefault(scored, Logprob(logps[scored].item(), order.index(scored) + 1))
            estimate, bound = position_entropy(entries, k, vocab)
            assert abs(estimate - exact) <= bound + 1e-12, (k, estimate, exact, bound)
            bounds.append(bound)
        assert bounds == sorted(bounds, reverse=True) and bounds[-1] < bounds[0]
        full = {t: Logprob(logps[t].item(), rank + 1) for rank, t in enumerate(order)}
        assert position_entropy(full, None, vocab) == (pytest.approx(exact, abs=1e-12), 0.0)
    assert topk_entropy([0.0], 0.0, vocab) == (0.0, 0.0)  # all the mass on one token: nothing left to bound


# --- Log-probs of unpaired rows --------------------------------------------------------------------------------


def unpaired_fixture_rows(count: int = 6) -> list[UnpairedRow]:
    rows = [UnpairedRow(id=f"u{i}", prompt=f"{i} + {i} =", prompt_id=f"p{i // 2}", completion=f"{2 * i}",
                        label="DU"[i % 2]) for i in range(count)]  # fmt: skip
    return [row.model_copy(update={"kl_completion": rows[(i + 2) % count].completion}) for i, row in enumerate(rows)]


def test_logprobs_of_unpaired_rows_m0_scores_both_roles_the_sources_the_completion_with_its_entropy(tiny_world, tmp_path):
    sources = sorted(tiny_world.source_paths)[:2]
    config = LogprobsConfig.model_validate({"pivot": {"name": "pivot", "path": str(tiny_world.pivot_path)},
                                            "sources": [{"name": s, "path": str(tiny_world.source_paths[s])}
                                                        for s in sources], "chunk_size": 4})  # fmt: skip
    rows = unpaired_fixture_rows()
    out = run_logprobs(config, rows, tmp_path / "unpaired.jsonl", quiet=True)
    scored = read_rows(out, UnpairedRow)
    meta = read_metadata(out)
    assert meta["entropy"] == {s: "exact" for s in sources}
    for k, name in enumerate(sources):
        spec = ModelSpec(path=str(tiny_world.source_paths[name]))
        model, tokenizer = load_model(spec), load_tokenizer(spec)
        for row in scored:
            encoded = encode(tokenizer, row.prompt, response_text(row.completion))
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([encoded.input_ids])).logits[0].double()
            start, end = len(encoded.prompt_ids), len(encoded.input_ids)
            entropies = [scipy_entropy(torch.softmax(r, -1).numpy()) for r in logits[start - 1 : end - 1]]
            assert row.fuse_completion_entropy[k] == pytest.approx(
                sum(entropies) / len(entropies) / math.log(logits.shape[-1]), abs=1e-5)
            assert row.fuse_completion_ntokens[k] == end - start
    for row in scored:
        assert row.ref_kl_completion_ntokens > 0 and row.ref_mean_kl_completion_logps is not None
        assert set(row.model_dump(exclude_none=True)) & {"fuse_kl_completion_logps", "ref_completion_entropy"} == set()
    mixed = [*rows[:2], PreferenceRow(id="q", prompt="a", chosen="b", rejected="c")]
    with pytest.raises(DataError, match="mix preference rows .* and unpaired rows"):
        run_logprobs(config, mixed, tmp_path / "mixed.jsonl", quiet=True)


def test_vllm_asks_the_engine_for_enough_prompt_log_probs():
    from polyfuse.sampling.vllm_backend import VllmBackend, VllmSettings

    assert VllmBackend.logprob_settings(ModelSpec(path="m"), VllmSettings(), None).engine_args == {"max_logprobs": -1}
    assert VllmBackend.logprob_settings(ModelSpec(path="m"), VllmSettings(), 50).engine_args == {"max_logprobs": 50}
    kept = VllmSettings(engine_args={"max_logprobs": 7})
    assert VllmBackend.logprob_settings(ModelSpec(path="m"), kept, None).engine_args == {"max_logprobs": 7}  # the user's wins


# --- The consensus step ---------------------------------------------------------------------------------------


def scored_rows(count: int = 40, sources: int = 3, seed: int = 0, prefix: str = "p") -> list[UnpairedRow]:
    """Unpaired rows as `polyfuse logprobs` writes them (M0's mean, each source's mean and entropy), 4 per prompt."""
    rng = random.Random(seed)
    return [UnpairedRow(
        id=f"{prefix}{i}", prompt=f"question {prefix}{i // 4}", prompt_id=f"{prefix}{i // 4}", completion=f"answer {i}",
        label="DU"[i % 2], ref_mean_completion_logps=-rng.uniform(0.2, 2.0),
        fuse_mean_completion_logps=[-rng.uniform(0.2, 2.0) for _ in range(sources)],
        fuse_completion_entropy=[rng.uniform(0.05, 0.9) for _ in range(sources)],
    ) for i in range(count)]  # fmt: skip


def tensor(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def write_scored(path, rows, sources=("s0", "s1", "s2")):
    write_rows(path, rows)
    write_metadata(path, {"sources": [{"name": name} for name in sources], "pivot": {"name": "m0"}})
    return path


def test_consensus_columns_are_build_consensus_on_the_rows_left_after_the_held_out_split(tmp_path):
    rows = scored_rows()
    data = write_scored(tmp_path / "scored.jsonl", rows)
    config = ConsensusConfig(calibration_fraction=0.2, calibration_min_rows=8, calibration_seed=5)
    paths = run_consensus(config, rows, data, tmp_path / "out")
    held = set(calibration_prompts([r.prompt_id for r in rows], 0.2, 8, 5))
    train = [r for r in rows if r.prompt_id not in held]
    calibration = [r for r in rows if r.prompt_id in held]
    assert len(held) == 2 and len(calibration) == 8  # 20% of 10 prompts, 8 rows
    expected = build_consensus([r.prompt_id for r in train], tensor([r.ref_mean_completion_logps for r in train]),
                               tensor([r.fuse_mean_completion_logps for r in train]),
                               tensor([r.fuse_completion_entropy for r in train]),
                               tensor([r.fuse_completion_entropy for r in calibration]), config)  # fmt: skip
    written = read_rows(paths["unpaired"], UnpairedRow)
    assert [r.id for r in written] == [r.id for r in train]
    assert [r.id for r in read_rows(paths["calibration"], UnpairedRow)] == [r.id for r in calibration]
    for name in ("aligned_consensus", "source_consensus", "baseline_shift", "source_weights", "calibrated_entropies"):
        assert tensor([getattr(r, name) for r in written]) == pytest.approx(getattr(expected, name), abs=1e-12), name
    meta = read_metadata(paths["unpaired"])
    assert [s["name"] for s in meta["sources"]] == ["s0", "s1", "s2"]  # the data's metadata, carried over
    assert sorted(meta["consensus"]["calibration"]["prompts"]) == sorted(held)
    summary = json.loads(paths["summary"].read_text())["summary"]
    assert summary["training_rows"] == 32 and summary["calibration_rows"] == 8
    assert sum(summary[f"source_weight/{i}"] for i in range(3)) == pytest.approx(1.0)


def test_consensus_from_a_calibration_file_must_be_disjoint_and_scored_by_the_same_sources(tmp_path):
    rows = scored_rows()
    data = write_scored(tmp_path / "scored.jsonl", rows)
    other = scored_rows(12, seed=1, prefix="c")
    calibration = write_scored(tmp_path / "calibration.jsonl", other)
    config = ConsensusConfig(calibration=str(calibration))
    paths = run_consensus(config, rows, data, tmp_path / "out", other)
    assert len(read_rows(paths["unpaired"], UnpairedRow)) == 40 and "calibration" not in paths
    expected = build_consensus([r.prompt_id for r in rows], tensor([r.ref_mean_completion_logps for r in rows]),
                               tensor([r.fuse_mean_completion_logps for r in rows]),
                               tensor([r.fuse_completion_entropy for r in rows]),
                               tensor([r.fuse_completion_entropy for r in other]), config)  # fmt: skip
    got = [r.aligned_consensus for r in read_rows(paths["unpaired"], UnpairedRow)]
    assert got == pytest.approx(expected.aligned_consensus.tolist(), abs=1e-9)
    overlapping = write_scored(tmp_path / "overlap.jsonl", rows[:4] + other)
    with pytest.raises(DataError, match="the calibration split overlaps training: 1 prompts in both"):
        run_consensus(config.model_copy(update={"calibration": str(overlapping)}), rows, data, tmp_path / "x",
                      rows[:4] + other)
    reordered = write_scored(tmp_path / "reordered.jsonl", other, ("s1", "s0", "s2"))
    with pytest.raises(DataError, match="must list the same sources in the same order"):
        run_consensus(config.model_copy(update={"calibration": str(reordered)}), rows, data, tmp_path / "y", other)


def test_consensus_needs_the_entropy_column_unless_it_averages(tmp_path):
    rows = [r.model_copy(update={"fuse_completion_entropy": None}) for r in scored_rows()]
    data = write_scored(tmp_path / "scored.jsonl", rows)
    config = ConsensusConfig(calibration_fraction=0.2, calibration_min_rows=8)
    with pytest.raises(DataError, match=r"has no 'fuse_completion_entropy', which the CGPO consensus needs: each "
                                        r"source's normalised token entropy"):
        run_consensus(config, rows, data, tmp_path / "out")
    paths = run_consensus(config.model_copy(update={"aggregation": "mean"}), rows, data, tmp_path / "mean")
    written = read_rows(paths["unpaired"], UnpairedRow)
    assert [r.source_consensus for r in written] == pytest.approx([sum(r.fuse_mean_completion_logps) / 3 for r in written])

