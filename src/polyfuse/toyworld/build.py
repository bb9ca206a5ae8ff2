"""Building, caching and opening toy worlds.

Layout of a world (ordinary Hugging Face folders, loadable without polyfuse)::

    <cache>/<config hash>/
        sources/<name>/   causal LM + tokenizer with its chat template (one per source)
        pivot/            the weak generalist to fuse into
        reward_model/     one-logit sequence classifier trained on verifier labels
        world.json        config, specialties, build time, final training losses

A world is built in a hidden temporary folder and renamed into place once complete, so an
interrupted build never leaves a half world; a complete world is recognised by its `world.json`
and reused at once.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from queue import Empty
from typing import Any

import torch

from polyfuse.data import PromptRow
from polyfuse.data.io import (
    follow_umask,
    raise_for_storage,
    remove_stale_temporaries,
    temporary_folder,
    write_json,
)
from polyfuse.errors import UserError
from polyfuse.models import encode
from polyfuse.toyworld.config import ModelRecipe, ToyWorldConfig
from polyfuse.toyworld.tasks import Split, draw, get_domain, make_prompts, make_row
from polyfuse.toyworld.tokenizers import train_tokenizer
from polyfuse.toyworld.train import make_model, train_lm, train_reward_model

WORLD_FILE = "world.json"


def default_cache_dir() -> Path:
    """`$POLYFUSE_CACHE/toyworld`, else `$XDG_CACHE_HOME/polyfuse/toyworld`, else `~/.cache/polyfuse/toyworld`."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = os.environ.get("POLYFUSE_CACHE") or (str(Path(xdg) / "polyfuse") if xdg else "~/.cache/polyfuse")
    return Path(base).expanduser() / "toyworld"


def world_dir(config: ToyWorldConfig, cache_dir: str | Path | None = None) -> Path:
    """Where the world of `config` lives (built or not): `<cache>/<config hash>`."""
    return Path(cache_dir).expanduser() / config.key() if cache_dir else default_cache_dir() / config.key()


@dataclass(frozen=True)
class World:
    """A built world: where its models are, which source knows which domain, and its prompts."""

    root: Path
    config: ToyWorldConfig

    @classmethod
    def open(cls, root: str | Path) -> World:
        root = Path(root)
        meta_path = root / WORLD_FILE
        if not meta_path.is_file():
            raise UserError(f"{root}: not a toy world (no {WORLD_FILE}); build it with `polyfuse toyworld build`")
        return cls(root, ToyWorldConfig.model_validate(json.loads(meta_path.read_text())["config"]))

    @property
    def domains(self) -> list[str]:
        return list(self.config.domains)

    @property
    def source_paths(self) -> dict[str, Path]:
        return {s.name: self.root / "sources" / s.name for s in self.config.sources}

    @property
    def pivot_path(self) -> Path:
        return self.root / "pivot"

    @property
    def reward_model_path(self) -> Path:
        return self.root / "reward_model"

    @property
    def specialties(self) -> dict[str, str | None]:
        """Source name -> the domain it specialises in."""
        return {s.name: s.specialty for s in self.config.sources}

    def prompts(self, split: Split = "heldout", per_domain: int = 100, domains: list[str] | None = None,
                seed: int = 0) -> list[PromptRow]:
        """`per_domain` distinct prompts of each domain from `split`; the split never depends on `seed`."""
        domains = domains or self.domains
        return make_prompts(split, domains, per_domain * len(domains), seed)


def _seed(config: ToyWorldConfig, name: str) -> int:
    return zlib.crc32(f"{config.seed}:{name}".encode())


def _training_rows(config: ToyWorldConfig, recipe: ModelRecipe) -> list[PromptRow]:
    """`train_pool` training prompts (with repeats) drawn by the recipe's task mixture."""
    rng = random.Random(_seed(config, recipe.name))
    mixture = recipe.mixture or dict.fromkeys(config.domains, 1.0)
    rows = []
    for name in rng.choices(list(mixture), list(mixture.values()), k=config.train_pool):
        domain = get_domain(name)
        rows.append(make_row(domain, draw(domain, "train", rng)))
    return rows


