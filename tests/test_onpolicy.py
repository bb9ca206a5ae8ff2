"""On-policy distillation (`polyfuse train onpolicy`, `polyfuse.teacher.online`, `polyfuse.trainers.onpolicy`) on
tiny models: the student's text and spans from its own sampled bytes, groups across two real tokenizers, the
backends' sampled ids and top-K, TRL's server-distillation loss on the same sampled tokens, the mixes and their
weights, GKD's lambda, accumulation invariance of the group count, the teacher store's normaliser (offline `kd`),
and bad inputs (one line, exit 2). The real engines (a vLLM engine, `vllm serve`) and the real-model pair are in
`test_onpolicy_engines.py`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from polyfuse.alignment import response_spans, token_bytes
from polyfuse.data import PromptRow, write_rows
from polyfuse.models import ModelSpec, encode, load_model, load_tokenizer, render_prompt
from polyfuse.models.forward import forward_response
from polyfuse.objectives import DISTILL_OBJECTIVES, IGNORE_INDEX
from polyfuse.objectives.distill import AlignedRow, DistillBatch, Projection, TeacherOutputs
from polyfuse.objectives.topk import projected_logps
from polyfuse.sampling import EngineModel, SamplingParams, build_backend
from polyfuse.teacher.online import (
    OnlineTeacher,
    TeacherAnswer,
    byte_spans,
    common_groups,
    end_of_turn,
    mix_weights,
    sampled_text,
    turn_end,
)
from polyfuse.trainers.distill import DistillCollator
from polyfuse.trainers.onpolicy import (
    OnPolicyTrainConfig,
    OnPolicyTrainer,
    Rollout,
    check_rows,
    train_onpolicy,
)
from test_ddp import free_port

EXACT_STEP = dict(optim="sgd", learning_rate=0.5, lr_scheduler="constant", warmup_ratio=0.0, max_grad_norm=0.0,
                  save_steps=0, padding_free=False)
TEXT = "naïve 東京 🙂 costs 1234.5"


def toy(tiny_world, name: str) -> EngineModel:
    path = tiny_world.pivot_path if name == "pivot" else tiny_world.source_paths[name]
    return EngineModel(name=name, path=str(path))


# ---- the student's text: its own sampled bytes ---------------------------------------------------------------


def test_sampled_text_is_the_bytes_of_the_sampled_ids_and_an_incomplete_character_ends_it(smollm2_tokenizer):
    """A sample that spells the emoji byte by byte (a sampled tokenization need not be canonical): the text is the
    ids' own bytes; cut inside the emoji, it ends before it, and those tokens and the stop get no signal."""
    tokenizer = smollm2_tokenizer
    pieces = token_bytes(tokenizer)
    byte_token = {piece: i for i, piece in enumerate(pieces) if piece is not None and len(piece) == 1}
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    head, tail = TEXT.split("🙂")
    emoji = [byte_token[bytes([b])] for b in "🙂".encode()]
    ids = [*tokenizer(head, add_special_tokens=False)["input_ids"], *emoji,
           *tokenizer(tail, add_special_tokens=False)["input_ids"]]
    text = sampled_text("hi", [1], [*ids, eot], {eot}, pieces)
    assert text.text == TEXT and text.stop == len(ids) and text.spans[-1] is None
    assert text.spans[0][0] == 0 and text.spans[-2][1] == len(TEXT.encode())
    assert all(a[1] == b[0] for a, b in zip(text.spans[:-2], text.spans[1:-1], strict=True))
    assert [TEXT.encode()[s:e] for s, e in text.spans[:-1]] == [pieces[t] for t in ids]  # never re-tokenised
    first = len(tokenizer(head, add_special_tokens=False)["input_ids"])
    cut = sampled_text("hi", [1], [*ids[: first + 2], eot], {eot}, pieces)
    assert cut.text == head and cut.stop is None and cut.spans[first:] == [None, None, None]
    assert cut.spans[first - 1] == text.spans[first - 1]
    truncated = sampled_text("hi", [1], ids, {eot}, pieces)  # ran out of max_new_tokens: no stop group
    assert truncated.text == TEXT and truncated.stop is None and truncated.spans[-1] is not None


