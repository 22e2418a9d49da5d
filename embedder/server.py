"""The embedder service: settings, model choice, request checks, and the gRPC servicer that converts protos."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from embedder import rerank
from embedder.batcher import Batcher
from embedder.model import (
    GPU_PROVIDERS,
    Embedded,
    ModelSpec,
    OnnxEmbedder,
    choose_provider,
    model_from_dir,
    packaged_minilm,
)
from fabric.errors import InvalidArgument, Unavailable
from fabric.resources import usable_cpus
from fabric.settings import ServiceSettings, option
from ragloom.embedder.v1 import embedder_pb2, embedder_pb2_grpc

log = logging.getLogger(__name__)


@dataclass
class Settings(ServiceSettings):
    service = "embedder"

    model: str = option(
        "minilm-int8",
        "'minilm-int8' (int8, quantised once from the fp32 export: about 2.4 times as fast on a CPU, and as good at "
        "retrieval on the labelled sets: nDCG@10 within 0.003), 'minilm' (fp32, exported once from the packaged "
        "weights) or a folder with model.onnx + tokenizer.json",
    )
    provider: str = option("auto", "ONNX Runtime execution provider: auto, Tensorrt, CUDA or CPU")
    workers: int = option(0, "model runs executed at once; 0 = one per usable CPU on a CPU, 1 on a GPU")
    threads: int = option(0, "intra-op threads of each model run; 0 = the usable CPUs shared among the workers")
    spin: bool = option(False, "with --threads > 1, let intra-op threads spin between ops: lower latency on "
                               "dedicated cores, CPU taken from gRPC and neighbours on shared ones")
    batch_size: int = option(64, "most texts in one model run")
    max_batch_tokens: int = option(8192, "most padded tokens (rows x longest text) in one model run")
    max_wait_ms: float = option(2.0, "longest a model run waits for more of a burst of calls")
    max_queued_tokens: int = option(131072, "tokens allowed to wait for the model before RESOURCE_EXHAUSTED")
    max_batch_texts: int = option(2048, "most texts accepted in one Embed call or stream message")
    stream_window: int = option(4, "messages of one EmbedStream embedded at once")
    max_rerank_texts: int = option(128, "most texts accepted in one Rerank call")

    def validate(self) -> None:
        super().validate()
        positive = ("batch_size", "max_batch_tokens", "max_queued_tokens", "max_batch_texts", "stream_window",
                    "max_rerank_texts")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        for name in ("max_wait_ms", "workers", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")

    def parallelism(self, provider: str) -> tuple[int, int]:
        """(workers, intra-op threads per run). On a CPU, runs side by side on one thread each beat one run over
        all threads, where every op waits for its slowest thread: on 2 cores, runs of ~8 texts, int8 ~690 vs
        ~450-600 texts/s, fp32 ~310 vs ~270. A lone short text waits longer on one thread (~4 vs ~8 ms fp32)."""
        cpus = usable_cpus()
        workers = self.workers or (1 if provider in GPU_PROVIDERS else cpus)
        return workers, self.threads or max(1, cpus // workers)


def _minilm_fp32() -> ModelSpec:
    try:
        from embedder.export import minilm_fp32

        return model_from_dir(minilm_fp32(), variant="fp32")
    except ImportError as exc:
        log.warning("cannot export the fp32 model (%s: install ragloom[export]); using the packaged int8 graph", exc)
        return packaged_minilm()


def _minilm_int8() -> ModelSpec:
    try:
        from embedder.export import minilm_int8

        return model_from_dir(minilm_int8(), variant="int8")
    except ImportError as exc:
        log.warning("cannot quantise the fp32 model (%s: install ragloom[export]); using the packaged int8 graph, "
                    "which is no faster than fp32", exc)
        return packaged_minilm()


MODELS: dict[str, Callable[[], ModelSpec]] = {"minilm": _minilm_fp32, "minilm-int8": _minilm_int8}


def resolve_model(name: str) -> ModelSpec:
    """A named model, or else a model folder."""
    if name in MODELS:
        return MODELS[name]()
    return model_from_dir(Path(name).expanduser())


def _check_texts(texts: list[str], limit: int) -> None:
    if not texts:
        raise InvalidArgument("texts", "at least one text is required")
    if len(texts) > limit:
        raise InvalidArgument("texts", f"{len(texts)} texts exceed the limit of {limit} per call")
    for i, text in enumerate(texts):
        if not text.strip():
            raise InvalidArgument(f"texts[{i}]", "text is empty")


class EmbedderService:
    """Checks requests and hands their texts to the batcher; plain Python, driven by the servicer or by tests."""

    name = "embedder"
    service_names = [embedder_pb2.DESCRIPTOR.services_by_name["EmbedderService"].full_name]

    def __init__(self, settings: Settings):
        self.settings = settings
        self.model: OnnxEmbedder | None = None
        self.batcher: Batcher | None = None

    def register(self, server: grpc.aio.Server) -> None:
        embedder_pb2_grpc.add_EmbedderServiceServicer_to_server(EmbedderServicer(self), server)

    async def start(self) -> None:
        s = self.settings
        provider = choose_provider(s.provider)
        workers, threads = s.parallelism(provider)
        spec = await asyncio.to_thread(resolve_model, s.model)
        self.model = await asyncio.to_thread(
            OnnxEmbedder, spec, provider=provider, threads=threads, batch_size=s.batch_size,
            max_batch_tokens=s.max_batch_tokens, spin=s.spin,
        )
        batcher = Batcher(
            self.model, workers=workers, max_wait_s=s.max_wait_ms / 1000, max_queued_tokens=s.max_queued_tokens
        )
        batcher.start()
        await batcher.embed(["warm-up"])
        self.batcher = batcher

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()

    async def embed(self, texts: list[str], reject_overlong: bool = False) -> Embedded:
        _, batcher = self.loaded()
        _check_texts(texts, self.settings.max_batch_texts)
        return await batcher.embed(texts, reject_overlong)

    async def rerank(self, query: str, texts: list[str], spans_per_text: int = 0,
                     titles: list[str] | None = None) -> tuple[list[rerank.Ranked], float]:
        """Texts best first by how well they answer `query`, with their best sentences; and the model ms spent."""
        _, batcher = self.loaded()
        if not query.strip():
            raise InvalidArgument("query", "must not be empty")
        _check_texts(texts, self.settings.max_rerank_texts)
        if titles and len(titles) != len(texts):
            raise InvalidArgument("titles", f"{len(titles)} titles for {len(texts)} texts: give none or one per text")
        if not 0 <= spans_per_text <= 16:
            raise InvalidArgument("spans_per_text", f"must be between 0 and 16, got {spans_per_text}")
        spent = 0.0

        async def embed(pieces: list[str]):
            nonlocal spent
            result = await batcher.embed(pieces)
            spent += result.inference_ms
            return result.vectors

        ranked = await rerank.rerank(query, texts, embed, spans_per_text=spans_per_text or 3, titles=titles or ())
        return ranked, spent

    async def embed_stream(self, requests: AsyncIterator[tuple[list[str], bool]]) -> AsyncIterator[Embedded]:
        """One result per request, in order, with up to `stream_window` requests embedded at once."""
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self.settings.stream_window)
        started: asyncio.Queue[asyncio.Future | None] = asyncio.Queue()

        async def read() -> None:
            n = 0
            try:
                async for texts, reject_overlong in requests:
                    await slots.acquire()
                    started.put_nowait(loop.create_task(self._embed_message(n, texts, reject_overlong)))
                    n += 1
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it in order
                failed = loop.create_future()
                failed.set_exception(exc)
                started.put_nowait(failed)
                return
            started.put_nowait(None)

        reader = loop.create_task(read())
        try:
            while (next_result := await started.get()) is not None:
                result = await next_result
                slots.release()
                yield result
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            while not started.empty():
                left = started.get_nowait()
                if left is not None and not left.cancel() and not left.cancelled():
                    left.exception()  # it had finished: mark its outcome as seen

    async def _embed_message(self, n: int, texts: list[str], reject_overlong: bool) -> Embedded:
        try:
            return await self.embed(texts, reject_overlong)
        except InvalidArgument as exc:
            raise InvalidArgument(exc.field, f"{exc.description} (stream message {n})") from None

    def loaded(self) -> tuple[OnnxEmbedder, Batcher]:
        if self.model is None or self.batcher is None:
            raise Unavailable("embedder is still loading its model")
        return self.model, self.batcher


class EmbedderServicer(embedder_pb2_grpc.EmbedderServiceServicer):
    def __init__(self, service: EmbedderService):
        self.service = service

    async def Embed(self, request, context):
        return self._response(await self.service.embed(list(request.texts), request.reject_overlong))

    async def EmbedStream(self, request_iterator, context):
        requests = ((list(r.texts), r.reject_overlong) async for r in request_iterator)
        async for result in self.service.embed_stream(requests):
            yield self._response(result)

    async def Info(self, request, context):
        model, batcher = self.service.loaded()
        settings, stats = self.service.settings, batcher.stats
        return embedder_pb2.InfoResponse(
            model=model.spec.name,
            dimension=model.spec.dimension,
            max_tokens=model.spec.max_tokens,
            provider=model.provider,
            threads=model.threads,
            workers=batcher.workers,
            max_batch_texts=settings.max_batch_texts,
            variant=model.spec.variant,
            max_wait_ms=batcher.max_wait_s * 1000,
            max_batch_tokens=model.limits.max_tokens,
            max_batch_rows=model.limits.max_rows,
            max_queued_tokens=batcher.max_queued_tokens,
            runs=stats.runs,
            texts=stats.texts,
            tokens=stats.tokens,
            padded_tokens=stats.padded_tokens,
            max_rerank_texts=settings.max_rerank_texts,
        )

    async def Rerank(self, request, context):
        ranked, inference_ms = await self.service.rerank(
            request.query, list(request.texts), request.spans_per_text, list(request.titles))
        return embedder_pb2.RerankResponse(
            results=[
                embedder_pb2.RerankResult(
                    index=r.index, score=r.score,
                    spans=[embedder_pb2.Span(start=s.start, end=s.end, score=s.score) for s in r.spans],
                    **({} if r.relevance is None else {"relevance": r.relevance}),
                )
                for r in ranked
            ],
            model=f"{self.service.model.spec.name}+sentence-rerank",
            usage=embedder_pb2.Usage(inference_ms=inference_ms),
        )

    def _response(self, result: Embedded) -> embedder_pb2.EmbedResponse:
        spec = self.service.model.spec
        return embedder_pb2.EmbedResponse(
            embeddings=[
                _embedding(vector, count, cut)
                for vector, count, cut in zip(result.vectors, result.token_counts, result.truncated)
            ],
            dimension=spec.dimension,
            model=spec.name,
            usage=embedder_pb2.Usage(
                total_tokens=sum(result.token_counts), queue_ms=result.queue_ms, inference_ms=result.inference_ms
            ),
        )


def _embedding(vector: np.ndarray, token_count: int, truncated: bool) -> embedder_pb2.Embedding:
    """One vector's proto, parsed from its wire form: a packed `repeated float` is the vector's
    little-endian float32 bytes behind a tag and a length. ~0.7 us for 384 floats, against ~8 us
    for handing protobuf a list of Python floats (most of the response's cost for a single text)."""
    values = vector.astype("<f4", copy=False).tobytes()
    embedding = embedder_pb2.Embedding.FromString(_VALUES_TAG + _varint(len(values)) + values)
    embedding.token_count = token_count
    embedding.truncated = truncated
    return embedding


_VALUES_TAG = bytes([embedder_pb2.Embedding.VALUES_FIELD_NUMBER << 3 | 2])  # wire type 2: length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def create_service(settings: Settings) -> EmbedderService:
    return EmbedderService(settings)
