"""The toy world: tasks, splits, verifiers, tokenizers, templates, HF folders, determinism, cache."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from polyfuse.config import validate
from polyfuse.data import SampleRow
from polyfuse.errors import ConfigError, UserError
from polyfuse.models import encode, render_prompt
from polyfuse.scorers import SCORERS, ToyVerifierConfig, build_scorer, exact_match
from polyfuse.toyworld import (
    DOMAINS,
    GYM_DOMAINS,
    ToyWorldConfig,
    World,
    build_world,
    reward_model_accuracy,
    world_dir,
    world_info,
)
from polyfuse.toyworld import build as build_module
from polyfuse.toyworld.tasks import SISTER_TASKS, distinct_tasks, get_domain, make_prompts, split_of

ARCHITECTURES = {"llama": "llama", "qwen3": "qwen3", "gpt2": "gpt2", "mistral": "mistral"}


def _models(world):
    """(name, folder) of every causal LM of the world."""
    return [*world.source_paths.items(), ("pivot", world.pivot_path)]


def _weights_hash(folder) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


# --- tasks, splits, verifiers -------------------------------------------------------------------


def test_gold_answers_by_hand():
    assert get_domain("arithmetic").answer((47, 8)) == "55"
    assert get_domain("arithmetic").prompt((47, 8)) == "What is 47 + 8?"
    assert get_domain("strings").answer(("KQZM",)) == "MZQK"
    assert get_domain("compare").answer((47, 82, 19)) == "82"
    assert get_domain("subtract").answer((47, 8)) == "39"
    assert get_domain("minimum").answer((47, 82, 19)) == "19"
    with pytest.raises(ConfigError, match="unknown toy task"):
        get_domain("poetry")


def test_verifier_accepts_gold_and_rejects_near_misses():
    rng = random.Random(0)
    for name, domain in DOMAINS.items():
        for params in distinct_tasks(name, "train", 50, seed=3):
            gold = domain.answer(params)
            assert exact_match(gold, gold) and exact_match(f" {gold} \n", gold)
            wrong = domain.corrupt(rng, params)
            assert wrong != gold and not exact_match(wrong, gold), (name, params, wrong)
    assert not exact_match("55 apples", "55") and not exact_match("", "55")


def test_registered_scorer_judges_toy_domains_only():
    scorer = build_scorer({"type": "toyworld"})
    assert "toyworld" in SCORERS

    def sample(domain, response, answer="82"):
        return SampleRow(id="s", prompt="p", domain=domain, answer=answer, prompt_id="p", model="m",
                         sample_index=0, response=response)

    assert scorer.applies_to(sample("compare", "82")) and not scorer.applies_to(sample("math", "82"))
    assert not scorer.applies_to(sample("compare", "82", answer=None))
    assert [v for v, _ in scorer.score([sample("compare", "82 "), sample("compare", "19")])] == [True, False]


def test_the_verifier_judges_every_domain_of_the_world_by_default():
    assert ToyVerifierConfig().domains == [*DOMAINS, *GYM_DOMAINS] == [
        "arithmetic", "strings", "compare", "addition", "reversal", "largest"]


def test_the_toyworld_verifier_is_registered_like_every_scorer():
    """Filling the scorer registry finds the verifier in `polyfuse.scorers` (one file, no side import) and loads
    nothing of the toy world, a floor above."""
    code = ("import sys; from polyfuse.scorers import SCORERS; names = SCORERS.names(); "
            "print(names, any(m.startswith('polyfuse.toyworld') for m in sys.modules))")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert found.strip() == "['choice', 'code', 'math', 'reasoning_gym', 'reward_model', 'toyworld'] False"


def test_splits_are_disjoint_and_seed_independent():
    for name in DOMAINS:
        train = {p.id for seed in (0, 1) for p in make_prompts("train", [name], 300, seed)}
        heldout = {p.id for seed in (0, 1) for p in make_prompts("heldout", [name], 100, seed)}
        assert train and heldout and not train & heldout
        assert all(split_of(t) == "heldout" for t in distinct_tasks(name, "heldout", 100, seed=5))
    draws = [DOMAINS["compare"].draw(random.Random(i)) for i in range(2000)]
    share = sum(split_of(t) == "heldout" for t in draws) / len(draws)
    assert 0.15 < share < 0.25  # HELDOUT_PERCENT = 20


def test_sister_tasks_never_use_heldout_operands():
    """A sister task with the operands of a held-out task is itself held-out, so pretraining on train
    sister tasks never shows the pivot a held-out operand set."""
    for params in distinct_tasks("arithmetic", "heldout", 50):
        assert split_of(params) == "heldout"
    for params in distinct_tasks("subtract", "train", 200):
        assert split_of(params) == "train"


def test_prompts_are_deterministic_and_distinct():
    first = make_prompts("heldout", list(DOMAINS), 30, seed=4)
    assert first == make_prompts("heldout", list(DOMAINS), 30, seed=4)
    assert first != make_prompts("heldout", list(DOMAINS), 30, seed=5)
    assert len({p.id for p in first}) == 30
    assert [sum(p.domain == d for p in first) for d in DOMAINS] == [10, 10, 10]
    assert all(exact_match(p.answer, get_domain(p.domain).answer(_params_of(p))) for p in first)
    with pytest.raises(ConfigError, match="cannot draw"):
        distinct_tasks("arithmetic", "heldout", 1000)  # only about 160 held-out sums exist


def _params_of(row):
    numbers = [int(x) for x in row.prompt.rstrip("?.").replace(",", " ").split() if x.isdigit()]
    return (row.prompt.rstrip(".").split()[-1],) if row.domain == "strings" else tuple(numbers)


# --- config ----------------------------------------------------------------------------------------


def test_config_presets_and_validation():
    default = ToyWorldConfig.preset("default")
    assert len({s.architecture for s in default.sources}) == 3
    assert len({s.tokenizer for s in default.sources}) == 3
    assert len({s.template for s in default.sources}) == 3
    assert sorted(s.specialty for s in default.sources) == sorted(DOMAINS)
    assert default.pivot.specialty is None and set(default.pivot.mixture) == set(SISTER_TASKS)
    assert default.key() != ToyWorldConfig.preset("tiny").key()
    assert default.key() != default.model_copy(update={"seed": 1}).key()
    with pytest.raises(ConfigError, match="unknown toy world preset"):
        ToyWorldConfig.preset("huge")
    data = default.model_dump()
    data["sources"][0]["mixture"] = {"poetry": 1.0}
    with pytest.raises(ConfigError, match="unknown tasks"):
        validate(ToyWorldConfig, data)


# --- the built world --------------------------------------------------------------------------------


def test_world_folders_load_with_plain_transformers(tiny_world):
    config = tiny_world.config
    recipes = {s.name: s for s in config.sources} | {"pivot": config.pivot}
    for name, folder in _models(tiny_world):
        model = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert model.config.model_type == ARCHITECTURES[recipes[name].architecture]
        assert model.config.vocab_size == len(tokenizer)
        assert model.generation_config.eos_token_id == tokenizer.eos_token_id
        ids = torch.tensor([encode(tokenizer, "What is 12 + 3?", "15").input_ids])
        assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))
    reward = AutoModelForSequenceClassification.from_pretrained(tiny_world.reward_model_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_world.reward_model_path)
    assert reward.config.num_labels == 1 and reward.config.pad_token_id == tokenizer.pad_token_id
    ids = torch.tensor([encode(tokenizer, "What is 12 + 3?", "15").input_ids])
    assert reward(input_ids=ids).logits.shape == (1, 1)


def test_world_paths_and_metadata(tiny_world):
    assert tiny_world.root == world_dir(tiny_world.config, tiny_world.root.parent)
    assert set(tiny_world.specialties.values()) == set(DOMAINS)
    meta = json.loads((tiny_world.root / "world.json").read_text())
    assert meta["key"] == tiny_world.config.key() and meta["specialties"] == tiny_world.specialties
    rows = tiny_world.prompts("train", per_domain=4, seed=2)
    assert len(rows) == 12 and {r.domain for r in rows} == set(DOMAINS)
    assert len(tiny_world.prompts("heldout", per_domain=3, domains=["strings"])) == 3
    assert World.open(tiny_world.root) == tiny_world
    with pytest.raises(UserError, match="not a toy world"):
        World.open(tiny_world.root / "pivot")


def test_tokenizers_and_templates_differ(tiny_world):
    seen = []
    for _, folder in [*_models(tiny_world), ("reward_model", tiny_world.reward_model_path)]:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        algorithm = json.loads((folder / "tokenizer.json").read_text())["model"]["type"]
        seen.append((algorithm, len(tokenizer), tokenizer.chat_template))
    sources = seen[:3]
    assert len({a for a, _, _ in sources}) == 3  # BPE, Unigram, WordPiece
    assert len({n for _, n, _ in seen}) == len(seen)  # every vocabulary size differs
    assert len({t for _, _, t in seen}) == len(seen) and None in {t for _, _, t in sources}


def test_encode_prefix_rule_and_end_of_turn_hold_for_every_model(tiny_world):
    """polyfuse's sequence convention must use each template (not the plain fallback) and end the
    response with the model's eos, which is its end-of-turn token, so generation stops."""
    rows = make_prompts("train", list(DOMAINS), 9, seed=1)
    for _, folder in [*_models(tiny_world), ("reward_model", tiny_world.reward_model_path)]:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        expected = "chat" if tokenizer.chat_template else "plain"
        for row in rows:
            encoded = encode(tokenizer, row.prompt, row.answer)
            assert encoded.mode == expected, folder
            assert render_prompt(tokenizer, row.prompt) == (encoded.prompt_ids, expected)
            assert tokenizer.eos_token_id in encoded.response_ids
            text = tokenizer.decode(encoded.response_ids[: encoded.response_ids.index(tokenizer.eos_token_id)])
            assert text.strip() == row.answer  # digits and capitals survive every tokenizer