def test_groups_across_smollm2_and_gemma3_cover_the_same_bytes_on_both_sides(smollm2_tokenizer, gemma3_tokenizer):
    """A sampled tokenization need not be canonical: the student's digits come one by one here. Every group covers
    the same byte range on both sides, the groups tile the text, and the stop pairs with the teacher's end."""
    smol, gemma = smollm2_tokenizer, gemma3_tokenizer
    pieces = token_bytes(smol)
    eot = smol.convert_tokens_to_ids("<|im_end|>")
    head, digits = TEXT[: TEXT.index("1234")], "1234.5"
    ids = smol(head, add_special_tokens=False)["input_ids"] + [smol.convert_tokens_to_ids(c) for c in digits]
    prompt = [{"role": "user", "content": "Say something."}]
    student = sampled_text(prompt, render_prompt(smol, prompt)[0], [*ids, eot], {eot}, pieces)
    assert student.text == TEXT
    encoded, spans = response_spans(gemma, prompt, TEXT)
    teacher_spans = byte_spans(spans, TEXT)
    outputs = TeacherOutputs(np.array(encoded.response_ids), np.zeros((len(spans), 1), np.int32),
                             np.zeros((len(spans), 1), np.float32), np.zeros(len(spans)), np.zeros(len(spans)))
    special = [t in set(gemma.all_special_ids) for t in encoded.response_ids]
    groups = TeacherAnswer(outputs, teacher_spans, end=end_of_turn(teacher_spans, special)).groups(student)
    *text_groups, stop = groups
    covered = 0
    for left, right in text_groups:
        mine = (student.spans[left[0]][0], student.spans[left[-1]][1])
        theirs = (teacher_spans[right[0]][0], teacher_spans[right[-1]][1])
        assert mine == theirs and mine[0] == covered
        covered = mine[1]
    assert covered == len(TEXT.encode())
    assert any(len(left) > 1 for left, _ in text_groups)  # the split digits meet Gemma's
    # Gemma's GGUF tokenizer has no chat template: polyfuse's plain format ends the response with its EOS.
    assert encoded.mode == "plain" and encoded.response_ids[-1] == gemma.eos_token_id
    assert stop == ([len(ids)], [len(encoded.response_ids) - 1])


# ---- the backends: sampled ids and top-K -----------------------------------------------------------------------


def test_transformers_backend_top_k_and_sampled_ids(tiny_world):
    spec = toy(tiny_world, "llama-compare")
    backend = build_backend(spec)
    model, tokenizer = load_model(spec), load_tokenizer(spec)
    sequences = [(encode(tokenizer, "Which is largest: 3, 17, 9?", r).input_ids,
                  len(encode(tokenizer, "Which is largest: 3, 17, 9?", r).prompt_ids)) for r in ("17", "it is 9 or 3")]
    answers = backend.topk_logprobs(sequences, 5)
    for (ids, prompt_length), answer in zip(sequences, answers, strict=True):
        with torch.no_grad():
            logps = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)[prompt_length - 1 : -1]
        top = logps.topk(5, -1)
        assert np.array_equal(answer.topk_ids, top.indices.numpy())
        assert np.allclose(answer.topk_logprobs, top.values.numpy(), atol=1e-5)
        assert np.allclose(answer.token_logps, logps.gather(-1, torch.tensor(ids[prompt_length:])[:, None])[:, 0],
                           atol=1e-5)
    prompts = [render_prompt(tokenizer, p)[0] for p in ("What is 3 + 4?", "Reverse ABC")]
    params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=5)
    state = torch.random.get_rng_state()
    sampled = backend.generate_ids(prompts, params)
    assert torch.equal(torch.random.get_rng_state(), state)  # a trainer's RNG is left alone
    texts = backend.generate_all(["What is 3 + 4?", "Reverse ABC"], params)
    stops = set(backend.stop_token_ids())
    for ids, text in zip(sampled, texts, strict=True):
        assert tokenizer.decode(ids[0], skip_special_tokens=True).strip() == text[0]
        assert all(t not in stops for t in ids[0][:-1]) and (ids[0][-1] in stops or len(ids[0]) == 12)


