"""Sharded, multi-process work: the one way sample, score, logprobs and teacher split their work.

Work is a grid of (model, chunk of rows) shards. Under `accelerate launch` the processes take the
shards in turn (shard i goes to process i mod n, models outer, chunks inner), so the assignment, and with
per-shard seeds the output, does not depend on which process runs first. A finished shard (written
atomically by its owner) is skipped, so a killed run resumes with the shards still missing. At the end
every process waits for the others and the main process alone gathers the shards into the output.
One process (no launcher) is the same code with n = 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def process_state() -> Any:
    """accelerate's view of the processes (index, count, barrier); one process without a launcher.

    `PartialState()` alone sees a CPU launch (`ACCELERATE_USE_CPU`, or a machine without an accelerator)
    as one process per rank, each believing it is the main one: only `Accelerator` reads that flag. So
    the flag is passed on, and a launch it still misses is set up again for CPU processes."""
    import os

    from accelerate import PartialState
    from accelerate.utils import DistributedType

    cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    state = PartialState(cpu=cpu)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched and state.distributed_type == DistributedType.NO:
        PartialState._reset_state()
        state = PartialState(cpu=True)
    return state


class ShardPlan:
    """Which (model, chunk) shards this process owns, and the barrier and gather around them."""

    def __init__(self, models: int, chunks: int, state: Any = None):
        self.state = state if state is not None else process_state()
        self.models, self.chunks = models, chunks
        shards = [(m, c) for m in range(models) for c in range(chunks)]
        count, index = self.state.num_processes, self.state.process_index
        self.mine = {shard for n, shard in enumerate(shards) if n % count == index}

    @property
    def is_main(self) -> bool:
        return bool(self.state.is_main_process)

    @property
    def writer(self) -> dict[str, int]:
        """What a shard's sidecar records of the process that wrote it: which one, of how many."""
        return {"process": self.state.process_index, "processes": self.state.num_processes}

    def todo(self, model: int, done: Callable[[int], bool]) -> list[int]:
        """The chunks of `model` that this process owns and that are not finished yet, in order."""
        return [c for c in range(self.chunks) if (model, c) in self.mine and not done(c)]

    def barrier(self) -> None:
        self.state.wait_for_everyone()

    def on_main(self, work: Callable[[], T]) -> T | None:
        """Wait for every process, run `work` on the main process only (e.g. gather the shards), wait again;
        returns its result on the main process, None elsewhere."""
        self.barrier()
        result = work() if self.is_main else None
        self.barrier()
        return result
