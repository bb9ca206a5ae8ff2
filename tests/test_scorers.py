"""Scorers: config dispatch, math-verify answers, code programs and tests, generic reward models."""

from __future__ import annotations

import json
from typing import Literal

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from polyfuse.config import StrictModel
from polyfuse.data import SampleRow
from polyfuse.errors import ConfigError
from polyfuse.scorers import (
    SCORERS,
    CodeConfig,
    MathConfig,
    ScorerConfig,
    ScorerSettings,
    Verifier,
    build_scorer,
    parse_scorer_config,
)
from polyfuse.scorers.code_tests import build_program

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def byte_tokenizer(chat_template: str | None = None, padding_side: str = "right") -> PreTrainedTokenizerFast:
    """A byte-level tokenizer without merges: every byte is a token, plus <pad>, <s>, </s>."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(["<pad>", "<s>", "</s>", *alphabet])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side=padding_side
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def sample(response: str, prompt="Q?", **fields) -> SampleRow:
    return SampleRow(
        id="s", prompt=prompt, prompt_id="p", model="m", sample_index=0, response=response, **fields
    )


# --- configs -------------------------------------------------------------------------------------


class Stage(StrictModel):
    scorers: list[ScorerConfig]


def test_config_dispatch_by_type_and_round_trip():
    stage = Stage.model_validate(
        {"scorers": [{"type": "math"}, {"type": "code", "timeout_s": 3, "name": "tests"}]}
    )
    assert isinstance(stage.scorers[0], MathConfig) and isinstance(stage.scorers[1], CodeConfig)
    assert stage.scorers[1].timeout_s == 3.0
    dumped = stage.model_dump()
    assert dumped["scorers"][1]["timeout_s"] == 3.0 and dumped["scorers"][1]["memory_mb"] == 1024
    assert Stage.model_validate(dumped) == stage
    scorer = build_scorer(stage.scorers[1])
    assert (scorer.name, scorer.kind) == ("tests", "verifier")
    assert build_scorer({"type": "math"}).name == "math"


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="unknown scorer 'nope'; expected one of: choice, code, coin_test, echo_test, math, "):
        parse_scorer_config({"type": "nope"})
    with pytest.raises(ConfigError, match="scorer.timeout_sec: unknown key"):
        parse_scorer_config({"type": "code", "timeout_sec": 3})
    with pytest.raises(ConfigError, match="scorer.model: required key is missing"):
        parse_scorer_config({"type": "reward_model"})
    with pytest.raises(ConfigError, match="'type' key"):
        parse_scorer_config({"name": "x"})


class EchoConfig(ScorerSettings):
    type: Literal["echo_test"] = "echo_test"
    domains: list[str] | None = ["echo"]


@SCORERS.register("echo_test")
class EchoVerifier(Verifier):
    """What another module (the toy world) does to add a verifier."""

    Config = EchoConfig

    def check(self, row):
        return row.response == row.answer, {"expected": row.answer}


def test_subclassed_verifier_builds_from_config_and_filters_domains():
    verifier = build_scorer({"type": "echo_test"})
    rows = [sample("a", answer="a", domain="echo"), sample("b", answer="a", domain="echo")]
    assert verifier.score(rows) == [(True, {"expected": "a"}), (False, {"expected": "a"})]
    assert verifier.applies_to(rows[0]) and not verifier.applies_to(sample("a", answer="a", domain="math"))
    assert build_scorer({"type": "echo_test", "domains": None}).applies_to(sample("a", domain="math"))


# --- math ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gold", "response", "expected"),
    [
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "She sold 48 + 24 = 72 clips.\n#### 72", True),
        ("... so the total is\n#### 72", "48 + 24 = 72, so the answer is \\boxed{72}.", True),
        ("#### 18", "She makes 9 * 2 = $18 every day.", True),
        ("#### 1,234", "The answer is 1234", True),
        ("\\frac{1}{2}", "The probability is 0.5", True),
        ("0.5", "so $p = \\frac{1}{2}$", True),
        ("\\boxed{\\frac{3}{4}}", "\\boxed{0.75}", True),
        ("2\\sqrt{2}", "\\sqrt{8}", True),
        ("#### 72", "She sold 48 + 24 = 71 clips.\n#### 71", False),
        ("\\frac{1}{2}", "\\boxed{\\frac{1}{3}}", False),
        ("#### 42", "I do not know.", False),
    ],
)
def test_math_verifier(gold, response, expected):
    verdict, details = build_scorer({"type": "math"}).check(sample(response, answer=gold, domain="math"))
    assert verdict is expected, details


def test_math_applies_only_to_math_rows_with_answers_and_reports_bad_gold():
    verifier = build_scorer({"type": "math"})
    assert verifier.applies_to(sample("1", answer="1", domain="math"))
    assert not verifier.applies_to(sample("1", domain="math"))
    assert not verifier.applies_to(sample("1", answer="1", domain="general"))
    verdict, details = verifier.check(sample("1", answer="", domain="math"))
    assert verdict is False and "could not be parsed" in details["error"]


# --- code ----------------------------------------------------------------------------------------

PROMPT = 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum of xs."""\n'
TESTS = "def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n    assert candidate([]) == 0\n"


