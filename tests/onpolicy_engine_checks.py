"""Run in the vLLM venv by tests/test_onpolicy_engines.py: the vLLM engine as an on-policy teacher and student.

    python onpolicy_engine_checks.py JOB.json OUT.json

- a teacher engine returns top-K log-probs above vLLM's default limit of 20 (`OnlineTeacher` starts it with
  `max_logprobs`);
- a student engine inside this process samples ids and takes new weights in place (`load_weights`), then scores
  sequences with them;
- `train_onpolicy` runs with `student_backend: vllm` (weights refreshed every step) and a teacher of another
  tokenizer in process.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    from polyfuse.data import PromptRow
    from polyfuse.models import ModelSpec, load_model, load_tokenizer
    from polyfuse.sampling import EngineModel, SamplingParams
    from polyfuse.sampling.vllm_backend import VllmBackend, VllmSettings
    from polyfuse.teacher.online import OnlineTeacher
    from polyfuse.trainers.onpolicy import OnPolicyTrainConfig, train_onpolicy

    job = json.loads(open(sys.argv[1]).read())
    out: dict = {}
    # Every engine here runs inside this process: for these tiny models the start dominates, and it is half as long
    # there (an engine process of its own re-imports vLLM); the engine tests' other checks run vLLM's default.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    student_spec = ModelSpec.model_validate(job["student"])
    start = time.perf_counter()
    teacher = OnlineTeacher(EngineModel.model_validate(job["teacher"]), job["k"], load_tokenizer(student_spec))
    out["teacher_start_s"] = time.perf_counter() - start
    answers = teacher.backend.topk_logprobs([tuple(s) for s in job["sequences"]], job["k"])
    out["topk"] = [{"ids": a.topk_ids.tolist(), "logps": a.topk_logprobs.tolist(), "own": a.token_logps.tolist()}
                   for a in answers]
    teacher.close()

    start = time.perf_counter()
    student = VllmBackend(student_spec, VllmSettings(max_model_len=128, max_num_seqs=8))
    out["student_start_s"], out["in_process"] = time.perf_counter() - start, student.in_process
    out["stops"] = student.stop_token_ids()
    params = SamplingParams(temperature=1.0, max_new_tokens=job["max_new_tokens"], seed=3)
    out["sampled"] = student.generate_ids(job["prompts"], params)
    out["sampled_again"] = student.generate_ids(job["prompts"], params)
    model = load_model(ModelSpec(path=job["perturbed"]))
    start = time.perf_counter()
    student.load_weights((name, tensor.detach()) for name, tensor in model.state_dict().items())
    out["refresh_s"] = time.perf_counter() - start
    out["scores"] = student.score([tuple(s) for s in job["student_sequences"]])
    student.close()

    config = OnPolicyTrainConfig.model_validate(job["train"])
    rows = [PromptRow.model_validate(r) for r in job["rows"]]
    start = time.perf_counter()
    saved = train_onpolicy(student_spec, rows, config, job["out"])
    out["train_s"] = time.perf_counter() - start
    out["history"] = json.loads((saved / "polyfuse_training.json").read_text())["log_history"]
    out["trained_differs"] = any(
        (a - b).abs().max().item() > 0 for a, b in zip(load_model(student_spec).state_dict().values(),
                                                       load_model(ModelSpec(path=str(saved))).state_dict().values(),
                                                       strict=True))
    with open(sys.argv[2], "w") as handle:
        json.dump(out, handle)


if __name__ == "__main__":  # vLLM may spawn processes that import this module again
    main()