def test_the_teachers_end_of_turn_is_a_special_token_and_w_pairs_it_with_the_students_stop(tiny_world):
    """Before an empty text the gpt2 toy tokenizer emits a lone word-start marker with no characters: it is not the
    teacher's end of turn (read as one, a student that stopped at once was told the teacher does so with
    probability 1, which emptied the gym's addition answers); and W gives the student's end-of-turn token weight 1
    on the teacher's, so where the teacher would end and the student did not stop, the teacher's end-of-turn mass
    meets the student's stop mass instead of a tail that any token fills."""
    student = load_tokenizer(toy(tiny_world, "pivot"))
    stop = turn_end(student, set(student.all_special_ids))
    assert stop == student.eos_token_id
    teacher = OnlineTeacher(toy(tiny_world, "gpt2-arithmetic"), 4, student)
    try:
        prompt = "What is 3 + 4?"
        empty = sampled_text(prompt, render_prompt(student, prompt)[0], [stop], {stop}, token_bytes(student))
        assert (empty.text, empty.stop) == ("", 0)
        answer = teacher.score([empty])[0]
        assert teacher.tokenizer.convert_ids_to_tokens(answer.outputs.token_ids.tolist()) == ["▁", "<|endoftext|>"]
        assert end_of_turn(answer.spans) == 0  # the spans alone cannot tell the marker from the end of turn
        assert answer.end == 1 and answer.groups(empty) == [([0], [1])]
        teacher_end = teacher.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        column = teacher.projection.weights_t.to_dense()[teacher_end]
        assert column.nonzero().flatten().tolist() == [stop] and column[stop] == 1
        assert teacher_end not in teacher.projection.matched_teacher.tolist()  # no hybrid pair: GOLD skips EOS
        logps = torch.log_softmax(torch.randn(2, len(student), generator=torch.Generator().manual_seed(0)), -1)
        found = projected_logps(logps, torch.tensor([[teacher_end], [teacher_end]]), teacher.projection)
        assert torch.allclose(found[:, 0], logps[:, stop])
    finally:
        teacher.close()


def test_offline_projections_pair_the_end_of_turn_as_on_policy_does(tiny_world, tmp_path):
    """A stored teacher's W (`polyfuse train distill` with a projecting objective) gives the student's end-of-turn
    token weight 1 on the teacher's, the same matrix the on-policy teacher builds, not a W whose only row for
    the teacher's end of turn is the catch-all remainder."""
    from polyfuse.data import SFTRow
    from polyfuse.teacher import TeacherConfig, open_stores, run_teacher
    from polyfuse.teacher.targets import store_projections

    student = load_tokenizer(toy(tiny_world, "pivot"))
    teacher_spec = toy(tiny_world, "gpt2-arithmetic")
    run_teacher([SFTRow(id="r0", prompt="What is 3 + 4?", completion="7")], TeacherConfig(models=[teacher_spec], top_k=4),
                tmp_path / "store", quiet=True)
    (offline,) = store_projections(open_stores(tmp_path / "store"), student, "exact")
    online = OnlineTeacher(teacher_spec, 4, student)
    try:
        teacher_end = online.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        column = offline.weights_t.to_dense()[teacher_end]
        assert column.nonzero().flatten().tolist() == [student.eos_token_id] and column[student.eos_token_id] == 1
        assert torch.equal(offline.weights_t.to_dense(), online.projection.weights_t.to_dense())
    finally:
        online.close()


# ---- the loss on the student's own tokens, against TRL -------------------------------------------------------


def _student_copy(tiny_world, tmp_path) -> ModelSpec:
    """A student that shares `llama-compare`'s vocabulary, with other weights."""
    model = load_model(toy(tiny_world, "llama-compare"))
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.save_pretrained(tmp_path / "student")
    load_tokenizer(toy(tiny_world, "llama-compare")).save_pretrained(tmp_path / "student")
    return ModelSpec(name="student", path=str(tmp_path / "student"))


