"""Replicas and disruption budgets: every workload starts with a known number of pods (its replicas,
or its HPA's minReplicas), and each has one PodDisruptionBudget that keeps a pod serving through a
node drain without blocking the drain (templates/pdb.yaml explains the choice).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.mesh import chart_tools as ct
from tests.mesh.netpol import selects

VARIANTS = {
    "default": (),
    "canary": ("-f", str(ct.CHART / "values-canary.yaml")),
    "hpa-everywhere": ("--set", "generator.autoscaling.enabled=true", "--set", "gateway.autoscaling.enabled=true"),
    "no-hpa": ("--set", "router.autoscaling.enabled=false", "--set", "embedder.autoscaling.enabled=false"),
    "big": ("--set", "indexer.shards=4", "--set", "indexer.replicasPerShard=3", "--set", "nats.replicas=5"),
    "shared-gateway": ct.SHARED_GATEWAY,
}




@pytest.fixture(scope="module")
def rendered(helm_bin) -> dict[str, list[dict]]:
    return {name: ct.render(helm_bin, *args) for name, args in VARIANTS.items()}


@pytest.fixture(params=list(VARIANTS))
def objs(request, rendered):
    return rendered[request.param]


def of_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def hpas_by_target(objs) -> dict[str, dict]:
    return {h["spec"]["scaleTargetRef"]["name"]: h for h in of_kind(objs, "HorizontalPodAutoscaler")
            if h["spec"]["scaleTargetRef"]["kind"] == "Deployment"}


def least_pods(workload: dict, hpas: dict) -> int:
    """The fewest pods a workload runs: its HPA's floor, else its replicas."""
    hpa = hpas.get(workload["metadata"]["name"]) if workload["kind"] == "Deployment" else None
    return hpa["spec"]["minReplicas"] if hpa else workload["spec"]["replicas"]


def test_every_deployment_has_a_count(objs):
    """replicas where no HPA owns the count; where one does, no replicas (the HPA's would be reset on
    every upgrade) and a floor of two."""
    hpas = hpas_by_target(objs)
    assert set(hpas) <= {d["metadata"]["name"] for d in of_kind(objs, "Deployment")}
    for deployment in of_kind(objs, "Deployment"):
        name = deployment["metadata"]["name"]
        if name in hpas:
            assert "replicas" not in deployment["spec"], name
            assert hpas[name]["spec"]["minReplicas"] >= 2, name
            assert hpas[name]["spec"]["maxReplicas"] >= hpas[name]["spec"]["minReplicas"], name
        else:
            assert deployment["spec"].get("replicas", 0) >= 1, name
            if deployment["metadata"]["labels"].get("version") != "canary":  # a canary is an extra pod
                assert deployment["spec"]["replicas"] >= 2, name
    for statefulset in of_kind(objs, "StatefulSet"):
        assert statefulset["spec"]["replicas"] >= 2, statefulset["metadata"]["name"]


def test_every_workload_has_one_budget_that_protects_a_pod_and_lets_a_drain_through(objs):
    hpas = hpas_by_target(objs)
    workloads = [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]
    for pdb in of_kind(objs, "PodDisruptionBudget"):
        spec = pdb["spec"]
        covered = [w for w in workloads if w["metadata"]["namespace"] == pdb["metadata"]["namespace"]
                   and selects(spec["selector"], w["spec"]["template"]["metadata"]["labels"])]
        assert covered, pdb["metadata"]["name"]
        pods = sum(least_pods(w, hpas) for w in covered)
        if "maxUnavailable" in spec:
            disruptions = spec["maxUnavailable"]
        else:
            disruptions = pods - spec["minAvailable"]
        assert disruptions >= 1, f"{pdb['metadata']['name']}: blocks every drain"
        assert pods - disruptions >= 1, f"{pdb['metadata']['name']}: a drain may take all {pods} pods"
    budgets = [p["spec"]["selector"] for p in of_kind(objs, "PodDisruptionBudget")]
    for workload in workloads:
        labels = workload["spec"]["template"]["metadata"]["labels"]
        matching = [s for s in budgets if selects(s, labels)]
        assert len(matching) == 1, (workload["metadata"]["name"], matching)  # one each: overlaps block evictions


def test_the_documented_defaults():
    values = yaml.safe_load((ct.CHART / "values.yaml").read_text())
    for name in ("router", "embedder", "generator", "gateway"):
        assert values[name]["autoscaling"]["minReplicas"] >= 2, name
        assert values[name]["replicas"] >= 2, name
    assert values["indexer"]["replicasPerShard"] >= 2 and values["nats"]["replicas"] >= 3
    assert values["podDisruptionBudget"]["maxUnavailable"] == 1


def test_a_single_pod_service_keeps_a_budget_that_lets_drains_through(helm_bin):
    """The operator's choice of one generator (a GPU each, say): its budget does not block drains."""
    objs = ct.render(helm_bin, "--set", "generator.replicas=1")
    (pdb,) = [p for p in of_kind(objs, "PodDisruptionBudget") if p["metadata"]["name"] == "generator"]
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": {"app": "generator"}}}


def test_bad_autoscaling_fails_the_render(helm_bin):
    with pytest.raises(ct.RenderError, match="minReplicas must be at least 1"):
        ct.render(helm_bin, "--set", "router.autoscaling.minReplicas=0")
    with pytest.raises(ct.RenderError, match="maxReplicas must be at least its minReplicas"):
        ct.render(helm_bin, "--set", "embedder.autoscaling.minReplicas=5", "--set", "embedder.autoscaling.maxReplicas=3")
