"""A small offline world in which model fusion has something to do.

Three task domains with verifiable answers (`tasks`), three source models that each specialise in
one domain and differ in architecture, tokenizer and chat template, a weak generalist pivot, and a
tiny reward model, all trained on the CPU from a seed and saved as ordinary Hugging Face folders
(`build`). Importing this package registers the `toyworld` verifier.

    world = build_world(ToyWorldConfig.preset("default"))   # cached by config hash
    world.prompts("train", per_domain=100)                  # PromptRows with gold answers
    world_info(world)                                       # held-out accuracy of every model
"""

from polyfuse.toyworld.build import World, build_world, default_cache_dir, world_dir
from polyfuse.toyworld.config import ModelRecipe, ToyWorldConfig
from polyfuse.toyworld.info import reward_model_accuracy, world_info
from polyfuse.toyworld.scorer import ToyVerifier, ToyVerifierConfig
from polyfuse.toyworld.tasks import DOMAINS, make_prompts, verify

__all__ = [
    "DOMAINS",
    "ModelRecipe",
    "ToyVerifier",
    "ToyVerifierConfig",
    "ToyWorldConfig",
    "World",
    "build_world",
    "default_cache_dir",
    "make_prompts",
    "reward_model_accuracy",
    "verify",
    "world_dir",
    "world_info",
]
