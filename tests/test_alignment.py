"""Cross-tokenizer alignment: space markers, token bytes, response spans, offset groups, the DP fallback
and vocabulary maps, on SmolLM2 (byte-level BPE) x Gemma-3 (SentencePiece with byte fallback) and the
toy-world tokenizers (byte-level, Metaspace, Unigram, WordPiece; llama3 / zephyr / chatml / no template)."""

from __future__ import annotations

import itertools
import random
import types

import numpy as np
import pytest
from rapidfuzz.distance import Levenshtein
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dtw_reference import reference_dp
from polyfuse.alignment import (
    align,
    align_dp,
    align_offsets,
    response_spans,
    space_marker,
    special_ids,
    token_bytes,
    vocab_map,
)
from polyfuse.alignment import vocab as vocab_module
from polyfuse.errors import ConfigError, DataError
from polyfuse.models import encode
from polyfuse.toyworld.tokenizers import train_tokenizer

PROMPT = [{"role": "user", "content": "Say something."}]
RESPONSES = [
    "naïve 東京 🙂",
    "  leading spaces and trailing  ",
    "Digits 1234567 and 3.14159, ok?",
    "Line one.\n\nLine two\tTabbed",
    "x",
]
TEXTS = ["naïve 東京 🙂", "  x 123456 ab.\n\nThe\t\tfoo   bar\u3000x", "Hello, world! <b>bold</b>"]


@pytest.fixture(scope="module")
def smollm2(smollm2_tokenizer):
    return smollm2_tokenizer  # read once per session (conftest), shared with test_models


@pytest.fixture(scope="module")
def gemma3(gemma3_tokenizer):
    return gemma3_tokenizer  # read once per session (conftest)


@pytest.fixture(scope="module")
def toys():
    """One toy tokenizer per algorithm, each with a different template (BOS on some sides only)."""
    return {
        "bytelevel-llama3": train_tokenizer("bpe-bytelevel", 400, "llama3"),
        "metaspace-zephyr": train_tokenizer("bpe-metaspace", 400, "zephyr"),
        "unigram-chatml": train_tokenizer("unigram", 300, "chatml", corpus_lines=300),
        "wordpiece-none": train_tokenizer("wordpiece", 400, "none"),
    }


@pytest.fixture(scope="module")
def digits():
    """A byte-level BPE without digit isolation: it merges digit runs ('123', '45'), unlike SmolLM2."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    core.train_from_iterator([" ".join(str(n) for n in range(k, k + 40)) for k in range(0, 40000, 40)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>")


def _tokens(tokenizer, ids: list[int]) -> list[str]:
    return tokenizer.convert_ids_to_tokens(ids)


def checked_spans(tokenizer, prompt, response):
    """`response_spans`, checked: same ids as `encode`, markers without span, spans tiling the response."""
    encoded, spans = response_spans(tokenizer, prompt, response)
    assert encoded == encode(tokenizer, prompt, response)
    assert len(spans) == len(encoded.response_ids)
    markers = special_ids(tokenizer) - {tokenizer.unk_token_id}
    assert all(span is None for token_id, span in zip(encoded.response_ids, spans, strict=True) if token_id in markers)
    distinct = sorted({span for span in spans if span is not None})
    assert distinct[0][0] == 0 and distinct[-1][1] == len(response)
    assert all(left[1] == right[0] for left, right in itertools.pairwise(distinct))
    return encoded, spans


def check_groups(spans_a, spans_b, groups, response) -> list[str]:
    """Groups partition both sides' spanned tokens in order, and each group is the same text on both."""
    for spans, side in ((spans_a, 0), (spans_b, 1)):
        assert [i for group in groups for i in group[side]] == [i for i, s in enumerate(spans) if s is not None]
    texts = []
    for group_a, group_b in groups:
        text_a = response[spans_a[group_a[0]][0] : spans_a[group_a[-1]][1]]
        text_b = response[spans_b[group_b[0]][0] : spans_b[group_b[-1]][1]]
        assert text_a == text_b
        texts.append(text_a)
    assert "".join(texts) == response
    return texts


# --- space markers and token bytes -------------------------------------------------------------------


