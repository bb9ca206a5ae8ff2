"""The toy world's task domains: prompt generators with gold answers and disjoint splits (the answers are
checked by the `toyworld` verifier, `polyfuse.scorers.toyworld`).

Each domain is small enough for a tiny model to learn on a CPU in seconds, yet a model that has not
learnt it scores near zero:

- `arithmetic`: "What is 47 + 8?" -> "55" (a 2-digit and a 1-digit operand: carries matter; two
  2-digit operands take tiny models thousands of steps, too slow for a CPU build),
- `strings`: "Reverse the letters of KQZM." -> "MZQK" (3-5 random capitals),
- `compare`: "Which number is largest: 47, 82, 19?" -> "82" (three 2-digit numbers).

Three sister tasks (`SISTER_TASKS`: subtraction, copying, minimum) share the formats but not the
answers; only the pivot is trained on them.

The fusion gym's domains (`GYM_DOMAINS`, with their sister tasks `GYM_SISTER_TASKS`) are larger
versions of the same three families, with parameter spaces of 10^5 and more, drawn by difficulty level
(uniform over levels), so that a model trained on the lower levels only is right on part of a domain:

- `addition`: "What is 3471 + 8?" (levels 1-4: a number of 2-5 digits plus 1-9),
- `reversal`: "Reverse the letters of KQZMAB." (levels 1-10: 3-12 random capitals),
- `largest`: "Which number is largest: 347, 58, 912, 400?" (levels 1-4: 3-6 distinct numbers of 10-999).

Task words are random capitals, and every tokenizer of the world isolates digits and runs of
capitals, so each model sees numbers and task words one symbol at a time.

A task belongs to the held-out split when a hash of its parameters (not its wording) falls under
`HELDOUT_PERCENT`: the split does not depend on any seed, so train and held-out prompts never overlap
whichever seeds generate them, and a sister task never shows the pivot the operands of a held-out task.
The gym's domains split three ways by the same hash: `test` is what the two-way scheme calls held-out
(the lowest `HELDOUT_PERCENT` buckets), `validation` the next `VALIDATION_PERCENT`, `train` the rest;
for them "heldout" names the test split.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from polyfuse.data import PromptRow, stable_id
from polyfuse.errors import ConfigError

Split = Literal["train", "heldout", "validation", "test"]
TWO_WAY: tuple[Split, ...] = ("train", "heldout")
THREE_WAY: tuple[Split, ...] = ("train", "validation", "test")
HELDOUT_PERCENT = 20
VALIDATION_PERCENT = 10  # three-way domains only
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
Params = tuple


@dataclass(frozen=True)
class Domain:
    """One task family. `draw` picks canonical parameters; `prompt` and `answer` render them;
    `corrupt` gives a plausible wrong answer (reward-model negatives, verifier tests)."""

    name: str
    draw: Callable[[random.Random], Params]
    prompt: Callable[[Params], str]
    answer: Callable[[Params], str]
    corrupt: Callable[[random.Random, Params], str] | None = None
    three_way: bool = False  # train / validation / test (the gym) instead of train / heldout
    draw_at: Callable[[random.Random, int], Params] | None = None  # the gym: a task of difficulty level 1..levels
    levels: int = 1

    def draw_within(self, rng: random.Random, reach: int | None = None) -> Params:
        """A task of a uniformly drawn level up to `reach` (None: any level; `draw` itself)."""
        if reach is None or self.draw_at is None:
            return self.draw(rng)
        return self.draw_at(rng, rng.randint(1, min(reach, self.levels)))

    @property
    def splits(self) -> tuple[Split, ...]:
        return THREE_WAY if self.three_way else TWO_WAY

    def split_of(self, params: Params) -> Split:
        """The split of a task of this domain, by the hash of its parameters alone."""
        bucket = _bucket(params)
        if not self.three_way:
            return "heldout" if bucket < HELDOUT_PERCENT else "train"
        return "test" if bucket < HELDOUT_PERCENT else "validation" if bucket < HELDOUT_PERCENT + VALIDATION_PERCENT else "train"

    def resolve_split(self, split: str) -> Split:
        """`split` as this domain names it ("heldout" is the test split of a three-way domain)."""
        if self.three_way and split == "heldout":
            return "test"
        if split not in self.splits:
            raise ConfigError(f"split {split!r}: the toy domain {self.name!r} has the splits {', '.join(self.splits)}")
        return split  # type: ignore[return-value]


def _bucket(params: Params) -> int:
    """0-99 from a hash of the parameters alone (not the wording, not any seed)."""
    digest = hashlib.sha1(repr(params).encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100


def _sum_operands(rng: random.Random) -> Params:
    return (rng.randint(10, 99), rng.randint(1, 9))


def _three_numbers(rng: random.Random) -> Params:
    return tuple(rng.sample(range(10, 100), 3))


def _word(rng: random.Random) -> Params:
    return ("".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5))),)


# The gym's tasks by difficulty level (1 = easiest); a domain draws its level uniformly.
def _operands_at(rng: random.Random, level: int) -> Params:
    """A number of level + 1 digits plus a one-digit number."""
    return (rng.randint(10**level, 10 ** (level + 1) - 1), rng.randint(1, 9))


def _numbers_at(rng: random.Random, level: int) -> Params:
    """level + 2 distinct numbers of 10-999."""
    return tuple(rng.sample(range(10, 1000), level + 2))


def _word_at(rng: random.Random, level: int) -> Params:
    """level + 2 random capitals."""
    return ("".join(rng.choice(LETTERS) for _ in range(level + 2)),)


def _gym_domain(name: str, draw_at: Callable[[random.Random, int], Params], levels: int, prompt: Callable[[Params], str],
                answer: Callable[[Params], str], corrupt: Callable[[random.Random, Params], str] | None = None) -> Domain:
    return Domain(name, lambda rng: draw_at(rng, rng.randint(1, levels)), prompt, answer, corrupt, three_way=True,
                  draw_at=draw_at, levels=levels)


def _list_prompt(question: str) -> Callable[[Params], str]:
    return lambda p: f"Which number is {question}: {', '.join(map(str, p))}?"


def _near_number(rng: random.Random, gold: str) -> str:
    """A near miss: off by a little, one digit changed, or the digits reversed."""
    while True:
        kind = rng.randrange(3)
        if kind == 0:
            wrong = str(max(0, int(gold) + rng.choice([-10, -2, -1, 1, 2, 10])))
        elif kind == 1:
            pos = rng.randrange(len(gold))
            wrong = str(int(gold[:pos] + str(rng.randrange(10)) + gold[pos + 1 :]))
        else:
            wrong = str(int(gold[::-1]))
        if wrong != gold:
            return wrong


def _wrong_sum(rng: random.Random, params: Params) -> str:
    return _near_number(rng, str(sum(params)))


def _wrong_max(rng: random.Random, params: Params) -> str:
    """Half the time another number of the list (the usual mistake), else a near miss."""
    gold = max(params)
    if rng.random() < 0.5:
        return str(rng.choice([p for p in params if p != gold]))
    return _near_number(rng, str(gold))


def _wrong_reversal(rng: random.Random, params: Params) -> str:
    """The word as given, two letters swapped, one letter changed, dropped or added."""
    gold = params[0][::-1]
    while True:
        kind, i = rng.randrange(5), rng.randrange(len(gold))
        if kind == 0:
            wrong = params[0]
        elif kind == 1:
            j = rng.randrange(len(gold))
            chars = list(gold)
            chars[i], chars[j] = chars[j], chars[i]
            wrong = "".join(chars)
        elif kind == 2:
            wrong = gold[:i] + rng.choice(LETTERS) + gold[i + 1 :]
        elif kind == 3:
            wrong = gold[:i] + gold[i + 1 :]
        else:
            wrong = gold[:i] + rng.choice(LETTERS) + gold[i:]
        if wrong != gold:
            return wrong


def _domains(*domains: Domain) -> dict[str, Domain]:
    return {d.name: d for d in domains}


DOMAINS = _domains(
    Domain("arithmetic", _sum_operands, lambda p: f"What is {p[0]} + {p[1]}?", lambda p: str(p[0] + p[1]), _wrong_sum),
    Domain("strings", _word, lambda p: f"Reverse the letters of {p[0]}.", lambda p: p[0][::-1], _wrong_reversal),
    Domain("compare", _three_numbers, lambda p: "Which number is largest: {}, {}, {}?".format(*p),
           lambda p: str(max(p)), _wrong_max),
)

# Sister tasks: the same formats and building blocks (reading digits, copying letters, picking one of
# three numbers) with different answers. The pivot is pretrained on them, so it starts near zero on
# every domain yet learns the real tasks from a few hundred fine-tuning steps: fusion supplies those.
SISTER_TASKS = _domains(
    Domain("subtract", _sum_operands, lambda p: f"What is {p[0]} - {p[1]}?", lambda p: str(p[0] - p[1])),
    Domain("copy", _word, lambda p: f"Repeat the letters of {p[0]}.", lambda p: p[0]),
    Domain("minimum", _three_numbers, lambda p: "Which number is smallest: {}, {}, {}?".format(*p),
           lambda p: str(min(p))),
)


# The fusion gym's domains: the same families, larger parameter spaces and a spread of difficulty, split
# three ways. Their sister tasks pretrain the gym's pivot as SISTER_TASKS do the default one.
GYM_DOMAINS = _domains(
    _gym_domain("addition", _operands_at, 4, lambda p: f"What is {p[0]} + {p[1]}?", lambda p: str(p[0] + p[1]), _wrong_sum),
    _gym_domain("reversal", _word_at, 10, lambda p: f"Reverse the letters of {p[0]}.", lambda p: p[0][::-1], _wrong_reversal),
    _gym_domain("largest", _numbers_at, 4, _list_prompt("largest"), lambda p: str(max(p)), _wrong_max),
)
GYM_SISTER_TASKS = _domains(
    _gym_domain("subtraction", _operands_at, 4, lambda p: f"What is {p[0]} - {p[1]}?", lambda p: str(p[0] - p[1])),
    _gym_domain("repetition", _word_at, 10, lambda p: f"Repeat the letters of {p[0]}.", lambda p: p[0]),
    _gym_domain("smallest", _numbers_at, 4, _list_prompt("smallest"), lambda p: str(min(p))),
)
ALL_TASKS = {**DOMAINS, **SISTER_TASKS, **GYM_DOMAINS, **GYM_SISTER_TASKS}


def get_domain(name: str) -> Domain:
    """A domain or sister task (of either world) by name."""
    found = ALL_TASKS.get(name)
    if found is None:
        raise ConfigError(f"unknown toy task {name!r}; expected one of: {', '.join(ALL_TASKS)}")
    return found


def split_of(params: Params) -> Split:
    """"heldout" for about `HELDOUT_PERCENT`% of all tasks, by a hash of the parameters alone (the
    two-way scheme of the default world's domains)."""
    return "heldout" if _bucket(params) < HELDOUT_PERCENT else "train"


def draw(domain: Domain, split: Split, rng: random.Random, reach: int | None = None) -> Params:
    """Parameters of one task of `split` (rejection sampling: about 1 in 5 draws is held-out), of a level up to
    `reach` (a gym domain; None: any)."""
    while True:
        params = domain.draw_within(rng, reach)
        if domain.split_of(params) == split:
            return params


def make_row(domain: Domain, params: Params) -> PromptRow:
    prompt = domain.prompt(params)
    return PromptRow(id=stable_id(domain.name, prompt), prompt=prompt, domain=domain.name, answer=domain.answer(params))


def distinct_tasks(name: str, split: Split, count: int, seed: int = 0) -> list[Params]:
    """`count` distinct tasks of one domain and split, in drawing order, from an RNG seeded by
    (seed, split, domain)."""
    domain = get_domain(name)
    split = domain.resolve_split(split)
    rng = random.Random(f"{seed}:{split}:{name}")
    seen: dict[Params, None] = {}  # a dict keeps the drawing order
    for _ in range(50 * count + 1000):
        if len(seen) == count:
            return list(seen)
        seen[draw(domain, split, rng)] = None
    raise ConfigError(f"{name}: cannot draw {count} distinct {split} prompts (only {len(seen)} found); ask for fewer")


def make_prompts(split: Split, domains: list[str], n: int, seed: int = 0) -> list[PromptRow]:
    """`n` distinct prompts of `split`, spread evenly over `domains` (the first domains get the remainder)."""
    rows: list[PromptRow] = []
    for k, name in enumerate(domains):
        count = n // len(domains) + (1 if k < n % len(domains) else 0)
        rows.extend(make_row(get_domain(name), params) for params in distinct_tasks(name, split, count, seed))
    return rows
