"""The chart's NetworkPolicies: everything in the release namespace denied both ways, then exactly the
calls trafficPolicy.callers names (the data of the AuthorizationPolicies too), NATS, DNS, istiod,
Prometheus, and the outside services values point at. Judged by what they let through (tests/mesh/netpol.py
evaluates them as a cluster would), not by their shape.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml

from mesh import policy
from tests.mesh import chart_tools as ct
from tests.mesh.netpol import Pod, allowed, outside, pods_of

NAMESPACE = "ragloom"
SERVICES = ("router", "embedder", "indexer", "generator")
GRPC, METRICS = 50051, 9090
#: The gateway's listeners and its status port: anyone may connect.
PUBLIC = {8080, 8443, 15021}

KUBE_DNS = Pod("kube-dns", "kube-system", {"k8s-app": "kube-dns"})
ISTIOD = Pod("istiod", "istio-system", {"app": "istiod"})
PROMETHEUS = Pod("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"})
#: Pods elsewhere that look like ours: a namespace's pods are not another's.
STRANGERS = [Pod(f"stranger-{app}", "elsewhere", {"app": app}) for app in (*SERVICES, "nats")]
INTERNET = outside("internet", "203.0.113.7")
REDIS = outside("redis", "10.20.0.5")
EXTERNAL_NATS = outside("nats", "10.30.0.9")
VLLM = Pod("vllm", "vllm", {"app": "vllm"})
SHARED_GATEWAY_POD = Pod("istio-ingressgateway", "istio-system", {"istio": "ingressgateway", "app": "istio-ingressgateway"})

VARIANTS = {
    "default": (),
    "canary": ("-f", str(ct.CHART / "values-canary.yaml")),
    "tls-redis": ("--set", "gateway.tls.credentialName=tls", "--set", "router.redisUrl=redis://redis.cache:6379/0",
                  *ct.REDIS_EGRESS),
    "nats-off": ("--set", "nats.deploy=false", "--set", "indexer.replicasPerShard=1"),
    "nats-external": ("--set", "nats.deploy=false", "--set", "nats.url=nats://10.30.0.9:4222", *ct.NATS_EGRESS),
    "openai": ("--set", "generator.backend=openai", "--set", "generator.openai.baseUrl=http://vllm.vllm:8000/v1",
               *ct.OPENAI_EGRESS),
    "shared-gateway": ct.SHARED_GATEWAY,
}




@pytest.fixture(scope="module")
def rendered(helm_bin) -> dict[str, list[dict]]:
    return {name: ct.render(helm_bin, *args) for name, args in VARIANTS.items()}


@pytest.fixture(params=list(VARIANTS))
def variant(request, rendered):
    return request.param, rendered[request.param]


def policies(objs) -> list[dict]:
    return [o for o in objs if o["kind"] == "NetworkPolicy"]


def in_cluster(objs, name: str) -> list[Pod]:
    """Every pod the render makes, and the gateway's where it is someone else's."""
    pods = pods_of(objs)
    if name == "shared-gateway":
        pods.append(SHARED_GATEWAY_POD)
    return pods


def app(pod: Pod) -> str:
    """A pod's role: its service, "nats" or "gateway"."""
    if pod.name in (ct.GATEWAY_NAME, SHARED_GATEWAY_POD.name):
        return policy.GATEWAY
    return pod.labels["app"]


def expected_calls(name: str) -> set[tuple[str, str, int]]:
    """(caller, callee, port) the values name: trafficPolicy.callers on the gRPC port, and NATS."""
    tp = policy.load(*([ct.CHART / "values-canary.yaml"] if name == "canary" else []))
    calls = {(caller, callee, GRPC) for callee in SERVICES for caller in tp.callers[callee]}
    if name not in ("nats-off", "nats-external"):
        calls |= {("router", "nats", 4222), ("indexer", "nats", 4222), ("nats", "nats", 6222)}
    return calls


def ports_of(pod: Pod) -> set[int]:
    return {*pod.ports.values(), GRPC, METRICS, 4222, 6222, 8222, 15020, 15021}


# --------------------------------------------------------------------------- inside the namespace

def test_everything_is_denied_first(variant):
    _, objs = variant
    (deny,) = [p for p in policies(objs) if p["metadata"]["name"] == "ragloom-default-deny"]
    assert deny["metadata"]["namespace"] == NAMESPACE
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    assert all(p["metadata"]["namespace"] == NAMESPACE for p in policies(objs))