def test_space_markers_are_read_from_the_tokenizer(smollm2, gemma3, toys):
    assert space_marker(smollm2) == "Ġ"
    assert space_marker(gemma3) == "▁"
    assert {name: space_marker(t) for name, t in toys.items()} == {
        "bytelevel-llama3": "Ġ", "metaspace-zephyr": "▁", "unigram-chatml": "▁", "wordpiece-none": "▁"}


def test_token_bytes_of_real_vocabularies(smollm2, gemma3):
    for tokenizer in (smollm2, gemma3):
        table = token_bytes(tokenizer)
        assert len(table) == len(tokenizer)
        for text in TEXTS:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert b"".join(table[i] for i in ids) == text.encode()
        assert all(table[i] is None for i in special_ids(tokenizer))
    smol, gem = token_bytes(smollm2), token_bytes(gemma3)
    assert smol[smollm2.convert_tokens_to_ids("Ġhello")] == b" hello" == gem[gemma3.convert_tokens_to_ids("▁hello")]
    assert smol[smollm2.convert_tokens_to_ids("ĊĊ")] == b"\n\n" == gem[gemma3.convert_tokens_to_ids("\n\n")]
    assert gem[gemma3.convert_tokens_to_ids("<0xE3>")] == b"\xe3"
    assert smol[smollm2.convert_tokens_to_ids("Ã¯")] == "ï".encode()


def test_token_bytes_of_toy_vocabularies(toys):
    text = " the answer is 42, right?"
    for tokenizer in toys.values():
        table = token_bytes(tokenizer)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert b"".join(table[i] for i in ids) == text.encode()
    wordpiece = toys["wordpiece-none"]
    continuation = next(t for t in wordpiece.get_vocab() if t.startswith("##") and len(t) > 3)
    assert token_bytes(wordpiece)[wordpiece.convert_tokens_to_ids(continuation)] == continuation[2:].encode()


def test_wordpiece_without_marker_reads_word_starts_as_space_prefixed():
    vocab = {"[UNK]": 0, "hel": 1, "##lo": 2, "world": 3, "a": 4}
    core = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    bert_like = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    assert space_marker(bert_like) == ""
    assert token_bytes(bert_like) == [None, b" hel", b"lo", b" world", b" a"]


# --- response spans and offset groups -----------------------------------------------------------------


def test_multibyte_text_groups_smollm2_with_gemma3(smollm2, gemma3):
    response = "naïve 東京 🙂"
    smol, smol_spans = checked_spans(smollm2, PROMPT, response)
    gem, gem_spans = checked_spans(gemma3, PROMPT, response)
    groups = align_offsets(smol_spans, gem_spans)
    assert [(_tokens(smollm2, [smol.response_ids[i] for i in a]), _tokens(gemma3, [gem.response_ids[j] for j in b]))
            for a, b in groups] == [
        (["na", "Ã¯ve"], ["▁naïve"]),  # plain mode: Gemma tokenises " " + response, the space is clipped off
        (["Ġæ", "Ŀ", "±", "äº", "¬"], ["▁東京"]),  # byte pieces of one character share its span
        (["ĠðŁĻĤ"], ["▁🙂"]),
    ]
    assert check_groups(smol_spans, gem_spans, groups, response) == ["naïve", " 東京", " 🙂"]


def test_end_of_turn_on_one_side_only(smollm2, gemma3):
    response = "Done."
    smol, smol_spans = checked_spans(smollm2, PROMPT, response)  # ChatML: ... Done.<|im_end|>\n
    gem, gem_spans = checked_spans(gemma3, PROMPT, response)  # no template: " Done." + <eos>
    assert (smol.mode, gem.mode) == ("chat", "plain")
    assert _tokens(smollm2, smol.response_ids)[-2:] == ["<|im_end|>", "Ċ"] and smol_spans[-2:] == [None, None]
    assert gem.response_ids[-1] == gemma3.eos_token_id and gem_spans[-1] is None
    groups = align_offsets(smol_spans, gem_spans)
    assert check_groups(smol_spans, gem_spans, groups, response) == ["Done", "."]


