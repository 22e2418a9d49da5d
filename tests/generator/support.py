"""Test helpers: the generator served on a free port, and a fake OpenAI-compatible streaming server."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from google.rpc import status_pb2

from generator.server import GeneratorService, Settings, create_service
from fabric.server import serve


_M = TypeVar("_M", bound=Message)


def status_details(error: grpc.aio.AioRpcError, kind: type[_M]) -> list[_M]:
    """The google.rpc details of type `kind` packed into a failed call's status."""
    found = []
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(kind.DESCRIPTOR):
                    message = kind()
                    detail.Unpack(message)
                    found.append(message)
    return found


@contextlib.asynccontextmanager
async def running_generator(settings: Settings) -> AsyncIterator[tuple[str, GeneratorService]]:
    """Serves the generator until the block ends; yields its address and the service once health says SERVING."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[int] = loop.create_future()
    stop = asyncio.Event()
    service = create_service(settings)
    task = asyncio.create_task(serve(service, settings, on_ready=ready.set_result, stop=stop))
    try:
        await asyncio.wait({ready, task}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # serve failed: raise its error
        yield f"127.0.0.1:{ready.result()}", service
    finally:
        stop.set()
        await task


def chunk(text: str | None = None, finish_reason: str | None = None) -> dict[str, Any]:
    """One chat.completion.chunk event."""
    delta = {"content": text} if text is not None else {}
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    return {"object": "chat.completion.chunk", "choices": [choice]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The closing usage event sent for stream_options.include_usage."""
    return {
        "object": "chat.completion.chunk",
        "choices": [],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
    }


@dataclass
class Reply:
    """What the fake server answers: an error body when status != 200, else `events` as SSE, `delay_s` apart."""

    status: int = 200
    events: list[dict[str, Any]] = field(default_factory=list)
    delay_s: float = 0.0
    error: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class FakeOpenAI:
    """A minimal HTTP/1.1 server for POST /v1/chat/completions with stream=true, on 127.0.0.1:<free port>."""

    def __init__(self, reply: Reply | None = None):
        self.reply = reply or Reply()
        self.requests: list[Request] = []
        self.sent = 0  # SSE events written so far, [DONE] included
        self.hung_up = asyncio.Event()  # the client closed the connection mid-stream
        self.base_url = ""
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task] = set()

    async def __aenter__(self) -> FakeOpenAI:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc_info) -> None:
        self._server.close()
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._handlers.add(asyncio.current_task())
        try:
            await self._answer(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            self.hung_up.set()
        finally:
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        _, path, _ = head[0].split(" ", 2)
        fields = (line.split(":", 1) for line in head[1:] if line)
        headers = {name.strip().lower(): value.strip() for name, value in fields}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        self.requests.append(Request(path, headers, json.loads(body)))
        reply = self.reply
        extra = "".join(f"{name}: {value}\r\n" for name, value in reply.headers.items())
        if reply.status != 200:
            payload = json.dumps(reply.error or {}).encode()
            writer.write(
                f"HTTP/1.1 {reply.status} Error\r\nContent-Type: application/json\r\n{extra}"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
            return
        writer.write(
            f"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n{extra}"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode()
        )
        hang_up = asyncio.ensure_future(reader.read(1))  # completes with b"" when the client closes
        try:
            for data in [*map(json.dumps, reply.events), "[DONE]"]:
                if hang_up.done():
                    self.hung_up.set()
                    return
                event = f"data: {data}\n\n".encode()
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()
                self.sent += 1
                await asyncio.wait({hang_up}, timeout=reply.delay_s)  # a pause that ends early on hang-up
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        finally:
            hang_up.cancel()
