"""The mesh's traffic policy, read from the Helm chart's values: one policy, two planes.

Retries, timeouts, canary weights and who may call whom are written once, under the
`trafficPolicy:` key of `mesh/chart/values.yaml`. The chart renders them as Istio
resources; this module hands the same numbers to the local plane (the Envoy config of
`ragloom up`)::

    from mesh import policy

    tp = policy.load()                                   # the chart's values.yaml
    tp = policy.load("mesh/chart/values-canary.yaml")    # + overlays, merged as `helm -f` does
    route = tp.route("generator")
    route.timeout_s, route.retries.attempts, route.retries.retry_on, route.canary_weight
    tp.allowed_spiffe_ids("embedder")   # ('spiffe://cluster.local/ns/ragloom/sa/router',)

Only PyYAML is needed; nothing is read until `load` is called.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import yaml

CHART_DIR = Path(__file__).resolve().parent / "chart"
VALUES = CHART_DIR / "values.yaml"
SERVICES = ("router", "embedder", "indexer", "generator")
#: Caller name for the ingress gateway in `callers`.
GATEWAY = "gateway"
#: Namespace in the identities when the values leave `trafficPolicy.namespace` empty
#: (Helm then uses the release namespace; the README installs into `ragloom`).
DEFAULT_NAMESPACE = "ragloom"

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


@dataclass(frozen=True)
class Retries:
    attempts: int
    #: Longest wait for one attempt's first response bytes (a stream already answering is never retried).
    per_try_timeout_s: float
    #: gRPC/Envoy retry conditions, e.g. ("unavailable", "cancelled").
    retry_on: tuple[str, ...]


@dataclass(frozen=True)
class Route:
    """How calls to one service are routed."""

    #: Bound on a whole call, a stream included.
    timeout_s: float
    retries: Retries
    #: Whether a canary version is deployed (the header then always reaches it).
    canary: bool
    #: Percent of calls (without the header) sent to the canary; 0 when there is none.
    canary_weight: int
    #: Retries of the writes safe to repeat (IDEMPOTENT), and of every method of unknown idempotency.
    idempotent_retries: Retries
    unsafe_retries: Retries
    #: Method names (of the service's proto) by idempotency: reads, then idempotent writes.
    no_side_effects: tuple[str, ...] = ()
    idempotent: tuple[str, ...] = ()

    def retries_for(self, method: str) -> Retries:
        """The retries a call of `method` may get: a read's, an idempotent write's, or, for a method
        not declared either, only those that cannot replay it (the request never reached the server)."""
        if method in self.no_side_effects:
            return self.retries
        if method in self.idempotent:
            return self.idempotent_retries
        return self.unsafe_retries

    def retry_classes(self) -> list[tuple[tuple[str, ...], Retries]]:
        """(methods, retries) for the reads, the idempotent writes, and () for every other method."""
        return [(self.no_side_effects, self.retries), (self.idempotent, self.idempotent_retries),
                ((), self.unsafe_retries)]


@dataclass(frozen=True)
class TrafficPolicy:
    namespace: str
    trust_domain: str
    #: PeerAuthentication mode: STRICT means mTLS on every hop.
    mtls_mode: str
    canary_header: str
    canary_header_value: str
    #: Per service in SERVICES.
    routes: Mapping[str, Route]
    #: Service -> its ServiceAccount, the name in its identity.
    service_accounts: Mapping[str, str]
    #: Callee -> the names allowed to call it: services, or GATEWAY.
    callers: Mapping[str, tuple[str, ...]]
    gateway_namespace: str
    gateway_service_account: str
    #: Who is asking, quotas and limits at the gateway.
    edge: "Edge" = None  # type: ignore[assignment]

    def route(self, service: str) -> Route:
        return self.routes[service]

    def principal(self, name: str) -> str:
        """Istio's principal of a service or of GATEWAY: `<trust domain>/ns/<ns>/sa/<account>`."""
        if name == GATEWAY:
            return f"{self.trust_domain}/ns/{self.gateway_namespace}/sa/{self.gateway_service_account}"
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_accounts[name]}"

    def spiffe_id(self, name: str) -> str:
        """The URI SAN in the certificate of a service or of GATEWAY."""
        return f"spiffe://{self.principal(name)}"

    def allowed_principals(self, service: str) -> tuple[str, ...]:
        return tuple(self.principal(caller) for caller in self.callers.get(service, ()))

    def allowed_spiffe_ids(self, service: str) -> tuple[str, ...]:
        return tuple(self.spiffe_id(caller) for caller in self.callers.get(service, ()))


@dataclass(frozen=True)
class Auth:
    """Bearer JWTs verified at the gateway; the verified claims travel to the router as headers."""

    enabled: bool
    issuer: str
    audiences: tuple[str, ...]
    jwks_uri: str
    jwks: str
    tenant_claim: str
    scope_claim: str
    write_scope: str
    tenant_header: str
    scope_header: str

    @property
    def identity_headers(self) -> tuple[str, str]:
        """The headers only the gateway may set: stripped from what callers send."""
        return (self.tenant_header, self.scope_header)


@dataclass(frozen=True)
class ConsoleFile:
    path: str  # where the gateway serves it, e.g. "/"
    file: str  # its name in the chart's files/console
    content_type: str


@dataclass(frozen=True)
class Console:
    """The web console: static files the gateway answers GETs of itself, with the same headers everywhere."""

    files: tuple[ConsoleFile, ...]
    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Edge:
    auth: Auth
    #: Per-tenant token bucket: sustained rate, burst, how many tenants' buckets are kept; 0 rate = off.
    requests_per_second: float
    burst: int
    max_tenants: int
    #: Largest request body the gateway accepts.
    max_request_bytes: int
    #: The web console the gateway serves; None when gateway.console.enabled is false.
    console: Console | None = None


