"""Who is asking: the tenant a call acts for, and whether it may write.

Behind the gateway (`tenant_from="gateway"`) the tenant is the one in the caller's verified token,
which the gateway forwards in a header after stripping any copy the caller sent. The router believes
that header only from the gateway: locally, a peer certificate with one of `trusted` SPIFFE ids; in
a cluster (no `trusted` ids) the sidecar's AuthorizationPolicy, which admits the gateway alone. A
request's own `tenant` may then only repeat the token's (empty means the token's), and writes need
the token's write scope.

`tenant_from="request"` is a mesh without authentication (`ragloom up --no-auth`): the request's
tenant is taken as written.
"""

from __future__ import annotations

from dataclasses import dataclass

from fabric.errors import PermissionDenied, Unauthenticated
from fabric.tls import peer_spiffe_ids

GATEWAY, REQUEST = "gateway", "request"


@dataclass(frozen=True)
class Callers:
    tenant_from: str = REQUEST
    #: SPIFFE ids whose identity headers are believed; empty: the transport already admits only the gateway.
    trusted: frozenset[str] = frozenset()
    tenant_header: str = "x-ragloom-tenant"
    scope_header: str = "x-ragloom-scope"
    write_scope: str = "write"

    def __post_init__(self) -> None:
        if self.tenant_from not in (GATEWAY, REQUEST):
            raise ValueError(f"tenant_from must be {GATEWAY!r} or {REQUEST!r}, not {self.tenant_from!r}")

    def tenant(self, context, requested: str, write: bool = False) -> str:
        """The tenant this call acts for; UNAUTHENTICATED without a believable identity, PERMISSION_DENIED
        for another tenant's documents or a write without the write scope."""
        if self.tenant_from == REQUEST:
            return requested
        metadata = context.invocation_metadata() or ()
        if self.trusted and not self.trusted.intersection(peer_spiffe_ids(context)):
            raise Unauthenticated("this router takes the caller's identity only from the gateway: call it through "
                                  "the gateway, with a bearer token")
        tenant = _header(metadata, self.tenant_header)
        if not tenant:
            raise Unauthenticated("the caller's token names no tenant (its tenant claim is missing or empty)")
        if requested and requested != tenant:
            raise PermissionDenied(f"the token is for tenant {tenant!r}; it may not act for tenant {requested!r}")
        if write and self.write_scope not in _header(metadata, self.scope_header).replace(",", " ").split():
            raise PermissionDenied(f"this token may only read: ingest and delete need the {self.write_scope!r} scope")
        return tenant


def _header(metadata, name: str) -> str:
    for key, value in metadata:
        if key == name:
            return value if isinstance(value, str) else value.decode()
    return ""
