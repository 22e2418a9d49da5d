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


class HandlerCache:
    """Each method's wrapped handler, made once instead of on every call.

    A server hands an interceptor the same handler object for a method call after call, so its
    wrapping (new closures and a new handler, a few microseconds each time) is kept by method and
    made again only when the handler behind it is another object. Bounded by the server's methods:
    an unknown method has no handler and nothing is kept for it."""

    def __init__(self, wrap: Callable[[grpc.RpcMethodHandler, str], grpc.RpcMethodHandler]):
        self._wrap = wrap
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def get(self, method: str, handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
        if handler is None:
            return None
        kept = self._wrapped.get(method)
        if kept is not None and kept[0] is handler:
            return kept[1]
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped
