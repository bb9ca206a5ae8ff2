"""Streaming weight merging: mergekit-style configs, validated up front, merged tensor by tensor.

`load_merge_config` reads and checks a config without touching a model; `run_merge` plans from the
safetensors headers, merges with a method of `polyfuse.merge.methods`, and writes a sharded,
resumable output folder.
"""

from polyfuse.merge.config import MergeConfig, load_merge_config
from polyfuse.merge.executor import MergeOptions, MergeResult, run_merge

__all__ = ["MergeConfig", "MergeOptions", "MergeResult", "load_merge_config", "run_merge"]
