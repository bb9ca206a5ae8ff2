"""The stage registry: one file per stage, the recipe schema built from it, each stage's own checks."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field

from polyfuse.config import StrictModel
from polyfuse.data.io import atomic_write_text
from polyfuse.data.schemas import PromptRow
from polyfuse.errors import ConfigError
from polyfuse.pipeline import recipe as recipe_module
from polyfuse.pipeline.context import STAGES, CommandInput, Context, Stage, model_stages, stage, stage_order
from polyfuse.pipeline.recipe import Recipe, load_recipe
from tiny_lm import build_tiny_model

STAGE_FILES = Path(recipe_module.__file__).parent / "stages"
ORDER = ["prompts", "sample", "score", "pairs", "transplant", "sft", "teacher", "distill", "onpolicy", "merge",
         "logprobs", "consensus", "po", "upo", "eval"]


def test_one_file_per_stage_each_registering_the_stage_of_its_name():
    files = sorted(p.stem for p in STAGE_FILES.glob("*.py") if p.stem != "__init__")
    assert sorted(STAGES.names()) == files
    for name in files:
        cls = STAGES.get(name)
        assert cls.name == name and cls.__module__ == f"polyfuse.pipeline.stages.{name}"
    assert stage_order() == ORDER
    assert model_stages() == ["transplant", "sft", "distill", "onpolicy", "merge", "po", "upo"]


def test_the_recipe_schema_is_built_from_the_registry():
    fields = Recipe.model_fields
    assert [name for name in fields if name in STAGES] == ORDER  # one section per stage, in stage order
    assert fields["prompts"].is_required()
    assert Recipe.model_fields["stages"].default_factory() == [
        "prompts", "sample", "score", "pairs", "sft", "logprobs", "po", "eval"  # opt-in: teacher, distill, merge, ...
    ]


def _recipe(tmp_path: Path, body: str) -> Path:
    for model in ("a", "p"):  # models, as the runner checks them before the first stage (no stage loads them)
        if not (tmp_path / model / "config.json").exists():
            build_tiny_model(tmp_path / model)
    path = tmp_path / "recipe.yaml"
    path.write_text(f"name: t\nsources: [{{name: a, path: {tmp_path / 'a'}}}]\npivot: {{name: p, path: {tmp_path / 'p'}}}\n"
                    "prompts: {path: prompts.jsonl}\n" + body)
    return path


def test_eval_without_score_or_scorers_grades_with_the_default_verifiers_as_the_command_does(tmp_path):
    """One default: an eval section that names no scorers, in a recipe without a score section, grades with every
    registered verifier that needs no options, as `polyfuse eval` does; a score section's verifiers win."""
    from polyfuse.evaluation import default_verifier_configs

    path = _recipe(tmp_path, "stages: [prompts, eval]\neval: {prompts: {path: held.jsonl}, models: [pivot]}\n")
    assert load_recipe(path).eval.scorers is None
    assert {c.type for c in default_verifier_configs()} >= {"math", "code", "toyworld"}
    with_score = _recipe(tmp_path, "stages: [prompts, eval]\nscore: {scorers: [{type: math}]}\n"
                         "eval: {prompts: {path: held.jsonl}, models: [pivot]}\n")
    assert [c.type for c in load_recipe(with_score).eval.scorers] == ["math"]


def test_a_recipe_error_exits_2_with_the_message_and_no_traceback(polyfuse_cli, tmp_path):
    path = _recipe(tmp_path, "stages: [prompts, eval]\neval: {prompts: {path: held.jsonl}, models: [pivot, po]}\n")
    proc = polyfuse_cli("run", path, "--work-dir", tmp_path / "w")
    assert proc.returncode == 2
    assert "eval.models: 'po': neither 'sources', 'pivot'" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "w").exists()  # refused before any work


