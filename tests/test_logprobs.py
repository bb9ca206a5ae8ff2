"""The log-prob engine against a naive one-sequence-at-a-time forward, on a tiny Llama and on the toy
world's heterogeneous models (Llama, Qwen3 and GPT-2 with absolute positions, three tokenizers)."""

from __future__ import annotations

import json
import random
import subprocess

import pytest
import torch

import warm_python
from polyfuse.data import PreferenceRow, read_rows, response_text, write_rows
from polyfuse.data.io import read_metadata
from polyfuse.errors import DataError
from polyfuse.logprobs import (
    LogpReport,
    LogprobsConfig,
    check_logp_columns,
    column_names,
    compute_reference_logps,
    fusion_sources,
    roles_of,
    run_logprobs,
    score_rows,
)
from polyfuse.models import ModelSpec, encode, load_model, load_tokenizer
from polyfuse.models.forward import plan_batches
from tiny_lm import build_tiny_model, sentence


@pytest.fixture(scope="module")
def pivot(tmp_path_factory):
    spec = ModelSpec(path=build_tiny_model(tmp_path_factory.mktemp("pivot")))
    return load_model(spec), load_tokenizer(spec)


def make_rows(count: int, seed: int = 0) -> list[PreferenceRow]:
    rng = random.Random(seed)
    rows = [
        PreferenceRow(
            id=f"r{i}", prompt=sentence(rng), chosen=sentence(rng, 1, 20), rejected=sentence(rng, 1, 20)
        )
        for i in range(count)
    ]
    rows[0] = PreferenceRow(
        id="messages",
        prompt=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "two and two"}],
        chosen=[{"role": "assistant", "content": "four"}],
        rejected="five",
        chosen_source="four yes",
    )
    return rows


