"""TensorRT-LLM in-process on a GPU through its LLM API, with its in-flight batching.

Written against the documented LLM API of TensorRT-LLM 1.2 (nvidia.github.io/TensorRT-LLM/1.2.1):
``LLM(model, tokenizer=, tensor_parallel_size=, max_batch_size=, max_num_tokens=, max_seq_len=,
kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=))``; ``llm.tokenizer`` (``apply_chat_template``,
``encode``); ``llm.generate_async(prompt_token_ids, SamplingParams(...), streaming=True)`` returning a
``RequestOutput`` whose ``outputs[0]`` holds the cumulative ``text``, ``token_ids`` and ``finish_reason``
after each ``async for`` step; ``RequestOutput.abort()``; ``llm.shutdown()``. The package is imported in
`start` only: it needs CUDA.

Every request goes straight to the engine, which batches all of them at every step: nothing here
serialises them. `max_in_flight` optionally bounds how many may be in flight (more → RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from generator.backends.base import (
    Backend,
    ChatMessage,
    CommonOptions,
    Delta,
    Finished,
    FinishReason,
    GenerationParams,
    Slots,
)
from fabric.errors import InvalidArgument, Unavailable
from fabric.settings import option

log = logging.getLogger(__name__)

#: A prebuilt TensorRT engine folder holds one file per rank; anything else is a checkpoint for the PyTorch flow.
ENGINE_FILE = "rank0.engine"
#: Since 1.0 `tensorrt_llm.LLM` runs checkpoints with the PyTorch flow; engines need the TensorRT flow's class.
_ENGINE_LLM_MODULE = "tensorrt_llm._tensorrt_engine"


class StopScanner:
    """Finds stop strings in the cumulative text and says how much of it is safe to send.

    TensorRT-LLM matches stop strings on token ids, so a string that the model spells with other
    tokens gets through, and a string split over several tokens is streamed piece by piece before
    the match. Scanning the text closes both gaps: the tail that could still begin a stop string
    is held back until the next token settles it.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]

    def find(self, text: str) -> int:
        """Where the earliest stop string starts in `text`, or -1."""
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(found, default=-1)

    def safe_length(self, text: str) -> int:
        """Length of the prefix of `text` that no stop string can still claim."""
        held = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:size]):
                    held = size
                    break
        return len(text) - held


