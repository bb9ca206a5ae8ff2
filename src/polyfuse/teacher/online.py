"""Teachers that score a student's own text while it trains (on-policy distillation). Spec:
`methods/onpolicy-distillation.md`, section 6 (a)-(c) and (f).

The student's side of a row (`StudentText`):
- sampled (on-policy): the text is the **bytes of the sampled ids** up to, not including, the stop token, cut at
  the first byte that does not complete a UTF-8 character (the tokens from there on get no teacher signal, and
  neither does the stop); each token's byte span is the running sum of its own bytes, never a re-tokenisation
  (`sampled_text`);
- written (GKD's off-policy branch): a row's `completion` through the student's own template, its spans from
  the tokenizer's offsets, as offline distillation reads it (`written_text`).

Each teacher (`OnlineTeacher`) renders the **original prompt messages with its own chat template**, appends the
text and tokenises with offsets (`polyfuse.alignment.response_spans`), and its backend (transformers in
process, a vLLM engine, an OpenAI-compatible server with vLLM's prompt log-probs) returns the top-K log-probs
at every response position (`Backend.topk_logprobs`). A teacher that shares the student's vocabulary and renders
the prompt to the same ids scores the student's own ids instead (spec 6b: ids on the wire, no re-tokenisation,
every position paired with itself, as TRL's distillation trainers). Only K ids and log-probs per position cross
the wire and sit in memory. Groups are the byte-offset walk (`align_offsets`) plus the stop pair: the student's stop token
against the teacher's end-of-turn marker, when the student stopped.

Several teachers (`Mix`): `route` (MOPD: a row column names its one teacher), `sum` (every teacher on every row,
each teacher's groups its own loss items), or a weighted mix at each position: `average`, `confident` (the
teacher with the lowest entropy) and `uncertainty` (InfiFusion-style `softmax(-H / tau)`), with H the entropy of
a teacher's renormalised top-K where its group ends. A weighted mix needs every teacher's group to cover the
same text, so its positions are the **common segmentation** (`common_groups`): the groups between the byte
boundaries that the student and every scoring teacher share (docs/design.md, "On-policy distillation").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from polyfuse.errors import DataError, UserError
from polyfuse.lazy import lazy_import
from polyfuse.objectives.distill import Groups, Projection, TeacherOutputs
from polyfuse.objectives.uld import average_weights, topk_entropy, uncertainty_weights

np = lazy_import("numpy")
torch = lazy_import("torch")
logger = logging.getLogger(__name__)

Mix = Literal["sum", "route", "average", "confident", "uncertainty"]
WEIGHTED: tuple[str, ...] = ("average", "confident", "uncertainty")
Span = tuple[int, int]
PROBE_PROMPT = [{"role": "user", "content": "Say hello."}]


@dataclass(frozen=True)
class StudentText:
    """One response the student trains on, in its own tokens: `response_ids` (position j predicts token j), the
    byte span of each in `text` (None: no text, or past the last complete character) and the index of the stop
    token the teachers' end-of-turn is compared with (None: the student did not stop, or its text is cut)."""

    prompt: Any
    prompt_ids: list[int]
    response_ids: list[int]
    spans: list[Span | None]
    text: str
    stop: int | None


def sampled_text(prompt: Any, prompt_ids: list[int], ids: list[int], stops: set[int],
                 pieces: list[bytes | None]) -> StudentText:
    """The student's sampled `ids` (ending with a stop id when it stopped) as a `StudentText`; `pieces` are the
    student's token bytes by id (`polyfuse.alignment.token_bytes`)."""
    stopped = bool(ids) and ids[-1] in stops
    body = ids[:-1] if stopped else ids
    data = b"".join(pieces[t] or b"" for t in body)
    try:
        text, complete = data.decode("utf-8"), True
    except UnicodeDecodeError as err:
        text, complete = data[: err.start].decode("utf-8"), False
    limit = len(text.encode("utf-8"))
    spans: list[Span | None] = []
    at = 0
    for token in body:
        piece = pieces[token]
        if not piece:
            spans.append(None)
            continue
        spans.append((at, at + len(piece)) if at + len(piece) <= limit else None)
        at += len(piece)
    if stopped:
        spans.append(None)
    return StudentText(prompt, list(prompt_ids), list(ids), spans, text, len(ids) - 1 if stopped and complete else None)


def byte_spans(spans: list[Span | None], text: str) -> list[Span | None]:
    """Character spans in `text` as UTF-8 byte spans."""
    offsets = np.concatenate([[0], np.cumsum([len(ch.encode("utf-8")) for ch in text], dtype=np.int64)])
    return [None if s is None else (int(offsets[s[0]]), int(offsets[s[1]])) for s in spans]


def end_of_turn(spans: list[Span | None], special: list[bool] | None = None) -> int | None:
    """The first span-less (non-text) token after the last text token, if any: the end-of-turn marker. With
    `special` (which tokens are special), only a special token is one: before an empty text, a tokenizer's lone
    word-start marker (a '▁' with no characters) is span-less too, and read as the end of turn it would tell the
    student that the teacher stops at once with probability 1."""
    last_text = max((i for i, s in enumerate(spans) if s is not None), default=-1)
    return next((i for i in range(last_text + 1, len(spans)) if spans[i] is None and (special is None or special[i])),
                None)


