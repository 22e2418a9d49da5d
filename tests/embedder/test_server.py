import asyncio

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from embedder.model import choose_provider
from embedder.server import Settings, create_service
from fabric.server import serve
from ragloom.embedder.v1 import embedder_pb2, embedder_pb2_grpc


async def _serving(settings: Settings):
    stop, ready = asyncio.Event(), asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(create_service(settings), settings, on_ready=ready.set_result, stop=stop))
    port = await asyncio.wait_for(ready, 60)
    return port, stop, task


@pytest.fixture
async def stub():
    port, stop, task = await _serving(Settings(port=0, model="minilm", max_batch_texts=8))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield embedder_pb2_grpc.EmbedderServiceStub(channel)
    stop.set()
    await task


def _vectors(reply) -> np.ndarray:
    return np.array([e.values for e in reply.embeddings], dtype=np.float32)


async def test_embed_and_info(stub):
    reply = await stub.Embed(embedder_pb2.EmbedRequest(texts=["a bee", "a hive of bees", "word " * 300]), timeout=10)
    vectors = _vectors(reply)
    assert vectors.shape == (3, 384) and reply.dimension == 384
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert [e.truncated for e in reply.embeddings] == [False, False, True]
    assert reply.usage.total_tokens == sum(e.token_count for e in reply.embeddings)
    info = await stub.Info(embedder_pb2.InfoRequest(), timeout=5)
    # the best provider this onnxruntime offers: CPU here, CUDA or TensorRT on a GPU machine
    assert info.max_tokens == 256 and info.provider == choose_provider() and info.threads >= 1 <= info.workers
    assert info.variant == "fp32" and info.max_wait_ms == 2.0 and info.max_batch_tokens == 8192
    assert info.max_queued_tokens > 0 and info.texts >= 4 and info.padded_tokens >= info.tokens > 0


async def test_vectors_come_back_exactly_as_the_model_made_them(stub):
    from embedder.server import resolve_model
    from embedder.model import OnnxEmbedder

    texts = ["a bee", "the lighthouse keeper trims the wick at dusk", "word " * 300]
    reply = await stub.Embed(embedder_pb2.EmbedRequest(texts=texts), timeout=10)
    local = OnnxEmbedder(resolve_model("minilm")).embed(texts)
    np.testing.assert_allclose(_vectors(reply), local.vectors, atol=1e-6)
    assert [e.token_count for e in reply.embeddings] == local.token_counts
    assert [e.truncated for e in reply.embeddings] == local.truncated == [False, False, True]


async def test_concurrent_callers_get_their_own_vectors(stub):
    texts = [f"sentence number {i} about {'bees' if i % 2 else 'lighthouses'}" + " and more" * (i % 7) for i in range(32)]
    alone = [_vectors(await stub.Embed(embedder_pb2.EmbedRequest(texts=[t]), timeout=20))[0] for t in texts]
    before = await stub.Info(embedder_pb2.InfoRequest(), timeout=5)
    replies = await asyncio.gather(*(stub.Embed(embedder_pb2.EmbedRequest(texts=[t]), timeout=20) for t in texts))
    after = await stub.Info(embedder_pb2.InfoRequest(), timeout=5)
    np.testing.assert_allclose(np.concatenate([_vectors(r) for r in replies]), np.stack(alone), atol=1e-5)
    assert after.runs - before.runs < len(texts)


async def test_stream_answers_every_message_in_order(stub):
    messages = [[f"message {m} text {i} " + "about bees " * (m + i) for i in range(1 + m % 3)] for m in range(10)]

    async def requests():
        for texts in messages:
            yield embedder_pb2.EmbedRequest(texts=texts)

    replies = [reply async for reply in stub.EmbedStream(requests(), timeout=30)]
    assert [len(r.embeddings) for r in replies] == [len(m) for m in messages]
    direct = await stub.Embed(embedder_pb2.EmbedRequest(texts=messages[7]), timeout=10)
    np.testing.assert_allclose(_vectors(replies[7]), _vectors(direct), atol=1e-5)


