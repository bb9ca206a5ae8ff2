"""Run in the vLLM venv by tests/test_engines.py: one vLLM engine start for several checks.

    python engine_checks.py JOB.json OUT.json

JOB: {"model": {...EngineModel...}, "greedy": [prompts], "max_new_tokens": N, "seeded": [prompts],
"sequences": [[ids, prompt_length], ...]}. OUT: the start time, greedy texts, three seeded runs (seed 7 twice,
seed 8 once) and the sequence scores, for the test to compare with the transformers backend.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    from polyfuse.sampling import EngineModel, SamplingParams, build_backend

    job = json.loads(open(sys.argv[1]).read())
    start = time.perf_counter()
    backend = build_backend(EngineModel.model_validate(job["model"]))
    started = time.perf_counter() - start
    with backend:
        greedy = backend.generate_all(job["greedy"], SamplingParams(temperature=0.0, max_new_tokens=job["max_new_tokens"]),
                                      batch_size=64)
        seeded = [
            backend.generate_all(job["seeded"], SamplingParams(n=2, temperature=0.9, top_p=0.95, max_new_tokens=24,
                                                               seed=seed))
            for seed in (7, 7, 8)
        ]
        scores = backend.score([(ids, length) for ids, length in job["sequences"]])
    with open(sys.argv[2], "w") as handle:
        json.dump({"start_s": started, "greedy": greedy, "seeded": seeded, "scores": scores}, handle)


if __name__ == "__main__":  # vLLM may spawn processes that import this module again
    main()
