"""What `ragloom up` runs, as one typed value: the CLI, the tests' mesh and the benchmarks build it."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import platformdirs

SERVICES = ("embedder", "indexer", "generator", "router")
#: embedder, generator, router, canary router, gateway metrics, NATS, NATS monitoring
FIXED_PORTS = 7


def default_data_dir() -> Path:
    """Where `ragloom up` keeps its data, and where the CLI looks for the development token, unless
    --data-dir / RAGLOOM_DATA_DIR say otherwise."""
    return Path(platformdirs.user_data_dir("ragloom"))


@dataclass(frozen=True)
class MeshSpec:
    """The mesh on one machine: how many shards and replicas, which ports, which generator, which planes.

    Ports from `base_port`: embedder, generator, router, canary router, gateway metrics, NATS,
    NATS monitoring, then the shards' replicas. With the gateway on, Envoy takes `router_port` (gRPC and REST) and the router
    listens on its internal port; without it, the router takes `router_port`.
    """

    data_dir: Path
    shards: int = 2
    replicas: int = 1
    host: str = "127.0.0.1"
    router_port: int = 50051
    base_port: int = 50052
    generator_backend: str = "llama_cpp"
    generator_model_path: str = ""
    openai_base_url: str = ""
    openai_model: str = ""
    redis_url: str = ""
    #: NATS (JetStream) holding the shards' logs; empty: `ragloom up` runs its own under data_dir.
    nats_url: str = ""
    #: Raft replicas of each shard's stream and of the generations bucket (3 on a 3-server NATS cluster).
    log_replicas: int = 1
    gateway: bool = True
    mtls: bool = True
    #: Bearer JWTs at the gateway decide the tenant: the local issuer's (keys under data_dir/pki), or,
    #: with jwks_uri, any OIDC provider's.
    auth: bool = True
    jwt_issuer: str = ""
    jwt_audiences: tuple[str, ...] = ()
    jwks_uri: str = ""
    #: Percent of traffic for a canary router; None = what the values' router canary says.
    canary_weight: int | None = None
    #: Helm values overlays for the traffic policy.
    values: tuple[Path, ...] = ()
    #: First of the services' Prometheus ports, 0 = no metrics.
    metrics_base_port: int = 0
    otlp_endpoint: str = ""
    startup_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser().resolve())
        object.__setattr__(self, "values", tuple(Path(v) for v in self.values))
        object.__setattr__(self, "jwt_audiences", tuple(self.jwt_audiences))

    def validate(self) -> None:
        """Raises ValueError naming the flag that cannot work."""
        if self.shards < 1 or self.replicas < 1:
            raise ValueError("--shards and --replicas must be at least 1")
        if self.mtls and not self.gateway:
            raise ValueError("--mtls needs the gateway (only it may call the router); add --no-mtls with --no-gateway")
        if self.auth and not (self.gateway and self.mtls):
            raise ValueError("--auth needs the gateway and --mtls (the router believes a tenant only from the "
                             "gateway's certificate); for a laptop without them add --no-auth")
        if self.jwks_uri and not self.jwt_issuer:
            raise ValueError("--jwks-uri needs --jwt-issuer (the tokens' iss)")
        if self.jwks_uri and not self.jwks_uri.startswith(("https://", "http://")):
            raise ValueError(f"--jwks-uri must be an http(s) URL: {self.jwks_uri!r}")
        if self.canary_weight is not None and not 0 <= self.canary_weight <= 100:
            raise ValueError("--canary-weight must be between 0 and 100")
        if self.startup_timeout_s <= 0:
            raise ValueError("--startup-timeout must be positive")
        for port in (self.router_port, self.base_port, self.last_port):
            if not 1 <= port <= 65535:
                raise ValueError(f"ports must be 1..65535: --router-port {self.router_port}, --base-port {self.base_port} "
                                 f"and the {self.ports_needed} ports above it")
        for path in self.values:
            if not path.is_file():
                raise ValueError(f"--values: no such file: {path}")

    @property
    def ports_needed(self) -> int:
        """Consecutive ports from base_port: seven fixed ones, then one per shard replica."""
        return FIXED_PORTS + self.shards * self.replicas

    @property
    def last_port(self) -> int:
        return self.base_port + self.ports_needed - 1

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> "MeshSpec":
        """The spec from `ragloom up`'s parsed flags (each field has a flag of the same name)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(ns).items() if k in names})