def test_exactly_the_named_calls_get_through(variant):
    """Every caller reaches each callee's pods on the gRPC port; no other pair, on no port."""
    name, objs = variant
    nps = policies(objs)
    pods = in_cluster(objs, name)
    calls = expected_calls(name)
    assert ("embedder", "generator", GRPC) not in calls
    problems = []
    for source, destination in itertools.product(pods, pods):
        if NAMESPACE not in (source.namespace, destination.namespace):
            continue  # a shared gateway's own traffic is not the chart's to police
        for port in sorted(ports_of(destination)):
            want = (app(source), app(destination), port) in calls
            if allowed(nps, source, destination, port) != want:
                problems.append(f"{source.name} -> {destination.name}:{port} {'refused' if want else 'let through'}")
    assert not problems, "\n".join(problems)
    # each named call has both ends in the render
    roles = {app(p) for p in pods}
    assert {c for c, _, _ in calls} <= roles and {c for _, c, _ in calls} <= roles


def test_an_uncalled_pair_is_refused(rendered):
    objs = rendered["default"]
    nps = policies(objs)
    embedder = next(p for p in pods_of(objs) if p.labels["app"] == "embedder")
    generator = next(p for p in pods_of(objs) if p.labels["app"] == "generator")
    router = next(p for p in pods_of(objs) if p.labels["app"] == "router")
    assert allowed(nps, router, generator, GRPC)
    assert not allowed(nps, embedder, generator, GRPC)
    assert not allowed(nps, generator, router, GRPC)  # a callee does not call back


def test_the_callers_drive_the_policies(helm_bin, tmp_path):
    """Other callers in the values, other policies: the NetworkPolicies and the AuthorizationPolicies agree."""
    overlay = tmp_path / "callers.yaml"
    overlay.write_text(yaml.safe_dump({"trafficPolicy": {"callers": {"generator": ["router", "embedder"], "indexer": []}}}))
    objs = ct.render(helm_bin, "-f", str(overlay))
    nps = policies(objs)
    pod = {p.labels["app"]: p for p in pods_of(objs) if p.name != ct.GATEWAY_NAME}
    assert allowed(nps, pod["embedder"], pod["generator"], GRPC)
    assert not allowed(nps, pod["router"], pod["indexer"], GRPC)  # nobody calls the indexers now
    tp = policy.load(overlay)
    ap = next(o for o in objs if o["kind"] == "AuthorizationPolicy" and o["metadata"]["name"] == "generator")
    assert ap["spec"]["rules"][0]["from"][0]["source"]["principals"] == list(tp.allowed_principals("generator"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"trafficPolicy": {"callers": {"router": ["gateway", "nobody"]}}}))
    with pytest.raises(ct.RenderError, match="neither a service of this chart"):
        ct.render(helm_bin, "-f", str(bad))


# --------------------------------------------------------------------------- the control plane, DNS, Prometheus

def test_every_pod_reaches_dns_and_istiod_only(variant):
    name, objs = variant
    nps = policies(objs)
    for pod in pods_of(objs):
        assert allowed(nps, pod, KUBE_DNS, 53, "UDP") and allowed(nps, pod, KUBE_DNS, 53, "TCP"), pod.name
        assert allowed(nps, pod, ISTIOD, 15012), pod.name  # xDS and certificates
        assert not allowed(nps, pod, KUBE_DNS, 80) and not allowed(nps, pod, ISTIOD, 15010), pod.name
        assert not allowed(nps, pod, INTERNET, 443), pod.name


def test_prometheus_scrapes_the_metrics_ports_only(variant):
    _, objs = variant
    nps = policies(objs)
    for pod in pods_of(objs):
        for port in (METRICS, 15020):  # the app's, and the sidecar's merged metrics
            assert allowed(nps, PROMETHEUS, pod, port), (pod.name, port)
        assert not allowed(nps, PROMETHEUS, pod, GRPC), pod.name
        private = ports_of(pod) - (PUBLIC if pod.name == ct.GATEWAY_NAME else set())  # the gateway's listeners are public
        for stranger in STRANGERS:
            assert not any(allowed(nps, stranger, pod, port) for port in private), (stranger.name, pod.name)