def test_build_is_deterministic_cached_and_atomic(tiny_world, tmp_path, monkeypatch):
    """A second build (in two worker processes this time) gives the same bytes; a third is a cache hit;
    a build that dies half way leaves nothing behind."""
    config = ToyWorldConfig.preset("tiny")
    again = build_world(config.model_copy(update={"workers": 2}), cache_dir=tmp_path / "a", progress=False)
    for (_, first), (_, second) in zip(_models(tiny_world), _models(again), strict=True):
        assert _weights_hash(first) == _weights_hash(second)
    assert _weights_hash(tiny_world.reward_model_path) == _weights_hash(again.reward_model_path)
    started = time.perf_counter()
    assert build_world(config, cache_dir=tmp_path / "a", progress=False).root == again.root
    assert time.perf_counter() - started < 0.5  # cache hit: nothing is trained

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "_run_job", crash)
    with pytest.raises(KeyboardInterrupt):
        build_world(config, cache_dir=tmp_path / "b", progress=False)
    assert list((tmp_path / "b").iterdir()) == []  # no half world, no temporary folder left


def test_world_info_and_reward_model_accuracy_run(tiny_world):
    info = world_info(tiny_world, per_domain=4)
    assert list(info) == [*tiny_world.source_paths, "pivot"]
    for result in info.values():
        assert set(result.per_domain) == set(DOMAINS) and all(s.total == 4 for s in result.per_domain.values())
    ranking = reward_model_accuracy(tiny_world, per_domain=4)
    assert set(ranking) == set(DOMAINS) and all(0.0 <= v <= 1.0 for v in ranking.values())


@pytest.mark.slow
def test_every_tokenizer_algorithm_trains_reproducibly_across_processes():
    """`tokenizers` iterates hash maps in a per-process random order; the toy world's tokenizer files
    must still be identical on every build (the Unigram fallback characters used to swap ids)."""
    import subprocess
    import sys

    script = (
        "import hashlib\nfrom polyfuse.toyworld.tokenizers import train_tokenizer\n"
        "for alg, size, template in [('unigram', 384, 'chatml'), ('bpe-bytelevel', 288, 'gemma'),"
        " ('bpe-metaspace', 448, 'zephyr'), ('wordpiece', 320, 'none')]:\n"
        "    tok = train_tokenizer(alg, size, template, corpus_lines=1000)\n"
        "    print(hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest())\n"
    )
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout for _ in range(3)]
    assert len(runs[0].split()) == 4 and runs[0] == runs[1] == runs[2]
