"""Run in the vLLM venv by tests/test_engines.py: one vLLM engine start for several checks.

    python engine_checks.py JOB.json OUT.json

JOB: {"model": {...EngineModel...}, "greedy": [prompts], "max_new_tokens": N, "seeded": [prompts],
"sequences": [[ids, prompt_length], ...]}; the model's `sampling.stop` strings (which start the engine with its
tokenizer); "chat": a conversation. OUT: the start time, greedy texts, the same greedy texts with the stop strings,
three seeded runs (seed 7 twice, seed 8 once), the sequence scores and, through vLLM's own API on the same engine,
the conversation rendered by the engine's tokenizer and chat template (the model folder's), its prompt ids, greedy
text and prompt log-probs, for the tests to compare with transformers.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    from polyfuse.sampling import SampledModel, SamplingParams, build_backend

    job = json.loads(open(sys.argv[1]).read())
    start = time.perf_counter()
    model = SampledModel.model_validate(job["model"])
    backend = build_backend(model)
    started = time.perf_counter() - start
    with backend:
        greedy = backend.generate_all(job["greedy"], SamplingParams(temperature=0.0, max_new_tokens=job["max_new_tokens"]),
                                      batch_size=64)
        stopped = backend.generate_all(job["greedy"], SamplingParams(temperature=0.0, max_new_tokens=job["max_new_tokens"],
                                                                     stop=model.sampling.stop), batch_size=64)
        seeded = [
            backend.generate_all(job["seeded"], SamplingParams(n=2, temperature=0.9, top_p=0.95, max_new_tokens=24,
                                                               seed=seed))
            for seed in (7, 7, 8)
        ]
        scores = backend.score([(ids, length) for ids, length in job["sequences"]])
        chat = own_chat_template(backend.engine, job["chat"])
    with open(sys.argv[2], "w") as handle:
        json.dump({"start_s": started, "greedy": greedy, "stopped": stopped, "detokenizes": backend.detokenizes,
                   "seeded": seeded, "scores": scores, "chat": chat}, handle)


def own_chat_template(llm, conversation: list[dict]) -> dict:
    """The conversation through the engine's own tokenizer and chat template: the rendered prompt, its ids, 12 greedy
    tokens as text and the prompt's log-probs."""
    from vllm import SamplingParams as VllmParams

    prompt = llm.get_tokenizer().apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    greedy = llm.generate([prompt], VllmParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    scored = llm.generate([prompt], VllmParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    logps = [next(iter(d.values())).logprob for d in scored.prompt_logprobs[1:]]
    return {"prompt": prompt, "ids": list(greedy.prompt_token_ids), "text": greedy.outputs[0].text, "logps": logps}


if __name__ == "__main__":  # vLLM may spawn processes that import this module again
    main()
