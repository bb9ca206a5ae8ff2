"""Streaming weight merging: mergekit-style configs, validated up front, merged tensor by tensor.

`load_merge_config` reads and checks a config without touching a model; `run_merge` plans from the
safetensors headers, merges with a method of `polyfuse.merge.methods`, and writes a sharded,
resumable output folder.
"""

from polyfuse.lazy import lazy_exports

_EXPORTS = {
    "MergeConfig": "config",
    "load_merge_config": "config",
    "MergeOptions": "executor",
    "MergeResult": "executor",
    "run_merge": "executor",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
