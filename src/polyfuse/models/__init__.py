"""Loading models and tokenizers, and rendering prompts through each model's own chat template."""

from polyfuse.models.loader import ModelSpec, load_config, load_generation_config, load_model, load_tokenizer
from polyfuse.models.templates import Encoded, encode, render_prompt

__all__ = ["Encoded", "ModelSpec", "encode", "load_config", "load_generation_config", "load_model", "load_tokenizer", "render_prompt"]