def code_row(response: str, **fields) -> SampleRow:
    base = {"prompt": PROMPT, "tests": TESTS, "entry_point": "total", "domain": "code"}
    return sample(response, **{**base, **fields})


def test_build_program_rules():
    full = "def total(xs):\n    return sum(xs)\n"
    fenced = f"Here:\n```python\nprint('demo')\n```\nand the solution:\n```python\n{full}```\n"
    program, how = build_program(fenced, PROMPT, "total")
    assert how == "context+response" and program == "from typing import List\n\n" + full
    assert build_program("    return sum(xs)\n", PROMPT, "total") == (
        PROMPT + "    return sum(xs)\n",
        "prompt+response",
    )
    assert build_program("```\nx = 1\n```", "Write code.", None) == ("x = 1\n", "response")


@pytest.mark.parametrize(
    ("response", "passed", "stage"),
    [
        ("```python\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n```", True, "tests"),
        ("    return sum(xs)\n", True, "tests"),
        ("    s = 0\n    for x in xs:\n        s += x\n    return s\n", True, "tests"),
        ("```python\ndef total(xs):\n    return len(xs)\n```", False, "tests"),
        ("```python\ndef total(xs):\n    import sys\n    sys.exit(0)\n```", False, "tests"),
        ("```python\ndef total(xs)\n    return sum(xs)\n```", False, "static"),
        ("```python\ndef summe(xs):\n    return sum(xs)\n```", False, "tests"),  # prompt's `total` is empty
    ],
)
def test_code_verifier(response, passed, stage):
    verdict, details = build_scorer({"type": "code", "timeout_s": 5}).check(code_row(response))
    assert verdict is passed, details
    assert details["stage"] == stage


def test_code_verifier_plain_asserts_batch_and_applies_to():
    verifier = build_scorer({"type": "code", "timeout_s": 5})
    rows = [
        code_row(
            "def double(x):\n    return 2 * x\n",
            prompt="Write double(x).",
            tests="assert double(3) == 6\n",
            entry_point=None,
        ),
        code_row(
            "def double(x):\n    return x + 2\n",
            prompt="Write double(x).",
            tests="assert double(3) == 6\n",
            entry_point=None,
        ),
        code_row("def total(xs):\n    while True:\n        pass\n"),
    ]
    results = build_scorer({"type": "code", "timeout_s": 2, "workers": 2}).score(rows)
    assert [v for v, _ in results] == [True, False, False]
    assert results[1][1]["failure"] is None and "AssertionError" in results[1][1]["error"]
    assert results[2][1]["timed_out"] is True
    chat_prompt = [{"role": "user", "content": "Write total(xs)."}]
    verdict, details = verifier.check(code_row("def summe(xs):\n    return sum(xs)\n", prompt=chat_prompt))
    assert verdict is False and details["stage"] == "static" and "'total' is not defined" in details["error"]
    assert not verifier.applies_to(code_row("x", tests=None))
    assert not verifier.applies_to(code_row("x", domain="math"))


def test_code_verifier_stdin_stdout_tests_compare_in_the_scorer():
    tests = '{"inputs": ["1 2\\n", "5 7\\n"], "outputs": ["3\\n", "12"]}'
    verifier = build_scorer({"type": "code", "timeout_s": 20})  # generous: only a loaded machine gets near it

    def judge(response):
        return verifier.check(code_row(response, prompt="Read two integers, print their sum.", tests=tests, entry_point=None))

    right = "a, b = map(int, input().split())\nprint(a + b)   \n"
    assert judge(f"```python\n{right}```")[0] is True
    verdict, details = judge("a, b = map(int, input().split())\nprint(a * b)\n")
    assert verdict is False and details["error"] == "case 0: wrong output"
    verdict, details = judge("import sys\nprint(3)\nsys.exit(0)\n")  # right once, by luck: fails the second case
    assert verdict is False and details["error"] == "case 1: wrong output"
    verdict, details = judge("import os\nos.write(1, b'3\\n')\nos._exit(1)\n")
    assert verdict is False and details["error"] == "case 0: exit status 1"