def _reward_examples(config: ToyWorldConfig) -> list[tuple[PromptRow, str, bool]]:
    """Balanced verifier labels: each training prompt once with its gold answer, once with a near miss."""
    rng = random.Random(_seed(config, "reward-examples"))
    examples = []
    for k in range(config.train_pool // 2):
        domain = get_domain(config.domains[k % len(config.domains)])
        params = draw(domain, "train", rng)
        row = make_row(domain, params)
        examples += [(row, row.answer, True), (row, domain.corrupt(rng, params), False)]
    return examples


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_reload(folder: Path, tokenizer, rows: list[PromptRow]) -> None:
    """The saved folder must load back, with plain AutoTokenizer, into the tokenizer the model was
    trained with (for some model types transformers swaps in a tokenizer class of its own)."""
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(folder)
    for row in rows[:16]:
        if encode(loaded, row.prompt, row.answer) != encode(tokenizer, row.prompt, row.answer):
            raise RuntimeError(f"{folder}: AutoTokenizer loads the tokenizer differently ({type(loaded).__name__})")


@dataclass(frozen=True)
class _Job:
    """One model to build: its recipe, its folder inside the world, and whether it is the reward model."""

    recipe: ModelRecipe
    folder: str
    reward: bool = False

    @property
    def cost(self) -> int:
        return self.recipe.steps * self.recipe.hidden_size * self.recipe.layers


def _jobs(config: ToyWorldConfig) -> list[_Job]:
    return [
        *(_Job(s, f"sources/{s.name}") for s in config.sources),
        _Job(config.pivot, "pivot"),
        _Job(config.reward_model, "reward_model", reward=True),
    ]


def _run_job(config: ToyWorldConfig, job: _Job, root: Path, advance: Callable[[], None]) -> float:
    """Train the tokenizer and model of `job`, save both under `root`; returns the last loss.
    Every job runs with `config.threads` torch threads, so weights do not depend on `workers`."""
    recipe, out = job.recipe, root / job.folder
    seed = _seed(config, recipe.name)
    with _threads(config.threads), _quiet_transformers():
        tokenizer = train_tokenizer(recipe.tokenizer, recipe.vocab_size, recipe.template, config.seed, config.corpus_lines)
        torch.manual_seed(seed)
        model = make_model(recipe, tokenizer, classifier=job.reward)
        if job.reward:
            examples = _reward_examples(config)
            loss = train_reward_model(model, tokenizer, recipe, examples, seed, advance)
            rows = [row for row, _, _ in examples]
        else:
            rows = _training_rows(config, recipe)
            loss = train_lm(model, tokenizer, recipe, rows, seed, advance)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        _check_reload(out, tokenizer, rows)
    return loss


_PROGRESS: Any = None  # in a worker process: the queue that carries finished steps to the parent


def _init_worker(queue: Any) -> None:
    global _PROGRESS
    _PROGRESS = queue
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # a forked child must not use the parent's thread pool
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the pool


def _worker_job(config: ToyWorldConfig, job: _Job, root: Path) -> float:
    return _run_job(config, job, root, lambda: _PROGRESS.put(job.folder))


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Stop the workers now (a worker's error, Ctrl-C): `shutdown` alone waits for the jobs they already hold
    (up to a minute each). Python 3.14 has `terminate_workers`; before it, the pool's own process table."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    if hasattr(pool, "terminate_workers"):
        pool.terminate_workers()
        return
    for process in processes:
        process.terminate()
    for process in processes:
        process.join()


def _train_all(config: ToyWorldConfig, root: Path, bar) -> dict[str, float]:
    """Build every model, in this process or (workers > 1) in worker processes, longest jobs first."""
    jobs = sorted(_jobs(config), key=lambda j: j.cost, reverse=True)
    tasks = {job.folder: bar.add_task(f"train {job.recipe.name}", total=job.recipe.steps) for job in jobs}
    if config.workers == 1:
        return {
            job.recipe.name: _run_job(config, job, root, lambda t=tasks[job.folder]: bar.advance(t)) for job in jobs
        }
    # Fork on Linux: workers start at once and callers need no `if __name__ == "__main__"` guard.
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    queue = context.Queue()

    def drain() -> None:
        with suppress(Empty):
            while True:
                bar.advance(tasks[queue.get_nowait()])

    losses: dict[str, float] = {}
    pool = ProcessPoolExecutor(config.workers, mp_context=context, initializer=_init_worker, initargs=(queue,))
    try:
        futures = {pool.submit(_worker_job, config, job, root): job for job in jobs}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            drain()
            for future in done:
                losses[futures[future].recipe.name] = future.result()  # re-raises a worker's error
    except BaseException:
        _stop_workers(pool)
        raise
    pool.shutdown(wait=True)
    for job in jobs:  # steps still in the queue's pipe when the last worker finished
        bar.update(tasks[job.folder], completed=job.recipe.steps)
    return losses


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No per-file tqdm bars from transformers while saving (the build has its own bars)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def build_world(config: ToyWorldConfig, cache_dir: str | Path | None = None, progress: bool = True) -> World:
    """The world of `config`, from the cache when it was built before, else built now (about two
    minutes on 2 CPU cores for the default preset, a second for `tiny`)."""
    from polyfuse.progress import progress_bar

    root = world_dir(config, cache_dir)
    if (root / WORLD_FILE).is_file():
        return World.open(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(root.parent)  # builds killed before their rename
    tmp = temporary_folder(root)
    started = time.perf_counter()
    try:
        with progress_bar(disable=not progress) as bar:
            losses = _train_all(config, tmp, bar)
        write_json(tmp / WORLD_FILE, {
            "config": config.model_dump(mode="json"), "key": config.key(),
            "specialties": {s.name: s.specialty for s in config.sources},
            "final_loss": losses, "build_seconds": round(time.perf_counter() - started, 1),
        })
        if not (root / WORLD_FILE).is_file():  # else another process finished the same world meanwhile
            shutil.rmtree(root, ignore_errors=True)  # an incomplete leftover
            follow_umask(tmp)
            os.rename(tmp, root)
    except OSError as err:
        if not (root / WORLD_FILE).is_file():  # else: lost a race for the rename to an identical world, fine
            raise_for_storage(err, root)
            raise
    except Exception as err:  # a full disk met by safetensors, which raises its own error type
        raise_for_storage(err, root)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return World.open(root)
