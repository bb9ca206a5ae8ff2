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

import random
from dataclasses import dataclass
from typing import Literal

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from polyfuse.toyworld.tasks import DOMAINS, LETTERS

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


def training_corpus(seed: int, lines: int = 3000) -> list[str]:
    """Prompts of every domain (task words in lower case, so no capital runs are learnt), the plain
    format's role names, and pseudo-English filler that gives the algorithms something to merge."""
    rng = random.Random(f"corpus:{seed}")
    corpus = []
    for i in range(lines):
        domain = list(DOMAINS.values())[i % len(DOMAINS)]
        corpus.append(f"User: {domain.prompt(domain.draw(rng)).lower()}\n\nAssistant:")
        corpus.append("system user assistant model")
        words = ["".join(rng.choices(_SYLLABLES, k=rng.randint(1, 3))) for _ in range(rng.randint(4, 12))]
        corpus.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ","]))
    return corpus


def _pipeline(algorithm: Algorithm, vocab_size: int, specials: list[str], alphabet: list[str]):
    """(Tokenizer, trainer) for an algorithm; all isolate digits, capital runs and newlines."""
    if algorithm == "bpe-bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(ISOLATE, "isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(show_progress=False, 
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        return tok, trainer
    metaspace = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(prepend_scheme="first"), pre_tokenizers.Split(ISOLATE, "isolated")]
    )
    if algorithm == "bpe-metaspace":
        tok = Tokenizer(models.BPE(unk_token=specials[0]))
        trainer = trainers.BpeTrainer(show_progress=False, vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet)
        tok.decoder = decoders.Metaspace(prepend_scheme="first")
    elif algorithm == "unigram":
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(show_progress=False, 
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, unk_token=specials[0]
        )
        tok.decoder = decoders.Metaspace(prepend_scheme="first")
    else:
        tok = Tokenizer(models.WordPiece(unk_token=specials[0]))
        trainer = trainers.WordPieceTrainer(show_progress=False, vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet)
        # Word boundaries live in the "▁" marks, so "##" is dropped without inserting spaces.
        tok.decoder = decoders.Sequence([decoders.Replace("##", ""), decoders.Metaspace(prepend_scheme="first")])
    tok.pre_tokenizer = metaspace
    return tok, trainer


def train_tokenizer(
    algorithm: Algorithm, vocab_size: int, template: TemplateName, seed: int = 0, corpus_lines: int = 3000
) -> PreTrainedTokenizerFast:
    """A Hugging Face fast tokenizer trained on the toy corpus, with special tokens and chat template."""
    spec = TEMPLATES[template]
    unk = "<unk>"
    specials = list(dict.fromkeys([unk, spec.pad, spec.eos, *([spec.bos] if spec.bos else []), *spec.extra]))
    alphabet = sorted(set(LETTERS + LETTERS.lower() + "0123456789 .,?!:+-\n▁"))
    tok, trainer = _pipeline(algorithm, vocab_size, specials, alphabet)
    tok.train_from_iterator(training_corpus(seed, corpus_lines), trainer=trainer)
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