def test_bos_on_one_side_only(toys):
    """llama3 and zephyr templates start with BOS, chatml has none: the responses align the same."""
    response = "the answer is 42."
    llama, llama_spans = checked_spans(toys["bytelevel-llama3"], PROMPT, response)
    chatml, chatml_spans = checked_spans(toys["unigram-chatml"], PROMPT, response)
    assert llama.prompt_ids[0] == toys["bytelevel-llama3"].bos_token_id
    assert toys["unigram-chatml"].bos_token_id not in chatml.prompt_ids
    groups = align_offsets(llama_spans, chatml_spans)
    assert groups[0][0][0] == 0 and groups[0][1][0] == 0
    check_groups(llama_spans, chatml_spans, groups, response)


def test_leading_spaces_belong_to_the_following_token(smollm2, gemma3):
    response = "  two spaces"
    smol, smol_spans = checked_spans(smollm2, PROMPT, response)
    gem, gem_spans = checked_spans(gemma3, PROMPT, response)
    # ChatML's "\n" before the response would merge with the spaces, so encode falls back to plain mode:
    # " " + response, whose extra space is clipped off the first token.
    assert smol.mode == "plain" and _tokens(smollm2, smol.response_ids[:2]) == ["ĠĠ", "Ġtwo"]
    assert smol_spans[:2] == [(0, 1), (1, 5)]
    groups = align_offsets(smol_spans, gem_spans)
    assert check_groups(smol_spans, gem_spans, groups, response)[0] == "  two"


def test_digits_split_differently(smollm2, digits):
    response = "12345 67890"
    smol, smol_spans = checked_spans(smollm2, PROMPT, response)
    dig, dig_spans = checked_spans(digits, PROMPT, response)
    assert _tokens(smollm2, smol.response_ids[:5]) == list("12345")
    assert len([s for s in dig_spans if s]) < len([s for s in smol_spans if s])
    groups = align_offsets(smol_spans, dig_spans)
    check_groups(smol_spans, dig_spans, groups, response)
    assert any(len(b) == 1 and len(a) > 1 for a, b in groups)  # one merged-digits token, several single digits


def test_groups_partition_every_pair(smollm2, gemma3, toys, digits):
    from tiny_lm import build_tokenizer

    tokenizers = {"smollm2": smollm2, "gemma3": gemma3, **toys, "digits": digits, "wordlevel": build_tokenizer()}
    for response in RESPONSES:
        spans = {name: checked_spans(tokenizer, PROMPT, response)[1] for name, tokenizer in tokenizers.items()}
        for a, b in itertools.combinations(spans, 2):
            check_groups(spans[a], spans[b], align_offsets(spans[a], spans[b]), response)


def test_empty_response_has_no_spans(smollm2, gemma3):
    smol, smol_spans = response_spans(smollm2, PROMPT, "")
    gem, gem_spans = response_spans(gemma3, PROMPT, "")
    assert smol.response_ids and all(span is None for span in smol_spans + gem_spans)
    assert align_offsets(smol_spans, gem_spans) == []


def test_align_offsets_hand_made_groups():
    spans_a = [None, (0, 3), (3, 5), (5, 9), (9, 10), (9, 10), None]  # BOS, ..., two pieces of one char, EOT
    spans_b = [(0, 5), (5, 7), (7, 9), (9, 10), None]
    assert align_offsets(spans_a, spans_b) == [([1, 2], [0]), ([3], [1, 2]), ([4, 5], [3])]
    assert align_offsets([(0, 2), (2, 5)], [(0, 3), (3, 5)]) == [([0, 1], [0, 1])]
    assert align_offsets([(0, 2), (2, 4)], [(0, 2), (2, 3)]) == [([0], [0])]  # no common end after 2
    assert align_offsets([None], [(0, 1)]) == []


def test_slow_tokenizer_is_refused():
    with pytest.raises(DataError, match="not a fast tokenizer"):
        response_spans(types.SimpleNamespace(is_fast=False), PROMPT, "hi")


# --- the DP fallback ------------------------------------------------------------------------------


def groups_of(path):
    groups = []
    for (i, j), previous in zip(path, [(-1, -1), *path[:-1]], strict=True):
        if i != previous[0] and j != previous[1]:
            groups.append(([i], [j]))
        elif i != previous[0]:
            groups[-1][0].append(i)
        else:
            groups[-1][1].append(j)
    return groups


