"""Teacher outputs for explicit fusion: each source's top-K next-token logits over the training texts,
computed once offline (`polyfuse teacher`), so no teacher model is loaded while distilling."""

from polyfuse.lazy import lazy_exports

_EXPORTS = {  # module -> the names it gives the package
    "run": ("TeacherConfig", "response_topk", "run_teacher"),
    "store": ("FORMAT", "TeacherExample", "TeacherStore", "open_stores", "read_shard", "write_shard"),
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
