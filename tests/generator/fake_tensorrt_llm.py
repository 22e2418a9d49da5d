"""A test double of the slice of TensorRT-LLM's LLM API (1.2) that the tensorrt_llm backend uses.

`install()` puts it in sys.modules as `tensorrt_llm`, `tensorrt_llm.llmapi` and
`tensorrt_llm._tensorrt_engine`. Like the real engine, a request runs on its own once submitted
(an asyncio task per request steps the "model" every `step_s`), every step queues a response,
and the RequestOutput applies one queued response per `async for` step, so `outputs[0].text` and
`token_ids` are cumulative. The "model" replies with `FakeLLM.script`, one token per item. Stop
strings are matched the way the engine does it, on whole tokens: only when a token ends with one
(`engine_stops=False` turns that off, for a model that spells the stop string differently).
"""

from __future__ import annotations

import asyncio
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import pytest


@dataclass(kw_only=True)
class SamplingParams:
    max_tokens: int = 32
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None


@dataclass
class KvCacheConfig:
    free_gpu_memory_fraction: float | None = None


@dataclass
class CompletionOutput:
    index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class FakeTokenizer:
    """Templates turns as <|role|>content</s>; one token per whitespace-separated word."""

    def __init__(self):
        self.encoded: list[str] = []

    def apply_chat_template(self, conversation, tokenize=True, add_generation_prompt=False):
        assert tokenize is False and add_generation_prompt is True
        turns = "".join(f"<|{m['role']}|>{m['content']}</s>" for m in conversation)
        return turns + "<|assistant|>"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert add_special_tokens is False
        self.encoded.append(text)
        return [hash(word) % 32_000 for word in text.split()]


class RequestOutput:
    def __init__(self, llm: FakeLLM, request_id: int, prompt_token_ids: list[int], params: SamplingParams):
        self._llm = llm
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.outputs = [CompletionOutput()]
        self.finished = False
        self._responses: asyncio.Queue = asyncio.Queue()  # needs a running loop, as the real one does
        self._aborted = asyncio.Event()
        self._engine = asyncio.get_running_loop().create_task(self._run(params))

    def abort(self) -> None:
        self._llm.aborted.append(self.request_id)
        self._aborted.set()

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        token, text, reason = await self._responses.get()
        output = self.outputs[0]
        if token is not None:
            output.token_ids.append(token)
        output.text = text
        if reason is not None:
            output.finish_reason, self.finished = reason, True
        return self

    async def _run(self, params: SamplingParams) -> None:
        """The engine's side: one token per step until the script, max_tokens, a stop string or an abort ends it."""
        llm = self._llm
        stops = [params.stop] if isinstance(params.stop, str) else list(params.stop or ())
        text = ""
        for step, piece in enumerate(llm.script):
            if await _wait(self._aborted, llm.step_s):
                break
            llm.tokens_generated += 1
            text += piece
            stop = next((s for s in stops if text.endswith(s)), None) if llm.engine_stops else None
            if stop is not None:
                await self._responses.put((step, text[: -len(stop)], "stop"))
                return
            if step + 1 == params.max_tokens:
                await self._responses.put((step, text, "length"))
                return
            await self._responses.put((step, text, None))
        else:
            await self._responses.put((None, text, "stop"))  # the end-of-sequence token
            return
        await self._responses.put((None, text, "cancelled"))


async def _wait(event: asyncio.Event, timeout: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except asyncio.TimeoutError:
        return False
    return True


class FakeLLM:
    """Records its arguments, submitted prompts and sampling parameters, aborts and shutdown."""

    script: list[str] = ["Hello", ",", " world", "!"]
    step_s: float = 0.01
    engine_stops: bool = True
    instances: list[FakeLLM] = []

    def __init__(self, model: str, **kwargs: Any):
        self.model = model
        self.kwargs = kwargs
        self.tokenizer = FakeTokenizer()
        self.requests: list[RequestOutput] = []
        self.sampling: list[SamplingParams] = []
        self.aborted: list[int] = []
        self.tokens_generated = 0
        self.shut_down = False
        type(self).instances.append(self)

    def generate_async(self, inputs: list[int], sampling_params: SamplingParams | None = None, streaming=False):
        assert streaming is True and isinstance(inputs, list)
        params = sampling_params or SamplingParams()
        if params.max_tokens > self.kwargs.get("max_num_tokens", 1 << 30):
            raise ValueError("max_tokens should not exceed max_num_tokens")
        request = RequestOutput(self, len(self.requests), list(inputs), params)
        self.requests.append(request)
        self.sampling.append(params)
        return request

    def shutdown(self) -> None:
        self.shut_down = True


class FakeEngineLLM(FakeLLM):
    """The TensorRT flow's LLM, for prebuilt engine folders."""


def install(monkeypatch: pytest.MonkeyPatch) -> type[FakeLLM]:
    """Puts the fake package in sys.modules for the test; returns FakeLLM (class attributes set the behaviour)."""

    class LLM(FakeLLM):
        instances: list[FakeLLM] = []

    class EngineLLM(FakeEngineLLM, LLM):
        pass

    package = types.ModuleType("tensorrt_llm")
    package.__version__ = "1.2.0-fake"
    package.LLM = LLM
    package.SamplingParams = SamplingParams
    llmapi = types.ModuleType("tensorrt_llm.llmapi")
    llmapi.KvCacheConfig = KvCacheConfig
    engine = types.ModuleType("tensorrt_llm._tensorrt_engine")
    engine.LLM = EngineLLM
    package.llmapi, package._tensorrt_engine = llmapi, engine
    for module in (package, llmapi, engine):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return LLM
