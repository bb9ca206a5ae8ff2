"""Building, caching and opening toy worlds.

Layout of a world (ordinary Hugging Face folders, loadable without polyfuse)::

    <cache>/<config hash>/
        sources/<name>/   causal LM + tokenizer with its chat template (one per source)
        pivot/            the weak generalist to fuse into
        reward_model/     one-logit sequence classifier trained on verifier labels
        world.json        config, specialties, build time, final training losses, CPU seconds per model
      a fusion gym (a config with a `gym` section) also has:
        merging/base/                   the shared pretrained base
        merging/specialists/<domain>/   the base + a LoRA fine-tune on one domain (merged into the weights)
        merging/multitask/              the base + a LoRA fine-tune on every domain (FusionBench's baseline)
        texts/gold.jsonl                gold training texts (SFT rows) that no source wrote

A world is built in a hidden temporary folder and renamed into place once complete, so an
interrupted build never leaves a half world; a complete world is recognised by its `world.json`
and reused at once.
"""

from __future__ import annotations

import ctypes
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

from polyfuse.config import cache_root
from polyfuse.data import PromptRow, SFTRow
from polyfuse.data.io import (
    follow_umask,
    raise_for_storage,
    remove_stale_temporaries,
    temporary_folder,
    write_json,
    write_rows,
)
from polyfuse.errors import UserError
from polyfuse.models import encode
from polyfuse.toyworld.config import LoraRecipe, ModelRecipe, ToyWorldConfig
from polyfuse.toyworld.tasks import Split, distinct_tasks, draw, get_domain, make_prompts, make_row
from polyfuse.toyworld.tokenizers import train_tokenizer
from polyfuse.toyworld.train import make_model, train_lm, train_reward_model, with_lora

WORLD_FILE = "world.json"


def default_cache_dir() -> Path:
    """`<cache>/toyworld` (`polyfuse.config.cache_root`)."""
    return cache_root() / "toyworld"


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

    @property
    def is_gym(self) -> bool:
        return self.config.gym is not None

    def _gym_path(self, relative: str) -> Path:
        if not self.is_gym:
            raise UserError(f"{self.root}: not a fusion gym (no merging models, no gold texts); use a gym preset")
        return self.root / relative

    @property
    def merge_base_path(self) -> Path:
        """The shared pretrained base of the merging specialists (a gym only)."""
        return self._gym_path("merging/base")

    @property
    def specialist_paths(self) -> dict[str, Path]:
        """Domain -> the base fine-tuned (LoRA, merged into the weights) on that domain (a gym only)."""
        return {d: self._gym_path(f"merging/specialists/{d}") for d in self.domains}

    @property
    def multitask_path(self) -> Path:
        """The base fine-tuned (LoRA) on every domain at once (a gym only)."""
        return self._gym_path("merging/multitask")

    @property
    def gold_texts_path(self) -> Path:
        """SFT rows of train prompts with their gold answers, `gold_texts_per_domain` per domain (a gym only)."""
        return self._gym_path("texts/gold.jsonl")

    def prompts(self, split: Split = "heldout", per_domain: int = 100, domains: list[str] | None = None,
                seed: int = 0) -> list[PromptRow]:
        """`per_domain` distinct prompts of each domain from `split` (a gym: train, validation or test; heldout
        is test); the split never depends on `seed`."""
        domains = domains or self.domains
        return make_prompts(split, domains, per_domain * len(domains), seed)


def _seed(config: ToyWorldConfig, name: str) -> int:
    return zlib.crc32(f"{config.seed}:{name}".encode())


def _training_rows(config: ToyWorldConfig, recipe: ModelRecipe) -> list[PromptRow]:
    """`train_pool` training prompts (with repeats) drawn by the recipe's task mixture, up to its reach."""
    rng = random.Random(_seed(config, recipe.name))
    mixture = recipe.mixture or dict.fromkeys(config.domains, 1.0)
    rows = []
    reach = recipe.reach or {}
    for name in rng.choices(list(mixture), list(mixture.values()), k=config.train_pool):
        domain = get_domain(name)
        rows.append(make_row(domain, draw(domain, "train", rng, reach.get(name))))
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
    """One model to build: its recipe, its folder inside the world, whether it is the reward model, and for a
    LoRA fine-tune the folder of the model it starts from (built first) and its adapter."""

    recipe: ModelRecipe
    folder: str
    reward: bool = False
    start: str | None = None
    lora: LoraRecipe | None = None

    @property
    def cost(self) -> int:
        return self.recipe.steps * self.recipe.hidden_size * self.recipe.layers


def _lora_job(base: ModelRecipe, name: str, mixture: dict[str, float] | None, lora: LoraRecipe, folder: str) -> _Job:
    """A LoRA fine-tune of the base: the base's recipe (architecture, tokenizer) with its own name (its seed),
    data mixture and training length, on every level of its tasks (the base's `reach` is what is left to learn)."""
    recipe = base.model_copy(update=dict(name=name, mixture=mixture, reach=None, steps=lora.steps,
                                         batch_size=lora.batch_size, learning_rate=lora.learning_rate))
    return _Job(recipe, folder, start="merging/base", lora=lora)


def _jobs(config: ToyWorldConfig) -> list[_Job]:
    jobs = [
        *(_Job(s, f"sources/{s.name}") for s in config.sources),
        _Job(config.pivot, "pivot"),
        _Job(config.reward_model, "reward_model", reward=True),
    ]
    if config.gym is not None:
        gym = config.gym
        jobs += [
            _Job(gym.base, "merging/base"),
            *(_lora_job(gym.base, f"specialist-{d}", {d: 1.0}, gym.specialist, f"merging/specialists/{d}")
              for d in config.domains),
            _lora_job(gym.base, "multitask", None, gym.multitask, "merging/multitask"),
        ]
    return jobs


