"""Latency the Envoy gateway hop adds, gRPC and REST, against calling the router directly.

Starts the mesh with the gateway and mutual TLS (as `ragloom up` does), ingests the sample
documents, warms the query-embedding cache, then times the same Search in interleaved rounds:

  * baseline: gRPC straight to the router (mTLS with a router-allowed identity);
  * gRPC through Envoy (plaintext to Envoy, mTLS Envoy → router);
  * REST (JSON) through Envoy's gRPC-JSON transcoder.

Reports p50/p99 of each and the added latency (gateway − direct). Target: ≤ 1 ms added at p50
on loopback (Istio publishes ~1.7–2.8 ms p90 for a sidecar pair).

Then what verifying the caller costs: three gateways (the config `ragloom up` runs) in front of
one fake router, called in interleaved rounds with the same gRPC Search:

  * baseline: the gateway without authentication (`--no-auth`);
  * jwt: verifying an ES256 bearer token (jwt_authn, claims forwarded as headers);
  * jwt_quota: the same plus the per-tenant rate limit (a quota too large to refuse anything).

Reports the p50 each adds over the baseline. Target: JWT verification ≤ 0.3 ms at p50.

    .venv/bin/python bench/gateway.py [--calls 2000]

Last line: one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mesh import policy  # noqa: E402
from mesh.auth import Signer  # noqa: E402
from bench.common import percentile  # noqa: E402
from tests.support.gateway import start_gateway  # noqa: E402
from tests.support.mesh import LocalMesh  # noqa: E402
from fabric.tls import LocalCA  # noqa: E402
from ragloom.router.v1 import router_pb2, router_pb2_grpc  # noqa: E402



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="calls per path")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as data, LocalMesh(Path(data), shards=2, gateway=True, mtls=True) as mesh:
        gateway = router_pb2_grpc.RouterServiceStub(grpc.insecure_channel(mesh.router))
        docs = [router_pb2.Document(source=str(p), content=p.read_bytes()) for p in sorted((ROOT / "router" / "samples").iterdir())]
        gateway.Ingest(router_pb2.IngestRequest(documents=docs), timeout=120)
        identity = LocalCA(Path(data) / "pki").issue("bench", policy.load().spiffe_id(policy.GATEWAY))
        direct = router_pb2_grpc.RouterServiceStub(
            grpc.secure_channel(mesh.child("router").address, identity.channel_credentials()))
        host, port = mesh.router.rsplit(":", 1)
        rest = http.client.HTTPConnection(host, int(port), timeout=10)
        request = router_pb2.SearchRequest(query="how do bees find flowers", top_k=3)
        body = json.dumps({"query": request.query, "top_k": 3})

        def call_rest() -> None:
            rest.request("POST", "/v1/search", body, {"content-type": "application/json"})
            reply = rest.getresponse()
            reply.read()
            assert reply.status == 200, reply.status

        paths = {
            "direct_grpc": lambda: direct.Search(request, timeout=10),
            "gateway_grpc": lambda: gateway.Search(request, timeout=10),
            "gateway_rest": call_rest,
        }
        for fn in paths.values():  # warm-up: connections, caches
            for _ in range(50):
                fn()
        samples = {name: [] for name in paths}
        for _ in range(args.calls):
            for name, fn in paths.items():  # interleaved so drift hits every path alike
                start = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - start) * 1000)

    samples.update(jwt_samples(args.calls))
    figures = {f"{name}_{q}_ms": round(percentile(v, q), 3) for name, v in samples.items() for q in (50, 99)}
    for path in ("jwt", "jwt_quota"):
        figures[f"{path}_added_p50_ms"] = round(statistics.median(samples[path]) - statistics.median(samples["no_auth"]), 3)
    for path in ("gateway_grpc", "gateway_rest"):
        figures[f"{path}_added_p50_ms"] = round(statistics.median(samples[path]) - statistics.median(samples["direct_grpc"]), 3)
        figures[f"{path}_added_p99_ms"] = round(percentile(samples[path], 99) - percentile(samples["direct_grpc"], 99), 3)
    figures["calls_per_path"] = args.calls
    for name, v in samples.items():
        print(f"{name:>13}: p50 {statistics.median(v):.3f} ms  p99 {percentile(v, 99):.3f} ms")
    print(f"added by the gateway at p50: gRPC {figures['gateway_grpc_added_p50_ms']} ms, "
          f"REST {figures['gateway_rest_added_p50_ms']} ms (target ≤ 1 ms)")
    print(f"verifying the token adds {figures['jwt_added_p50_ms']} ms at p50, with the tenant's quota "
          f"{figures['jwt_quota_added_p50_ms']} ms (target ≤ 0.3 ms)")
    print(json.dumps(figures))


def jwt_samples(calls: int) -> dict[str, list[float]]:
    """Latency of one gRPC Search through gateways without and with authentication, interleaved."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        signer = Signer(folder / "pki")
        open_quota = folder / "no-quota.yaml"
        open_quota.write_text("quotas: {enabled: false}\n")
        huge_quota = folder / "huge-quota.yaml"
        huge_quota.write_text("quotas: {enabled: true, requestsPerSecond: 1000000, burst: 1000000}\n")
        gateways = {
            "no_auth": start_gateway(folder / "open", values=(open_quota,)),
            "jwt": start_gateway(folder / "jwt", values=(open_quota,), verifier=signer.verifier),
            "jwt_quota": start_gateway(folder / "quota", values=(huge_quota,), verifier=signer.verifier),
        }
        try:
            metadata = [("authorization", f"Bearer {signer.mint('bench', ttl_s=3600)}")]
            request = router_pb2.SearchRequest(query="q")
            stubs = {name: router_pb2_grpc.RouterServiceStub(grpc.insecure_channel(g.address))
                     for name, g in gateways.items()}
            calls_of = {name: (lambda stub=stub: stub.Search(request, timeout=10, metadata=metadata))
                        for name, stub in stubs.items()}
            for fn in calls_of.values():
                for _ in range(100):
                    fn()
            samples = {name: [] for name in calls_of}
            for _ in range(calls):
                for name, fn in calls_of.items():
                    start = time.perf_counter()
                    fn()
                    samples[name].append((time.perf_counter() - start) * 1000)
        finally:
            for gateway in gateways.values():
                gateway.stop()
    return samples


if __name__ == "__main__":
    main()
