"""The chart's own ingress gateway (gateway.deploy): a Deployment Istio injects with its gateway
template, its Service and ServiceAccount (the identity the router admits), and the router's descriptor
set as a mounted file that the transcoder names, with one patch for all of the gateway's listeners.
And, with gateway.deploy off, an existing gateway patched on ragloom's ports with the set inline.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest

from mesh import policy
from tests.mesh import chart_tools as ct

NAMESPACE = "ragloom"
ROUTER_PB = ct.CHART / "files" / "router.pb"
GATEWAY_FILTERS = ("ragloom-grpc-json-transcoder", "ragloom-tenant-quotas", "ragloom-strip-identity-headers")




@pytest.fixture(scope="module")
def objs(helm_bin) -> list[dict]:
    return ct.render(helm_bin)


@pytest.fixture(scope="module")
def tls(helm_bin) -> list[dict]:
    return ct.render(helm_bin, "--set", "gateway.tls.credentialName=ragloom-tls")


@pytest.fixture(scope="module")
def shared(helm_bin) -> list[dict]:
    return ct.render(helm_bin, *ct.SHARED_GATEWAY, "--set", "gateway.tls.credentialName=ragloom-tls")


def of_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def one(objs, kind, name):
    (found,) = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def gateway_pods(objs) -> tuple[str, dict]:
    deployment = one(objs, "Deployment", ct.GATEWAY_NAME)
    return deployment["metadata"]["namespace"], deployment["spec"]["template"]


def selector_of(obj) -> dict:
    spec = obj["spec"]
    return spec.get("workloadSelector", {}).get("labels") or spec.get("selector", {}).get("matchLabels") or spec["selector"]


def test_the_chart_runs_an_injected_gateway(objs):
    tp = policy.load()
    namespace, template = gateway_pods(objs)
    assert namespace == tp.gateway_namespace == NAMESPACE
    labels, annotations = template["metadata"]["labels"], template["metadata"]["annotations"]
    assert labels["sidecar.istio.io/inject"] == "true" and annotations["inject.istio.io/templates"] == "gateway"
    spec = template["spec"]
    (proxy,) = spec["containers"]
    assert proxy["name"] == "istio-proxy" and proxy["image"] == "auto"  # the injector sets the proxy image
    assert spec["serviceAccountName"] == tp.gateway_service_account
    account = one(objs, "ServiceAccount", tp.gateway_service_account)
    assert account["metadata"]["namespace"] == namespace
    # its identity is the one caller the router admits
    assert tp.principal(policy.GATEWAY) == f"cluster.local/ns/{namespace}/sa/{spec['serviceAccountName']}"
    router = one(objs, "AuthorizationPolicy", "router")
    assert router["spec"]["rules"][0]["from"][0]["source"]["principals"] == [tp.principal(policy.GATEWAY)]
    # the Gateway, the Service and the Deployment all mean these pods
    (gateway,) = of_kind(objs, "Gateway")
    service = one(objs, "Service", ct.GATEWAY_NAME)
    deployment = one(objs, "Deployment", ct.GATEWAY_NAME)
    for selector in (gateway["spec"]["selector"], service["spec"]["selector"], deployment["spec"]["selector"]["matchLabels"]):
        assert selector and selector.items() <= labels.items()
    assert {(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        ("status-port", 15021, 15021), ("http2", 80, 8080)}
    assert service["spec"]["type"] == "LoadBalancer"
    container_ports = {p["containerPort"] for p in proxy["ports"]}
    assert {8080, 15021} <= container_ports
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    assert proxy["securityContext"]["readOnlyRootFilesystem"] is True
    assert proxy["resources"]["limits"]["memory"] and proxy["resources"]["requests"]["cpu"]


def test_the_descriptor_set_is_a_mounted_file(objs):
    (patch,) = one(objs, "EnvoyFilter", "ragloom-grpc-json-transcoder")["spec"]["configPatches"]
    config = patch["patch"]["value"]["typed_config"]
    assert set(config) >= {"proto_descriptor"} and "proto_descriptor_bin" not in config
    assert ct.mounted_descriptor(objs, config["proto_descriptor"]) == ROUTER_PB.read_bytes()
    configmap = one(objs, "ConfigMap", "ragloom-gateway-descriptors")
    namespace, template = gateway_pods(objs)
    assert configmap["metadata"]["namespace"] == namespace
    assert base64.b64decode(configmap["binaryData"]["router.pb"]) == ROUTER_PB.read_bytes()
    (mount,) = template["spec"]["containers"][0]["volumeMounts"]
    assert mount["readOnly"] is True
    # a new set rolls the gateway's pods
    assert template["metadata"]["annotations"]["checksum/descriptors"] == hashlib.sha256(ROUTER_PB.read_bytes()).hexdigest()


@pytest.mark.parametrize("which", ["objs", "tls"])
def test_one_patch_for_all_listeners(which, request):
    """The chart's gateway serves ragloom alone: each filter is patched in once, on every listener,
    HTTPS included, whatever the number of ports."""
    rendered = request.getfixturevalue(which)
    for name in GATEWAY_FILTERS:
        (patch,) = one(rendered, "EnvoyFilter", name)["spec"]["configPatches"]
        assert "portNumber" not in patch["match"]["listener"], name
    if which == "tls":
        ports = {p["name"]: p for p in one(rendered, "Service", ct.GATEWAY_NAME)["spec"]["ports"]}
        assert (ports["https"]["port"], ports["https"]["targetPort"]) == (443, 8443)


@pytest.mark.parametrize("which", ["objs", "tls"])
def test_everything_at_the_gateway_selects_the_charts_gateway(which, request):
    """Auth, quotas and transcoding: each object with a workload selector in the gateway's namespace
    selects the chart's gateway pods (and only those of the whole render)."""
    rendered = request.getfixturevalue(which)
    namespace, template = gateway_pods(rendered)
    at_gateway = [o for o in rendered if o["kind"] in ("EnvoyFilter", "RequestAuthentication")
                  or o["metadata"]["name"] == "ragloom-require-jwt"]
    assert {(o["kind"], o["metadata"]["name"]) for o in at_gateway} == {
        ("EnvoyFilter", n) for n in GATEWAY_FILTERS} | {("RequestAuthentication", "ragloom-jwt"),
                                                       ("AuthorizationPolicy", "ragloom-require-jwt"),
                                                       ("EnvoyFilter", "ragloom-console-body-size")}
    others = [o["spec"]["template"]["metadata"]["labels"] for o in rendered
              if o["kind"] in ("Deployment", "StatefulSet") and o["metadata"]["name"] != ct.GATEWAY_NAME]
    for obj in at_gateway:
        assert obj["metadata"]["namespace"] == namespace, obj["metadata"]["name"]
        selector = selector_of(obj)
        assert selector.items() <= template["metadata"]["labels"].items(), obj["metadata"]["name"]
        assert not any(selector.items() <= labels.items() for labels in others), obj["metadata"]["name"]