@dataclass
class TensorRTLLMOptions:
    """The tensorrt_llm backend's own settings."""

    tokenizer: str = option("", "tensorrt_llm: tokenizer folder, if the model folder has none (an engine)")
    tensor_parallel_size: int = option(1, "tensorrt_llm: GPUs the model is split across")
    max_batch_size: int = option(0, "tensorrt_llm: most requests batched per step; 0 = TensorRT-LLM's default")
    max_num_tokens: int = option(0, "tensorrt_llm: most tokens batched per step; 0 = TensorRT-LLM's default")
    kv_cache_fraction: float = option(
        0.0, "tensorrt_llm: share of free GPU memory for the KV cache, in (0, 1]; 0 = TensorRT-LLM's default"
    )
    max_in_flight: int = option(
        0, "tensorrt_llm: most generations in flight, more wait queue_timeout_s then RESOURCE_EXHAUSTED; 0 = no bound"
    )

    def validate(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError("tensorrt_llm: tensor_parallel_size must be positive")
        if min(self.max_batch_size, self.max_num_tokens, self.max_in_flight) < 0:
            raise ValueError("tensorrt_llm: max_batch_size, max_num_tokens and max_in_flight must be 0 or more")
        if not 0 <= self.kv_cache_fraction <= 1:
            raise ValueError("tensorrt_llm: kv_cache_fraction must be in [0, 1]")


class TensorRTLLMBackend(Backend):
    name = "tensorrt_llm"
    Options = TensorRTLLMOptions

    def __init__(
        self,
        model_path: str | Path,
        *,
        tokenizer_path: str = "",
        context_tokens: int = 2048,
        tensor_parallel_size: int = 1,
        max_batch_size: int = 0,
        max_num_tokens: int = 0,
        kv_cache_fraction: float = 0.0,
        max_in_flight: int = 0,
        queue_timeout_s: float = 30.0,
    ):
        self.model_path = Path(model_path).expanduser()
        self.tokenizer_path = tokenizer_path
        self.context_tokens = context_tokens
        self.tensor_parallel_size = tensor_parallel_size
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.kv_cache_fraction = kv_cache_fraction
        self.max_in_flight = max_in_flight
        self.queue_timeout_s = queue_timeout_s
        # In-flight batching runs every admitted request at once: max_in_flight is how many.
        self.slots = Slots(max_in_flight, queue_timeout_s) if max_in_flight else None
        self._api: Any = None  # the tensorrt_llm module, once started
        self._llm: Any = None

    @classmethod
    def create(cls, common: CommonOptions, options: TensorRTLLMOptions) -> TensorRTLLMBackend:
        if not common.model_path:
            raise ValueError("the tensorrt_llm backend needs model_path: a checkpoint or engine folder")
        return cls(
            common.model_path,
            tokenizer_path=options.tokenizer,
            context_tokens=common.context_tokens,
            tensor_parallel_size=options.tensor_parallel_size,
            max_batch_size=options.max_batch_size,
            max_num_tokens=options.max_num_tokens,
            kv_cache_fraction=options.kv_cache_fraction,
            max_in_flight=options.max_in_flight,
            queue_timeout_s=common.queue_timeout_s,
        )

    async def start(self) -> None:
        if not self.model_path.exists():
            raise FileNotFoundError(f"model folder not found: {self.model_path}")
        # Loading (and for a checkpoint, compiling) takes minutes: off the event loop, so health answers.
        self._api, self._llm = await asyncio.to_thread(self._load)
        if self._llm.tokenizer is None:
            await self.close()
            raise FileNotFoundError(f"no tokenizer in {self.model_path} for the chat template; set --trtllm-tokenizer")
        log.info(
            "loaded %s with TensorRT-LLM %s (tensor parallel %d)",
            self.model_path.name, getattr(self._api, "__version__", "?"), self.tensor_parallel_size,
        )

    def _load(self) -> tuple[Any, Any]:
        api = importlib.import_module("tensorrt_llm")
        from tensorrt_llm.llmapi import KvCacheConfig

        engine = (self.model_path / ENGINE_FILE).is_file()
        llm_class = importlib.import_module(_ENGINE_LLM_MODULE).LLM if engine else api.LLM
        options: dict[str, Any] = {
            "tensor_parallel_size": self.tensor_parallel_size,
            "max_seq_len": self.context_tokens,
        }
        optional = {
            "tokenizer": self.tokenizer_path or None,
            "max_batch_size": self.max_batch_size or None,
            "max_num_tokens": self.max_num_tokens or None,
            "kv_cache_config": KvCacheConfig(free_gpu_memory_fraction=self.kv_cache_fraction)
            if self.kv_cache_fraction
            else None,
        }
        options.update((key, value) for key, value in optional.items() if value is not None)
        return api, llm_class(str(self.model_path), **options)

    async def close(self) -> None:
        if self._llm is not None:
            llm, self._llm = self._llm, None
            await asyncio.to_thread(llm.shutdown)

    def info(self) -> tuple[str, int]:
        return self.model_path.name, self.context_tokens

    async def stream(self, params: GenerationParams) -> AsyncIterator[Delta | Finished]:
        if self._llm is None:
            raise Unavailable("the model is not loaded yet")
        async with self._admitted():
            prompt = await asyncio.to_thread(self._prompt_ids, params.messages)
            room = self.context_tokens - len(prompt)
            if room < 1:
                raise InvalidArgument(
                    "messages", f"the prompt is {len(prompt)} tokens; the context holds {self.context_tokens}"
                )
            # Like llama.cpp: a reply that would overflow the context is cut to fit, not refused.
            request = self._submit(prompt, params, max_tokens=min(params.max_tokens, room))
            try:
                async with contextlib.aclosing(self._follow(request, StopScanner(params.stop))) as items:
                    async for item in items:
                        yield item
            finally:
                if not request.finished:
                    request.abort()  # the caller left or a stop string was found: free the batch slot now

    @contextlib.asynccontextmanager
    async def _admitted(self) -> AsyncIterator[None]:
        if self.slots is None:
            yield
            return
        async with self.slots.hold():
            yield

    def _prompt_ids(self, messages: list[ChatMessage]) -> list[int]:
        """The conversation in the model's own chat template, up to where the assistant's turn begins, as tokens."""
        tokenizer = self._llm.tokenizer
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        try:
            text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        except ValueError as exc:  # no template, or one that rejects this sequence of roles
            raise InvalidArgument("messages", f"the model's chat template refused them: {exc}") from None
        # The template already holds the special tokens (BOS and the like), as trtllm-serve's chat route assumes.
        return tokenizer.encode(text, add_special_tokens=False)

    def _submit(self, prompt: list[int], params: GenerationParams, max_tokens: int) -> Any:
        # On the event loop's thread: the RequestOutput binds its async queue to the running loop.
        try:
            sampling = self._sampling(params, max_tokens)
            return self._llm.generate_async(prompt, sampling_params=sampling, streaming=True)
        except ValueError as exc:  # a request the engine's limits refuse
            raise InvalidArgument("messages", str(exc)) from None

    def _sampling(self, params: GenerationParams, max_tokens: int) -> Any:
        options: dict[str, Any] = {"max_tokens": max_tokens}
        if params.temperature == 0:
            options["top_k"] = 1  # greedy; TensorRT-LLM takes only temperatures above 0
        elif params.temperature is not None:
            options["temperature"] = params.temperature
        if params.top_p is not None:
            options["top_p"] = params.top_p
        if params.seed is not None:
            options["seed"] = params.seed & 0xFFFF_FFFF_FFFF_FFFF  # the engine's seed is uint64
        if params.stop:
            options["stop"] = list(params.stop)
        return self._api.SamplingParams(**options)

    async def _follow(self, request: Any, stops: StopScanner) -> AsyncIterator[Delta | Finished]:
        """Turns the request's cumulative outputs into deltas, holding back what a stop string may claim."""
        sent = 0
        async for output in request:
            completion = output.outputs[0]
            text = completion.text
            cut = stops.find(text)
            done = cut >= 0 or output.finished
            if cut >= 0:
                text = text[:cut]
            ready = len(text) if done else stops.safe_length(text)
            if ready > sent:
                yield Delta(text[sent:ready])
                sent = ready
            if done:
                reason = "stop" if cut >= 0 else _finish_reason(completion.finish_reason)
                yield Finished(reason, len(output.prompt_token_ids), len(completion.token_ids))
                return
        raise Unavailable("TensorRT-LLM ended the stream before the reply finished")


def _finish_reason(reason: str | None) -> FinishReason:
    if reason in (None, "stop"):
        return "stop"
    if reason == "length":
        return "length"
    # "cancelled" or "timeout" without our asking: the engine gave up on the request.
    raise Unavailable(f"TensorRT-LLM ended the request: {reason}")