def _next_jobs(jobs: list[_Job], finished: str | None) -> list[_Job]:
    """The jobs that can start once `finished` is built (None: at the start), those that others start from
    first (they are on the critical path), then the longest."""
    ready = [job for job in jobs if job.start == finished]
    return sorted(ready, key=lambda j: (not any(k.start == j.folder for k in jobs), -j.cost))


def _gold_texts(config: ToyWorldConfig) -> list[SFTRow]:
    """`gold_texts_per_domain` distinct train prompts of every domain with their gold answers."""
    rows = []
    for name in config.domains:
        domain = get_domain(name)
        for params in distinct_tasks(name, "train", config.gym.gold_texts_per_domain, seed=_seed(config, "gold-texts")):
            row = make_row(domain, params)
            rows.append(SFTRow(id=row.id, prompt=row.prompt, completion=row.answer, domain=name, source="gold"))
    return rows


def _run_job(config: ToyWorldConfig, job: _Job, root: Path, advance: Callable[[], None]) -> tuple[float, float]:
    """Train `job` (`_train_job`); returns its last loss and the CPU seconds it took (the build's cost whatever
    else the machine runs)."""
    started = time.process_time()
    loss = _train_job(config, job, root, advance)
    return loss, round(time.process_time() - started, 1)


def _train_job(config: ToyWorldConfig, job: _Job, root: Path, advance: Callable[[], None]) -> float:
    """Train the tokenizer and model of `job`, save both under `root`; returns the last loss.
    Every job runs with `config.threads` torch threads, so weights do not depend on `workers`."""
    recipe, out = job.recipe, root / job.folder
    seed = _seed(config, recipe.name)
    with _threads(config.threads), _quiet_transformers():
        tokenizer = train_tokenizer(recipe.tokenizer, recipe.vocab_size, recipe.template, config.seed,
                                    config.corpus_lines, config.corpus_tasks)
        if job.lora is not None:
            from transformers import AutoModelForCausalLM

            model = with_lora(AutoModelForCausalLM.from_pretrained(root / job.start), job.lora, seed)
            rows = _training_rows(config, recipe)
            loss = train_lm(model, tokenizer, recipe, rows, seed, advance)
            model = model.merge_and_unload()
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            _check_reload(out, tokenizer, rows)
            return loss
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


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # malloc.h


def _keep_freed_memory() -> None:
    """Let glibc keep the memory a worker frees instead of handing it back to the kernel at once: every training
    step frees and reallocates activations of a few MB, which the defaults unmap and fault back in (5.9 million
    page faults, 14 s of system time in a build of the `gym` preset). The numbers computed do not change."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if sys.platform == "linux" else None  # glibc only
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's ceiling: blocks up to 32 MB come from the heap
        mallopt(_M_TRIM_THRESHOLD, 1 << 30)  # and the heap is not trimmed below its peak


def _init_worker(queue: Any) -> None:
    global _PROGRESS
    _PROGRESS = queue
    _keep_freed_memory()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # a forked child must not use the parent's thread pool
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the pool


def _worker_job(config: ToyWorldConfig, job: _Job, root: Path) -> tuple[float, float]:
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


def _train_all(config: ToyWorldConfig, root: Path, bar) -> dict[str, tuple[float, float]]:
    """Build every model, in this process or (workers > 1) in worker processes, longest jobs first (a
    fine-tune once the model it starts from is built)."""
    jobs = _jobs(config)
    tasks = {job.folder: bar.add_task(f"train {job.recipe.name}", total=job.recipe.steps) for job in jobs}
    trained: dict[str, tuple[float, float]] = {}
    if config.workers == 1:
        waiting = _next_jobs(jobs, None)
        while waiting:
            job = waiting.pop(0)
            trained[job.recipe.name] = _run_job(config, job, root, lambda t=tasks[job.folder]: bar.advance(t))
            waiting += _next_jobs(jobs, job.folder)
        return trained
    # Fork on Linux: workers start at once and callers need no `if __name__ == "__main__"` guard.
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    queue = context.Queue()

    def drain() -> None:
        with suppress(Empty):
            while True:
                bar.advance(tasks[queue.get_nowait()])

    pool = ProcessPoolExecutor(config.workers, mp_context=context, initializer=_init_worker, initargs=(queue,))
    try:
        futures = {pool.submit(_worker_job, config, job, root): job for job in _next_jobs(jobs, None)}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            drain()
            for future in done:
                finished = futures[future]
                trained[finished.recipe.name] = future.result()  # re-raises a worker's error
                for job in _next_jobs(jobs, finished.folder):
                    started = pool.submit(_worker_job, config, job, root)
                    futures[started] = job
                    pending.add(started)
    except BaseException:
        _stop_workers(pool)
        raise
    pool.shutdown(wait=True)
    for job in jobs:  # steps still in the queue's pipe when the last worker finished
        bar.update(tasks[job.folder], completed=job.recipe.steps)
    return trained


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
    minutes on 2 CPU cores for the default preset, a second for `tiny`; docs/results.md has the gym's)."""
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
            trained = _train_all(config, tmp, bar)
        if config.gym is not None:
            write_rows(tmp / "texts" / "gold.jsonl", _gold_texts(config))
        write_json(tmp / WORLD_FILE, {
            "config": config.model_dump(mode="json"), "key": config.key(),
            "specialties": {s.name: s.specialty for s in config.sources},
            "final_loss": {name: loss for name, (loss, _) in trained.items()},
            "cpu_seconds": {name: cpu for name, (_, cpu) in trained.items()},
            "build_seconds": round(time.perf_counter() - started, 1),
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
