"""A small offline world in which model fusion has something to do.

    world = build_world(ToyWorldConfig.preset("default"))   # about 2 min on 2 cores, then cached
    world.prompts("train", per_domain=100)                  # PromptRows with gold answers
    world_info(world)                                       # held-out accuracy of every model

What is in it (default preset, measured on 3 seeds; held-out accuracy, greedy):

- three domains with verifiable answers (`tasks`): `arithmetic` (47 + 8), `strings` (reverse
  KQZM), `compare` (largest of three numbers); train / held-out split by a hash of the task;
- three sources, each trained 94% on its own domain (92-100% there, 0-37% elsewhere), each with
  its own architecture, tokenizer algorithm, vocabulary size and chat template:
  `llama-compare` (Llama, byte-level BPE, Llama-3 template), `qwen-strings` (Qwen3, Unigram,
  ChatML), `gpt2-arithmetic` (GPT-2, WordPiece, no template: polyfuse's plain format);
- a smaller `pivot` (Mistral, SentencePiece-style BPE, Zephyr template) pretrained on sister tasks
  (subtraction, copying, minimum) only: about 1% on every domain, but fine-tuning on a few hundred
  correct answers lifts it by 40-80 points, which is the room fusion needs;
- a `reward_model` (Llama sequence classifier, one logit, Gemma-style template) trained on gold
  answers vs near misses; it ranks gold above a near miss 75-88% of the time on `compare`, 58-68%
  on `strings`, and near chance on `arithmetic` (it would have to do the sum).

Every model is a plain Hugging Face folder; answers are checked by the `toyworld` verifier
(`polyfuse.scorers.toyworld`: exact match). Module guide: `tasks` (domains, splits), `tokenizers`
(tokenizer training, templates), `config` (recipes, presets, cache key), `train` (models and
training loops), `build` (cache, parallel build, `World`), `info` (accuracies).
"""

from polyfuse.toyworld.build import World, build_world, default_cache_dir, world_dir
from polyfuse.toyworld.config import GymSettings, LoraRecipe, ModelRecipe, ToyWorldConfig
from polyfuse.toyworld.info import gym_report, reward_model_accuracy, world_info
from polyfuse.toyworld.tasks import DOMAINS, GYM_DOMAINS, make_prompts

__all__ = [
    "DOMAINS",
    "GYM_DOMAINS",
    "GymSettings",
    "LoraRecipe",
    "ModelRecipe",
    "ToyWorldConfig",
    "World",
    "build_world",
    "default_cache_dir",
    "gym_report",
    "make_prompts",
    "reward_model_accuracy",
    "world_dir",
    "world_info",
]
