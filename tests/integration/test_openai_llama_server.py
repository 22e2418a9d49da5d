"""The OpenAI-compatible backend against a real OpenAI-compatible server: llama.cpp's own
(`python -m llama_cpp.server`) serving the packaged SmolLM2 GGUF on a free loopback port."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest

from generator.backends import ChatMessage, Delta, Finished, GenerationParams
from generator.backends.llama_cpp import packaged_model_path
from generator.backends.openai import OpenAIBackend, OpenAIOptions
from generator.server import Settings
from ragloom.generator.v1 import generator_pb2, generator_pb2_grpc
from tests.generator.support import running_generator

pytestmark = pytest.mark.integration
pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python[server] is not installed")

QUESTION = [ChatMessage("user", "Name three colours of the rainbow.")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log = open(tmp_path_factory.mktemp("llama-server") / "server.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(packaged_model_path()), "--host", "127.0.0.1",
         "--port", str(port), "--n_ctx", "1024", "--n_threads", "1", "--model_alias", "smollm2"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while True:  # ready once it lists its model
        if process.poll() is not None:
            pytest.fail(f"llama_cpp.server exited with {process.returncode}")
        try:
            urllib.request.urlopen(f"{url}/models", timeout=1).read()
            break
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                pytest.fail("llama_cpp.server did not come up in 120 s")
            time.sleep(0.2)
    yield url
    process.terminate()
    process.wait(timeout=10)
    log.close()


@pytest.fixture
async def backend(server):
    backend = OpenAIBackend(server, "smollm2", request_timeout_s=60.0)
    await backend.start()
    yield backend
    await backend.close()


async def test_a_reply_streams_in_pieces_and_ends_with_usage(backend):
    items = [item async for item in backend.stream(GenerationParams(messages=QUESTION, max_tokens=24, temperature=0.0))]
    deltas = [i for i in items if isinstance(i, Delta)]
    *_, finished = items
    assert len(deltas) >= 3 and "".join(d.text for d in deltas).strip()  # streamed, not one block
    assert isinstance(finished, Finished) and finished.finish_reason in ("stop", "length")
    # llama.cpp's server sends no usage event in a stream: the backend counts the tokens it received.
    assert 0 < finished.completion_tokens <= 24


async def test_stop_sequences_and_max_tokens_are_honoured(backend):
    long = GenerationParams(messages=[ChatMessage("user", "Count from 1 to 50, separated by spaces.")],
                            max_tokens=8, temperature=0.0)
    *_, finished = [i async for i in backend.stream(long)]
    assert finished.finish_reason == "length" and finished.completion_tokens == 8


async def test_after_a_cancelled_generation_the_server_answers_the_next(backend):
    endless = GenerationParams(messages=[ChatMessage("user", "Write a very long story about a lighthouse.")],
                               max_tokens=600, temperature=0.0)
    stream = backend.stream(endless)
    received = [await anext(stream) for _ in range(3)]
    await stream.aclose()  # the caller went away: the HTTP stream is closed
    assert all(isinstance(r, Delta) for r in received)
    # The server notices the hang-up (or interrupts it for the next request) and answers in full.
    items = [i async for i in backend.stream(GenerationParams(messages=QUESTION, max_tokens=8, temperature=0.0))]
    assert isinstance(items[-1], Finished) and any(isinstance(i, Delta) for i in items)


async def test_through_the_generator_service_with_cancellation(server):
    settings = Settings(port=0, backend="openai", openai=OpenAIOptions(base_url=server, model="smollm2"))
    async with running_generator(settings) as (address, _):
        async with grpc.aio.insecure_channel(address) as channel:
            stub = generator_pb2_grpc.GeneratorServiceStub(channel)
            request = generator_pb2.GenerateRequest(
                messages=[generator_pb2.Message(role="user", content="Name three colours of the rainbow.")],
                max_tokens=16, temperature=0.0)
            replies = [r async for r in stub.Generate(request, timeout=60)]
            assert "".join(r.text for r in replies).strip()
            assert replies[-1].finish_reason in (generator_pb2.FINISH_REASON_STOP, generator_pb2.FINISH_REASON_LENGTH)
            assert replies[-1].usage.completion_tokens > 0 and replies[-1].usage.time_to_first_token_ms > 0

            call = stub.Generate(generator_pb2.GenerateRequest(
                messages=[generator_pb2.Message(role="user", content="Write a very long story.")], max_tokens=600),
                timeout=60)
            assert (await call.read()).text
            call.cancel()
            again = [r async for r in stub.Generate(request, timeout=60)]
            assert again[-1].usage.completion_tokens > 0
