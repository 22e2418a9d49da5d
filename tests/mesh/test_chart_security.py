"""A security scan of what the chart renders: checkov's Kubernetes checks (checkov -f rendered.yaml
--framework kubernetes -o json), with no failure but the ones SKIPS names, each with its reason.

checkov pins packaging<24 (and networkx<2.7), which pytest 9 refuses, so it lives in a virtual
environment of its own: $RAGLOOM_CHECKOV, else `checkov` on PATH or beside this Python, else
CHECKOV_HOME (the user cache; scripts can make it with
`python -m venv ~/.cache/ragloom/tools/checkov-3.3.30 && ~/.cache/ragloom/tools/checkov-3.3.30/bin/pip install checkov==3.3.30`).
A scan takes about 3 s of checkov plus its start (about 3 s).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import platformdirs
import pytest

from tests.mesh import chart_tools as ct

CHECKOV_VERSION = "3.3.30"
CHECKOV_HOME = Path(platformdirs.user_cache_dir("ragloom")) / "tools" / f"checkov-{CHECKOV_VERSION}"

#: Failures we accept: check id -> (the resources it may fail on, None = any; why).
SKIPS: dict[str, tuple[frozenset[str] | None, str]] = {
    "CKV_K8S_43": (None,
                   "Image should use digest: the chart names images by tag (the chart's appVersion, nats.image.tag), "
                   "which a release pins; an operator pins digests with image.tag: '<tag>@sha256:<digest>'. The "
                   "gateway's image 'auto' is the injector's, which sets the proxy image istiod is configured with."),
    "CKV_K8S_15": (None,
                   "Image Pull Policy should be Always: IfNotPresent keeps pods starting from the node's copy while "
                   "the registry is away or rate-limits (Docker Hub's anonymous pulls, for nats); the images are "
                   "versioned tags, and image.pullPolicy: Always is one value away where nodes are shared with "
                   "tenants that must not use each other's cached private images."),
    "CKV_K8S_14": (frozenset({"Deployment.ragloom.ragloom-gateway"}),
                   "Image Tag should be fixed: the gateway's image is 'auto', a placeholder Istio's injector "
                   "replaces with the proxy image of the control plane's version (the injection contract for "
                   "gateways: a fixed tag here would drift from istiod)."),
    "CKV2_K8S_5": (frozenset({"RoleBinding.ragloom.ragloom-gateway-secrets"}),
                   "No ServiceAccount should be able to read all secrets: with gateway.tls.credentialName, istiod "
                   "hands the gateway its certificate only where a SubjectAccessReview says the gateway's "
                   "ServiceAccount may list Secrets in its namespace (Istio's own gateway chart grants the same). "
                   "The grant is a marker: the gateway's pods mount no API token (automountServiceAccountToken "
                   "false; the proxy's own token is for istiod's audience), so nothing in them can use it."),
}
#: Rendered and scanned: the defaults, and every optional branch on (canary, HTTPS, Redis, observability).
SCANNED = {
    "default": (),
    "everything": ("-f", str(ct.CHART / "values-canary.yaml"), "--set", "gateway.tls.credentialName=ragloom-tls",
                   "--set", "router.redisUrl=redis://redis:6379/0", *ct.REDIS_EGRESS,
                   "--set", "observability.serviceMonitor.enabled=true",
                   "--set", "observability.prometheusRule.enabled=true",
                   "--set", "observability.grafanaDashboard.enabled=true"),
}


def checkov_binary() -> Path | None:
    explicit = os.environ.get("RAGLOOM_CHECKOV")
    if explicit:
        return Path(explicit)
    for candidate in (shutil.which("checkov"), Path(sys.executable).parent / "checkov", CHECKOV_HOME / "bin" / "checkov"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None




@pytest.fixture(scope="module")
def checkov() -> Path:
    binary = checkov_binary()
    if binary is None:
        pytest.skip(f"no checkov: set RAGLOOM_CHECKOV, or install checkov=={CHECKOV_VERSION} into {CHECKOV_HOME} "
                    "(a virtual environment of its own: its pins conflict with pytest's)")
    return binary


@pytest.fixture(scope="module")
def scan(helm_bin, checkov, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("checkov")
    files = []
    for name, args in SCANNED.items():
        done = ct.helm(helm_bin, "template", "ragloom", str(ct.CHART), "--namespace", "ragloom", *args)
        assert done.returncode == 0, done.stderr
        files.append(folder / f"{name}.yaml")
        files[-1].write_text(done.stdout)
    started = time.monotonic()
    done = subprocess.run([str(checkov), *(a for f in files for a in ("-f", str(f))), "--framework", "kubernetes",
                           "-o", "json", "--skip-download", "--compact"],
                          capture_output=True, text=True, timeout=90, cwd=folder,
                          env={**os.environ, "LOG_LEVEL": "WARNING"})
    elapsed = time.monotonic() - started
    assert done.returncode in (0, 1), done.stderr[-3000:]  # 1: some check failed
    report = json.loads(done.stdout)
    reports = report if isinstance(report, list) else [report]
    (kubernetes,) = [r for r in reports if r.get("check_type") == "kubernetes"]
    return {"report": kubernetes, "elapsed": elapsed}


def test_checkov_passes_but_for_the_named_skips(scan):
    report = scan["report"]
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["resource_count"] > 60  # it read the whole render
    unexpected, used = [], set()
    for failure in report["results"]["failed_checks"]:
        check, resource = failure["check_id"], failure["resource"]
        allowed, _ = SKIPS.get(check, (frozenset(), ""))
        if allowed is None or resource in allowed:
            used.add(check)
        else:
            unexpected.append(f"{check} {failure['check_name']}: {resource} ({Path(failure['file_path']).name})")
    assert not unexpected, "\n".join(unexpected)
    assert used == set(SKIPS), f"skips that nothing needs any more: {set(SKIPS) - used}"
    assert scan["elapsed"] < 60, f"checkov took {scan['elapsed']:.0f} s"


def test_what_the_fixes_fixed(scan):
    """Checks the chart once failed: CPU limits on every container, and a NetworkPolicy for every pod."""
    passed = {(c["check_id"], c["resource"]) for c in scan["report"]["results"]["passed_checks"]}
    for resource in ("Deployment.ragloom.router", "StatefulSet.ragloom.indexer-0", "Deployment.ragloom.ragloom-gateway"):
        assert ("CKV_K8S_11", resource) in passed  # CPU limits
        assert ("CKV_K8S_8", resource) in passed and ("CKV_K8S_9", resource) in passed  # liveness, readiness
    pods_with_a_policy = {r for c, r in passed if c == "CKV2_K8S_6"}
    assert len(pods_with_a_policy) >= 6