# --- reward models -------------------------------------------------------------------------------


def save_reward_model(folder, arch: str, chat_template: str | None, **config_overrides) -> None:
    torch.manual_seed(0)
    tokenizer = byte_tokenizer(chat_template, padding_side="left")  # the scorer must not trust this
    common = {"vocab_size": len(tokenizer), "num_labels": 1, "pad_token_id": 0, **config_overrides}
    if arch == "llama":
        config = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            **common,
        )
        model = LlamaForSequenceClassification(config)
    else:  # absolute position embeddings: wrong padding or positions would change the score
        model = GPT2ForSequenceClassification(
            GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=512, **common)
        )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def reference_scores(folder, texts: list[str]) -> list[float]:
    """Each text's logit, scored alone with no padding at all."""
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = byte_tokenizer()
    with torch.no_grad():
        return [
            model(torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"]])).logits[0, 0].item()
            for t in texts
        ]


CONVERSATIONS = [
    ("Hi", "Hello there, how can I help?"),
    ("What is 2+2?", "4"),
    ("Tell me a joke.", "No."),
    ("A much longer question, padded against the others?", "Yes, indeed it is."),
]


@pytest.mark.parametrize(("arch", "chat"), [("llama", True), ("llama", False), ("gpt2", False)])
def test_reward_model_matches_unpadded_reference(tmp_path, arch, chat):
    folder = tmp_path / arch
    save_reward_model(folder, arch, CHAT_TEMPLATE if chat else None)
    rows = [sample(response, prompt=prompt) for prompt, response in CONVERSATIONS]
    if chat:  # the template renders <s>user: ...</s><s>assistant: ...</s>
        texts = [f"<s>user: {p}</s><s>assistant: {r}</s>" for p, r in CONVERSATIONS]
    else:
        texts = [f"User: {p}\n\nAssistant: {r}</s>" for p, r in CONVERSATIONS]
    expected = reference_scores(folder, texts)
    config = {"type": "reward_model", "model": {"path": str(folder)}, "batch_size": 3}
    batched = [v for v, _ in build_scorer(config).score(rows)]
    one_by_one = [build_scorer(config).score([row])[0][0] for row in rows]
    assert batched == pytest.approx(expected, abs=1e-5)
    assert one_by_one == pytest.approx(expected, abs=1e-5)
    assert len(set(batched)) == len(batched)  # the rows really were told apart
    sigmoid = build_scorer({**config, "normalize": "sigmoid", "name": "rm"})
    assert (sigmoid.name, sigmoid.kind) == ("rm", "reward")
    assert [v for v, _ in sigmoid.score(rows)] == pytest.approx(
        torch.tensor(expected).sigmoid().tolist(), abs=1e-6
    )


def test_reward_model_truncation_keeps_the_end(tmp_path):
    folder = tmp_path / "llama"
    save_reward_model(folder, "llama", None)
    scorer = build_scorer({"type": "reward_model", "model": {"path": str(folder)}, "max_length": 10})
    ((value, details),) = scorer.score([sample("the end of a long answer", prompt="Hi")])
    assert details == {"truncated": True}  # 10 tokens: the last 9 bytes and EOS
    assert value == pytest.approx(reference_scores(folder, ["ng answer</s>"])[0], abs=1e-5)


def test_reward_model_refuses_armorm_and_multi_label_heads(tmp_path):
    folder = tmp_path / "llama"
    save_reward_model(folder, "llama", None)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "architectures": ["LlamaForRewardModelWithGating"]}))
    with pytest.raises(ConfigError, match="ArmoRM"):
        build_scorer({"type": "reward_model", "model": {"path": str(folder)}})
    save_reward_model(tmp_path / "two", "llama", None, num_labels=2)
    with pytest.raises(ConfigError, match="num_labels=1, got 2"):
        build_scorer({"type": "reward_model", "model": {"path": str(tmp_path / "two")}})
