"""Every model a config names, checked from its config and tokenizer files before any weight is read.

A wrong model must be refused before the first stage, not found after an hour of sampling. What is checked,
per model (seconds; no weights are loaded):

- its place: the folder (with `config.json`) or GGUF file exists, the device exists;
- its architecture: transformers knows the `model_type` for what the model is used as (a causal LM that
  generates, or a sequence classifier for a reward model), or, with `trust_remote_code`, the repository's
  own code (`auto_map`) provides that class;
- a reward model's head: the checkpoint is a sequence classifier (`*ForSequenceClassification`) with one
  output (`num_labels: 1`); a causal LM would get a new, untrained head with two outputs;
- a GGUF file: its header reads with the `gguf` package and transformers' GGUF loader supports its
  architecture (GGUF files hold language models, never a reward head);
- its tokenizer loads (folders), and its chat template, where prompts are rendered with it (every role but
  a merge input): a template that fails on a user/assistant conversation is an error; one whose prompt is
  not a prefix of the conversation is a warning (polyfuse then uses its plain format for that model).
  A model without a template is prompted in polyfuse's plain `User: ... Assistant:` format, which is right
  for base models; but a model whose end-of-sequence token ends a chat turn (`<|im_end|>`, `<|eot_id|>`,
  `<end_of_turn>`, ...) is a chat model whose template is missing (a GGUF without `tokenizer.chat_template`,
  a folder without `chat_template.jinja`), and the plain format would silently be the wrong prompt: an error.

The fields of a config that hold a reward model say so (`json_schema_extra=SEQUENCE_CLASSIFIER`), so one walk
over any config (a stage's, a recipe's) knows what each model is used as.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from polyfuse.config import walk_config
from polyfuse.errors import UserError
from polyfuse.models.gguf import info as gguf_info
from polyfuse.models.gguf import is_supported, supported_architectures
from polyfuse.models.loader import ModelSpec, _common_kwargs, check_device, check_location

Task = Literal["causal-lm", "sequence-classification"]

# `Field(..., json_schema_extra=SEQUENCE_CLASSIFIER)` marks a field that holds a reward model.
MODEL_TASK = "model_task"
SEQUENCE_CLASSIFIER = {MODEL_TASK: "sequence-classification"}

# End-of-turn tokens of chat formats: a tokenizer whose EOS is one of them belongs to a chat model.
TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<turn|>", "<|end|>",
                   "<|END_OF_TURN_TOKEN|>", "<|end_of_turn|>")
_PROBE = ([{"role": "user", "content": "What is 2 + 2?"}], "4")


@dataclass
class ModelCheck:
    """What was checked of one model and what was found wrong. `where`: the config key that names it."""

    where: str
    spec: ModelSpec
    task: Task
    found: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.where} ({self.spec.label})"

    def problem_lines(self) -> list[str]:
        return [f"{self.name}: {problem}" for problem in self.problems]

    def warning_lines(self) -> list[str]:
        return [f"{self.name}: {warning}" for warning in self.warnings]

    def describe(self) -> str:
        mark = "✗" if self.problems else "✓"
        return f"{mark} {self.name}: {self.spec.path}: {', '.join(self.found) or 'not readable'}"


def check_model(spec: ModelSpec, task: Task = "causal-lm", where: str = "model", chat: bool = True) -> ModelCheck:
    """Check one model from its files (see the module docstring); `chat`: its prompts go through its chat template."""
    check = ModelCheck(where, spec, task)
    try:
        check_location(spec)
        check_device(spec)
    except UserError as err:
        check.problems.append(str(err).removeprefix(f"{spec.label}: "))
        return check
    folder, gguf = spec.location()
    if gguf is not None:
        _check_gguf(Path(folder) / gguf, check, chat)
    else:
        _check_checkpoint(spec, check, chat)
    return check


def models_in(config: Any) -> list[tuple[str, ModelSpec, Task]]:
    """(config key, model, what it is used as) of every `ModelSpec` inside a config, each model once (a
    recipe's sources reappear, by name, as the models of its stages): the key is where it is named first."""
    tasks: dict[str, Task] = {}
    found: dict[tuple, tuple[str, ModelSpec, Task]] = {}
    for where, node in walk_config(config):
        if isinstance(node, BaseModel):
            for name, info in type(node).model_fields.items():
                extra = info.json_schema_extra
                if isinstance(extra, dict) and MODEL_TASK in extra:
                    tasks[f"{where}.{name}" if where else name] = extra[MODEL_TASK]
        if isinstance(node, ModelSpec):
            task = tasks.get(where, "causal-lm")
            key = (node.label, node.location(), node.revision, node.trust_remote_code, node.device, task)
            found.setdefault(key, (_dotted(where) or "model", node, task))
    return list(found.values())


def check_models(config: Any) -> list[ModelCheck]:
    """Every model inside a config checked (`check_model`) before any is loaded or any output written, then
    `enforce`d: what every stage command calls (`polyfuse run` checks the recipe's with `check_recipe`)."""
    checks = [check_model(spec, task, where) for where, spec, task in models_in(config)]
    enforce(checks)
    return checks


def enforce(checks: list[ModelCheck], problems: Iterable[str] = ()) -> None:
    """Show the checks' warnings; raise their problems and `problems` as one `UserError`: one problem as its own
    line, several as a list, one line each."""
    for check in checks:
        for line in check.warning_lines():
            warnings.warn(line, stacklevel=3)
    problems = [*(line for check in checks for line in check.problem_lines()), *problems]
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        raise UserError(f"{len(problems)} problems, found before any work:\n  " + "\n  ".join(problems))


def _dotted(where: str) -> str:
    """`sample.models[0].path` as config errors write it: `sample.models.0.path`; the items of a bare list
    (`polyfuse eval`'s models) as `models.0`."""
    return re.sub(r"\[(\d+)\]", r".\1", f"models{where}" if where.startswith("[") else where)


def _check_checkpoint(spec: ModelSpec, check: ModelCheck, chat: bool) -> None:
    """A model folder or hub id: its config, architecture, head, tokenizer and chat template."""
    from transformers import AutoConfig, AutoTokenizer

    folder, _ = spec.location()
    try:
        config = AutoConfig.from_pretrained(folder, **_common_kwargs(spec))
    except Exception as err:  # unreadable or unknown config: any failure is the checkpoint's to fix
        check.problems.append(f"cannot read its config: {_first_line(err)}")
        return
    _check_architecture(config, check, remote=spec.trust_remote_code and bool(getattr(config, "auto_map", None)))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **_common_kwargs(spec))
    except Exception as err:  # a missing or damaged tokenizer file
        check.problems.append(f"cannot load its tokenizer: {_first_line(err)}")
        return
    check.found.append(f"tokenizer of {len(tokenizer)} tokens")
    if chat:
        _check_template(tokenizer.chat_template, tokenizer.eos_token, check, tokenizer)