@pytest.mark.parametrize(("body", "message"), [
    ("stages: [prompts, score]\nscore: {scorers: [{type: math}]}\n",
     "stage 'score' needs the stage 'sample' to run before it"),
    ("stages: [prompts, eval]\neval: {prompts: {path: h.jsonl}, scorers: [{type: math}], models: [pivot, po]}\n",
     "eval.models: 'po': neither 'sources', 'pivot', a source name nor a model stage of this recipe"),
    ("stages: [prompts, sample, score]\n", "stage 'score' is listed in 'stages' but has no 'score' section"),
    ("stages: [transplant]\ntransplant: {k: 8}\n", "transplant: donor is required"),  # the command's is --donor
])
def test_each_stage_checks_what_it_needs_from_the_others(tmp_path, body, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(_recipe(tmp_path, body))


class CountSection(StrictModel):
    every: int = Field(default=2, ge=1)


class CountStage(Stage):
    """Count every `every`-th prompt (a stage written for this test only)."""

    name = "count"
    position = 25  # after sample
    section = CountSection
    default = False
    needs = ("prompts",)
    command = "count"
    config_help = "how many prompts to step over"
    command_inputs = (CommandInput("prompts", "Prompts.", schema=PromptRow),)

    def input_paths(self, ctx: Context) -> dict[str, str]:
        return {"prompts": ctx.output("prompts", "prompts")}

    def inputs(self, ctx: Context) -> dict[str, str]:
        return self.input_paths(ctx)

    def execute(self, config, inputs, out, quiet=False, resume=None) -> dict[str, str]:
        atomic_write_text(out / "count.txt", str(len(inputs["prompts"].rows[:: config.every])))
        return {"count": str(out / "count.txt")}


@pytest.fixture
def count_stage():
    STAGES.register("count")(CountStage)
    yield recipe_module._recipe_schema()
    del STAGES._items["count"]


def test_adding_a_stage_is_one_class_registered(count_stage, tmp_path, polyfuse_cli):
    """A new stage needs nothing but its registered class: the schema, the order, the runner and its command
    follow."""
    from polyfuse.config import read_yaml, validate
    from polyfuse.data.io import write_rows
    from polyfuse.data.schemas import PromptRow
    from polyfuse.pipeline.runner import run_recipe

    write_rows(tmp_path / "prompts.jsonl", [PromptRow(id=f"p{i}", prompt=f"q{i}") for i in range(5)])
    data = read_yaml(_recipe(tmp_path, "stages: [prompts, count]\ncount: {every: 2}\n"))
    data["prompts"] = {"path": str(tmp_path / "prompts.jsonl")}
    recipe = validate(count_stage, data)
    assert stage_order().index("count") == stage_order().index("sample") + 1
    ctx = run_recipe(recipe, tmp_path / "work", quiet=True)
    assert Path(ctx.output("count", "count")).read_text() == "3"
    with pytest.raises(ConfigError, match="count.every"):
        validate(count_stage, {**data, "count": {"every": 0}})
    # and a command: its section is the --config, its input the --prompts option, and it runs the same `execute`
    (tmp_path / "count.yaml").write_text("every: 2\n")
    proc = polyfuse_cli("count", "-c", tmp_path / "count.yaml", "--prompts", tmp_path / "prompts.jsonl", "-o", tmp_path / "c")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "c" / "count.txt").read_text() == "3"


def test_every_shipped_recipe_loads_with_its_sections_filled_from_the_recipe():
    """One config class per stage: what a section takes from the rest of the recipe (the seed, the sources
    as teachers, the score stage's verifiers for eval) is filled when the recipe loads."""
    from polyfuse.pipeline.demo import recipe_path

    folder = recipe_path("fusechat3.yaml").parent
    names = sorted(p.name for p in folder.glob("*.yaml"))
    assert len(names) == 19
    for name in names:
        recipe = load_recipe(folder / name)
        for section in ("pairs", "sft", "distill", "onpolicy", "po", "upo"):
            if getattr(recipe, section) is not None:
                assert getattr(recipe, section).seed == recipe.seed, (name, section)
        if recipe.teacher is not None:
            assert [m.model_dump() for m in recipe.teacher.models] == [
                s.model_dump(exclude={"sampling", "backend"}) for s in recipe.sources]
        if recipe.onpolicy is not None:  # the sources as teachers, each with its own backend
            assert [m.model_dump() for m in recipe.onpolicy.teachers] == [
                s.model_dump(exclude={"sampling"}) for s in recipe.sources]
        assert recipe.sample.models[: len(recipe.sources)] == recipe.sources and recipe.sample.seed == recipe.seed
        if recipe.logprobs is not None and recipe.logprobs.sources:
            assert [m.model_dump() for m in recipe.logprobs.sources] == [
                s.model_dump(exclude={"sampling"}) for s in recipe.sources]
        if recipe.merge is not None:
            assert recipe.merge.parameters["seed"] == recipe.seed
    fusechat3 = load_recipe(folder / "fusechat3.yaml")  # its eval section names no scorers: the verifiers grade
    assert [c.type for c in fusechat3.eval.scorers] == ["math", "code"]
    assert fusechat3.eval.scorers == [c for c in fusechat3.score.scorers if c.type != "reward_model"]


