"""Interceptors wrap each method's handler once, and again only when the handler behind it changes."""

from __future__ import annotations

import grpc

from fabric.handlers import HandlerCache


def test_a_method_is_wrapped_once_per_handler():
    made = []

    def wrap(handler, method):
        made.append(method)
        return grpc.unary_unary_rpc_method_handler(handler.unary_unary)

    cache = HandlerCache(wrap)
    first = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    wrapped = cache.get("/s/M", first)
    assert cache.get("/s/M", first) is wrapped and made == ["/s/M"]
    other = grpc.unary_unary_rpc_method_handler(lambda request, context: None)
    assert cache.get("/s/M", other) is not wrapped and made == ["/s/M", "/s/M"]
    assert cache.get("/s/Unknown", None) is None and len(made) == 2
