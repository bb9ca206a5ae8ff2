"""The fusion gym (toy world v2): three-way splits, presets and cache keys, the merging models, the gold texts,
the premise report, the gym recipes."""

from __future__ import annotations

import hashlib
import json
import random
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from polyfuse.config import validate
from polyfuse.data import SFTRow
from polyfuse.data.io import read_rows
from polyfuse.errors import ConfigError, UserError
from polyfuse.models import encode
from polyfuse.scorers import ToyVerifierConfig
from polyfuse.toyworld import GYM_DOMAINS, ModelRecipe, ToyWorldConfig, World, build_world, gym_report
from polyfuse.toyworld import build as build_module
from polyfuse.toyworld import train as train_module
from polyfuse.toyworld.info import task_vector
from polyfuse.toyworld.tasks import GYM_SISTER_TASKS, distinct_tasks, get_domain, make_prompts, split_of
from polyfuse.toyworld.tokenizers import train_tokenizer

# The cache keys of the default worlds before the gym existed (commit 6cf35f5): a world cached then is found again.
KEYS_BEFORE_THE_GYM = {("default", 0): "d1519a5fc4d16a04", ("default", 1): "8f7cd5fdebce0efa",
                       ("tiny", 0): "f21203796a540091", ("tiny", 1): "d099f851539f139d"}


@pytest.fixture(scope="module")
def gym_tiny(tmp_path_factory):
    """The `gym-tiny` world: sources, pivot, reward model, merging base, specialists, multi-task, gold texts
    (a few steps each; seconds)."""
    return build_world(ToyWorldConfig.preset("gym-tiny"), cache_dir=tmp_path_factory.mktemp("gym"), progress=False)