def test_what_a_section_gives_itself_wins_over_the_recipe(tmp_path):
    path = _recipe(tmp_path, "seed: 7\nstages: [prompts, teacher, distill]\n"
                   "teacher: {data: sft.jsonl, models: [{name: t, path: ./t}], include_pivot: true}\n"
                   "distill: {seed: 3, strategy: pairwise}\n")
    recipe = load_recipe(path)
    assert [m.label for m in recipe.teacher.models] == ["t"] and recipe.teacher.include_pivot
    assert (recipe.distill.seed, recipe.distill.strategy) == (3, "pairwise")
    toy = _recipe(tmp_path, "seed: 7\nstages: [prompts]\n")
    toy.write_text(toy.read_text().replace("prompts: {path: prompts.jsonl}", "prompts: {toyworld: {split: train}}"))
    assert load_recipe(toy).prompts.toyworld.seed == 7  # the toy world's prompt draw follows the recipe seed


@pytest.mark.parametrize(("config", "body", "key"), [
    ("TeacherConfig", "models: [{path: ./t}]\ninclude_pivot: true\n", "include_pivot"),
    ("DistillTrainConfig", "strategy: pairwise\n", "strategy"),
])
def test_a_command_config_refuses_the_keys_only_a_recipe_reads(tmp_path, config, body, key):
    from polyfuse.config import load_config
    from polyfuse.teacher import TeacherConfig
    from polyfuse.trainers import DistillTrainConfig

    model = {"TeacherConfig": TeacherConfig, "DistillTrainConfig": DistillTrainConfig}[config]
    path = tmp_path / "config.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=f"config.yaml: {key}: only a recipe's section reads this key"):
        load_config(model, path)
    path.write_text(body.replace(f"{key}:", "#"))
    assert load_config(model, path) is not None  # the rest is a valid command config


def test_the_resolved_recipe_loads_again_with_the_same_sections_and_fingerprints(tmp_path):
    """`recipe.resolved.yaml` (written by every run) loads as a recipe: every shipped recipe, dumped and loaded
    again, is the same recipe, and every stage has the same fingerprint. It shows what the stages run with
    (the filled sections), without the pivot logprobs scores, which only exists when the stage runs."""
    import yaml

    from polyfuse.pipeline.context import stage
    from polyfuse.pipeline.demo import recipe_path
    from polyfuse.pipeline.manifest import fingerprint

    for path in sorted(recipe_path("fusechat3.yaml").parent.glob("*.yaml")):
        recipe = load_recipe(path)
        resolved = tmp_path / f"{path.stem}.resolved.yaml"
        recipe.save_resolved(resolved)
        again = load_recipe(resolved)
        assert again.model_dump(mode="json") == recipe.model_dump(mode="json"), path.name
        assert [fingerprint(stage(name).config(again), {}) for name in again.stages] == [
            fingerprint(stage(name).config(recipe), {}) for name in recipe.stages], path.name
    written = yaml.safe_load((tmp_path / "infifpo-toy.resolved.yaml").read_text())
    assert "pivot" not in written["logprobs"]
    assert [m["name"] for m in written["logprobs"]["sources"]] == ["llama-compare", "qwen-strings", "gpt2-arithmetic"]
    assert [m["name"] for m in written["sample"]["models"]] == ["llama-compare", "qwen-strings", "gpt2-arithmetic", "pivot"]
    assert written["sft"]["seed"] == written["po"]["seed"] == 0 and written["eval"]["scorers"] == [
        {"type": "toyworld", "name": None, "domains": ["arithmetic", "strings", "compare", "addition", "reversal", "largest"]}]
    # the right pivot: the recipe's M0 at the top (toyworld:// resolved to the built world), and logprobs scores
    # the model sft made, not M0
    again, m0 = load_recipe(tmp_path / "infifpo-toy.resolved.yaml"), load_recipe(recipe_path("infifpo-toy.yaml")).pivot
    assert (written["pivot"]["name"], written["pivot"]["path"]) == (again.pivot.name, again.pivot.path) == (
        m0.name, m0.path) and m0.name == "pivot" and m0.path.endswith("/pivot")
    sft_model = str(tmp_path / "sft" / "model")
    ctx = Context(again, tmp_path, outputs={"pairs": {"preference": "p.jsonl"}, "sft": {"model": sft_model}})
    scored = stage("logprobs").engine_config(ctx).pivot
    assert (scored.name, scored.path, scored.backend.type) == ("pivot", sft_model, "transformers")
    assert stage("logprobs").inputs(ctx)["pivot"] == sft_model  # what its manifest records