async def test_stream_bad_message_ends_it_with_invalid_argument_after_the_good_ones(stub):
    async def requests():
        yield embedder_pb2.EmbedRequest(texts=["fine"])
        yield embedder_pb2.EmbedRequest(texts=["fine", ""])
        yield embedder_pb2.EmbedRequest(texts=["never answered"])

    replies = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for reply in stub.EmbedStream(requests(), timeout=10):
            replies.append(reply)
    assert [len(r.embeddings) for r in replies] == [1]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("texts[1]") and "stream message 1" in info.value.details()


@pytest.mark.parametrize(
    "request_, field",
    [
        (embedder_pb2.EmbedRequest(), "texts"),
        (embedder_pb2.EmbedRequest(texts=["ok", "  "]), "texts[1]"),
        (embedder_pb2.EmbedRequest(texts=["x"] * 9), "texts"),
        (embedder_pb2.EmbedRequest(texts=["word " * 300], reject_overlong=True), "texts[0]"),
    ],
)
async def test_bad_input_is_invalid_argument_and_service_keeps_serving(stub, request_, field):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Embed(request_, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field)
    ok = await stub.Embed(embedder_pb2.EmbedRequest(texts=["still here"]), timeout=10)
    assert len(ok.embeddings) == 1


async def test_overload_is_resource_exhausted_with_a_retry_hint():
    port, stop, task = await _serving(Settings(port=0, model="minilm", max_queued_tokens=300))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = embedder_pb2_grpc.EmbedderServiceStub(channel)
            request = embedder_pb2.EmbedRequest(texts=["the lighthouse keeper trims the wick " * 20] * 2)
            outcomes = await asyncio.gather(*(stub.Embed(request, timeout=30) for _ in range(12)), return_exceptions=True)
            refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
            assert refused and len(refused) < len(outcomes)
            assert {o.code() for o in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            status = rpc_status.from_call(refused[0])
            retry = error_details_pb2.RetryInfo()
            assert status.details[0].Unpack(retry) and retry.retry_delay.ToMilliseconds() > 0
            ok = await stub.Embed(embedder_pb2.EmbedRequest(texts=["afterwards"]), timeout=10)
            assert len(ok.embeddings) == 1
    finally:
        stop.set()
        await task


async def test_a_stream_the_client_abandons_leaves_nothing_queued():
    from embedder.server import EmbedderService

    service = EmbedderService(Settings(model="minilm", stream_window=3))
    await service.start()
    try:

        async def requests():
            for m in range(50):
                yield [f"bulk message {m} " + "about lighthouses " * 30] * 8, False

        stream = service.embed_stream(requests())
        assert len((await stream.__anext__()).vectors) == 8
        await stream.aclose()
        await asyncio.sleep(0.1)
        assert service.batcher.queued_tokens == 0
        assert len((await service.embed(["still serving"])).vectors) == 1
    finally:
        await service.close()


def test_cpu_runs_side_by_side_on_one_thread_each_and_a_gpu_runs_one_at_a_time():
    from fabric.resources import usable_cpus

    cpus = usable_cpus()
    assert Settings().parallelism("CPUExecutionProvider") == (cpus, 1)
    assert Settings().parallelism("CUDAExecutionProvider") == (1, cpus)
    assert Settings(workers=1).parallelism("CPUExecutionProvider") == (1, cpus)
    assert Settings(workers=3, threads=2).parallelism("CPUExecutionProvider") == (3, 2)


def test_settings_refuse_nonsense():
    with pytest.raises(ValueError, match="max_batch_tokens"):
        Settings(max_batch_tokens=0).validate()
    with pytest.raises(ValueError, match="max_wait_ms"):
        Settings(max_wait_ms=-1).validate()
    assert Settings.from_args(["--model", "minilm-int8", "--max-wait-ms", "0.5", "--spin"]).max_wait_ms == 0.5