@pytest.mark.parametrize("beta, k", [(0.0, 4), (0.5, 1), (1.0, 1)])
def test_same_vocabulary_loss_on_sampled_tokens_equals_trl_server_distillation(tiny_world, tmp_path, beta, k):
    """The student samples, the teacher (the student's vocabulary and template) scores its very ids; over the
    text positions the group loss is TRL's per-token server loss on the same ids and log-probs (a stop token is
    compared as {stop, not stop} here, so TRL's value there is left out)."""
    from trl.experimental.server_distillation import ServerDistillationTrainer

    student = _student_copy(tiny_world, tmp_path)
    teacher = toy(tiny_world, "llama-compare")
    rows = [PromptRow(id=f"r{i}", prompt=p) for i, p in enumerate(["What is 3 + 4?", "Reverse ABC", "Largest: 1, 5"])]
    config = OnPolicyTrainConfig(teachers=[teacher], objective_args={"beta": beta, "top_k": k},
                                 sampling={"temperature": 1.0, "max_new_tokens": 6})
    tokenizer = load_tokenizer(student)
    objective = config.build_objective()
    online = OnlineTeacher(teacher, k, tokenizer)
    assert online.same_vocabulary and torch.equal(online.projection.weights_t.to_dense(), torch.eye(len(tokenizer)))
    rollout = Rollout(rows, [None] * 3, config, objective, student, tokenizer, [online])
    model = load_model(student)
    features, metrics = rollout.features([0, 1, 2], True, model, seed=1, step=0)
    assert metrics["onpolicy/on_policy"].tolist() == [1.0] * 3
    fields = {n: objective.target_fields[n] for n in objective.required_fields()}
    batch = DistillCollator(0, ("completion",), fields=fields)(features)
    outputs, labels = forward_response(model, batch)
    targets = labels[:, 1:]
    at, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    losses, _ = objective(DistillBatch(outputs.logits[at, cols], targets[at, cols], [online.projection],
                                       **{n: batch[n] for n in objective.required_fields()}))
    text = batch["group"][:, 0] == 1
    trainer = object.__new__(ServerDistillationTrainer)
    trainer.beta, trainer.loss_add_tail, trainer.reverse_kl_top_1_mode = beta, True, "sampled"
    total, count, start = 0.0, 0, 0
    for feature in features:
        ids, prompt_length = feature["completion_input_ids"], feature["completion_prompt_length"]
        n = len(ids) - prompt_length
        mine = text[start : start + n]
        start += n
        answer = online.backend.topk_logprobs([(ids, prompt_length)], k)[0]
        result = {"topk_logprobs": torch.from_numpy(answer.topk_logprobs)[None],
                  "topk_token_ids": torch.from_numpy(answer.topk_ids).long()[None],
                  "actual_logprobs": torch.from_numpy(answer.token_logps)[None]}
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, prompt_length - 1 : -1].float()
        completion = torch.tensor(ids[prompt_length:])
        masked = torch.where(mine, completion, -100)[None]
        if not mine.any():
            continue
        student_logps = torch.log_softmax(logits, -1)[None]
        if beta == 0:
            trl = trainer._compute_server_forward_kl_loss(result, student_logps, masked)
        else:
            trl = trainer._compute_server_sparse_top_1_divergence_loss(result, student_logps, completion[None], masked)
        total, count = total + trl.item() * int(mine.sum()), count + int(mine.sum())
    assert count >= 12 and (batch["group"] > 0).sum() == len(text)  # every position is one group
    assert losses[text].sum().item() / count == pytest.approx(total / count, abs=2e-6)


# ---- several teachers -----------------------------------------------------------------------------------------


def test_common_groups_and_the_mix_weights_by_hand():
    # Student tokens 0..3; teacher a groups [0][1][2,3]; teacher b groups [0,1][2][3]: shared ends 1 and 3.
    a = [([0], [0]), ([1], [1]), ([2, 3], [2])]
    b = [([0, 1], [0]), ([2], [1]), ([3], [2, 3])]
    merged = common_groups([a, b, None])
    assert merged == [[([0, 1], [0, 1]), ([2, 3], [2])], [([0, 1], [0]), ([2, 3], [1, 2, 3])], None]

    def answer(entropy_rows: list[list[float]]) -> TeacherAnswer:
        logps = np.log(np.array(entropy_rows, np.float64)).astype(np.float32)
        n = len(entropy_rows)
        outputs = TeacherOutputs(np.zeros(n, np.int32), np.zeros(logps.shape, np.int32), logps, np.zeros(n),
                                 np.zeros(n, np.float32), topk_logprobs=logps)
        return TeacherAnswer(outputs, [])

    sure, unsure = [0.9, 0.1], [0.5, 0.5]
    answers = [answer([unsure, sure, unsure]), answer([sure, unsure, unsure, sure])]
    h_sure, h_unsure = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)), math.log(2)
    # position 1: a's group ends at its token 1 (sure), b's at token 0 (sure); position 3: a unsure, b sure.
    uncertainty = mix_weights("uncertainty", merged[:2], answers, 4)
    assert uncertainty[1].tolist() == pytest.approx([0.5, 0.5])
    wa = math.exp(-h_unsure) / (math.exp(-h_unsure) + math.exp(-h_sure))
    assert uncertainty[3].tolist() == pytest.approx([wa, 1 - wa], abs=1e-6)
    assert uncertainty[[0, 2]].sum() == 0
    assert mix_weights("confident", merged[:2], answers, 4)[3].tolist() == [0.0, 1.0]
    assert mix_weights("average", merged[:2], answers, 4)[3].tolist() == [0.5, 0.5]
    assert mix_weights("sum", [a, b], answers, 4).tolist() == [[1, 0], [1, 1], [0, 1], [1, 1]]
    assert mix_weights("route", [None, b], [None, answers[1]], 4)[:, 0].sum() == 0