def naive_logps(model, tokenizer, prompt, response: str) -> tuple[float, int]:
    """Sum of log p(token) over the response ids, one unpadded sequence, computed in float64."""
    encoded = encode(tokenizer, prompt, response)
    ids = torch.tensor([encoded.input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    log_probs = torch.log_softmax(logits, -1)
    start = len(encoded.prompt_ids)
    total = sum(log_probs[k - 1, ids[0, k]].item() for k in range(start, ids.shape[1]))
    return total, len(encoded.response_ids)


def test_engine_matches_naive_forward_and_is_self_consistent(pivot):
    model, tokenizer = pivot
    rows = make_rows(7)
    seen = []
    scored = compute_reference_logps(model, tokenizer, rows, token_budget=64, progress=seen.append)
    assert sum(seen) == 7 * 2 + 1  # chosen + rejected per row, plus the one chosen_source
    assert [r.id for r in scored] == [r.id for r in rows]
    for row in scored:
        for role in roles_of(row):
            sum_name, mean_name, count_name = column_names(role)
            expected_sum, expected_count = naive_logps(
                model, tokenizer, row.prompt, response_text(getattr(row, role))
            )
            assert getattr(row, sum_name) == pytest.approx(expected_sum, abs=1e-5)
            assert getattr(row, count_name) == expected_count
            mean, total, count = getattr(row, mean_name), getattr(row, sum_name), getattr(row, count_name)
            assert abs(mean * count - total) <= 1e-5 + 1e-5 * abs(total)
    assert (
        scored[0].ref_chosen_source_logps is not None
        and scored[1].model_extra.get("ref_chosen_source_logps") is None
    )


def test_token_budget_does_not_change_results(pivot):
    model, tokenizer = pivot
    rows = make_rows(9, seed=1)
    one = compute_reference_logps(model, tokenizer, rows, token_budget=1)  # one sequence per forward
    many = compute_reference_logps(model, tokenizer, rows, token_budget=10_000)  # everything in one
    for a, b in zip(one, many, strict=True):
        assert a.ref_chosen_logps == pytest.approx(b.ref_chosen_logps, abs=1e-5)
        assert a.ref_rejected_logps == pytest.approx(b.ref_rejected_logps, abs=1e-5)
        assert a.ref_mean_rejected_logps == pytest.approx(b.ref_mean_rejected_logps, abs=1e-6)
        assert a.ref_rejected_ntokens == b.ref_rejected_ntokens


def test_long_pairs_are_dropped_and_reported_or_rejected(pivot):
    model, tokenizer = pivot
    rows = make_rows(6, seed=2)
    lengths = {
        r.id: max(
            len(encode(tokenizer, r.prompt, response_text(getattr(r, role))).input_ids)
            for role in roles_of(r)
        )
        for r in rows
    }
    limit = sorted(lengths.values())[3]
    report = LogpReport()
    kept = compute_reference_logps(model, tokenizer, rows, max_length=limit, report=report)
    assert sorted(report.dropped) == sorted(i for i, n in lengths.items() if n > limit)
    assert {r.id for r in kept} == {i for i, n in lengths.items() if n <= limit}
    assert "dropped" in report.summary()
    with pytest.raises(DataError, match="exceed max_length"):
        compute_reference_logps(model, tokenizer, rows, max_length=limit, overflow="error")
    # Whatever max_length asks for, nothing beyond the model's context (64 positions) is scored.
    too_long = PreferenceRow(id="too-long", prompt="the", chosen=" ".join(["cat"] * 70), rejected="no")
    report = LogpReport()
    assert compute_reference_logps(model, tokenizer, [too_long], max_length=4096, report=report) == []
    assert report.dropped == ["too-long"]


def test_plan_batches_respects_the_budget_and_covers_every_sequence():
    lengths = [5, 17, 3, 9, 9, 40, 1, 12]
    batches = plan_batches(lengths, token_budget=30)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert lengths[batch[0]] == max(lengths[i] for i in batch)  # the first is the longest
        assert len(batch) == 1 or len(batch) * lengths[batch[0]] <= 30
    assert batches[0] == [5]  # 40 tokens: over budget, alone, and first
    assert [lengths[i] for i in batches[1]] == [17]  # 2 x 17 > 30


def test_check_logp_columns_fails_loudly():
    good = PreferenceRow(
        id="a",
        prompt="p",
        chosen="c",
        rejected="r",
        ref_chosen_logps=-6.0,
        ref_mean_chosen_logps=-2.0,
        ref_chosen_ntokens=3,
        fuse_chosen_logps=[-6.0, -1.0],
        fuse_mean_chosen_logps=[-1.5, -1.0],
        fuse_chosen_ntokens=[4, 1],
    )
    check_logp_columns([good], "ref")
    check_logp_columns([good], "fuse")
    bad_mean = good.model_copy(update={"ref_mean_chosen_logps": -2.001})
    with pytest.raises(DataError, match="row 'a': ref_mean_chosen_logps \\* ref_chosen_ntokens"):
        check_logp_columns([bad_mean])
    empty = good.model_copy(update={"ref_chosen_ntokens": 0})
    with pytest.raises(DataError, match="ref_chosen_ntokens is 0"):
        check_logp_columns([empty])
    bad_source = good.model_copy(update={"fuse_mean_chosen_logps": [-1.5, -1.1]})
    with pytest.raises(DataError, match="fuse_mean_chosen_logps \\* fuse_chosen_ntokens"):
        check_logp_columns([bad_source], "fuse")
    short = good.model_copy(update={"fuse_chosen_ntokens": [4]})
    with pytest.raises(DataError, match="differ in length"):
        check_logp_columns([short], "fuse")


def toy_rows(world, count: int) -> list[PreferenceRow]:
    prompts = world.prompts("train", per_domain=count)
    return [
        PreferenceRow(id=p.id, prompt=p.prompt, chosen=p.answer, rejected=prompts[-1 - i].answer + " no")
        for i, p in enumerate(prompts)
    ]


def test_every_toy_model_matches_the_naive_forward(tiny_world):
    """Left padding with explicit position ids and `logits_to_keep` change nothing, for every
    architecture of the toy world (GPT-2 has learned absolute positions)."""
    rows = toy_rows(tiny_world, 3)
    for path in [*tiny_world.source_paths.values(), tiny_world.pivot_path]:
        spec = ModelSpec(path=str(path))
        model, tokenizer = load_model(spec), load_tokenizer(spec)
        encoded = [{role: encode(tokenizer, r.prompt, response_text(getattr(r, role))) for role in roles_of(r)}
                   for r in rows]
        scores = score_rows(model, tokenizer, encoded, token_budget=200)
        for row, row_scores in zip(rows, scores, strict=True):
            for role, (total, count) in row_scores.items():
                expected_total, expected_count = naive_logps(model, tokenizer, row.prompt, response_text(getattr(row, role)))
                assert count == expected_count
                assert total == pytest.approx(expected_total, abs=1e-4), (path.name, row.id, role)


def test_logprobs_stage_writes_pivot_and_source_columns_with_named_sources(tiny_world, tmp_path):
    pivot = ModelSpec(name="pivot", path=str(tiny_world.pivot_path))
    sources = [ModelSpec(name=name, path=str(path)) for name, path in tiny_world.source_paths.items()]
    rows = toy_rows(tiny_world, 4)
    long_row = PreferenceRow(id="long", prompt="1 + 1 =", chosen="2 " * 200, rejected="3")
    config = LogprobsConfig(pivot=pivot.model_dump(), sources=[s.model_dump() for s in sources], token_budget=256,
                            chunk_size=5)
    out = run_logprobs(config, [*rows, long_row], tmp_path / "pairs.jsonl", quiet=True)
    written = read_rows(out, PreferenceRow)
    assert [r.id for r in written] == [r.id for r in rows]  # order kept, the long pair dropped for all
    expected_ref = compute_reference_logps(load_model(pivot), load_tokenizer(pivot), rows)
    for row, ref in zip(written, expected_ref, strict=True):
        for role in ("chosen", "rejected"):
            for name in column_names(role):
                assert getattr(row, name) == pytest.approx(getattr(ref, name), abs=1e-5)
    for k, source in enumerate(sources):
        expected = compute_reference_logps(load_model(source), load_tokenizer(source), rows)
        for row, ref in zip(written, expected, strict=True):
            for role in ("chosen", "rejected"):
                for ref_name, fuse_name in zip(column_names(role), column_names(role, "fuse"), strict=True):
                    assert getattr(row, fuse_name)[k] == pytest.approx(getattr(ref, ref_name), abs=1e-5)
    # Different tokenizers count the same text differently: the lists are per-source, not copies.
    assert len({tuple(r.fuse_chosen_ntokens) for r in written}) > 1 or len(set(written[0].fuse_chosen_ntokens)) > 1
    meta = read_metadata(out)
    assert [s["name"] for s in meta["sources"]] == [s.label for s in sources]
    assert meta["pivot"]["name"] == "pivot" and meta["pivot"]["hash"] and meta["convention"]
    assert meta["sources"][0]["template_mode"] in ("chat", "plain")
    assert meta["rows"] == len(rows) and meta["dropped"][0]["id"] == "long" and "pivot" in meta["dropped"][0]["models"]
    assert fusion_sources(out, written) == [s.label for s in sources]


def test_logprobs_stage_resumes_from_its_finished_shards(tiny_world, tmp_path, monkeypatch):
    pivot = ModelSpec(name="pivot", path=str(tiny_world.pivot_path))
    sources = [ModelSpec(name=name, path=str(path)) for name, path in tiny_world.source_paths.items()]
    rows = toy_rows(tiny_world, 4)
    config = LogprobsConfig(pivot=pivot.model_dump(), sources=[s.model_dump() for s in sources], chunk_size=5)
    out = run_logprobs(config, rows, tmp_path / "pairs.jsonl", quiet=True)
    first = out.read_bytes()
    shards = sorted((tmp_path / "shards-pairs.jsonl").glob("*.jsonl"))
    assert len(shards) == 4 * 3  # 4 models x 3 chunks of 5 rows (12 rows)
    lost = shards[4]  # a crash before this shard was written
    lost.unlink()
    out.unlink()
    loaded = []
    import polyfuse.logprobs.run as stage

    original = stage.build_backend
    monkeypatch.setattr(stage, "build_backend", lambda spec: loaded.append(spec.label) or original(spec))
    run_logprobs(config, rows, out, quiet=True)
    assert out.read_bytes() == first  # same rows, none lost or duplicated
    assert loaded == [sources[0].label] and lost.name.startswith(f"01-{sources[0].label}-")  # only its model reloaded


def test_fusion_sources_refuses_unnamed_or_misshapen_lists(tmp_path):
    from polyfuse.data.io import write_metadata, write_rows

    row = PreferenceRow(id="a", prompt="p", chosen="c", rejected="r", fuse_mean_chosen_logps=[-1.0, -2.0])
    path = tmp_path / "pairs.jsonl"
    write_rows(path, [row])
    with pytest.raises(DataError, match="lists no sources"):
        fusion_sources(path, [row])
    write_metadata(path, {"sources": [{"name": "a"}, {"name": "b"}, {"name": "c"}]})
    with pytest.raises(DataError, match="row 'a': fuse_mean_chosen_logps must be a list with one value per source"):
        fusion_sources(path, [row])
    write_metadata(path, {"sources": [{"name": "a"}, {"name": "b"}]})
    assert fusion_sources(path, [row]) == ["a", "b"]


def polyfuse_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m polyfuse ARGS` (in a warm child: `warm_python`)."""
    return warm_python.run(["-m", "polyfuse", *args])


def test_cli_logprobs_then_train_infifpo(tiny_world, tmp_path):
    sources = list(tiny_world.source_paths.items())[:2]
    config = {"pivot": {"name": "pivot", "path": str(tiny_world.pivot_path)}, "token_budget": 512,
              "sources": [{"name": name, "path": str(path)} for name, path in sources]}
    (tmp_path / "logprobs.yaml").write_text(json.dumps(config))  # JSON is YAML
    write_rows(tmp_path / "pairs.jsonl", toy_rows(tiny_world, 2))
    scored = tmp_path / "scored.jsonl"
    proc = polyfuse_cli("logprobs", "-c", tmp_path / "logprobs.yaml", "--data", tmp_path / "pairs.jsonl", "--out", scored, "-q")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [s["name"] for s in read_metadata(scored)["sources"]] == [name for name, _ in sources]

    train = ["--data", scored, "--model", tiny_world.pivot_path, "--set", "epochs=1", "--set", "batch_size=3"]
    proc = polyfuse_cli("train", "infifpo", *train, "--out", tmp_path / "model", "--set", "objective_args={fusion: average}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "model" / "polyfuse_training.json").read_text())
    assert summary["sources"] == [name for name, _ in sources] and summary["objective"]["fusion"] == "average"

    (tmp_path / "dpo.yaml").write_text("objective: dpo\n")
    proc = polyfuse_cli("train", "infifpo", *train, "--out", tmp_path / "x", "-c", tmp_path / "dpo.yaml")
    assert proc.returncode == 2 and "objective is 'dpo' but the command is `train infifpo`" in proc.stderr
    write_rows(tmp_path / "unnamed.jsonl", read_rows(scored, PreferenceRow))  # rows without the metadata
    proc = polyfuse_cli("train", "infifpo", "--data", tmp_path / "unnamed.jsonl", "--model", tiny_world.pivot_path,
                        "--out", tmp_path / "y")
    assert proc.returncode == 2 and "lists no sources" in proc.stderr and "Traceback" not in proc.stderr


def test_models_that_post_process_logits_are_scored_with_their_own_forward(caplog):
    """Gemma-2 soft-caps its logits after the head: the head-only path would be wrong, the first-batch
    check notices and the whole run falls back to the model's forward."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from polyfuse.models.forward import score_sequences

    torch.manual_seed(0)
    config = Gemma2Config(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=16, vocab_size=60, final_logit_softcapping=0.5)
    model = Gemma2ForCausalLM(config).eval()
    rng = random.Random(0)
    sequences = [([rng.randrange(1, 60) for _ in range(rng.randint(4, 12))], 2) for _ in range(6)]
    scores = score_sequences(model, sequences, pad_id=0, token_budget=24)
    assert "post-processes its logits" in caplog.text
    for (ids, prompt_length), (total, count) in zip(sequences, scores, strict=True):
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        expected = sum(log_probs[k - 1, ids[k]].item() for k in range(prompt_length, len(ids)))
        assert count == len(ids) - prompt_length and total == pytest.approx(expected, abs=1e-4)


def test_two_processes_under_accelerate_write_the_same_file(tiny_world, tmp_path):
    """Data parallel: processes take (model, chunk) shards in turn; the assembled file equals one process's."""
    import os

    from test_ddp import free_port

    config = {"pivot": {"name": "pivot", "path": str(tiny_world.pivot_path)}, "chunk_size": 4,
              "sources": [{"name": name, "path": str(path)} for name, path in tiny_world.source_paths.items()]}
    (tmp_path / "logprobs.yaml").write_text(json.dumps(config))
    write_rows(tmp_path / "pairs.jsonl", toy_rows(tiny_world, 3))
    args = ["-m", "polyfuse", "logprobs", "-c", str(tmp_path / "logprobs.yaml"), "--data", str(tmp_path / "pairs.jsonl"), "-q"]
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",  # in a warm child
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    ddp = warm_python.run([*launch, *args, "--out", tmp_path / "ddp" / "out.jsonl"], env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = polyfuse_cli(*args[2:], "--out", tmp_path / "single" / "out.jsonl")
    assert single.returncode == 0, single.stderr[-3000:]
    assert (tmp_path / "ddp" / "out.jsonl").read_bytes() == (tmp_path / "single" / "out.jsonl").read_bytes()
    shards = sorted((tmp_path / "ddp" / "shards-out.jsonl").glob("*.jsonl"))
    assert len(shards) == 4 * 3  # 4 models x 3 chunks, taken in turn
    assert [read_metadata(s)["process"] for s in shards] == [0, 1] * 6
