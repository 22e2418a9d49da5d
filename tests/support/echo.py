"""A tiny raw-bytes gRPC service for testing the shared bootstrap: unary, server-streaming and
bidirectional methods that echo, or raise the domain error a request names."""

import asyncio

import grpc

from fabric.errors import InvalidArgument, Overloaded, Unavailable

SERVICE = "test.Echo"


def _raise(exc):
    raise exc


FAILURES = {
    "invalid": lambda: _raise(InvalidArgument("texts[2]", "text is empty")),
    "overloaded": lambda: _raise(Overloaded("busy", retry_after_s=2.5)),
    "down": lambda: _raise(Unavailable("shard 1 unreachable")),
    "bug": lambda: _raise(ZeroDivisionError("division by zero")),
}


class EchoService:
    name = "echo"
    service_names = [SERVICE]

    def __init__(self):
        self.warm = asyncio.Event()
        self.closed = False

    def register(self, server):
        async def unary(request: bytes, context):
            if request.decode() in FAILURES:
                FAILURES[request.decode()]()
            return request

        async def stream(request: bytes, context):
            yield b"first"
            if request.decode() in FAILURES:
                FAILURES[request.decode()]()
            yield b"never"

        async def bidi(requests, context):
            async for request in requests:
                if request.decode() in FAILURES:
                    FAILURES[request.decode()]()
                yield request

        async def gather(requests, context):
            joined = []
            async for request in requests:
                if request.decode() in FAILURES:
                    FAILURES[request.decode()]()
                joined.append(request)
            return b"".join(joined)

        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Gather": grpc.stream_unary_rpc_method_handler(gather),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        }
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])

    async def start(self):
        await self.warm.wait()

    async def close(self):
        self.closed = True
