"""Tokenizers trained in-process, each with its own algorithm, vocabulary size and chat template.

Every tokenizer isolates digits, runs of capitals (the task words) and newlines before its model
runs, so tiny models see numbers and task letters one symbol at a time and a chat template's prefix
always tokenises the same with or without the response after it (polyfuse's prefix rule). The rest
of the text (instruction words, filler) is split by the algorithm itself, which is where the
tokenizers differ: byte-level BPE (Llama-3 / GPT-2 style), Metaspace BPE (SentencePiece style),
Unigram and WordPiece.

The eos token is the template's end-of-turn token, so generation stops at the end of the answer.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Literal

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from polyfuse.toyworld.tasks import DOMAINS, LETTERS, get_domain

Algorithm = Literal["bpe-bytelevel", "bpe-metaspace", "unigram", "wordpiece"]
TemplateName = Literal["llama3", "chatml", "gemma", "zephyr", "none"]

# Digits, every capital next to another capital, and newlines become pre-tokens of their own.
ISOLATE = Regex(r"\d|[A-Z](?=[A-Z])|(?<=[A-Z])[A-Z]|\n")


@dataclass(frozen=True)
class Template:
    """Special tokens and Jinja chat template of one model family; `chat_template=None` means the
    model has no template and polyfuse uses its plain `User: ... Assistant:` format."""

    bos: str | None
    eos: str
    pad: str
    extra: tuple[str, ...]
    chat_template: str | None


TEMPLATES: dict[str, Template] = {
    "llama3": Template(
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad="<|finetune_right_pad_id|>",
        extra=("<|start_header_id|>", "<|end_header_id|>"),
        chat_template=(
            "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
            "{{ m['content'] }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
        ),
    ),
    "chatml": Template(
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        extra=("<|im_start|>",),
        chat_template=(
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        ),
    ),
    "gemma": Template(
        bos="<bos>",
        eos="<end_of_turn>",
        pad="<pad>",
        extra=("<start_of_turn>",),
        chat_template=(
            "{{ bos_token }}{% for m in messages %}<start_of_turn>"
            "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
            "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
        ),
    ),
    "zephyr": Template(
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        extra=("<|system|>", "<|user|>", "<|assistant|>"),
        chat_template=(
            "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
        ),
    ),
    "none": Template(bos=None, eos="<|endoftext|>", pad="<|endoftext|>", extra=(), chat_template=None),
}

_SYLLABLES = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"]


def training_corpus(seed: int, lines: int = 3000, domains: list[str] | None = None) -> list[str]:
    """Every symbol on its own, role names, prompts of every domain (default: the default world's) in the
    plain format, and pseudo-English filler that gives the algorithms something to merge."""
    rng = random.Random(f"corpus:{seed}")
    tasks = [get_domain(name) for name in domains] if domains else list(DOMAINS.values())
    corpus = [f"{LETTERS} {LETTERS.lower()} 0123456789 .,?!:+-"] * 20 + ["system user assistant model"] * lines
    for i in range(lines):
        domain = tasks[i % len(tasks)]
        corpus.append(f"User: {domain.prompt(domain.draw(rng))}\n\nAssistant:")
        words = ["".join(rng.choices(_SYLLABLES, k=rng.randint(1, 3))) for _ in range(rng.randint(4, 12))]
        corpus.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ","]))
    return corpus


def _metaspace() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(prepend_scheme="first"), pre_tokenizers.Split(ISOLATE, "isolated")]
    )


def _canonical_unigram(pieces: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Unigram pieces in an order that does not depend on the trainer's hash-map order.

    The trainer keeps every character it pruned as a fallback piece, scored just below the lowest real piece
    and 1e-4 apart, in hash-map order: the same characters get different scores (and ids) on every build.
    Below the lowest score that no single character shares, pieces are put in string order (single
    characters first) and given that tail's scores in descending order; above it, by score then string."""
    single_scores = {score for piece, score in pieces if len(piece) == 1}
    floor = min((score for piece, score in pieces if len(piece) > 1 and score not in single_scores), default=float("inf"))
    head = sorted([p for p in pieces if p[1] >= floor], key=lambda p: (-p[1], p[0]))
    tail = [p for p in pieces if p[1] < floor]
    names = sorted((piece for piece, _ in tail), key=lambda piece: (len(piece) > 1, piece))
    return head + list(zip(names, sorted((score for _, score in tail), reverse=True), strict=True))


def _train(algorithm: Algorithm, vocab_size: int, specials: list[str], corpus: list[str]) -> Tokenizer:
    """The bare `tokenizers` pipeline of one algorithm, trained on `corpus`, reproducibly.

    `tokenizers`' Unigram and WordPiece trainers are not bit-for-bit reproducible (parallel float
    sums, hash-map order), so Unigram scores are rounded and re-sorted, and the WordPiece vocabulary
    is derived from a (reproducible) BPE one: each BPE piece as a word start and as a "##" suffix."""
    alphabet = sorted(set(LETTERS + LETTERS.lower() + "0123456789.,?!:+-\n▁"))
    common = dict(special_tokens=specials, show_progress=False)
    if algorithm == "bpe-bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(ISOLATE, "isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), **common)
        tok.train_from_iterator(corpus, trainer=trainer)
        return tok
    if algorithm == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = _metaspace()
        # No initial alphabet: the trainer would append unseen symbols in hash-map order.
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, unk_token=specials[0], **common)
        tok.train_from_iterator(corpus, trainer=trainer)
        data = json.loads(tok.to_str())
        pieces = [(piece, round(score, 6)) for piece, score in data["model"]["vocab"][len(specials) :]]
        data["model"]["vocab"][len(specials) :] = _canonical_unigram(pieces)
        tok = Tokenizer.from_str(json.dumps(data))
        tok.decoder = decoders.Metaspace(prepend_scheme="first")
        return tok
    size = vocab_size if algorithm == "bpe-metaspace" else (vocab_size + len(specials)) // 2
    tok = Tokenizer(models.BPE(unk_token=specials[0]))
    tok.pre_tokenizer = _metaspace()
    tok.train_from_iterator(corpus, trainer=trainers.BpeTrainer(vocab_size=size, initial_alphabet=alphabet, **common))
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    if algorithm == "bpe-metaspace":
        return tok
    pieces = sorted(tok.get_vocab().items(), key=lambda item: item[1])[len(specials) :]
    vocab = {token: i for i, token in enumerate(specials)}
    for piece, _ in pieces:
        for token in (piece,) if piece.startswith("▁") else (piece, "##" + piece):
            vocab.setdefault(token, len(vocab))
    wordpiece = Tokenizer(models.WordPiece(vocab, unk_token=specials[0]))
    wordpiece.pre_tokenizer = _metaspace()
    # Word boundaries live in the "▁" marks, so "##" is dropped without inserting spaces.
    wordpiece.decoder = decoders.Sequence([decoders.Replace("##", ""), decoders.Metaspace(prepend_scheme="first")])
    wordpiece.add_special_tokens(specials)
    return wordpiece


def train_tokenizer(
    algorithm: Algorithm, vocab_size: int, template: TemplateName, seed: int = 0, corpus_lines: int = 3000,
    domains: list[str] | None = None,
) -> PreTrainedTokenizerFast:
    """A Hugging Face fast tokenizer trained on the toy corpus (prompts of `domains`, default the default
    world's), with special tokens and chat template."""
    spec = TEMPLATES[template]
    unk = "<unk>"
    specials = list(dict.fromkeys([unk, spec.pad, spec.eos, *([spec.bos] if spec.bos else []), *spec.extra]))
    tok = _train(algorithm, vocab_size, specials, training_corpus(seed, corpus_lines, domains))
    if spec.bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A", pair=f"{spec.bos} $A $B", special_tokens=[(spec.bos, tok.token_to_id(spec.bos))]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=spec.bos,
        eos_token=spec.eos,
        pad_token=spec.pad,
        unk_token=unk,
        additional_special_tokens=list(spec.extra),
    )
    fast.chat_template = spec.chat_template
    return fast
