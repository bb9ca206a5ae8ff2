"""Sampling backends: N responses per prompt, each model through its own chat template."""

from polyfuse.sampling.base import BACKENDS, Backend, SamplingParams, get_backend

# Backends register themselves on import.
from polyfuse.sampling import transformers_backend  # noqa: E402,F401  isort: skip

__all__ = ["BACKENDS", "Backend", "SamplingParams", "get_backend"]
