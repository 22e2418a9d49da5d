"""gRPC servicer for the embedder: converts protos and hands work to the model off the event loop."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

from embedder.model import ModelSpec, OnnxEmbedder, model_from_dir, packaged_minilm
from mesh.errors import InvalidArgument, Overloaded
from mesh.settings import ServiceSettings, option
from ragloom.embedder.v1 import embedder_pb2, embedder_pb2_grpc

log = logging.getLogger(__name__)


@dataclass
class Settings(ServiceSettings):
    model: str = option(
        "minilm",
        "'minilm' (fp32, exported once from the packaged weights), 'minilm-int8' (packaged int8 graph) "
        "or a folder with model.onnx + tokenizer.json",
    )
    provider: str = option("auto", "ONNX Runtime execution provider: auto, Tensorrt, CUDA or CPU")
    threads: int = option(0, "intra-op threads; 0 = the CPUs this process may use")
    batch_size: int = option(32, "texts per model run")
    max_batch_texts: int = option(2048, "most texts accepted in one Embed call")
    max_pending: int = option(256, "Embed calls allowed to wait for the model before RESOURCE_EXHAUSTED")

    def validate(self) -> None:
        super().validate()
        if self.batch_size < 1 or self.max_batch_texts < 1 or self.max_pending < 1:
            raise ValueError("batch_size, max_batch_texts and max_pending must be positive")


def resolve_model(name: str) -> ModelSpec:
    if name == "minilm":
        try:
            from embedder.export import minilm_fp32

            return model_from_dir(minilm_fp32())
        except ImportError as exc:
            log.warning("cannot export the fp32 model (%s: install ragloom[export]); using the int8 graph", exc)
            return packaged_minilm()
    if name == "minilm-int8":
        return packaged_minilm()
    return model_from_dir(Path(name).expanduser())


class EmbedderServicer(embedder_pb2_grpc.EmbedderServiceServicer):
    def __init__(self, service: "EmbedderService"):
        self.service = service

    async def Embed(self, request, context):
        texts = list(request.texts)
        settings = self.service.settings
        if not texts:
            raise InvalidArgument("texts", "at least one text is required")
        if len(texts) > settings.max_batch_texts:
            raise InvalidArgument("texts", f"{len(texts)} texts exceed the limit of {settings.max_batch_texts} per call")
        for i, text in enumerate(texts):
            if not text.strip():
                raise InvalidArgument(f"texts[{i}]", "text is empty")
        result, queue_ms = await self.service.embed(texts, request.reject_overlong)
        model = self.service.model
        return embedder_pb2.EmbedResponse(
            embeddings=[
                embedder_pb2.Embedding(values=vector, token_count=count, truncated=cut)
                for vector, count, cut in zip(result.vectors, result.token_counts, result.truncated)
            ],
            dimension=model.spec.dimension,
            model=model.spec.name,
            usage=embedder_pb2.Usage(
                total_tokens=sum(result.token_counts), queue_ms=queue_ms, inference_ms=result.inference_ms
            ),
        )

    async def Info(self, request, context):
        model, settings = self.service.model, self.service.settings
        return embedder_pb2.InfoResponse(
            model=model.spec.name,
            dimension=model.spec.dimension,
            max_tokens=model.spec.max_tokens,
            provider=model.provider,
            threads=model.threads,
            max_batch_texts=settings.max_batch_texts,
        )


class EmbedderService:
    name = "embedder"
    service_names = [embedder_pb2.DESCRIPTOR.services_by_name["EmbedderService"].full_name]

    def __init__(self, settings: Settings):
        self.settings = settings
        self.model: OnnxEmbedder | None = None
        # One model run at a time: ONNX Runtime already spreads each run over all intra-op threads.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self._pending = 0

    def register(self, server: grpc.aio.Server) -> None:
        embedder_pb2_grpc.add_EmbedderServiceServicer_to_server(EmbedderServicer(self), server)

    async def start(self) -> None:
        s = self.settings
        spec = await asyncio.to_thread(resolve_model, s.model)
        self.model = await asyncio.to_thread(OnnxEmbedder, spec, s.provider, s.threads, s.batch_size)
        await self.embed(["warm-up"], False)

    async def embed(self, texts: list[str], reject_overlong: bool):
        if self._pending >= self.settings.max_pending:
            raise Overloaded(f"embedder has {self._pending} calls waiting; retry shortly", retry_after_s=0.5)
        self._pending += 1
        queued = time.perf_counter()
        try:
            loop = asyncio.get_running_loop()
            started = 0.0

            def run():
                nonlocal started
                started = time.perf_counter()
                return self.model.embed(texts, reject_overlong)

            result = await loop.run_in_executor(self._executor, run)
            return result, (started - queued) * 1000
        finally:
            self._pending -= 1

    async def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def create_service(settings: Settings) -> EmbedderService:
    return EmbedderService(settings)
