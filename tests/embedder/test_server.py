import asyncio

import grpc
import numpy as np
import pytest

from embedder.server import Settings, create_service
from mesh.server import serve
from ragloom.embedder.v1 import embedder_pb2, embedder_pb2_grpc


@pytest.fixture
async def stub():
    settings = Settings(port=0, model="minilm-int8", max_batch_texts=8)
    stop, ready = asyncio.Event(), asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(create_service(settings), settings, on_ready=ready.set_result, stop=stop))
    port = await asyncio.wait_for(ready, 60)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield embedder_pb2_grpc.EmbedderServiceStub(channel)
    stop.set()
    await task


async def test_embed_and_info(stub):
    reply = await stub.Embed(embedder_pb2.EmbedRequest(texts=["a bee", "a hive of bees", "word " * 300]), timeout=10)
    vectors = np.array([e.values for e in reply.embeddings])
    assert vectors.shape == (3, 384) and reply.dimension == 384
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert [e.truncated for e in reply.embeddings] == [False, False, True]
    info = await stub.Info(embedder_pb2.InfoRequest(), timeout=5)
    assert info.max_tokens == 256 and info.provider == "CPUExecutionProvider" and info.threads >= 1


async def test_concurrent_callers_get_their_own_vectors(stub):
    texts = [f"sentence number {i} about {'bees' if i % 2 else 'lighthouses'}" for i in range(24)]
    replies = await asyncio.gather(*(stub.Embed(embedder_pb2.EmbedRequest(texts=[t]), timeout=20) for t in texts))
    batch = await stub.Embed(embedder_pb2.EmbedRequest(texts=texts[:8]), timeout=20)
    for one, together in zip(replies[:8], batch.embeddings):
        np.testing.assert_allclose(one.embeddings[0].values, together.values, atol=1e-5)


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