def _hashes(world: World) -> dict[str, str]:
    return {str(f.relative_to(world.root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(world.root.rglob("*")) if f.is_file() and f.name != "world.json"}


def _answer_by_hand(domain: str, prompt: str) -> str:
    if domain == "addition":
        a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", prompt).groups())
        return str(a + b)
    if domain == "reversal":
        return re.fullmatch(r"Reverse the letters of ([A-Z]+)\.", prompt).group(1)[::-1]
    return str(max(map(int, re.fullmatch(r"Which number is largest: ([\d, ]+)\?", prompt).group(1).split(", "))))


# --- presets and keys -------------------------------------------------------------------------------


def test_default_and_tiny_keys_are_those_before_the_gym():
    for (preset, seed), key in KEYS_BEFORE_THE_GYM.items():
        assert ToyWorldConfig.preset(preset).model_copy(update={"seed": seed}).key() == key


def test_gym_presets_meet_the_layout_of_the_issue():
    gym = ToyWorldConfig.preset("gym")
    assert gym.domains == list(GYM_DOMAINS) == ["addition", "reversal", "largest"]
    assert len({s.architecture for s in gym.sources}) == len({s.tokenizer for s in gym.sources}) == len(
        {s.template for s in gym.sources}) == 3
    specialties = [s.specialty for s in gym.sources]
    assert sorted(specialties) == sorted(GYM_DOMAINS)
    for source in gym.sources:  # a second domain in every source's mixture, a different one each
        assert len([d for d, w in source.mixture.items() if w > 0]) == 2
    seconds = [next(d for d in s.mixture if d != s.specialty) for s in gym.sources]
    assert sorted(seconds) == sorted(GYM_DOMAINS)  # so every domain is covered by two sources
    assert set(gym.pivot.mixture) <= set(GYM_SISTER_TASKS) | set(GYM_DOMAINS)
    assert gym.key() != ToyWorldConfig.preset("gym-tiny").key() != gym.model_copy(update={"seed": 1}).key()
    with pytest.raises(ConfigError, match="unknown domains"):
        validate(ToyWorldConfig, {**gym.model_dump(), "domains": ["arithmetic"]})
    with pytest.raises(ConfigError, match="unknown domains"):
        validate(ToyWorldConfig, {**ToyWorldConfig.preset("default").model_dump(), "domains": ["addition"]})


def test_the_verifier_judges_the_gym_domains():
    assert set(GYM_DOMAINS) <= set(ToyVerifierConfig().domains)


# --- tasks and splits ---------------------------------------------------------------------------------


def test_gym_gold_answers_by_hand():
    assert get_domain("addition").prompt((3471, 58)) == "What is 3471 + 58?"
    assert get_domain("addition").answer((3471, 58)) == "3529"
    assert get_domain("reversal").answer(("KQZMAB",)) == "BAMZQK"
    assert get_domain("largest").prompt((347, 58, 912, 400)) == "Which number is largest: 347, 58, 912, 400?"
    assert get_domain("largest").answer((347, 58, 912, 400)) == "912"
    assert get_domain("subtraction").answer((47, 58)) == "-11"
    assert get_domain("smallest").answer((347, 58, 912)) == "58"
    assert get_domain("repetition").answer(("KQZ",)) == "KQZ"


def test_three_way_splits_are_large_disjoint_and_seed_independent():
    """>= 4,000 test and >= 1,000 validation items per domain, no parameters shared between splits, the same
    split whatever the seed; "heldout" names the test split."""
    for name in GYM_DOMAINS:
        domain = get_domain(name)
        test, validation = set(distinct_tasks(name, "test", 4000)), set(distinct_tasks(name, "validation", 1000))
        train = {p for seed in (0, 1) for p in distinct_tasks(name, "train", 2000, seed=seed)}
        assert len(test) == 4000 and len(validation) == 1000 and len(train) > 2000
        assert not test & validation and not train & (test | validation)
        assert {domain.split_of(p) for p in test} == {"test"} and {domain.split_of(p) for p in validation} == {"validation"}
        assert set(distinct_tasks(name, "test", 300, seed=7)) <= {p for p in distinct_tasks(name, "test", 300, seed=7)
                                                                  if domain.split_of(p) == "test"}
        assert make_prompts("heldout", [name], 10, seed=3) == make_prompts("test", [name], 10, seed=3)
        assert all(row.answer == _answer_by_hand(name, row.prompt) for row in make_prompts("validation", [name], 50))
    draws = [GYM_DOMAINS["largest"].draw(random.Random(i)) for i in range(4000)]
    shares = [sum(GYM_DOMAINS["largest"].split_of(t) == s for t in draws) / len(draws) for s in ("test", "validation")]
    assert 0.17 < shares[0] < 0.23 and 0.08 < shares[1] < 0.12  # HELDOUT_PERCENT 20, VALIDATION_PERCENT 10
    # the test split is the default worlds' held-out rule: one hash, the same buckets
    assert all((split_of(t) == "heldout") == (GYM_DOMAINS["largest"].split_of(t) == "test") for t in draws)


def test_levels_and_reach():
    """A gym domain draws its difficulty level uniformly; a recipe's `reach` keeps its training data at or below
    a level, so a source is right on part of a domain by construction."""
    rng = random.Random(0)
    assert [len(str(get_domain("addition").draw_at(rng, level)[0])) for level in (1, 2, 3, 4)] == [2, 3, 4, 5]
    assert [len(get_domain("reversal").draw_at(rng, level)[0]) for level in (1, 10)] == [3, 12]
    assert [len(get_domain("largest").draw_at(rng, level)) for level in (1, 4)] == [3, 6]
    lengths = [len(get_domain("reversal").draw_within(rng)[0]) for _ in range(2000)]
    assert set(lengths) == set(range(3, 13)) and 0.07 < lengths.count(12) / 2000 < 0.13
    assert {len(get_domain("reversal").draw_within(rng, 4)[0]) for _ in range(500)} == {3, 4, 5, 6}
    gym = ToyWorldConfig.preset("gym")
    source = next(s for s in gym.sources if s.name == "qwen-reversal")
    rows = build_module._training_rows(gym, source)
    for row in rows:
        word = re.fullmatch(r"Reverse the letters of ([A-Z]+)\.", row.prompt)
        if word:
            assert len(word.group(1)) <= source.reach["reversal"] + 2
    assert {r.domain for r in rows} == set(source.mixture)
    # the merging base stops below the top levels; its fine-tunes see every level (what is left to learn)
    jobs = {job.recipe.name: job.recipe for job in build_module._jobs(gym)}
    for name, longest in [("base", gym.gym.base.reach["reversal"] + 2), ("specialist-reversal", 12), ("multitask", 12)]:
        words = [re.fullmatch(r"Reverse the letters of ([A-Z]+)\.", row.prompt)
                 for row in build_module._training_rows(gym, jobs[name])]
        assert max(len(w.group(1)) for w in words if w) == longest
    bad = gym.sources[0].model_dump()
    for reach, message in [({"strings": 1}, "strings"), ({"largest": 5}, "largest"), ({"largest": 0}, "largest")]:
        with pytest.raises(ConfigError, match=f"reach: .*{message}.*expected gym tasks"):
            validate(ModelRecipe, {**bad, "reach": reach})


def test_sister_tasks_share_the_split_of_their_operands():
    """Pretraining the pivot on train sister tasks never shows it the operands of a test or validation task."""
    for params in distinct_tasks("subtraction", "train", 300):
        assert get_domain("addition").split_of(params) == "train"


def test_split_names_are_checked_per_domain():
    with pytest.raises(ConfigError, match="'arithmetic' has the splits train, heldout"):
        make_prompts("validation", ["arithmetic"], 3)
    with pytest.raises(ConfigError, match="'addition' has the splits train, validation, test"):
        make_prompts("dev", ["addition"], 3)


# --- the built gym ----------------------------------------------------------------------------------


def test_gym_folders_load_with_plain_transformers(gym_tiny):
    base = AutoModelForCausalLM.from_pretrained(gym_tiny.merge_base_path)
    base_tokenizer = (gym_tiny.merge_base_path / "tokenizer.json").read_bytes()
    for path in [*gym_tiny.specialist_paths.values(), gym_tiny.multitask_path]:
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.config.to_dict() | {"_name_or_path": ""} == base.config.to_dict() | {"_name_or_path": ""}
        assert (path / "tokenizer.json").read_bytes() == base_tokenizer  # the base's tokenizer
        assert not any("lora" in name for name in load_file(path / "model.safetensors"))  # adapter merged in
        tokenizer = AutoTokenizer.from_pretrained(path)
        encoded = encode(tokenizer, "What is 12 + 3?", "15")
        assert encoded.mode == "chat" and tokenizer.eos_token_id in encoded.response_ids
        assert model(input_ids=torch.tensor([encoded.input_ids])).logits.shape[-1] == len(tokenizer)
    assert list(gym_tiny.specialist_paths) == gym_tiny.domains
    assert World.open(gym_tiny.root) == gym_tiny and gym_tiny.is_gym


def test_specialists_move_the_layers_only(gym_tiny):
    """LoRA leaves the embeddings (tied to the head) as they were; the update lives in the blocks' linear
    layers, and `task_vector` reports its size as computed by hand."""
    base = load_file(gym_tiny.merge_base_path / "model.safetensors")
    for path in [*gym_tiny.specialist_paths.values(), gym_tiny.multitask_path]:
        tuned = load_file(path / "model.safetensors")
        changed = {name for name in base if not torch.equal(base[name], tuned[name])}
        assert changed and not any("embed" in name for name in changed)
        assert all(name.endswith("proj.weight") for name in changed)  # q/k/v/o and the MLP's, nothing else
        tau = torch.cat([(tuned[n] - base[n]).flatten().double() for n in base])
        theta = torch.cat([base[n].flatten().double() for n in base])
        vector = task_vector(gym_tiny.merge_base_path, path)
        assert vector["ratio"] == pytest.approx(float(tau.norm() / theta.norm()), rel=1e-9)
        assert vector["embedding_share"] == 0.0


def test_gold_texts_are_train_prompts_with_gold_answers(gym_tiny):
    rows = read_rows(gym_tiny.gold_texts_path, SFTRow)
    per_domain = gym_tiny.config.gym.gold_texts_per_domain
    assert [sum(r.domain == d for r in rows) for d in gym_tiny.domains] == [per_domain] * 3
    assert len({r.prompt for r in rows}) == len(rows) and {r.source for r in rows} == {"gold"}
    held_out = {p.prompt for split in ("test", "validation") for p in make_prompts(split, gym_tiny.domains, 3000)}
    for row in rows:
        assert row.completion == _answer_by_hand(row.domain, row.prompt) and row.prompt not in held_out


def test_a_world_without_a_gym_has_no_merging_models(tiny_world):
    assert not tiny_world.is_gym
    with pytest.raises(UserError, match="not a fusion gym"):
        tiny_world.merge_base_path  # noqa: B018


@pytest.mark.slow
def test_gym_build_is_the_same_in_two_workers(gym_tiny, tmp_path):
    """Fine-tunes start once their base is built, in whichever worker: the bytes do not depend on `workers`."""
    again = build_world(gym_tiny.config.model_copy(update={"workers": 2}), cache_dir=tmp_path, progress=False)
    assert again.root.name == gym_tiny.root.name and _hashes(again) == _hashes(gym_tiny)


# --- build speed: the same bytes, sooner -------------------------------------------------------------


def test_padding_each_batch_from_one_table_gives_the_tensors_of_padding_the_batch():
    rng = random.Random(0)
    seqs = [[rng.randrange(1, 50) for _ in range(rng.randint(1, 12))] for _ in range(40)]
    lengths = torch.tensor([len(s) for s in seqs])
    table = train_module._padded(seqs, 7)
    for batch in ([3, 0, 17], [5], list(range(40)), [39, 39, 2]):
        width = max(len(seqs[i]) for i in batch)
        mask, ids = train_module._batch(lengths, batch, table)
        expected = torch.tensor([seqs[i] + [7] * (width - len(seqs[i])) for i in batch])
        assert torch.equal(ids, expected) and ids.dtype == torch.long and ids.is_contiguous()
        assert torch.equal(mask, torch.tensor([[1] * len(seqs[i]) + [0] * (width - len(seqs[i])) for i in batch]))


def _pad_every_step(seqs: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The collation the build used before `_padded` (world 0c33b2aa0f5c1b52 was built with it)."""
    width = max(len(s) for s in seqs)
    return (torch.tensor([s + [value] * (width - len(s)) for s in seqs]),
            torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]))


def test_training_from_one_padded_table_gives_the_weights_of_padding_every_step():
    """The faster collation trains bit-identical models: a language model and the reward model, against the
    per-step padding the cached `gym` world was built with."""
    gym = ToyWorldConfig.preset("gym-tiny")
    recipe = gym.sources[0].model_copy(update={"steps": 6, "batch_size": 16})
    tokenizer = train_tokenizer(recipe.tokenizer, recipe.vocab_size, recipe.template, gym.seed, gym.corpus_lines,
                                gym.corpus_tasks)
    rows = build_module._training_rows(gym, recipe)
    examples = train_module.lm_examples(tokenizer, rows)
    pairs = build_module._reward_examples(gym)
    encoded = [(encode(tokenizer, row.prompt, response).input_ids, float(label)) for row, response, label in pairs]

    def trained(classifier: bool, by_step: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = train_module.make_model(recipe, tokenizer, classifier=classifier)
        if not by_step:
            if classifier:
                train_module.train_reward_model(model, tokenizer, recipe, pairs, seed=1)
            else:
                train_module.train_lm(model, tokenizer, recipe, rows, seed=1)
            return model.state_dict()
        pad = tokenizer.pad_token_id

        def lm_loss(batch: list[int]) -> torch.Tensor:
            ids, mask = _pad_every_step([examples[i][0] for i in batch], pad)
            labels, _ = _pad_every_step([examples[i][1] for i in batch], -100)
            return model(input_ids=ids, attention_mask=mask, labels=labels).loss

        def reward_loss(batch: list[int]) -> torch.Tensor:
            ids, mask = _pad_every_step([encoded[i][0] for i in batch], pad)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, 0]
            return torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([encoded[i][1] for i in batch]))

        train_module._fit(model, recipe, len(encoded if classifier else examples), reward_loss if classifier else lm_loss,
                          seed=1, advance=None)
        return model.state_dict()

    for classifier in (False, True):
        torch.manual_seed(0)
        start = train_module.make_model(recipe, tokenizer, classifier=classifier).state_dict()
        fast, slow = trained(classifier, by_step=False), trained(classifier, by_step=True)
        assert list(fast) == list(slow)
        assert all(torch.equal(fast[name], slow[name]) for name in fast)
        assert sum(not torch.equal(fast[name], start[name]) for name in fast) >= len(fast) - 1  # it trained


# --- the premise report -------------------------------------------------------------------------------


def test_gym_report_and_cli(gym_tiny, polyfuse_cli, tmp_path):
    report = gym_report(gym_tiny, per_domain=4)
    models = [*gym_tiny.source_paths, "pivot", "base", *(f"specialist-{d}" for d in gym_tiny.domains), "multitask"]
    assert list(report["accuracy"]) == models
    assert all(set(scores) == set(gym_tiny.domains) for scores in report["accuracy"].values())
    assert list(report["task_vectors"]) == [*(f"specialist-{d}" for d in gym_tiny.domains), "multitask"]
    premises = [c.premise for c in report["checks"]]
    assert premises[:3] == [f"{d}: test / validation items" for d in gym_tiny.domains]
    assert all(c.holds for c in report["checks"][:3])
    assert sum("its specialty" in p for p in premises) == 3 and sum("sources at" in p for p in premises) == 3
    specialty = next(c for c in report["checks"] if c.premise.startswith("llama-largest: its specialty"))
    assert specialty.holds == (60 <= report["accuracy"]["llama-largest"]["largest"] <= 90)
    run = polyfuse_cli("toyworld", "info", "--preset", "gym-tiny", "--cache-dir", gym_tiny.root.parent,
                       "--per-domain", "2", "--out", tmp_path / "report.json", "-q")
    assert run.returncode == 0, run.stderr
    assert "Premises" in run.stdout and "Validation accuracy" in run.stdout
    written = json.loads((tmp_path / "report.json").read_text())
    assert set(written) == {"accuracy", "task_vectors", "checks", "world"} and len(written["checks"]) == len(premises)


# --- recipes ----------------------------------------------------------------------------------------


def test_gym_recipes_evaluate_on_the_fixed_test_split():
    from polyfuse.pipeline.demo import recipe_path
    from polyfuse.pipeline.recipe import load_recipe

    for name in ("fusechat3-gym", "infifpo-gym", "infifusion-unified-gym", "onpolicy-gym", "cgpo-gym"):
        recipe = load_recipe(recipe_path(f"{name}.yaml"), ["toyworld.seed=3", "seed=5"])
        assert recipe.toyworld.preset == "gym" and recipe.prompts.toyworld.split == "train"
        toy = recipe.eval.prompts.toyworld
        assert (toy.split, toy.per_domain, toy.seed) == ("test", 4000, 0)  # the same items for every seed
        assert [s.name for s in recipe.sources] == ["llama-largest", "qwen-reversal", "gpt2-addition"]
    distill, onpolicy = (load_recipe(recipe_path(f"{n}.yaml")) for n in ("infifusion-unified-gym", "onpolicy-gym"))
    world = ToyWorldConfig.preset("gym")
    assert distill.teacher.data.endswith(f"{world.key()}/texts/gold.jsonl") and onpolicy.onpolicy.data == distill.teacher.data
    assert set(onpolicy.onpolicy.routes) == set(world.domains)  # MOPD: every domain routed to its teacher


def test_gym_preference_recipes_sample_alike():
    """The fair protocol builds both pair rules from infifpo-gym's source samples, and fusechat3-gym is measured
    for the intra-source count (docs/gym.md): the two must draw the same prompts and sample every source
    alike, at the temperature that makes a source's samples disagree (the paper's 0.7-0.8 gave 12 pairs)."""
    from polyfuse.pipeline.demo import recipe_path
    from polyfuse.pipeline.recipe import load_recipe

    fusechat, infifpo = (load_recipe(recipe_path(f"{n}.yaml")) for n in ("fusechat3-gym", "infifpo-gym"))
    assert fusechat.prompts.toyworld == infifpo.prompts.toyworld
    assert fusechat.pairs.sft_fraction == infifpo.pairs.sft_fraction
    for a, b in zip(fusechat.sources, infifpo.sources, strict=True):
        assert (a.sampling.n, a.sampling.temperature, a.sampling.top_p) == (b.sampling.n, b.sampling.temperature,
                                                                           b.sampling.top_p)
        assert a.sampling.temperature > 1.0 and a.sampling.top_p == 1.0


def test_cgpo_gym_recipe_takes_the_gym_sampling_and_its_unpaired_rows():
    """cgpo-gym (the fair protocol's unpaired family) samples as infifpo-gym from the same prompts and trains on
    the unpaired rows: anchors for CGPO, and for KTO a rotation in blocks of its micro-batch, whose rows and KL
    rows must fit max_length (kto refuses to drop rows from a block)."""
    from polyfuse.pipeline.demo import recipe_path
    from polyfuse.pipeline.recipe import load_recipe

    cgpo, infifpo = (load_recipe(recipe_path(f"{n}.yaml")) for n in ("cgpo-gym", "infifpo-gym"))
    assert cgpo.prompts.toyworld == infifpo.prompts.toyworld and cgpo.pairs.sft_fraction == 0.5
    for a, b in zip(cgpo.sources, infifpo.sources, strict=True):
        assert (a.name, a.sampling) == (b.name, b.sampling)
    assert "upo" in cgpo.stages and cgpo.pairs.unpaired.kl_completion == "anchor" and cgpo.logprobs.sources
    kto = load_recipe(recipe_path("cgpo-gym.yaml"), ["upo.objective=kto", "logprobs.sources=false",
                                                     "stages=[prompts, sample, score, pairs, sft, logprobs, upo]"])
    assert (kto.pairs.unpaired.kl_completion, kto.pairs.unpaired.kl_block) == ("rotation", kto.upo.batch_size)
    assert kto.upo.max_length >= 2 * kto.sft.max_length
