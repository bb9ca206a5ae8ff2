"""Streaming weight merging: mergekit-style configs, validated up front, merged tensor by tensor.

`load_merge_config` reads and checks a config without touching a model; `run_merge` plans from the
safetensors headers, merges with a method of `polyfuse.merge.methods`, and writes a sharded,
resumable output folder.
"""

from polyfuse.lazy import lazy_exports

_EXPORTS = {  # module -> the names it gives the package
    "config": ("MergeConfig", "load_merge_config"),
    "executor": ("MergeOptions", "MergeResult", "run_merge"),
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