def turn_end(tokenizer: Any, specials: set[int]) -> int | None:
    """The id of the special token that ends an assistant turn in the tokenizer's own template, if any."""
    from polyfuse.alignment import response_spans

    encoded, spans = response_spans(tokenizer, PROBE_PROMPT, "Hello.")
    end = end_of_turn(spans, [t in specials for t in encoded.response_ids])
    return None if end is None else int(encoded.response_ids[end])


def stop_pair(student_tokenizer: Any, teacher_tokenizer: Any) -> tuple[int, int] | None:
    """(the student's end-of-turn id, the teacher's): the one special-token row of a projection W, so that where the
    teacher ends its turn its mass meets the student's stop, not the catch-all remainder; None when either has none."""
    stops = (turn_end(student_tokenizer, set(student_tokenizer.all_special_ids)),
             turn_end(teacher_tokenizer, set(teacher_tokenizer.all_special_ids)))
    return None if None in stops else stops


def written_text(tokenizer: Any, prompt: Any, completion: str) -> StudentText:
    """A written completion (a data row's) in the student's own template: spans from its offsets, the stop at its
    end-of-turn marker."""
    from polyfuse.alignment import response_spans

    encoded, spans = response_spans(tokenizer, prompt, completion)
    spans = byte_spans(spans, completion)
    return StudentText(prompt, list(encoded.prompt_ids), list(encoded.response_ids), spans, completion,
                       end_of_turn(spans))


@dataclass(frozen=True)
class TeacherAnswer:
    """A teacher's outputs over its own response tokens of one (prompt, text), with their byte spans; or, when it
    scored the student's own ids (`same_ids`: a teacher with the student's vocabulary and template), over those."""

    outputs: TeacherOutputs
    spans: list[Span | None]
    same_ids: bool = False
    end: int | None = None  # the teacher's end-of-turn token among its response tokens

    def groups(self, student: StudentText) -> Groups:
        """The student's response tokens aligned with the teacher's: the byte-offset groups, plus the stop pair; on
        the student's own ids, every position with itself (TRL's per-token pairing)."""
        from polyfuse.alignment import align_offsets

        if self.same_ids:
            return [([j], [j]) for j in range(len(student.response_ids))]
        groups = align_offsets(student.spans, self.spans)
        if student.stop is not None and self.end is not None:
            groups.append(([student.stop], [self.end]))
        return groups

    def entropy(self) -> torch.Tensor:
        """[P] the entropy of each position's top-K renormalised (InfiFusion's uncertainty, in [0, ln K])."""
        return topk_entropy(torch.from_numpy(self.outputs.topk_logprobs))


