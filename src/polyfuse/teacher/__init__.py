"""Teacher outputs for explicit fusion: each source's top-K next-token logits over the training texts,
computed once offline (`polyfuse teacher`), so no teacher model is loaded while distilling."""

from polyfuse.teacher.run import TeacherConfig, response_topk, run_teacher
from polyfuse.teacher.store import FORMAT, TeacherExample, TeacherStore, open_stores, read_shard, write_shard

__all__ = [
    "FORMAT",
    "TeacherConfig",
    "TeacherExample",
    "TeacherStore",
    "open_stores",
    "read_shard",
    "response_topk",
    "run_teacher",
    "write_shard",
]