def test_a_role_to_read_the_certificate_with_tls_only(objs, tls):
    assert not of_kind(objs, "Role") and not of_kind(objs, "RoleBinding")
    (role,) = of_kind(tls, "Role")
    (binding,) = of_kind(tls, "RoleBinding")
    namespace, template = gateway_pods(tls)
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == namespace
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "watch", "list"]}]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": template["spec"]["serviceAccountName"],
                                    "namespace": namespace}]


def test_a_shared_gateway_gets_the_router_set_inline_on_its_ports(shared):
    """gateway.deploy off: nothing of the gateway is deployed; its namespace and pods are the values'."""
    assert not [o for o in shared if o["metadata"]["name"] == ct.GATEWAY_NAME]
    assert not [o for o in shared if o["metadata"]["name"] == "ragloom-gateway-descriptors"]
    for name in GATEWAY_FILTERS:
        envoy_filter = one(shared, "EnvoyFilter", name)
        assert envoy_filter["metadata"]["namespace"] == "istio-system"
        assert envoy_filter["spec"]["workloadSelector"]["labels"] == {"istio": "ingressgateway"}
    patches = one(shared, "EnvoyFilter", "ragloom-grpc-json-transcoder")["spec"]["configPatches"]
    assert [p["match"]["listener"]["portNumber"] for p in patches] == [8080, 8443]
    for patch in patches:  # the router-only set, a fraction of the full one
        config = patch["patch"]["value"]["typed_config"]
        assert base64.b64decode(config["proto_descriptor_bin"]) == ROUTER_PB.read_bytes()
    router = one(shared, "AuthorizationPolicy", "router")
    assert router["spec"]["rules"][0]["from"][0]["source"]["principals"] == [
        "cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"]


