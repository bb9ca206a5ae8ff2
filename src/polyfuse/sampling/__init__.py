"""Inference backends: how polyfuse samples from, evaluates and scores a model.

`transformers` (in this process, the default), `vllm` (vLLM's offline engine) and `openai` (any
OpenAI-compatible server). A model picks one with its `backend:` field; each backend is one module of this
package, registered in `BACKENDS` on the first lookup.
"""

from polyfuse.sampling.base import (
    BACKENDS,
    Backend,
    BackendConfig,
    BackendSettings,
    EngineModel,
    SampledModel,
    SamplingParams,
    backend_max_length,
    build_backend,
    request_seed,
)
from polyfuse.sampling.run import SampleConfig, ShardCache, run_sample

__all__ = [
    "run_sample",
    "SampleConfig",
    "ShardCache",
    "BACKENDS",
    "Backend",
    "BackendConfig",
    "BackendSettings",
    "EngineModel",
    "SampledModel",
    "SamplingParams",
    "backend_max_length",
    "build_backend",
    "request_seed",
]
