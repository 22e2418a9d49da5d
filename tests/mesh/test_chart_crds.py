"""Istio's and prometheus-operator's objects against their real CRDs, vendored in tests/data/k8s:
the structural schemas (unknown fields are errors) and every x-kubernetes-validations rule, evaluated
by a CEL interpreter (cel-python) with the Kubernetes functions it lacks added in chart_tools.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from tests.mesh import chart_tools as ct

ALL_ON = ("--set", "observability.grafanaDashboard.enabled=true", "--set", "observability.serviceMonitor.enabled=true",
          "--set", "observability.prometheusRule.enabled=true")
VARIANTS = {
    "default": (),
    "everything": ("-f", str(ct.CHART / "values-canary.yaml"), "--set", "gateway.tls.credentialName=tls", *ALL_ON),
    "shared-gateway": (*ct.SHARED_GATEWAY, "--set", "gateway.tls.credentialName=tls"),
    "open": ("--set", "auth.enabled=false", "--set", "quotas.enabled=false"),
}
#: CEL's macros: they look like calls and are no functions.
CEL_MACROS = {"has", "all", "exists", "exists_one", "map", "filter", "dyn"}




@pytest.fixture(scope="module")
def rendered(helm_bin) -> dict[str, list[dict]]:
    return {name: ct.render(helm_bin, *args) for name, args in VARIANTS.items()}


def one(objs, kind, name=None):
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert found, (kind, name)
    return copy.deepcopy(found[0])


def rules() -> set[str]:
    found = set()

    def walk(node):
        if isinstance(node, dict):
            found.update(r["rule"] for r in node.get("x-kubernetes-validations", ()))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(ct._crds())
    return found


def test_the_crds_are_in_the_repository():
    names = {p.name for p in ct.CRD_FILES}
    assert names == {"istio-crds.yaml", "podmonitors.yaml", "prometheusrules.yaml", "servicemonitors.yaml"}
    assert (ct.K8S_DATA / "README.md").is_file()
    kinds = {kind for _, kind in ct.crd_kinds()}
    assert {"VirtualService", "EnvoyFilter", "AuthorizationPolicy", "ServiceMonitor", "PrometheusRule", "PodMonitor"} <= kinds


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_custom_object_passes_its_crd(rendered, variant):
    objs = rendered[variant]
    custom = [o for o in objs if ct.is_istio(o) or ct.is_operator(o)]
    assert all(ct.has_crd(o) for o in custom), {(o["apiVersion"], o["kind"]) for o in custom if not ct.has_crd(o)}
    problems = [f"{o['kind']}/{o['metadata']['name']}{p}" for o in custom for p in ct.crd_problems(o)]
    assert not problems, "\n".join(problems)
    if variant == "everything":
        assert {o["kind"] for o in custom if ct.is_operator(o)} == {"ServiceMonitor", "PrometheusRule"}


def test_cel_python_knows_every_function_the_rules_call():
    """Every rule compiles, and every function it calls is cel-python's own or one chart_tools adds."""
    from celpy.evaluation import base_functions

    known = set(base_functions) | set(ct._cel_functions()) | CEL_MACROS
    found = rules()
    assert len(found) > 30
    for rule in found:
        ct._cel_program(rule)  # compiles
        called = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(", re.sub(r'"[^"]*"|\'[^\']*\'', '""', rule)))
        assert called <= known, (rule, called - known)