def test_prometheus_comes_from_the_values(helm_bin):
    objs = ct.render(helm_bin, "--set-json", 'networkPolicy.prometheus.from=[{"namespaceSelector": {"matchLabels": '
                                             '{"kubernetes.io/metadata.name": "observability"}}}]')
    router = next(p for p in pods_of(objs) if p.labels["app"] == "router")
    assert allowed(policies(objs), Pod("prom", "observability", {}), router, METRICS)
    assert not allowed(policies(objs), PROMETHEUS, router, METRICS)
    objs = ct.render(helm_bin, "--set-json", "networkPolicy.prometheus.from=[]")
    assert not allowed(policies(objs), PROMETHEUS, router, METRICS)  # nobody scrapes


# --------------------------------------------------------------------------- the edge and the outside

def test_the_internet_reaches_the_gateway_alone(variant):
    name, objs = variant
    nps = policies(objs)
    listeners = [8080, 8443] if name == "tls-redis" else [8080]
    for pod in pods_of(objs):
        if pod.name == ct.GATEWAY_NAME:
            assert all(allowed(nps, INTERNET, pod, port) for port in [*listeners, 15021])
            assert not allowed(nps, INTERNET, pod, 15000)  # Envoy's admin stays inside the pod
        else:
            assert not any(allowed(nps, INTERNET, pod, port) for port in ports_of(pod)), pod.name


def test_a_shared_gateway_in_its_own_namespace(rendered):
    objs = rendered["shared-gateway"]
    nps = policies(objs)
    router = next(p for p in pods_of(objs) if p.labels["app"] == "router")
    assert allowed(nps, SHARED_GATEWAY_POD, router, GRPC)
    look_alike = Pod("fake-gateway", "elsewhere", dict(SHARED_GATEWAY_POD.labels))
    assert not allowed(nps, look_alike, router, GRPC)  # its labels, another namespace
    assert not [p for p in nps if p["metadata"]["name"] == ct.GATEWAY_NAME]  # not ours to police


def test_outside_services_where_values_point(rendered):
    redis = policies(rendered["tls-redis"])
    pods = {p.labels["app"]: p for p in pods_of(rendered["tls-redis"]) if p.name != ct.GATEWAY_NAME}
    assert allowed(redis, pods["router"], REDIS, 6379)  # the port from router.redisUrl
    assert not allowed(redis, pods["router"], REDIS, 80) and not allowed(redis, pods["embedder"], REDIS, 6379)
    assert not allowed(policies(rendered["default"]), pods["router"], REDIS, 6379)

    openai = policies(rendered["openai"])
    pods = {p.labels["app"]: p for p in pods_of(rendered["openai"]) if p.name != ct.GATEWAY_NAME}
    assert allowed(openai, pods["generator"], VLLM, 8000)
    assert not allowed(openai, pods["router"], VLLM, 8000) and not allowed(openai, pods["generator"], VLLM, 443)

    external = policies(rendered["nats-external"])
    pods = {p.labels["app"]: p for p in pods_of(rendered["nats-external"]) if p.name != ct.GATEWAY_NAME}
    assert allowed(external, pods["router"], EXTERNAL_NATS, 4222) and allowed(external, pods["indexer"], EXTERNAL_NATS, 4222)
    assert not allowed(external, pods["embedder"], EXTERNAL_NATS, 4222)


@pytest.mark.parametrize("args, message", [
    (("--set", "router.redisUrl=redis://redis:6379/0"), "networkPolicy.egress.redis"),
    (("--set", "generator.backend=openai", "--set", "generator.openai.baseUrl=https://api.example/v1"),
     "networkPolicy.egress.openai"),
    (("--set", "nats.deploy=false", "--set", "nats.url=nats://n:4222"), "networkPolicy.egress.nats"),
])
def test_an_outside_url_needs_its_peers(helm_bin, args, message):
    with pytest.raises(ct.RenderError, match=message):
        ct.render(helm_bin, *args)
    ct.render(helm_bin, *args, "--set", "networkPolicy.enabled=false")  # or no policies at all


def test_url_ports(helm_bin):
    objs = ct.render(helm_bin, "--set", "generator.backend=openai", "--set", "generator.openai.baseUrl=https://api.example/v1",
                     *ct.OPENAI_EGRESS, "--set", "router.redisUrl=rediss://:secret@cache.example:6380/0", *ct.REDIS_EGRESS)
    by_name = {p["metadata"]["name"]: p for p in policies(objs)}
    assert by_name["generator"]["spec"]["egress"][-1]["ports"] == [{"protocol": "TCP", "port": 443}]
    assert by_name["router"]["spec"]["egress"][-1]["ports"] == [{"protocol": "TCP", "port": 6380}]


def test_switched_off(helm_bin):
    assert not policies(ct.render(helm_bin, "--set", "networkPolicy.enabled=false"))
