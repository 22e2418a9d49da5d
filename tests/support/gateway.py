"""A real Envoy gateway (the config `ragloom up` runs) in front of fake routers: what the gateway's
tests and bench/gateway.py start, to see the gateway's own behaviour apart from the mesh's."""

from __future__ import annotations

import asyncio
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from mesh import policy as policies
from mesh.auth import Verifier
from mesh.gateway import Upstream, admin_get, envoy_argv, envoy_config, write_config
from mesh.launcher import Child, start_child, stop_all, wait_ready
from ragloom.router.v1 import router_pb2, router_pb2_grpc
from tests.support.ports import free_port_block


class FakeRouter(router_pb2_grpc.RouterServiceServicer):
    """Answers Search with its own name and the tenant header it was given; Ingest with one document.
    Can fail each call's first attempt with UNAVAILABLE (after reading the whole request)."""

    def __init__(self, name: str, fail_first_attempt: bool = False, tenant_header: str = "x-ragloom-tenant"):
        self.name, self.fail_first_attempt, self.tenant_header = name, fail_first_attempt, tenant_header
        self.seen: dict[str, int] = {}
        self.lock = threading.Lock()

    def _attempt(self, key: str, context) -> None:
        with self.lock:
            attempts = self.seen[key] = self.seen.get(key, 0) + 1
        if self.fail_first_attempt and attempts == 1:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")

    def Search(self, request, context):
        self._attempt(request.query, context)
        tenant = dict(context.invocation_metadata()).get(self.tenant_header, "")
        return router_pb2.SearchResponse(hits=[router_pb2.SearchHit(source=self.name, document_id=tenant)])

    def Ingest(self, request, context):
        self._attempt("ingest:" + ",".join(d.id for d in request.documents), context)
        return router_pb2.IngestResponse(documents=[router_pb2.IngestedDocument(id=d.id) for d in request.documents])


@dataclass
class Gateway:
    address: str
    traffic: policies.TrafficPolicy
    fakes: dict[str, FakeRouter]
    child: Child
    admin_socket: Path
    metrics_url: str
    servers: list = field(default_factory=list)

    def admin(self, path: str) -> tuple[int, bytes]:
        return admin_get(self.admin_socket, path)

    def stop(self) -> None:
        stop_all([self.child])
        for server in self.servers:
            server.stop(0)


def start_gateway(folder: Path, *, values: tuple[Path, ...] = (), weight: int | None = 0, canary: bool = False,
                  fail_first_attempt: bool = False, verifier: Verifier | None = None, workers: int = 8) -> Gateway:
    """Fake stable (and canary) routers and an Envoy configured from the chart's values (+ `values`)."""
    folder.mkdir(parents=True, exist_ok=True)
    ports = free_port_block(4)
    traffic = policies.load(*values)
    fakes, upstreams, servers = {}, {}, []
    for offset, name in enumerate(("stable", "canary") if canary else ("stable",)):
        server = grpc.server(futures.ThreadPoolExecutor(workers))
        fake = FakeRouter(name, fail_first_attempt, traffic.edge.auth.tenant_header)
        router_pb2_grpc.add_RouterServiceServicer_to_server(fake, server)
        server.add_insecure_port(f"127.0.0.1:{ports + offset}")
        server.start()
        servers.append(server)
        fakes[name], upstreams[name] = fake, Upstream(name, "127.0.0.1", ports + offset)
    socket = folder / "admin.sock"
    config = envoy_config(traffic, listen_host="127.0.0.1", listen_port=ports + 2, admin_socket=socket,
                          stable=upstreams["stable"], canary=upstreams.get("canary"), canary_weight=weight,
                          verifier=verifier, metrics_port=ports + 3)
    path = write_config(config, folder / "envoy.json")
    child = Child("gateway", f"127.0.0.1:{ports + 2}", envoy_argv(path, base_id=ports + 3), folder / "envoy.log",
                  ready_socket=socket)
    start_child(child)
    gateway = Gateway(child.address, traffic, fakes, child, socket, f"http://127.0.0.1:{ports + 3}/stats/prometheus",
                      servers)
    try:
        asyncio.run(wait_ready([child], 30, quiet=True))
    except BaseException:
        gateway.stop()
        raise
    return gateway
