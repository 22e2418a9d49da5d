"""Who is asking: the tenant comes from the gateway's verified header, believed from the gateway alone."""

import grpc
import pytest

from fabric.errors import code_of
from router.callers import Callers


class Context:
    def __init__(self, metadata=(), peer_ids=()):
        self.metadata, self.peer_ids = tuple(metadata), peer_ids

    def invocation_metadata(self):
        return self.metadata

    def auth_context(self):
        return {}


GATEWAY = "spiffe://cluster.local/ns/istio-system/sa/gateway"


def refused(callers, context, requested="", write=False) -> grpc.StatusCode:
    with pytest.raises(Exception) as info:
        callers.tenant(context, requested, write)
    return code_of(info.value)


def test_the_tokens_tenant_is_used_and_another_is_refused():
    callers = Callers("gateway")
    ctx = Context([("x-ragloom-tenant", "alice"), ("x-ragloom-scope", "read write")])
    assert callers.tenant(ctx, "") == "alice"
    assert callers.tenant(ctx, "alice", write=True) == "alice"
    assert refused(callers, ctx, "bob") == grpc.StatusCode.PERMISSION_DENIED
    reader = Context([("x-ragloom-tenant", "alice"), ("x-ragloom-scope", "read")])
    assert callers.tenant(reader, "") == "alice"
    assert refused(callers, reader, write=True) == grpc.StatusCode.PERMISSION_DENIED
    assert refused(callers, Context([("x-ragloom-scope", "read")])) == grpc.StatusCode.UNAUTHENTICATED


def test_identity_headers_count_only_from_the_trusted_gateway(monkeypatch):
    import router.callers as module

    callers = Callers("gateway", trusted=frozenset({GATEWAY}))
    headers = [("x-ragloom-tenant", "alice"), ("x-ragloom-scope", "read write")]
    monkeypatch.setattr(module, "peer_spiffe_ids", lambda context: list(context.peer_ids))
    assert callers.tenant(Context(headers, [GATEWAY]), "") == "alice"
    other = Context(headers, ["spiffe://cluster.local/ns/ragloom/sa/generator"])
    assert refused(callers, other) == grpc.StatusCode.UNAUTHENTICATED


def test_without_authentication_the_request_names_its_tenant():
    callers = Callers("request")
    assert callers.tenant(Context([("x-ragloom-tenant", "alice")]), "bob", write=True) == "bob"
    with pytest.raises(ValueError):
        Callers("anyone")