def test_weighted_group_losses_and_their_count(tiny_world):
    """`group_weight` scales each teacher's group losses, and the trainer counts the weighted groups."""
    vocab = 5
    probs = np.full((2, vocab), 0.2)
    probs[:, 0] = 0.6
    probs /= probs.sum(-1, keepdims=True)
    logps = np.log(probs)
    order = np.argsort(-logps, 1)
    top = np.take_along_axis(logps, order, 1).astype(np.float32)
    outputs = TeacherOutputs(np.array([1, 2]), order.astype(np.int32), top, np.zeros(2), logps[[0, 1], [1, 2]].astype(
        np.float32), topk_logprobs=top)
    row = AlignedRow([1, 2], [outputs, outputs], [[([0], [0]), ([1], [1])]] * 2, [None] * 2, [b"x"] * vocab)
    loss = DISTILL_OBJECTIVES.get("kd").model_validate({"top_k": 3})
    built = loss.targets(row)
    fields = {k: torch.tensor(v, dtype=loss.target_fields[k].dtype) for k, v in built.items()}
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(0))
    identity = Projection.identity(vocab)
    plain, _ = loss(DistillBatch(logits, torch.tensor([1, 2]), [identity] * 2, **fields))
    weights = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    weighted, metrics = loss(DistillBatch(logits, torch.tensor([1, 2]), [identity] * 2, group_weight=weights, **fields))
    assert weighted.tolist() == pytest.approx((plain / 2).tolist(), abs=1e-6)  # both teachers give the same loss
    assert set(metrics) >= {"kd/teacher0", "kd/teacher1"}
    inputs = {"group": fields["group"], "group_weight": weights, "labels": torch.zeros(1, 3)}
    assert OnPolicyTrainer.count_items(None, inputs).item() == pytest.approx(2.0)
    assert OnPolicyTrainer.count_items(None, {k: inputs[k] for k in ("group", "labels")}).item() == 4


def test_lambda_is_drawn_once_per_step_from_the_seed_and_the_step():
    class Stub:
        def __init__(self, lmbda):
            self.rollout = type("R", (), {"config": type("C", (), {"lmbda": lmbda})()})()
            self.args = type("A", (), {"seed": 3})()

    half = [OnPolicyTrainer.on_policy(Stub(0.5), step) for step in range(400)]
    assert 0.4 < sum(half) / 400 < 0.6
    assert half == [OnPolicyTrainer.on_policy(Stub(0.5), step) for step in range(400)]  # resumable, every process
    assert not any(OnPolicyTrainer.on_policy(Stub(0.0), s) for s in range(50))
    assert all(OnPolicyTrainer.on_policy(Stub(1.0), s) for s in range(50))


# ---- training: across tokenizers, accumulation, routing -------------------------------------------------------


def _rows(tiny_world, count: int = 4) -> list[PromptRow]:
    return [row.model_copy(update={"completion": row.answer}) for row in tiny_world.prompts("train", per_domain=count)]


