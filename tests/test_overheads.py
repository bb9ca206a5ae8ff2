"""Overheads cut from the gym protocol's evaluations and distillation trainings (docs/gym.md, "Budget"), each
checked to give the same results: the tokenisation memo of `polyfuse.models.templates` (`encode`,
`render_prompt`: the same ids as computing them afresh, a new key when anything the ids depend on changes, an
evaluation identical with the memo warm) and the distillation collator's one-tensor dense fields."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from polyfuse.data.schemas import Message
from polyfuse.evaluation import evaluate
from polyfuse.models import ModelSpec, encode, load_tokenizer, render_prompt, templates
from polyfuse.objectives.uld import ULDObjective
from polyfuse.scorers import build_scorer
from polyfuse.trainers.distill import DistillCollator


@pytest.fixture(autouse=True)
def empty_memo(monkeypatch):
    monkeypatch.setattr(templates, "_memo", OrderedDict())
    monkeypatch.setattr(templates, "_memo_tokens", 0)


def _tokenizers(world):
    return {name: load_tokenizer(ModelSpec(path=str(path))) for name, path in
            {**world.source_paths, "pivot": world.pivot_path}.items()}


def test_memoised_ids_equal_fresh_ones_for_every_template(tiny_world):
    prompts = tiny_world.prompts("heldout", per_domain=5, seed=0)
    for name, tokenizer in _tokenizers(tiny_world).items():
        for prompt in prompts:
            for _ in range(2):  # a miss, then a hit
                assert encode(tokenizer, prompt.prompt, prompt.answer) == templates._encode(
                    tokenizer, prompt.prompt, prompt.answer), name
                assert render_prompt(tokenizer, prompt.prompt) == templates._render_prompt(tokenizer, prompt.prompt,
                                                                                            None), name
            messages = [{"role": "user", "content": prompt.prompt}]
            assert encode(tokenizer, messages, prompt.answer) == encode(tokenizer, prompt.prompt, prompt.answer)
            as_models = [Message(role="user", content=prompt.prompt)]  # pydantic messages, as PromptRow holds them
            assert encode(tokenizer, as_models, prompt.answer) == encode(tokenizer, prompt.prompt, prompt.answer)


def test_callers_get_their_own_lists(tiny_world):
    tokenizer = load_tokenizer(ModelSpec(path=str(tiny_world.pivot_path)))
    first = encode(tokenizer, "2+2=", "4")
    expected = list(first.input_ids)
    first.prompt_ids.append(-1)
    first.response_ids.clear()
    ids, _ = render_prompt(tokenizer, "2+2=")
    ids.append(-1)
    assert encode(tokenizer, "2+2=", "4").input_ids == expected
    assert render_prompt(tokenizer, "2+2=")[0] == templates._render_prompt(tokenizer, "2+2=", None)[0]


def test_the_memo_keeps_at_most_its_token_budget(tiny_world, monkeypatch):
    tokenizer = load_tokenizer(ModelSpec(path=str(tiny_world.pivot_path)))
    prompts = tiny_world.prompts("heldout", per_domain=5, seed=0)
    monkeypatch.setattr(templates, "_MEMO_TOKENS", 100)
    for prompt in prompts:
        assert encode(tokenizer, prompt.prompt, prompt.answer) == templates._encode(tokenizer, prompt.prompt, prompt.answer)
        kept = sum(len(a) + len(b if b is not None else ()) for a, b, _ in templates._memo.values())
        assert kept == templates._memo_tokens <= 100 and templates._memo
    for prompt in prompts:  # the first ones were dropped: computed again, the same ids
        assert encode(tokenizer, prompt.prompt, prompt.answer) == templates._encode(tokenizer, prompt.prompt, prompt.answer)


def test_a_changed_template_or_vocabulary_is_a_new_key(tiny_world):
    tokenizer = load_tokenizer(ModelSpec(path=str(tiny_world.pivot_path)))
    before = encode(tokenizer, "2+2=", "4")
    tokenizer.chat_template = None  # plain mode from now on
    plain = encode(tokenizer, "2+2=", "4")
    assert plain.mode == "plain" and plain == templates._encode(tokenizer, "2+2=", "4") and plain != before
    assert tokenizer.add_tokens(["2+2="], special_tokens=True) == 1  # the prompt is one new token now
    added = encode(tokenizer, "2+2=", "4")
    assert added == templates._encode(tokenizer, "2+2=", "4") and added != plain


@pytest.mark.parametrize("warm", [False, True])
def test_an_evaluation_is_identical_with_the_memo(tiny_world, warm, monkeypatch):
    prompts = tiny_world.prompts("heldout", per_domain=6, seed=0)
    spec = ModelSpec(path=str(tiny_world.pivot_path))
    scorers = [build_scorer({"type": "toyworld"})]
    if warm:  # another model with this tokenizer was evaluated on these items in this process
        evaluate(spec, prompts, scorers, max_new_tokens=8, quiet=True)
        assert templates._memo
    memoised = evaluate(spec, prompts, scorers, max_new_tokens=8, quiet=True)
    monkeypatch.setattr(templates, "_memo", OrderedDict())
    monkeypatch.setattr(templates, "_tokenizer_key", lambda tokenizer: ())  # no memo: every text tokenised afresh
    fresh = evaluate(spec, prompts, scorers, max_new_tokens=8, quiet=True)
    assert not templates._memo
    assert [r.model_dump() for r in memoised.records] == [r.model_dump() for r in fresh.records]
    assert all(r.bpb is not None for r in fresh.records)


def test_the_collators_dense_fields_are_the_per_row_tensors_concatenated():
    """The collator's dense target fields, built as one tensor, equal (values, dtype, shape) the concatenation of
    one tensor per row that they replace, for ULD's fields on rows of 0 to 5 response positions."""
    generator = torch.Generator().manual_seed(0)
    fields = ULDObjective.target_fields
    teachers, k = 3, 10
    features = []
    for prompt, response in [(2, 3), (4, 0), (1, 5), (3, 1)]:
        ids = torch.randint(3, 50, (prompt + response,), generator=generator).tolist()
        features.append({
            "completion_input_ids": ids, "completion_prompt_length": prompt,
            "teacher_probs": torch.rand((response, teachers, k), generator=generator, dtype=torch.float64).tolist(),
            "teacher_mask": (torch.rand((response, teachers), generator=generator) > 0.3).tolist(),
            "teacher_entropy": torch.rand((response, teachers), generator=generator, dtype=torch.float64).tolist(),
        })
    batch = DistillCollator(0, ("completion",), fields=dict(fields))([{**f} for f in features])
    for name, spec in fields.items():
        expected = torch.cat([torch.tensor(f[name], dtype=spec.dtype) for f in features])
        assert batch[name].dtype == expected.dtype and batch[name].shape == expected.shape, name
        assert expected.shape[0] == 9, name  # every response position, in row order
        assert torch.equal(batch[name], expected), name
