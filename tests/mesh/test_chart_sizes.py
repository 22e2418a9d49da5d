"""Every object the chart renders fits what the API server and kubectl accept, for every values
variant: `kubectl apply` copies the whole object as compact JSON into its
kubectl.kubernetes.io/last-applied-configuration annotation, and an object's annotations together
may hold 262,144 bytes (256 KiB); etcd refuses a request over about 1.5 MiB, and we keep each object
under 1 MiB. The Helm release Secret (the chart and the manifest, gzipped) is bounded by the 1 MiB of
a Secret too.

(The EnvoyFilter that inlined the full descriptor set once per listener port was about 460 KB with
gateway.tls.credentialName set: apply refused it. Now the router-only set is a file in the gateway.)
"""

from __future__ import annotations

import base64
import gzip
import json
from pathlib import Path

import pytest

from tests.mesh import chart_tools as ct

#: kubectl's limit on an object's annotations (apimachinery's TotalAnnotationSizeLimitB).
ANNOTATIONS_LIMIT = 262_144
#: What we allow one object (the API server takes up to ~1.5 MiB per request).
OBJECT_LIMIT = 1 << 20
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"

VARIANTS = {
    "default": (),
    "canary": ("-f", str(ct.CHART / "values-canary.yaml")),
    "tls": ("--set", "gateway.tls.credentialName=ragloom-tls"),
    "auth-off": ("--set", "auth.enabled=false"),
    "quotas-off": ("--set", "quotas.enabled=false"),
    "nats-off": ("--set", "nats.deploy=false", "--set", "indexer.replicasPerShard=1"),
    "nats-external": ("--set", "nats.deploy=false", "--set", "nats.url=nats://nats.example:4222", *ct.NATS_EGRESS),
    "shared-gateway": ct.SHARED_GATEWAY,
    "shared-gateway-tls": (*ct.SHARED_GATEWAY, "--set", "gateway.tls.credentialName=ragloom-tls"),
    "no-transcoding": ("--set", "gateway.transcoding.enabled=false"),
    "no-network-policy": ("--set", "networkPolicy.enabled=false"),
    "observability": ("--set", "observability.grafanaDashboard.enabled=true",
                      "--set", "observability.serviceMonitor.enabled=true",
                      "--set", "observability.prometheusRule.enabled=true"),
    "everything": ("-f", str(ct.CHART / "values-canary.yaml"), "--set", "gateway.tls.credentialName=ragloom-tls",
                   "--set", "router.redisUrl=redis://redis:6379/0", *ct.REDIS_EGRESS,
                   "--set", "indexer.shards=16", "--set", "indexer.replicasPerShard=3",
                   "--set", "observability.grafanaDashboard.enabled=true",
                   "--set", "observability.serviceMonitor.enabled=true",
                   "--set", "observability.prometheusRule.enabled=true"),
}




def compact_size(obj: dict) -> int:
    return len(json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode())


def annotations_after_apply(obj: dict) -> int:
    """Bytes of the object's annotations once `kubectl apply` has added its last-applied copy."""
    annotations = dict(obj.get("metadata", {}).get("annotations") or {})
    annotations[LAST_APPLIED] = json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n"
    return sum(len(k.encode()) + len(v.encode()) for k, v in annotations.items())


def oversized(objs: list[dict]) -> list[str]:
    """The objects that would not fit, and why."""
    out = []
    for obj in objs:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        size, annotations = compact_size(obj), annotations_after_apply(obj)
        if size >= ANNOTATIONS_LIMIT or annotations >= ANNOTATIONS_LIMIT:
            out.append(f"{name}: {size} bytes as compact JSON, {annotations} bytes of annotations after "
                       f"kubectl apply (the limit is {ANNOTATIONS_LIMIT})")
        if size >= OBJECT_LIMIT:
            out.append(f"{name}: {size} bytes, over {OBJECT_LIMIT}")
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_object_fits(helm_bin, variant):
    objs = ct.render(helm_bin, *VARIANTS[variant])
    problems = oversized(objs)
    assert not problems, "\n".join(problems)
    largest = max(objs, key=compact_size)
    # well inside the limit, with room for the descriptor set to grow
    assert compact_size(largest) < ANNOTATIONS_LIMIT // 2, (largest["kind"], largest["metadata"]["name"], compact_size(largest))


def test_the_size_check_catches_an_oversized_object(helm_bin):
    envoy_filter = next(o for o in ct.render(helm_bin, *VARIANTS["tls"]) if o["metadata"]["name"] == "ragloom-grpc-json-transcoder")
    assert not oversized([envoy_filter])
    # the full descriptor set inline, once per listener port, as the chart once had it
    full = base64.b64encode((ct.ROOT / "protos" / "ragloom" / "ragloom.pb").read_bytes()).decode()
    patch = envoy_filter["spec"]["configPatches"][0]
    config = patch["patch"]["value"]["typed_config"]
    config.pop("proto_descriptor", None)
    config["proto_descriptor_bin"] = full
    envoy_filter["spec"]["configPatches"] = [patch, patch]
    (problem,) = oversized([envoy_filter])
    assert "EnvoyFilter/ragloom-grpc-json-transcoder" in problem


def test_the_helm_release_fits_its_secret(helm_bin):
    """Helm keeps each release (the chart's files and the manifest) gzipped and base64-encoded in a
    Secret, at most 1 MiB: an estimate, for the largest variant."""
    done = ct.helm(helm_bin, "template", "ragloom", str(ct.CHART), "--namespace", "ragloom", *VARIANTS["everything"])
    assert done.returncode == 0, done.stderr
    files = {str(p.relative_to(ct.CHART)): base64.b64encode(p.read_bytes()).decode()
             for p in ct.CHART.rglob("*") if p.is_file()}
    release = json.dumps({"chart": {"files": files}, "manifest": done.stdout}).encode()
    stored = len(base64.b64encode(base64.b64encode(gzip.compress(release))))  # Helm's base64, then the Secret's
    assert stored < OBJECT_LIMIT, stored