def _check_architecture(config: Any, check: ModelCheck, remote: bool) -> None:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    causal = check.task == "causal-lm"
    architectures = list(getattr(config, "architectures", None) or [])
    classifiers = [name for name in architectures if name.endswith("ForSequenceClassification")]
    kind = "causal LM" if causal else "sequence classifier"
    check.found.append(f"{kind} {config.model_type} ({', '.join(architectures) or 'no architectures listed'})")
    mapping = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if causal else MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    auto = "AutoModelForCausalLM" if causal else "AutoModelForSequenceClassification"
    if remote:  # the repository's own code decides; transformers' mappings do not list it
        if auto not in config.auto_map:
            check.problems.append(f"its own code (auto_map: {', '.join(config.auto_map)}) provides no {auto}")
    elif config.model_type not in mapping:
        from transformers import __version__

        check.problems.append(f"transformers {__version__} has no {kind} class for model_type {config.model_type!r}")
    if causal and architectures and len(classifiers) == len(architectures):
        check.problems.append(f"it is a sequence classifier ({architectures[0]}), not a language model that generates; "
                              "a reward model goes under score.scorers as {type: reward_model, model: {path: ...}}")
    elif not causal:
        _check_reward_head(config, architectures, classifiers, check)


def _check_reward_head(config: Any, architectures: list[str], classifiers: list[str], check: ModelCheck) -> None:
    """A reward model is a sequence classifier with one output."""
    want = "a reward model is a sequence classifier with one output (config.json: architectures [*ForSequenceClassification], num_labels 1)"
    if architectures and not classifiers:
        check.problems.append(f"not a reward model: {architectures[0]} has no sequence-classification head, so "
                              f"transformers would put a new, untrained one with {config.num_labels} outputs on it; {want}")
    elif config.num_labels != 1:
        labels = ", ".join(map(str, config.id2label.values()))
        check.problems.append(f"a reward model needs num_labels=1, got {config.num_labels} ({labels}); {want}")
    else:
        check.found.append("1 output")


def _check_gguf(file: Path, check: ModelCheck, chat: bool) -> None:
    """The header (metadata and tensor table) read with the `gguf` package; no tensor data is read."""
    try:
        header = gguf_info(file)
    except Exception as err:  # gguf's reader raises whatever a damaged file trips it into
        check.problems.append(f"{file}: not a readable GGUF file, truncated or damaged "
                              f"({type(err).__name__}: {_first_line(err)})")
        return
    architecture = header["architecture"] or "?"
    check.found.append(f"GGUF {architecture}, {sum(header['tensor_types'].values())} tensors")
    if not is_supported(architecture):
        check.problems.append(f"{file}: transformers' GGUF loader does not support the architecture {architecture!r} "
                              f"(it reads {', '.join(sorted(supported_architectures()))}); export it to a safetensors "
                              "folder elsewhere")
    if check.task == "sequence-classification":
        check.problems.append(f"not a reward model: a GGUF file holds a language model ({architecture}) and no "
                              "reward head, so transformers would put a new, untrained one with 2 outputs on it; a "
                              "reward model is a folder with a sequence classifier with one output (num_labels 1)")
    if chat:
        _check_template(header["chat_template"], header["eos_token"], check)


def _check_template(template: Any, eos: str | None, check: ModelCheck, tokenizer: Any = None) -> None:
    """A chat template where prompts are rendered with it; see the module docstring for what is an error."""
    from polyfuse.models.templates import encode

    if not template:
        if eos in TURN_END_TOKENS:
            check.problems.append(
                f"no chat template, but its end-of-sequence token {eos!r} ends a chat turn: a chat model whose "
                "template is missing (a GGUF without tokenizer.chat_template, a folder without chat_template.jinja "
                "or a chat_template in tokenizer_config.json); polyfuse would prompt it in its plain "
                "'User: ... Assistant:' format. Add the model's chat template")
        else:
            check.found.append("no chat template (polyfuse's plain format)")
        return
    check.found.append("chat template")
    if tokenizer is None:  # a GGUF's tokenizer is built from its vocabulary only when the model loads
        return
    try:
        encoded = encode(tokenizer, *_PROBE)
    except Exception as err:  # a Jinja error, or the template's own raise_exception
        check.problems.append(f"its chat template fails on a user/assistant conversation: {_first_line(err)}")
        return
    if encoded.mode == "plain":
        check.warnings.append("its chat template does not render the prompt as the start of the conversation, so "
                              "polyfuse prompts and scores this model in its plain 'User: ... Assistant:' format")


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
