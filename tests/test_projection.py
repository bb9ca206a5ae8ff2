"""X-Token's projection W (`polyfuse.alignment.projection`): the piece weights of the spec (section 4.2), rows of
hand-built byte-level BPE vocabularies, the match rules, the reverse pass, the on-disk cache, and the real
SmolLM2 <- Gemma-3 pair (49k students tokens read in a 262k vocabulary)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from polyfuse.alignment import projection as projection_module
from polyfuse.alignment import token_bytes
from polyfuse.alignment.projection import build_weights, matched_pairs, piece_weights, projection
from polyfuse.errors import ConfigError
from polyfuse.objectives import DISTILL_OBJECTIVES
from polyfuse.objectives.distill import AlignedRow, DistillBatch, TeacherOutputs
from polyfuse.objectives.topk import sparse_divergence


def byte_bpe(merges: list[tuple[str, str]]) -> PreTrainedTokenizerFast:
    """A byte-level BPE over the 256 byte symbols plus the given merges (GPT-2's split: digit runs stay whole)."""
    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


@pytest.fixture(scope="module")
def pair():
    student = byte_bpe([("2", "0"), ("20", "1"), ("201", "20"), ("Ġ", "a"), ("y", "z"), ("x", "yz"), ("Ġ", "Ã")])
    teacher = byte_bpe([("Ġ", "a"), ("x", "y"), ("z", "w"), ("xy", "zw")])
    return student, teacher


def rows_of(student, teacher, rows, cols, weights) -> dict[str, dict[str, float]]:
    """W's rows by token text: {student token: {teacher token: weight}}."""
    out: dict[str, dict[str, float]] = {}
    for v, c, w in zip(rows.tolist(), cols.tolist(), weights.tolist(), strict=True):
        out.setdefault(student.convert_ids_to_tokens(v), {})[teacher.convert_ids_to_tokens(c)] = w
    return out


def test_piece_weights_are_the_spec_values():
    assert piece_weights(1) == pytest.approx([1.0])
    assert piece_weights(2) == pytest.approx([0.909091, 0.090909], abs=1e-6)
    assert piece_weights(3) == pytest.approx([0.900901, 0.090090, 0.009009], abs=1e-6)
    assert piece_weights(4) == pytest.approx([0.900090, 0.090009, 0.009001, 0.000900], abs=1e-6)


def test_rows_exact_retokenised_cut_at_four_pieces_and_byte_fallback(pair):
    student, teacher = pair
    rows, cols, weights, stats = build_weights(student, teacher)
    w = rows_of(student, teacher, rows, cols, weights)
    assert w["Ġa"] == {"Ġa": 1.0} and w["7"] == {"7": 1.0}  # exact after canonicalisation
    assert w["20"] == pytest.approx({"2": 0.909091, "0": 0.090909}, abs=1e-6)
    assert w["201"] == pytest.approx({"2": 0.900901, "0": 0.090090, "1": 0.009009}, abs=1e-6)
    # "20120" is 5 teacher pieces 2 0 1 2 0: the first four are kept, and repeated pieces share one cell.
    first_four = piece_weights(4)
    assert w["20120"] == pytest.approx({"2": first_four[0] + first_four[3], "0": first_four[1], "1": first_four[2]})
    # b" \xc3" is no whole UTF-8 character: the teacher's tokenizer cannot take it, its canonical bytes can.
    assert w["ĠÃ"] == pytest.approx({"Ġ": 0.909091, "Ã": 0.090909}, abs=1e-6)
    assert stats == {"exact": 257, "retokenized": 6, "fallback": 1, "no_row": 0}  # 256 bytes + "Ġa"
    sums = np.bincount(rows, weights=weights)
    assert np.allclose(sums[np.unique(rows)], 1.0)


def test_match_rules(pair):
    student, teacher = pair
    rows, cols, weights, _ = build_weights(student, teacher)
    ids = student.convert_tokens_to_ids
    exact = set(zip(*matched_pairs("exact", rows, cols, weights, student, teacher), strict=True))
    assert (ids("Ġa"), teacher.convert_tokens_to_ids("Ġa")) in exact and len(exact) == 257
    relaxed = set(zip(*matched_pairs("relaxed", rows, cols, weights, student, teacher), strict=True))
    # "xyz" -> teacher ("xy" .909, "z" .091): its top entry has no exact twin, so H-KL matches it; "20" -> "2"
    # loses the collision with the exact "2" (weight 1.0 beats 0.909).
    assert relaxed - exact == {(ids("xyz"), teacher.convert_tokens_to_ids("xy"))}
    strings = set(zip(*matched_pairs("strings", rows, cols, weights, student, teacher), strict=True))
    assert len(strings) == 257 and (ids("Ġa"), teacher.convert_tokens_to_ids("Ġa")) in strings  # 256 bytes + "Ġa"
    assert matched_pairs("none", rows, cols, weights, student, teacher)[0].size == 0
    with pytest.raises(ConfigError, match="unknown match rule"):
        matched_pairs("fuzzy", rows, cols, weights, student, teacher)


def test_reverse_pass_adds_the_teacher_tokens_own_pieces(pair):
    student, teacher = pair
    w = rows_of(student, teacher, *build_weights(student, teacher, reverse_pass=True)[:3])
    # teacher "xyzw" is student "xyz" + "w": row "xyz" gets 0.909 on "xyzw" beside its own ("xy" .909, "z" .091).
    assert w["xyz"] == pytest.approx({"xy": 0.476190, "xyzw": 0.476190, "z": 0.047619}, abs=1e-6)
    assert w["x"] == {"x": 1.0}  # exact matches keep their single 1.0


def test_projection_is_cached_atomically_and_keyed_by_both_tokenizers_and_the_options(pair, tmp_path, monkeypatch):
    student, teacher = pair
    built = projection(student, teacher, cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"
    monkeypatch.setattr(projection_module, "build_weights", lambda *a, **k: pytest.fail("rebuilt a cached W"))
    cached = projection(student, teacher, cache_dir=tmp_path)
    assert torch.equal(cached.weights_t.to_dense(), built.weights_t.to_dense())
    monkeypatch.undo()
    projection(student, teacher, cache_dir=tmp_path, reverse_pass=True)
    projection(teacher, student, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 3
    files[0].write_bytes(b"damaged")
    assert torch.equal(projection(student, teacher, cache_dir=tmp_path).weights_t.to_dense(), built.weights_t.to_dense())
    assert not list(tmp_path.glob("*.tmp"))
    same = projection(student, byte_bpe([("2", "0"), ("20", "1"), ("201", "20"), ("Ġ", "a"), ("y", "z"), ("x", "yz"),
                                         ("Ġ", "Ã")]), cache_dir=tmp_path / "none")
    assert torch.equal(same.weights_t.to_dense(), torch.eye(len(student)))  # one vocabulary: W = I, nothing cached
    assert not (tmp_path / "none").exists()
    with pytest.raises(ConfigError, match="max_pieces"):
        projection(student, teacher, max_pieces=0)


def test_pkl_through_a_built_projection_on_the_multi_digit_case(pair, tmp_path):
    """X-Token's motivating case: a student number token read by a digit-splitting teacher."""
    student, teacher = pair
    w = projection(student, teacher, cache_dir=tmp_path)
    ids_s, ids_t = student.convert_tokens_to_ids, teacher.convert_tokens_to_ids
    digits = [ids_t(d) for d in "201"]
    probs = np.full((1, len(teacher)), 1e-9)
    probs[0, digits] = [0.7, 0.2, 0.1 - 1e-9 * (len(teacher) - 3)]
    order = np.argsort(-probs[0])[:3][None]
    logps = np.log(probs)
    outputs = TeacherOutputs(np.array([digits[0]]), order, logps[:, order[0]], np.zeros(1), logps[:, digits[0]],
                             topk_logprobs=logps[:, order[0]].astype(np.float32))
    row = AlignedRow([ids_s("201")], [outputs], [[([0], [0])]], [None], token_bytes(student))
    loss = DISTILL_OBJECTIVES.get("kd").model_validate({"top_k": 3})
    fields = {k: torch.tensor(v, dtype=loss.target_fields[k].dtype) for k, v in loss.targets(row).items()}
    logits = torch.full((1, len(student)), -30.0)
    logits[0, ids_s("201")] = 0.0  # the student is sure of "201": its mass lands 0.9 / 0.09 / 0.009 on 2 / 0 / 1
    losses, _ = loss(DistillBatch(logits, torch.tensor([ids_s("201")]), [w], **fields))
    q = torch.tensor([0.900901, 0.090090, 0.009009]).log()  # by hand: forward KL over the three digits + tail
    hand = sparse_divergence(q[None], torch.tensor(logps[0, digits], dtype=torch.float32)[None],
                             torch.ones(1, 3, dtype=torch.bool), 0.0)
    assert losses.item() == pytest.approx(hand.item(), abs=1e-4)


def test_real_pair_smollm2_read_in_gemma3(smollm2_tokenizer, gemma3_tokenizer, tmp_path):
    smol, gemma = smollm2_tokenizer, gemma3_tokenizer
    start = time.perf_counter()
    rows, cols, weights, stats = build_weights(smol, gemma)
    seconds = time.perf_counter() - start
    smol_bytes, gemma_bytes = token_bytes(smol), token_bytes(gemma)
    assert stats["exact"] > 45000 and stats["no_row"] == 0 and stats["fallback"] == 200  # the non-UTF-8 byte tokens
    assert np.allclose(np.bincount(rows, weights=weights)[np.unique(rows)], 1.0, atol=1e-6)
    # Every re-tokenised row with fewer than five pieces spells its token, pieces in order of weight.
    order = np.lexsort((-weights, rows))
    rows, cols = rows[order], cols[order]
    starts = np.r_[0, np.flatnonzero(np.diff(rows)) + 1, len(rows)]
    spelled = {int(rows[a]): b"".join(gemma_bytes[c] for c in cols[a:b]) for a, b in zip(starts[:-1], starts[1:],
                                                                                       strict=True)}
    short = [v for v, text in spelled.items() if len(text) == len(smol_bytes[v])]
    assert len(short) > 0.99 * len(spelled) and all(spelled[v] == smol_bytes[v] for v in short)
    hello = smol.convert_tokens_to_ids("Ġhello")
    assert spelled[hello] == b" hello" and (cols[rows == hello] == gemma.convert_tokens_to_ids("▁hello")).all()
    assert seconds < 60, seconds


def test_kd_and_gold_on_a_real_alignment(smollm2_tokenizer, gemma3_tokenizer, tmp_path):
    """SmolLM2 student, Gemma-3 teacher on multi-byte text and digits, each in its own chat template: one item
    per aligned group, the stop group at the student's end-of-turn marker, finite losses and gradients."""
    from polyfuse.alignment import align_offsets, response_spans

    smol, gemma = smollm2_tokenizer, gemma3_tokenizer
    prompt, response = [{"role": "user", "content": "Say something."}], "naïve 東京 🙂 costs 1234.5"
    student, student_spans = response_spans(smol, prompt, response)
    teacher, teacher_spans = response_spans(gemma, prompt, response)
    groups = align_offsets(student_spans, teacher_spans)
    end_s, end_t = student_spans.index(None), teacher_spans.index(None)  # the first marker after the text
    groups.append(([end_s], [end_t]))
    generator = np.random.default_rng(0)
    tokens = np.array(teacher.response_ids)
    ids = np.stack([np.r_[t, generator.choice(len(gemma), 7, replace=False)] for t in tokens])
    logps = np.log(np.full((len(tokens), 8), 0.9 / 8))
    outputs = TeacherOutputs(tokens, ids.astype(np.int32), logps.astype(np.float32), np.zeros(len(tokens)),
                             logps[:, 0].astype(np.float32), topk_logprobs=logps.astype(np.float32))
    row = AlignedRow(list(student.response_ids), [outputs], [groups], [None], token_bytes(smol))
    projections = [projection(smol, gemma, cache_dir=tmp_path)]
    logits = torch.randn(len(student.response_ids), len(smol), generator=torch.Generator().manual_seed(0))
    logits.requires_grad_()
    for name, settings in [("kd", {"top_k": 8}), ("kd", {"beta": 0.5}), ("gold", {"top_k": 8})]:
        loss = DISTILL_OBJECTIVES.get(name).model_validate(settings)
        built = loss.targets(row)
        kinds = np.array(built["group"])[:, 0]
        assert np.flatnonzero(kinds == 2).tolist() == [end_s]
        assert np.flatnonzero(kinds == 1).tolist() == [left[-1] for left, _ in groups[:-1]]
        assert [built["group_lead"][left[-1]][0] for left, _ in groups] == [len(left) - 1 for left, _ in groups]
        fields = {k: torch.tensor(v, dtype=loss.target_fields[k].dtype) for k, v in built.items()}
        losses, metrics = loss(DistillBatch(logits, torch.tensor(student.response_ids), projections, **fields))
        assert metrics["kd/groups"].sum() == len(groups) and (losses >= 0).all()
        grad, = torch.autograd.grad(losses.sum(), logits)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