def test_align_dp_hand_made_path():
    a = [b"The", b" cat", b"s", b" sat", b"."]
    b = [b"The", b" cats", b" s", b"at."]
    # 's' and ' sat' both take ' s' (1 + 2) rather than 's' joining ' cats' (4); '.' takes 'at.' (2).
    expected = [([0], [0]), ([1], [1]), ([2, 3], [2]), ([4], [3])]
    assert groups_of(reference_dp(a, b)) == expected
    assert align_dp(a, b) == expected
    assert align_dp([b"ab"], [b"a", b"b"]) == [([0], [0, 1])]
    assert align_dp([], [b"a"]) == []


def test_align_dp_matches_the_reference_loop():
    rng = random.Random(0)
    pieces = [b"a", b"b", b"ab", b" ab", b"ba", b" c", b"abc", b"\xe6\x9d", b"."]
    for _ in range(30):
        a = [rng.choice(pieces) for _ in range(rng.randint(1, 25))]
        b = [rng.choice(pieces) for _ in range(rng.randint(1, 25))]
        assert align_dp(a, b) == groups_of(reference_dp(a, b))
        assert align_dp(a, b, band=60) == align_dp(a, b)


def test_align_dp_band_too_narrow():
    with pytest.raises(ConfigError, match="too narrow"):
        align_dp([b"a"] * 3, [b"a"] * 9, band=0)


def test_align_falls_back_to_dp_for_slow_tokenizers(smollm2, gemma3):
    class Slow:
        """A tokenizer without offsets: everything but `is_fast` comes from the wrapped fast one."""

        is_fast = False

        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            return getattr(self._inner, name)

        def __call__(self, *args, **kwargs):
            return self._inner(*args, **kwargs)

        def __len__(self):
            return len(self._inner)

    response = "Pay 12345 now, naïve 東京 🙂"
    smol, gem = encode(smollm2, PROMPT, response), encode(gemma3, PROMPT, response)
    text_a, text_b = len(smol.response_ids) - 2, len(gem.response_ids) - 1  # before <|im_end|> "\n" / <eos>
    table_a, table_b = token_bytes(smollm2), token_bytes(gemma3)
    expected = align_dp([table_a[t] for t in smol.response_ids[:text_a]], [table_b[t] for t in gem.response_ids[:text_b]])
    groups = align(Slow(smollm2), gemma3, PROMPT, response)
    assert groups == expected
    assert [i for a, _ in groups for i in a] == list(range(text_a))
    assert [j for _, b in groups for j in b] == list(range(text_b))
    simple = "The cat sat on the mat."
    assert align(Slow(smollm2), gemma3, PROMPT, simple) == align(smollm2, gemma3, PROMPT, simple)


# --- vocabulary maps ----------------------------------------------------------------------------------


def test_exact_map_of_real_vocabularies(smollm2, gemma3, tmp_path):
    forward = vocab_map(smollm2, gemma3, "exact", cache_dir=tmp_path)
    backward = vocab_map(gemma3, smollm2, "exact", cache_dir=tmp_path)
    assert forward.dtype == np.int32 and forward.shape == (len(smollm2),) and backward.shape == (len(gemma3),)

    def pivot_token(mapping, source, pivot, token):
        target = int(mapping[source.convert_tokens_to_ids(token)])
        return None if target < 0 else pivot.convert_ids_to_tokens(target)

    assert pivot_token(forward, smollm2, gemma3, "Ġhello") == "▁hello"
    assert pivot_token(backward, gemma3, smollm2, "▁hello") == "Ġhello"
    assert pivot_token(forward, smollm2, gemma3, "ĊĊ") == "\n\n"
    assert pivot_token(forward, smollm2, gemma3, "<|im_end|>") == "<eos>"  # eos -> eos
    assert pivot_token(forward, smollm2, gemma3, "<|im_start|>") == "<bos>"  # bos -> bos
    assert pivot_token(forward, smollm2, gemma3, "<|endoftext|>") == "<unk>"  # unk -> unk
    assert pivot_token(forward, smollm2, gemma3, "<repo_name>") == "<unk>"  # other specials -> pivot unk
    assert pivot_token(backward, gemma3, smollm2, "<unused0>") == "<|endoftext|>"
    assert pivot_token(backward, gemma3, smollm2, "▁東京") is None  # not one SmolLM2 token: unmapped