def _edge(values: Mapping) -> Edge:
    auth = values.get("auth") or {}
    quotas = values.get("quotas") or {}
    limits = values.get("limits") or {}
    rate = float(quotas.get("requestsPerSecond", 0)) if quotas.get("enabled", True) else 0.0
    burst = int(quotas.get("burst", max(1, int(rate))))
    if rate < 0 or (rate and burst < 1):
        raise ValueError("quotas.requestsPerSecond must be >= 0 and quotas.burst >= 1")
    return Edge(
        auth=Auth(
            enabled=bool(auth.get("enabled", False)), issuer=str(auth.get("issuer") or ""),
            audiences=tuple(auth.get("audiences") or ()), jwks_uri=str(auth.get("jwksUri") or ""),
            jwks=str(auth.get("jwks") or ""), tenant_claim=auth.get("tenantClaim", "tenant"),
            scope_claim=auth.get("scopeClaim", "scope"), write_scope=auth.get("writeScope", "write"),
            tenant_header=auth.get("tenantHeader", "x-ragloom-tenant").lower(),
            scope_header=auth.get("scopeHeader", "x-ragloom-scope").lower(),
        ),
        requests_per_second=rate, burst=burst, max_tenants=int(quotas.get("maxTenants", 10000)),
        max_request_bytes=int(limits.get("maxRequestBytes", 16 * 1024 * 1024)),
        console=_console((values.get("gateway") or {}).get("console") or {}),
    )


def _console(spec: Mapping) -> Console | None:
    if not spec.get("enabled", False):
        return None
    files = tuple(ConsoleFile(str(f["path"]), str(f["file"]), str(f["contentType"])) for f in spec.get("files") or ())
    if not files or any(not f.path.startswith("/") or "/" in f.file for f in files):
        raise ValueError("gateway.console.files: each needs a path starting with / and a file name in files/console")
    return Console(files, tuple((str(k).lower(), str(v)) for k, v in (spec.get("headers") or {}).items()))


def load(*overlays: str | Path, values: str | Path = VALUES, namespace: str = DEFAULT_NAMESPACE) -> TrafficPolicy:
    """The policy in `values` with `overlays` merged over it in order (like `helm -f values -f overlay`).

    `namespace` stands in for Helm's release namespace when the values leave
    `trafficPolicy.namespace` empty.
    """
    merged: dict = {}
    for path in (values, *overlays):
        merged = merge_values(merged, yaml.safe_load(Path(path).read_text()) or {})
    return from_values(merged, namespace=namespace)


def merge_values(base: Mapping, overlay: Mapping) -> dict:
    """Helm's merge of a values file over another: maps merge key by key, anything else
    (lists included) is replaced, and a null in the overlay removes the key."""
    merged = copy.deepcopy(dict(base))
    for key, value in overlay.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_values(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def from_values(values: Mapping, namespace: str = DEFAULT_NAMESPACE) -> TrafficPolicy:
    """The policy in already merged chart values."""
    tp = values["trafficPolicy"]
    canary = tp.get("canary") or {}
    defaults = tp["retries"]
    methods = tp.get("methods") or {}

    def retries_of(spec: Mapping, base: Mapping | None = None) -> Retries:
        spec = {**(base or {}), **spec}
        return Retries(attempts=int(spec["attempts"]), per_try_timeout_s=parse_duration(spec["perTryTimeout"]),
                       retry_on=tuple(spec["retryOn"]))

    routes = {}
    for service in SERVICES:
        own = (tp.get("services") or {}).get(service) or {}
        retries = {**defaults, **(own.get("retries") or {})}
        release = canary.get(service) or {}
        enabled = bool(release.get("enabled"))
        weight = int(release.get("weight", 0)) if enabled else 0
        if not 0 <= weight <= 100:
            raise ValueError(f"trafficPolicy.canary.{service}.weight must be 0..100, got {weight}")
        if "timeout" not in own:
            raise ValueError(f"trafficPolicy.services.{service}.timeout is required")
        routes[service] = Route(
            timeout_s=parse_duration(own["timeout"]),
            retries=retries_of(retries),
            canary=enabled,
            canary_weight=weight,
            idempotent_retries=retries_of(tp.get("idempotentRetries") or {"attempts": 0}, retries),
            unsafe_retries=retries_of(tp.get("unsafeRetries") or {"attempts": 0}, retries),
            no_side_effects=tuple((methods.get(service) or {}).get("noSideEffects") or ()),
            idempotent=tuple((methods.get(service) or {}).get("idempotent") or ()),
        )
    header = canary.get("header") or {}
    gateway = tp.get("gateway") or {}
    callers = tp.get("callers") or {}
    return TrafficPolicy(
        namespace=tp.get("namespace") or namespace,
        trust_domain=tp["trustDomain"],
        mtls_mode=tp.get("mtlsMode", "STRICT"),
        canary_header=header.get("name", ""),
        canary_header_value=str(header.get("value", "")),
        routes=MappingProxyType(routes),
        service_accounts=MappingProxyType({s: tp["serviceAccounts"][s] for s in SERVICES}),
        callers=MappingProxyType({s: tuple(callers.get(s) or ()) for s in SERVICES}),
        gateway_namespace=gateway.get("namespace", "istio-system"),
        gateway_service_account=gateway.get("serviceAccount", "istio-ingressgateway-service-account"),
        edge=_edge(values),
    )


def parse_duration(text: str | int | float) -> float:
    """Seconds in an Istio duration such as "250ms", "10s", "1m30s" or "1.5h"."""
    if isinstance(text, (int, float)):
        return float(text)
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration (like 250ms, 10s, 1m30s): {text!r}")
    return sum(float(n) * _UNIT_S[u] for n, u in parts)
