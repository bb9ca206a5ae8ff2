"""Teacher outputs for explicit fusion: each source's top-K next-token logits over the training texts,
computed once offline (`polyfuse teacher`), so no teacher model is loaded while distilling."""

from polyfuse.lazy import lazy_exports

_EXPORTS = {
    "TeacherConfig": "run",
    "response_topk": "run",
    "run_teacher": "run",
    "FORMAT": "store",
    "TeacherExample": "store",
    "TeacherStore": "store",
    "open_stores": "store",
    "read_shard": "store",
    "write_shard": "store",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
