"""Prompt and response tokenisation through each model's own chat template.

This is polyfuse's sequence convention (docs/design.md, "The sequence convention"), shared by sampling,
SFT, DPO and the log-prob engine so that every stage sees the same tokens:

- chat mode: the prompt is the template with `add_generation_prompt=True`; the response tokens are the
  ids of the full conversation after that prefix, including the end-of-turn marker and anything the
  template writes after it. Special tokens are added only if the template does not emit BOS itself.
- plain mode (no template, or the prefix property fails): `"{Role}: {content}\n\n"` per message then
  `"Assistant:"`; the response is `" " + text` plus EOS, concatenated as ids without re-tokenising.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from polyfuse.data.schemas import as_messages

TemplateMode = Literal["chat", "plain"]
_Result = TypeVar("_Result")
# Token ids the memo keeps (8 bytes each: 64 MiB), least recently used dropped first: every evaluation of a protocol
# repeats the same items (24,000 gym test items take ~1M)
_MEMO_TOKENS = 8 << 20
_memo: OrderedDict[tuple, tuple[array, array | None, TemplateMode]] = OrderedDict()
_memo_tokens = 0


@dataclass(frozen=True)
class Encoded:
    prompt_ids: list[int]
    response_ids: list[int]
    mode: TemplateMode

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids


def _plain_prompt(messages: list[dict[str, str]]) -> str:
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant:"


def _bos(tokenizer) -> list[int]:
    """The BOS id the tokenizer would add on its own, if any."""
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    return probe[:1] if len(probe) > len(bare) and probe[0] == tokenizer.bos_token_id else []


def _ids(tokenizer, text: str) -> list[int]:
    """Tokenise a rendered template: add special tokens only when the text does not start with BOS."""
    bos = tokenizer.bos_token
    adds_own = bool(bos) and text.startswith(bos)
    prefix = [] if adds_own else _bos(tokenizer)
    return prefix + tokenizer(text, add_special_tokens=False)["input_ids"]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _tokenizer_key(tokenizer) -> tuple:
    """What a tokenizer's ids depend on: its backend (vocabulary, merges, normalizer, pre-tokenizer, post-processor,
    added tokens), its class, size, chat template and BOS / EOS. The backend's hash is computed once per tokenizer
    object; the rest is read on every call, so a template set or a token added later gives a new key."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow tokenizer: no serialised form to key on, never memoised
        return ()
    digest = tokenizer.__dict__.get("_polyfuse_backend_hash")
    if digest is None:
        digest = hashlib.sha256(backend.to_str().encode()).hexdigest()
        tokenizer.__dict__["_polyfuse_backend_hash"] = digest
    return (digest, type(tokenizer).__name__, len(tokenizer), getattr(tokenizer, "chat_template", None),
            tokenizer.bos_token, tokenizer.eos_token_id)


def _memoised(tokenizer, what: tuple, compute: Callable[[], _Result]) -> _Result:
    """`compute()` once per tokenizer content and `what`: the same tokens for the same texts, so the 12,000 items
    that every model of a protocol is evaluated on are rendered and tokenised once per tokenizer, not per model
    (about a third of a gym evaluation's CPU, docs/gym.md "Budget"). Callers get their own lists."""
    global _memo_tokens
    tokenizer_key = _tokenizer_key(tokenizer)
    if not tokenizer_key or what[1] is None:
        return compute()
    key = (tokenizer_key, *what)
    found = _memo.get(key)
    if found is not None:
        _memo.move_to_end(key)
        first, second, mode = found
        return Encoded(list(first), list(second), mode) if second is not None else (list(first), mode)  # type: ignore[return-value]
    result = compute()
    first, second, mode = ((result.prompt_ids, result.response_ids, result.mode) if isinstance(result, Encoded)
                           else (result[0], None, result[1]))  # fmt: skip
    _memo[key] = (array("q", first), None if second is None else array("q", second), mode)
    _memo_tokens += len(first) + len(second or ())
    while _memo_tokens > _MEMO_TOKENS and _memo:
        _, (dropped, dropped_second, _) = _memo.popitem(last=False)
        _memo_tokens -= len(dropped) + len(dropped_second or ())
    return result


def _prompt_key(prompt: Any) -> str | None:
    """A prompt as a memo key: a text, or its messages as JSON; None (not memoised) for anything else."""
    if isinstance(prompt, str):
        return prompt
    try:
        return json.dumps(as_messages(prompt), sort_keys=True)
    except (TypeError, ValueError):
        return None


def render_prompt(tokenizer, prompt: Any, mode: TemplateMode | None = None) -> tuple[list[int], TemplateMode]:
    """Token ids that ask `tokenizer`'s model for the assistant's next turn."""
    return _memoised(tokenizer, ("prompt", _prompt_key(prompt), mode), lambda: _render_prompt(tokenizer, prompt, mode))


def _render_prompt(tokenizer, prompt: Any, mode: TemplateMode | None) -> tuple[list[int], TemplateMode]:
    messages = as_messages(prompt)
    if (mode or ("chat" if has_chat_template(tokenizer) else "plain")) == "chat":
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return _ids(tokenizer, text), "chat"
    return _bos(tokenizer) + tokenizer(_plain_prompt(messages), add_special_tokens=False)["input_ids"], "plain"


def encode(tokenizer, prompt: Any, response: str) -> Encoded:
    """Prompt ids and scored response ids of (prompt, response) under the model's own convention."""
    return _memoised(tokenizer, ("encode", _prompt_key(prompt), response), lambda: _encode(tokenizer, prompt, response))


def _encode(tokenizer, prompt: Any, response: str) -> Encoded:
    messages = as_messages(prompt)
    if has_chat_template(tokenizer):
        prompt_ids, _ = _render_prompt(tokenizer, messages, "chat")
        full = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": response}], tokenize=False, add_generation_prompt=False
        )
        full_ids = _ids(tokenizer, full)
        if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
            return Encoded(prompt_ids, full_ids[len(prompt_ids) :], "chat")
    prompt_ids, _ = _render_prompt(tokenizer, messages, "plain")
    response_ids = tokenizer(" " + response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return Encoded(prompt_ids, response_ids, "plain")


def decode_response(tokenizer, ids: list[int], stop: list[str] | None = None) -> str:
    """The text of generated ids, without special tokens and without surrounding whitespace, in both template
    modes: the plain format's leading space, and the newlines a chat template puts around a turn. With `stop`,
    the text ends before the earliest stop string (which is not kept), as vLLM and OpenAI return it."""
    return cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stop or []).strip()


def cut_at_stop(text: str, stop: list[str]) -> str:
    """`text` up to (not including) the earliest of the `stop` strings, as vLLM and OpenAI return it; applied to every
    backend's text, so that all give the same response whichever engine stopped early."""
    ends = [found for s in stop if (found := text.find(s)) >= 0]
    return text[: min(ends)] if ends else text