def test_mined_map_of_real_tokens_is_the_minimum_edit_distance(smollm2, gemma3, tmp_path):
    exact = vocab_map(smollm2, gemma3, "exact", cache_dir=tmp_path)
    source, pivot = token_bytes(smollm2), token_bytes(gemma3)
    choice_ids = sorted({piece: j for j, piece in reversed(list(enumerate(pivot))) if piece is not None}.values())
    choices = [pivot[j].decode("latin-1") for j in choice_ids]
    unmapped = [i for i in np.flatnonzero(exact < 0) if source[i] is not None][::500][:4]
    nearest = vocab_module._min_edit_distance([source[i] for i in unmapped], [pivot[j] for j in choice_ids])
    for i, k in zip(unmapped, nearest, strict=True):
        distances = [Levenshtein.distance(source[i].decode("latin-1"), c) for c in choices]
        assert k == distances.index(min(distances))  # the first minimum: the lowest pivot id


def _byte_level(pieces: list[str], specials: dict[str, str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE with exactly `pieces` (no merges beyond the listed words) and named specials."""
    vocab = {piece: i for i, piece in enumerate([*specials.values(), *pieces])}
    core = Tokenizer(models.BPE(vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, **specials)


def test_mined_ties_go_to_the_lowest_pivot_id_and_specials_by_role(tmp_path):
    source = _byte_level(["Ġ", "a", "b", "c", "d", "abc", "Ġabc", "zz"],
                         {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"})
    pivot = _byte_level(["Ġ", "a", "b", "c", "abe", "d", "e", "abd", "Ġab"], {"eos_token": "<eos>"})
    mapping = vocab_map(source, pivot, "mined", cache_dir=tmp_path)
    pivot_of = {t: pivot.convert_ids_to_tokens(int(mapping[source.convert_tokens_to_ids(t)]))
                for t in ["a", "d", "abc", "Ġabc", "zz", "<s>", "</s>", "<pad>"]}
    assert pivot_of == {
        "a": "a", "d": "d",  # exact
        "abc": "abe",  # 'abe' (id 5) and 'abd' (id 8) are both at distance 1: the lower id wins
        "Ġabc": "Ġab",
        "zz": "Ġ",  # every one-byte token is at distance 2: the lowest id, b" " (1)
        "<s>": "<eos>", "<pad>": "<eos>",  # the pivot has no bos, pad or unk: its eos
        "</s>": "<eos>",
    }
    exact = vocab_map(source, pivot, "exact", cache_dir=tmp_path)
    assert exact[source.convert_tokens_to_ids("abc")] == -1 and exact[source.convert_tokens_to_ids("a")] == 2


def test_map_is_cached_and_directional(toys, tmp_path, monkeypatch):
    source, pivot = toys["bytelevel-llama3"], toys["metaspace-zephyr"]
    forward = vocab_map(source, pivot, "mined", cache_dir=tmp_path)
    files = list(tmp_path.glob("mined-*.npy"))
    assert len(files) == 1 and (forward >= 0).all()
    written = files[0].stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached map was rebuilt")

    monkeypatch.setattr(vocab_module, "_build", no_rebuild)
    assert np.array_equal(vocab_map(source, pivot, "mined", cache_dir=tmp_path), forward)
    assert files[0].stat().st_mtime_ns == written
    monkeypatch.undo()
    backward = vocab_map(pivot, source, "mined", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("mined-*.npy"))) == 2
    assert backward.shape == (len(pivot),) and forward.shape == (len(source),)
    composed = backward[forward]  # source -> pivot -> source is not the identity: maps are directional
    assert (composed != np.arange(len(source))).any()
    assert not list(tmp_path.glob(".*tmp"))


def test_unknown_method_is_a_config_error(toys, tmp_path):
    with pytest.raises(ConfigError, match="method"):
        vocab_map(toys["unigram-chatml"], toys["wordpiece-none"], "ms", cache_dir=tmp_path)