@pytest.mark.parametrize("rule, value, passes", [
    ("duration(self) >= duration('1ms')", "250ms", True),
    ("duration(self) >= duration('1ms')", "500us", False),
    ("duration(self) >= duration('1ms')", "ten", False),  # an error is a refusal
    ('url(self).getScheme() in ["http", "https"]', "https://id.example/keys", True),
    ('url(self).getScheme() in ["http", "https"]', "ftp://id.example/keys", False),
    ('url(self).getScheme() in ["http", "https"]', "id.example/keys", False),  # not a URL: url() fails
    ('isURL(self)', "/an/absolute/path", True),
    ('isURL(self)', "../relative", False),
    ('isURL(self)', "https://example.com:80:80/", False),
    ('isURL(self)', "https://exa mple.com/", False),
    ('url(self).getHost() == "example.com:8443" && url(self).getPort() == "8443"', "https://example.com:8443/x", True),
    ('self.startsWith("unix://") ? (self.substring(7, 8) == "/" || self.substring(7, 8) == "@") : true', "unix:///run/s", True),
    ('self.startsWith("unix://") ? (self.substring(7, 8) == "/" || self.substring(7, 8) == "@") : true', "unix://run", False),
    ('"tacocat".substring(4) == "cat" && self.lowerAscii() == "taco"', "TaCo", True),
    ("self.all(key, 0 < int(key) && int(key) <= 65535)", {"8080": {}, "65536": {}}, False),
    ("self.all(l1, self.exists_one(l2, l1.number == l2.number))", [{"number": 1}, {"number": 2}], True),
    ("self.all(l1, self.exists_one(l2, l1.number == l2.number))", [{"number": 1}, {"number": 1}], False),
])
def test_cel_evaluation(rule, value, passes):
    try:
        result = ct._cel_passes(rule, value)
    except Exception:  # noqa: BLE001 - the API server refuses what a rule cannot evaluate
        result = False
    assert result is passes


def test_the_crd_check_refuses_what_the_api_server_refuses(rendered):
    objs = rendered["everything"]
    ra = one(objs, "RequestAuthentication")
    assert not ct.crd_problems(ra)
    bad = copy.deepcopy(ra)
    bad["spec"]["jwtRules"][0]["jwksUri"] = "ftp://id.example/keys"  # CEL: url(self).getScheme()
    assert any("getScheme" in p or "http" in p for p in ct.crd_problems(bad))
    bad = copy.deepcopy(ra)
    bad["spec"]["jwtRules"][0]["jwks"] = "{}"  # CEL: jwksUri or jwks, not both
    assert ct.crd_problems(bad)
    vs = one(objs, "VirtualService", "router")
    vs["spec"]["http"][0]["retries"]["perTryTimeout"] = "500us"  # CEL: at least 1ms
    assert ct.crd_problems(vs)
    ap = one(objs, "AuthorizationPolicy", "router")
    ap["spec"]["rules"][0]["from"][0]["source"]["serviceAccounts"] = ["ragloom/router"]  # CEL: not with principals
    assert ct.crd_problems(ap)
    envoy_filter = one(objs, "EnvoyFilter", "ragloom-tenant-quotas")
    bad = copy.deepcopy(envoy_filter)
    bad["spec"]["configPatches"][0]["match"]["waypoint"] = {"portNumber": 8080}  # CEL: waypoint only in WAYPOINT
    assert ct.crd_problems(bad)
    bad = copy.deepcopy(envoy_filter)
    bad["spec"]["configPatches"][0]["match"]["listenr"] = {}  # an unknown field
    assert ct.crd_problems(bad)
    # prometheus-operator's: a misspelled field, a duration its pattern refuses, a duplicate group (list-type map)
    monitor = one(objs, "ServiceMonitor")
    assert not ct.crd_problems(monitor)
    monitor["spec"]["endpoints"][0]["honorLabel"] = True
    assert ct.crd_problems(monitor)
    rule = one(objs, "PrometheusRule")
    assert not ct.crd_problems(rule)
    bad = copy.deepcopy(rule)
    bad["spec"]["groups"][0]["rules"][0]["for"] = "10 minutes"
    assert ct.crd_problems(bad)
    bad = copy.deepcopy(rule)
    bad["spec"]["groups"].append(copy.deepcopy(bad["spec"]["groups"][0]))
    assert any("duplicate" in p for p in ct.crd_problems(bad))


def test_an_unknown_kind_is_a_problem():
    assert ct.crd_problems({"apiVersion": "networking.istio.io/v9", "kind": "Nothing", "metadata": {}, "spec": {}})