def test_recipe_fills_names_the_keys_that_fill_gives_a_section():
    """What `config show STAGE --recipe` marks and the resolved recipe leaves out come from `recipe_fills`: it must
    name exactly the keys `fill` adds to an empty section (merge: only the seed inside its parameters)."""
    from polyfuse.pipeline.context import stage

    raw = {"seed": 7, "sources": [{"name": "a", "path": "a", "sampling": {"n": 2}}], "pivot": {"name": "p", "path": "p"},
           "score": {"scorers": [{"type": "reward_model", "model": {"path": "rm"}}, {"type": "math"}]},
           "stages": ["pairs", "upo"], "upo": {"objective": "kto", "batch_size": 6}}
    expected = {"prompts": set(), "sample": {"seed", "models"}, "score": set(), "pairs": {"seed", "unpaired"},
                "sft": {"seed"}, "teacher": {"models"}, "distill": {"seed"}, "merge": set(),
                "logprobs": {"pivot", "sources"}, "consensus": set(), "po": {"seed"}, "upo": {"seed"},
                "eval": {"scorers"}, "transplant": set(), "onpolicy": {"seed", "teachers"}}
    assert {name: set(stage(name).recipe_fills()) for name in STAGES.names()} == expected
    for name in STAGES.names():
        filled = stage(name).fill({}, dict(raw))
        assert (filled == {"parameters": {"seed": 7}}) if name == "merge" else set(filled) == expected[name], name
    assert stage("pairs").fill({}, dict(raw))["unpaired"] == {"kl_completion": "rotation", "kl_block": 6}
    assert [k for k, v in stage("logprobs").recipe_fills().items() if v is None] == ["pivot"]  # set when it runs


def test_an_error_in_a_source_is_reported_once_where_it_is(tmp_path):
    """The sections that copy the sources (sample, teacher, logprobs) do not repeat a source's errors; an error
    in what a section gives itself is still reported, at its own key."""
    body = ("stages: [prompts, sample, score, pairs, teacher, logprobs]\nsample: {include_pivot: true}\n"
            "score: {scorers: [{type: math}]}\npairs: {reward: math}\nteacher: {}\nlogprobs: {sources: true}\n")
    path = _recipe(tmp_path, body)
    path.write_text(path.read_text().replace("name: a,", "name: a, devcie: cpu, sampling: {n: 0},")
                    .replace("name: p,", "name: p, dtype: fp64,"))
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert str(err.value).splitlines()[1:] == [
        "  line 2: sources.0.sampling.n: Input should be greater than or equal to 1 (got 0)",
        "  line 2: sources.0.devcie: unknown key; did you mean 'device'?",
        "  line 3: pivot.dtype: Input should be 'auto', 'float32', 'bfloat16' or 'float16' (got 'fp64')",
    ]
    path.write_text(path.read_text().replace("sample: {include_pivot: true}", "sample: {seed: null}")
                    .replace("logprobs: {sources: true}", "logprobs: {sources: [{path: x, devcie: cpu}]}"))
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert str(err.value).splitlines()[4:] == ["  line 6: sample.seed: Input should be a valid integer (got None)",
                                               "  line 10: logprobs.sources.0.devcie: unknown key; did you mean 'device'?"]