def test_a_shared_gateway_that_mounts_the_set(helm_bin):
    objs = ct.render(helm_bin, *ct.SHARED_GATEWAY, "--set", "gateway.transcoding.descriptorPath=/etc/ragloom/router.pb")
    (patch,) = one(objs, "EnvoyFilter", "ragloom-grpc-json-transcoder")["spec"]["configPatches"]
    assert patch["patch"]["value"]["typed_config"]["proto_descriptor"] == "/etc/ragloom/router.pb"
    configmap = one(objs, "ConfigMap", "ragloom-gateway-descriptors")  # for its operator to mount
    assert configmap["metadata"]["namespace"] == "istio-system"
    assert base64.b64decode(configmap["binaryData"]["router.pb"]) == ROUTER_PB.read_bytes()


def test_an_empty_gateway_namespace_is_the_release_namespace(helm_bin):
    objs = ct.render(helm_bin, "--set", "trafficPolicy.gateway.namespace=", namespace="prod")
    namespace, _ = gateway_pods(objs)
    assert namespace == "prod"
    assert one(objs, "AuthorizationPolicy", "router")["spec"]["rules"][0]["from"][0]["source"]["principals"] == [
        "cluster.local/ns/prod/sa/ragloom-gateway"]
    assert {o["metadata"]["namespace"] for o in objs if o["kind"] == "EnvoyFilter"} == {"prod"}


def test_no_transcoding_no_descriptor(helm_bin):
    objs = ct.render(helm_bin, "--set", "gateway.transcoding.enabled=false")
    _, template = gateway_pods(objs)
    assert "volumes" not in template["spec"] and "checksum/descriptors" not in template["metadata"]["annotations"]
    assert not [o for o in objs if o["metadata"]["name"] in ("ragloom-gateway-descriptors", "ragloom-grpc-json-transcoder")]


def test_the_gateway_serves_the_console_as_the_local_gateway_does(objs, helm_bin):
    """The console's files, answered by the gateway itself before any route to the router, with the
    headers the local gateway sends; Envoy's 4 KiB limit on direct responses raised past the largest;
    no token needed for them (and only for them). Off: none of it."""
    console = policy.load().edge.console
    folder = ct.CHART / "files" / "console"
    vs = one(objs, "VirtualService", "router-gateway")
    served = [r for r in vs["spec"]["http"] if "directResponse" in r]
    assert vs["spec"]["http"][:len(served)] == served  # first: the router's catch-all comes after
    assert [(r["match"][0]["uri"]["exact"], r["match"][0]["method"]["regex"]) for r in served] == [
        (f.path, "GET|HEAD") for f in console.files]
    for route, f in zip(served, console.files):
        assert route["directResponse"] == {"status": 200, "body": {"string": (folder / f.file).read_text()}}
        assert route["headers"]["response"]["set"] == {"content-type": f.content_type, **dict(console.headers)}
    (patch,) = one(objs, "EnvoyFilter", "ragloom-console-body-size")["spec"]["configPatches"]
    assert patch["applyTo"] == "ROUTE_CONFIGURATION" and patch["patch"]["operation"] == "MERGE"
    largest = max((folder / f.file).stat().st_size for f in console.files)
    assert largest > 4096 and patch["patch"]["value"]["max_direct_response_body_size_bytes"] >= largest
    for rule in one(objs, "AuthorizationPolicy", "ragloom-require-jwt")["spec"]["rules"]:
        assert rule["to"][0]["operation"]["notPaths"] == [f.path for f in console.files]

    off = ct.render(helm_bin, "--set", "gateway.console.enabled=false")
    assert not [r for r in one(off, "VirtualService", "router-gateway")["spec"]["http"] if "directResponse" in r]
    assert not [o for o in off if o["metadata"]["name"] == "ragloom-console-body-size"]
    for rule in one(off, "AuthorizationPolicy", "ragloom-require-jwt")["spec"]["rules"]:
        assert "notPaths" not in rule["to"][0]["operation"]
