"""`ragloom status`: what a client can see of a running mesh through its public endpoint, and no more.

Two probes over the client's own channel (its token and deadline): the endpoint's gRPC health, and one
Search (top_k=1) whose coverage names the shards that answered and failed and whose `degraded` lines name a
dependency the router worked around (the embedder down: lexical only). The internal services are not asked
directly: `ragloom up` keeps no record of their ports, and with mTLS they admit only the callers the policy
names. The generator and the answer cache show only in an Ask, which `status` does not make (it would
generate); the report says so rather than guess.
"""

from __future__ import annotations

import argparse
import json
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.commands import client, exit_code, fail
from ragloom.client import RagloomError, error_from_rpc

#: Why health may be missing: Envoy answers a path outside the RouterService with HTTP 404 (UNIMPLEMENTED).
NOT_EXPOSED = "not exposed here (a gateway routes the RouterService only)"
NOT_SEEN = "the generator and the answer cache (visible only in an Ask, which status does not make)"


def _health(rag, timeout: float) -> tuple[str, RagloomError | None]:
    stub = health_pb2_grpc.HealthStub(rag.channel)
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout, metadata=rag.metadata)
    except grpc.RpcError as exc:
        error = error_from_rpc(exc)
        if error.code == grpc.StatusCode.UNIMPLEMENTED:
            return NOT_EXPOSED, None
        return f"{error.code.name}: {error.message}", error
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status), None


def probe(args: argparse.Namespace) -> tuple[dict, int, RagloomError | None]:
    """The report, the exit status (see mesh.cli.STATUS_HELP) and the probe search's error, if it failed."""
    rag = client(args)
    try:
        health, health_error = _health(rag, min(5.0, args.timeout))
        report: dict = {"endpoint": args.router, "health": health, "not_seen": NOT_SEEN}
        started = time.perf_counter()
        try:
            result = rag.search("ragloom status probe", top_k=1, tenant=args.tenant)
        except RagloomError as exc:
            report["search"] = {"error": str(exc)}
            return report, exit_code(exc.code), exc
    finally:
        rag.close()
    coverage = result.coverage
    report["search"] = {
        "ms": round((time.perf_counter() - started) * 1e3, 1), "router_ms": round(result.timings.total_ms, 1),
        "shards_answered": list(coverage.shards_answered), "shards_failed": list(coverage.shards_failed),
        "partial": coverage.partial, "retrieval": coverage.retrieval, "degraded": list(coverage.degraded),
    }
    unwell = coverage.partial or coverage.degraded or health_error is not None or \
        health not in ("SERVING", NOT_EXPOSED)
    return report, (1 if unwell else 0), None


def status(args: argparse.Namespace) -> int:
    report, code, error = probe(args)
    if args.json:
        print(json.dumps(report, indent=2))
        return code
    print(f"endpoint   {report['endpoint']}")
    print(f"health     {report['health']}")
    if error is not None:
        print("search     failed")
        return fail(args, error)
    search = report["search"]
    answered, failed = search["shards_answered"], search["shards_failed"]
    print(f"shards     {len(answered)} answered ({', '.join(map(str, answered)) or '-'}); "
          f"{len(failed)} failed ({', '.join(map(str, failed)) or '-'})")
    print(f"retrieval  {search['retrieval'] or 'unknown'}; "
          f"{'degraded: ' + '; '.join(search['degraded']) if search['degraded'] else 'nothing degraded'}")
    print(f"search     {search['ms']:.0f} ms ({search['router_ms']:.0f} ms in the router)")
    print(f"not seen   {report['not_seen']}")
    return code
