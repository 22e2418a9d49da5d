"""Wrapping a gRPC method handler's behaviour, whatever its kind: what every server interceptor does."""

from __future__ import annotations

from collections.abc import Callable

import grpc

Behavior = Callable  # (request or request iterator, context) -> response, or an async iterator of responses

# (attribute of the handler, the constructor of its kind, whether its responses stream)
_KINDS = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler, False),
    ("unary_stream", grpc.unary_stream_rpc_method_handler, True),
    ("stream_unary", grpc.stream_unary_rpc_method_handler, False),
    ("stream_stream", grpc.stream_stream_rpc_method_handler, True),
)


def rewrap(
    handler: grpc.RpcMethodHandler | None,
    unary: Callable[[Behavior], Behavior],
    stream: Callable[[Behavior], Behavior],
) -> grpc.RpcMethodHandler | None:
    """The same handler with its behaviour wrapped: by `unary` where it answers with one response
    (unary-unary, stream-unary), by `stream` where it streams responses (unary-stream, stream-stream).
    Every kind is covered, so no interceptor can miss one."""
    if handler is None:
        return None
    for attribute, make, streams in _KINDS:
        behavior = getattr(handler, attribute)
        if behavior:
            return make((stream if streams else unary)(behavior), request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    return handler