def test_accumulation_and_batch_size_give_the_same_update_across_tokenizers(tiny_world, tmp_path):
    """lmbda 0: the rows' own completions, scored by two teachers with other tokenizers (uncertainty mix): batch 1 x
    accumulation 4 and batch 4 x 1 divide by the same weighted group count, so they make the same update."""
    rows = _rows(tiny_world, 2)[:4]
    config = dict(teachers=[toy(tiny_world, "llama-compare"), toy(tiny_world, "qwen-strings")], lmbda=0.0,
                  mix="uncertainty", objective_args={"top_k": 4}, max_length=96, **EXACT_STEP)
    pivot = ModelSpec(name="pivot", path=str(tiny_world.pivot_path))
    micro = train_onpolicy(pivot, rows, OnPolicyTrainConfig(batch_size=1, grad_accum=4, **config), tmp_path / "m")
    full = train_onpolicy(pivot, rows, OnPolicyTrainConfig(batch_size=4, grad_accum=1, **config), tmp_path / "f")
    a, b = load_file(str(micro / "model.safetensors")), load_file(str(full / "model.safetensors"))
    before = load_file(str(tiny_world.pivot_path / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert max((b[k] - before[k]).abs().max().item() for k in b) > 1e-4
    history = json.loads((full / "polyfuse_training.json").read_text())["log_history"][0]
    assert history["onpolicy/on_policy"] == 0.0
    assert history["onpolicy/groups/llama-compare"] > 0 and history["onpolicy/groups/qwen-strings"] > 0


def test_routed_on_policy_training_across_three_tokenizers(tiny_world, tmp_path):
    """MOPD on the toy world: each domain's prompts to its source (three tokenizers, one without a template); the
    pivot samples, and each teacher scores only its own rows."""
    rows = tiny_world.prompts("train", per_domain=2)
    names = ["llama-compare", "qwen-strings", "gpt2-arithmetic"]
    config = OnPolicyTrainConfig(
        teachers=[toy(tiny_world, n) for n in names], mix="route", route_by="domain",
        routes={"compare": "llama-compare", "strings": "qwen-strings", "arithmetic": "gpt2-arithmetic"},
        objective_args={"top_k": 8}, sampling={"max_new_tokens": 8}, batch_size=6, max_length=96, save_steps=0)
    tokenizer = load_tokenizer(ModelSpec(path=str(tiny_world.pivot_path)))
    routed = check_rows(rows, config, "rows")
    assert [names[t] for t in routed] == [config.routes[r.domain] for r in rows]
    teachers = [OnlineTeacher(m, 8, tokenizer) for m in config.teachers]
    rollout = Rollout(rows, routed, config, config.build_objective(), ModelSpec(path=str(tiny_world.pivot_path)),
                      tokenizer, teachers)
    model = load_model(ModelSpec(path=str(tiny_world.pivot_path)))
    features, metrics = rollout.features(list(range(len(rows))), True, model, seed=0, step=0)
    for k, (row, feature) in enumerate(zip(rows, features, strict=True)):
        groups = np.array(feature["group"])
        mine = names.index(config.routes[row.domain])
        assert groups[:, [t for t in range(3) if t != mine]].sum() == 0  # only its own teacher
        assert metrics[f"onpolicy/groups/{names[mine]}"][k] == (groups[:, mine] > 0).sum()
    out = train_onpolicy(ModelSpec(name="pivot", path=str(tiny_world.pivot_path)), rows, config, tmp_path / "out")
    summary = json.loads((out / "polyfuse_training.json").read_text())
    assert [t["name"] for t in summary["teachers"]] == names and summary["stage"] == "onpolicy"


# ---- the offline store now serves the group losses too --------------------------------------------------------


def test_the_teacher_store_records_the_normaliser_so_offline_kd_trains(tiny_world, tmp_path):
    from polyfuse.data import SFTRow
    from polyfuse.teacher import TeacherConfig, open_stores, run_teacher
    from polyfuse.trainers import DistillTrainConfig, train_distill

    rows = [SFTRow(id=r.id, prompt=r.prompt, completion=r.answer) for r in tiny_world.prompts("train", per_domain=2)]
    teacher = ModelSpec(name="qwen-strings", path=str(tiny_world.source_paths["qwen-strings"]))
    run_teacher(rows, TeacherConfig(models=[teacher], top_k=4), tmp_path / "store", quiet=True)
    (store,) = open_stores(tmp_path / "store")
    model, tokenizer = load_model(teacher), load_tokenizer(teacher)
    example = dict(store.examples())[rows[0].id].outputs()
    encoded = encode(tokenizer, rows[0].prompt, rows[0].completion)
    with torch.no_grad():
        logps = torch.log_softmax(model(torch.tensor([encoded.input_ids])).logits[0], -1)[len(encoded.prompt_ids) - 1:-1]
    assert np.allclose(example.topk_logprobs, logps.topk(4, -1).values.numpy(), atol=2e-2)  # fp16 logits
    config = DistillTrainConfig(objective="kd", objective_args={"top_k": 4}, alignment="offsets", batch_size=4,
                                save_steps=0, max_length=96)
    out = train_distill(ModelSpec(name="pivot", path=str(tiny_world.pivot_path)), rows, tmp_path / "store", config,
                        tmp_path / "kd")
    history = json.loads((out / "polyfuse_training.json").read_text())["log_history"][0]
    assert history["kd/loss/qwen-strings"] > 0 and math.isfinite(history["loss"])


# ---- bad inputs: one line, exit 2, before any student is loaded ----------------------------------------------


@pytest.fixture
def kit(tiny_world, tmp_path):
    rows = tiny_world.prompts("train", per_domain=2)
    write_rows(tmp_path / "prompts.jsonl", [r.model_copy(update={"teacher_id": "llama-compare"}) for r in rows])
    write_rows(tmp_path / "bad-route.jsonl", [r.model_copy(update={"teacher_id": "mistral"}) for r in rows])
    config = {"teachers": [toy(tiny_world, "llama-compare").model_dump(), toy(tiny_world, "gpt2-arithmetic").model_dump()],
              "objective_args": {"top_k": 4}, "sampling": {"max_new_tokens": 4}, "batch_size": 2, "max_length": 96,
              "save_steps": 0}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    return tmp_path, str(tiny_world.pivot_path)


@pytest.mark.parametrize("data, settings, message", [
    ("bad-route.jsonl", ["mix=route", "route_by=teacher_id"],
     r"bad-route.jsonl: row '\w+': teacher_id 'mistral' names no teacher; teachers: llama-compare, gpt2-arithmetic$"),
    ("prompts.jsonl", ["lmbda=0.5"], r"prompts.jsonl: row '\w+' has no `completion`: lmbda 0.5 < 1"),
    ("prompts.jsonl", ["objective_args.top_k=600"],
     r"teacher llama-compare: top_k 600 is larger than the 512 log-probs per position it returns"),
    ("prompts.jsonl", ["objective=uld"], r"objective 'uld' reads stored teacher logits.*kd or gold"),
    ("prompts.jsonl", ["route_by=teacher_id"], r"mix route needs route_by"),
    ("prompts.jsonl", ["mix=route", "route_by=teacher_id", "routes={a: nobody}"], r"routes: \['nobody'\] name no teacher"),
    ("prompts.jsonl", ["student_backend=openai"], r"student_backend"),
    ("prompts.jsonl", ["sampling.n=2"], r"sampling.n: .*less than or equal to 1"),
])
def test_bad_inputs_are_one_line_and_exit_2(polyfuse_cli, kit, data, settings, message):
    import re

    folder, pivot = kit
    sets = [item for s in settings for item in ("--set", s)]
    proc = polyfuse_cli("train", "onpolicy", "-c", folder / "cfg.yaml", "--prompts", folder / data, "--model", pivot,
                        "-o", folder / "out", *sets)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert re.search(message, proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr and not (folder / "out").exists()


def test_a_teacher_whose_server_is_down_is_one_line_and_exit_2(polyfuse_cli, kit, tiny_world):
    folder, pivot = kit
    config = yaml.safe_load((folder / "cfg.yaml").read_text())
    url = f"http://127.0.0.1:{free_port()}/v1"
    config["teachers"][0]["backend"] = {"type": "openai", "base_url": url, "max_retries": 0, "timeout": 5}
    (folder / "served.yaml").write_text(yaml.safe_dump(config))
    proc = polyfuse_cli("train", "onpolicy", "-c", folder / "served.yaml", "--prompts", folder / "prompts.jsonl",
                        "--model", pivot, "-o", folder / "out")
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert url in line and "cannot connect" in line and "is the server running?" in line and "\n" not in line.strip()
    assert not (folder / "out").exists()