def test_one_walk_of_a_config_gives_the_model_paths_a_stage_hashes_and_the_data_files_it_checks():
    """`walk_config` visits every value with where it sits (models, mappings, lists, depth first); the paths a
    stage hashes (`paths_in`, keyed by their owner: these keys are in every fingerprint) and the data files a
    run checks before it starts come from it."""
    from polyfuse.config import walk_config
    from polyfuse.pipeline.checks import _data_paths
    from polyfuse.pipeline.context import paths_in
    from polyfuse.pipeline.sources import PromptSource

    class Leaf(StrictModel):
        path: str
        n: int = 1

    class Tree(StrictModel):
        leaf: Leaf
        items: list[Leaf] = []
        extra: dict = {}
        prompts: PromptSource | None = None

    tree = Tree(leaf=Leaf(path="a"), items=[Leaf(path="b")], extra={"k": [1, {"path": "c", "data": "d.jsonl"}]},
                prompts={"path": "p.jsonl"})
    assert [where for where, _ in walk_config(tree)] == [
        "", "leaf", "leaf.path", "leaf.n", "items", "items[0]", "items[0].path", "items[0].n", "extra", "extra.k",
        "extra.k[0]", "extra.k[1]", "extra.k[1].path", "extra.k[1].data", "prompts", "prompts.path",
        "prompts.toyworld", "prompts.limit", "prompts.skip_invalid"]
    assert paths_in(tree.model_dump()) == {"leaf": "a", "items[0]": "b", "extra.k[1]": "c", "prompts": "p.jsonl"}
    assert paths_in({"path": "m"}) == {"path": "m"}
    assert list(_data_paths({"s": tree})) == [("s.extra.k[1].data", "d.jsonl"), ("s.prompts.path", "p.jsonl")]
    tree.prompts = PromptSource(toyworld={})  # no file to check
    assert list(_data_paths({"s": tree})) == [("s.extra.k[1].data", "d.jsonl")]


class PolishStage(Stage):
    """A model stage written for this test only (never run)."""

    name = "polish"
    position = 105  # after po
    default = False
    makes_model = True

    def execute(self, config, inputs, out, quiet=False, resume=None) -> dict[str, str]:
        raise AssertionError("not run in this test")


def test_a_model_stage_labels_its_own_model_and_eval_needs_no_po_section(tmp_path):
    """Each model stage says how its model shows in an evaluation row (`Stage.label`); a stage eval does not know
    is labelled by its name (before the hook, eval read `recipe.po.objective`: an AttributeError without `po`)."""
    from polyfuse.config import read_yaml, validate
    from polyfuse.pipeline.stages.eval import eval_models

    STAGES.register("polish")(PolishStage)
    try:
        schema = recipe_module._recipe_schema()
        body = ("stages: [prompts, polish, eval]\n"
                "eval: {prompts: {path: h.jsonl}, scorers: [{type: math}], models: [pivot, polish]}\n")
        recipe = validate(schema, read_yaml(_recipe(tmp_path, body)))
        assert recipe.po is None
        ctx = Context(recipe, tmp_path, outputs={"polish": {"model": str(tmp_path / "polished")}})
        models = eval_models(ctx)
        assert list(models) == ["pivot", "pivot+POLISH"] and models["pivot+POLISH"].path == str(tmp_path / "polished")
    finally:
        del STAGES._items["polish"]
    full = load_recipe(_recipe(tmp_path, "stages: [prompts, sample, score, pairs, sft, po]\nscore: {scorers: [{type: math}]}\nsft: {}\n"
                               "po: {objective: ln_dpo}\n"))
    assert [stage(name).label(full) for name in ("sft", "po")] == ["SFT", "LN_DPO"]


def test_pairs_reward_naming_a_verifier_says_to_leave_it_out(tmp_path):
    """Issue 22: `pairs: {reward: math}` read as "rank by the math verifier"; verdicts always rank."""
    body = "stages: [prompts, sample, score, pairs]\nscore: {scorers: [{type: math}]}\npairs: {reward: math}\n"
    with pytest.raises(ConfigError, match="pairs.reward: 'math' is a verifier, not a reward scorer; verifier verdicts "
                                          "always rank .*leave pairs.reward out"):
        load_recipe(_recipe(tmp_path, body))
    assert load_recipe(_recipe(tmp_path, body.replace("pairs: {reward: math}", "pairs: {}"))).pairs.reward is None