class OnlineTeacher:
    """One teacher scoring texts on demand through its backend, with its tokenizer and its projection from the
    student's vocabulary (`projection`; W = I for a shared vocabulary). `top_k`: the log-probs it returns per
    position, which its engine is started able to give (the backends' `logprob_settings`)."""

    def __init__(self, model: Any, top_k: int, student_tokenizer: Any, match: str = "exact"):
        from polyfuse.alignment.projection import projection
        from polyfuse.models import load_config
        from polyfuse.models.forward import length_limit
        from polyfuse.sampling import BACKENDS, backend_max_length, build_backend

        self.name, self.top_k = model.label, top_k
        settings = BACKENDS.get(model.backend.type).logprob_settings(model, model.backend, top_k)
        model = self.model = model.model_copy(update={"backend": settings})
        self.backend = build_backend(model)
        self.tokenizer = self.backend.tokenizer
        if not getattr(self.tokenizer, "is_fast", False):
            self.backend.close()
            raise UserError(f"teacher {self.name}: its tokenizer has no offsets (not a fast tokenizer), which "
                            "on-policy distillation aligns by")
        served = backend_max_length(model)
        self.max_length = min(served or 10**9, length_limit(load_config(model), None))
        self.specials = set(self.tokenizer.all_special_ids)
        self.projection: Projection = projection(student_tokenizer, self.tokenizer, match=match,
                                                 stop_pair=stop_pair(student_tokenizer, self.tokenizer))
        self.same_vocabulary = self.tokenizer.get_vocab() == student_tokenizer.get_vocab()
        self.skipped = 0  # rows this teacher could not score (too long, a template that rewrites the text)

    def probe(self) -> None:
        """One short request before any training: a server that is down, or that returns fewer than `top_k`
        log-probs per position, is refused now, in one line, not after the first rollout."""
        from polyfuse.models import encode

        encoded = encode(self.tokenizer, PROBE_PROMPT, "Hello.")
        answer = self.backend.topk_logprobs([(encoded.input_ids, len(encoded.prompt_ids))], self.top_k)[0]
        returned = int(np.isfinite(answer.topk_logprobs).sum(-1).min()) if len(answer.token_logps) else 0
        if answer.topk_ids.shape[1] < self.top_k or returned < self.top_k:
            raise UserError(f"teacher {self.name}: top_k {self.top_k} is larger than the {returned} log-probs per "
                            "position it returns; lower objective_args.top_k")

    def score(self, texts: list[StudentText]) -> list[TeacherAnswer | None]:
        """Each student text through the teacher's backend: its own template and tokens, or the student's own ids
        when it shares the student's vocabulary and renders the prompt to the same ids (spec 6b: ids on the wire,
        no re-tokenisation); None for a text it cannot score (longer than it takes, a chat template that rewrites
        the text), counted in `skipped`."""
        from polyfuse.alignment import response_spans
        from polyfuse.models import render_prompt

        encoded: list[tuple[list[int], int, list[int], list[Span | None], bool] | None] = []
        for text in texts:
            ids: list[int] | None = None
            if self.same_vocabulary and render_prompt(self.tokenizer, text.prompt)[0] == text.prompt_ids:
                ids, prompt_length, response, spans, same = (text.prompt_ids + text.response_ids, len(text.prompt_ids),
                                                             text.response_ids, [], True)
            else:
                try:
                    enc, char_spans = response_spans(self.tokenizer, text.prompt, text.text)
                    ids, prompt_length, response, spans, same = (enc.input_ids, len(enc.prompt_ids), enc.response_ids,
                                                                 byte_spans(char_spans, text.text), False)
                except DataError as err:
                    logger.debug("teacher %s skips a text: %s", self.name, err)
            fits = ids is not None and len(ids) <= self.max_length
            encoded.append((ids, prompt_length, response, spans, same) if fits else None)
        todo = [i for i, item in enumerate(encoded) if item is not None]
        answers = self.backend.topk_logprobs([encoded[i][:2] for i in todo], self.top_k) if todo else []
        out: list[TeacherAnswer | None] = [None] * len(texts)
        for i, answer in zip(todo, answers, strict=True):
            _, _, response, spans, same = encoded[i]
            outputs = TeacherOutputs(
                token_ids=np.asarray(response, np.int32), topk_ids=answer.topk_ids,
                topk_logits=answer.topk_logprobs,  # log-probs: logits up to each position's normaliser
                std=np.zeros(len(answer.token_logps), np.float32), token_logps=answer.token_logps,
                topk_logprobs=answer.topk_logprobs)
            out[i] = TeacherAnswer(outputs, spans, same, end_of_turn(spans, [t in self.specials for t in response]))
        self.skipped += len(texts) - len(todo)
        return out

    def close(self) -> None:
        self.backend.close()


def common_groups(groups: list[Groups | None]) -> list[Groups | None]:
    """Each teacher's groups merged up to the boundaries (student token ends) that every scoring teacher shares:
    afterwards every teacher has a group ending at exactly the same student positions, over the same text.
    Groups after the last shared boundary are dropped."""
    present = [g for g in groups if g is not None]
    if len(present) < 2:
        return groups
    shared = set.intersection(*({pivot[-1] for pivot, _ in g if pivot} for g in present))
    merged: list[Groups | None] = []
    for own in groups:
        if own is None:
            merged.append(None)
            continue
        out: Groups = []
        pivot_run: list[int] = []
        teacher_run: list[int] = []
        for pivot, teacher in own:
            pivot_run, teacher_run = pivot_run + pivot, teacher_run + teacher
            if pivot and pivot[-1] in shared:
                out.append((pivot_run, teacher_run))
                pivot_run, teacher_run = [], []
        merged.append(out)
    return merged


def mix_weights(mix: Mix, groups: list[Groups | None], answers: list[TeacherAnswer | None], length: int,
                tau: float = 1.0) -> np.ndarray:
    """[length, teachers] the weight of each teacher's group at its anchor (the group's last student token): 1
    for `sum` and `route`; for the weighted mixes, over the teachers with a group there, `1/n` (`average`), 1 for
    the lowest-entropy teacher (`confident`, ties to the first) or `softmax(-H / tau)` (`uncertainty`)."""
    mask = torch.zeros((length, len(groups)), dtype=torch.bool)
    entropy = torch.zeros((length, len(groups)))
    for t, (own, answer) in enumerate(zip(groups, answers, strict=True)):
        if own is None or answer is None:
            continue
        per_position = answer.entropy() if mix in WEIGHTED else None
        for pivot, teacher in own:
            if pivot and teacher:
                mask[pivot[-1], t] = True
                if per_position is not None:
                    entropy[pivot[-1], t] = per_position[teacher[-1]]
    if mix == "average":
        weights = average_weights(mask)
    elif mix == "uncertainty":
        weights = uncertainty_weights(entropy, mask, tau)
    elif mix == "confident":
        best = entropy.masked_fill(~mask, float("inf")).argmin(-1)
        weights = torch.nn.functional.one_hot(best, len(groups)).float() * mask
    else:
        weights = mask.float()
    return weights.numpy()
