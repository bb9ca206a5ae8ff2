"""The reference log-prob engine against a naive one-sequence-at-a-time forward on a tiny Llama."""

from __future__ import annotations

import random

import pytest
import torch

from polyfuse.data import PreferenceRow, read_rows, response_text
from polyfuse.data.io import read_metadata
from polyfuse.errors import DataError
from polyfuse.logprobs import (
    LogpReport,
    ReferenceConfig,
    add_reference_columns,
    check_reference_columns,
    column_names,
    compute_reference_logps,
    roles_of,
)
from polyfuse.models import ModelSpec, encode, load_model, load_tokenizer
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
    scored = compute_reference_logps(model, tokenizer, rows, batch_size=4, progress=seen.append)
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


def test_batch_size_does_not_change_results(pivot):
    model, tokenizer = pivot
    rows = make_rows(9, seed=1)
    one = compute_reference_logps(model, tokenizer, rows, batch_size=1)
    many = compute_reference_logps(model, tokenizer, rows, batch_size=5)
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


def test_check_reference_columns_fails_loudly():
    good = PreferenceRow(
        id="a",
        prompt="p",
        chosen="c",
        rejected="r",
        ref_chosen_logps=-6.0,
        ref_mean_chosen_logps=-2.0,
        ref_chosen_ntokens=3,
    )
    check_reference_columns([good])
    bad_mean = good.model_copy(update={"ref_mean_chosen_logps": -2.001})
    with pytest.raises(DataError, match="row 'a': ref_mean_chosen_logps \\* ref_chosen_ntokens"):
        check_reference_columns([bad_mean])
    empty = good.model_copy(update={"ref_chosen_ntokens": 0})
    with pytest.raises(DataError, match="ref_chosen_ntokens is 0"):
        check_reference_columns([empty])


def test_reference_stage_writes_rows_and_metadata(pivot, tmp_path):
    model, tokenizer = pivot
    spec = ModelSpec(path=model.name_or_path)
    rows = make_rows(4, seed=4) + [
        PreferenceRow(id="long", prompt="the", chosen=" ".join(["cat"] * 70), rejected="no")
    ]
    out = add_reference_columns(
        spec, rows, ReferenceConfig(batch_size=3), tmp_path / "pairs.jsonl", quiet=True
    )
    written = read_rows(out, PreferenceRow)
    expected = compute_reference_logps(model, tokenizer, rows[:4], batch_size=3)
    assert [r.model_dump() for r in written] == [r.model_dump() for r in expected]  # a lossless round trip
    meta = read_metadata(out)
    assert meta["dropped"] == ["long"] and meta["rows"] == 4
    assert meta["reference"]["template_mode"] == "chat" and meta["convention"]
