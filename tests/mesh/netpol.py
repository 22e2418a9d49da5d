"""What NetworkPolicies let through, for the chart tests: would the cluster let one pod open a
connection to another (or to an address outside) on a port?

The semantics of networking.k8s.io/v1: a pod is isolated for egress (ingress) when some policy of its
namespace selects it with that policy type; an isolated pod's connection is allowed when some rule of
those policies admits the peer and the port. A connection needs both the source's egress and the
destination's ingress. Rules add up; `from`/`to` missing or empty admits every peer, `ports` missing
or empty every port; a peer with only a podSelector means the policy's own namespace, a namespaceSelector
alone every pod of the selected namespaces, both together the selected pods of those namespaces.
Namespaces carry kubernetes.io/metadata.name. ipBlock peers match addresses outside the cluster here.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterable, Mapping


@dataclass(frozen=True)
class Pod:
    name: str
    #: "" for an address outside the cluster (then `ip` is set).
    namespace: str
    labels: Mapping[str, str] = field(default_factory=dict)
    ip: str = ""
    #: Named container ports (a policy may name a port).
    ports: Mapping[str, int] = field(default_factory=dict)

    @property
    def namespace_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace}


def outside(name: str, ip: str) -> Pod:
    return Pod(name, "", {}, ip)


def selects(selector: Mapping | None, labels: Mapping[str, str]) -> bool:
    """A label selector (matchLabels, matchExpressions); {} selects everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or ():
        key, op, values = expr["key"], expr["operator"], expr.get("values") or ()
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def policy_types(policy: dict) -> list[str]:
    spec = policy["spec"]
    return spec.get("policyTypes") or ["Ingress", *(["Egress"] if "egress" in spec else [])]


def _peer_admits(peer: dict, policy_ns: str, other: Pod) -> bool:
    if "ipBlock" in peer:
        if not other.ip:
            return False
        address = ipaddress.ip_address(other.ip)
        block = peer["ipBlock"]
        return address in ipaddress.ip_network(block["cidr"]) and not any(
            address in ipaddress.ip_network(e) for e in block.get("except", ()))
    if not other.namespace:
        return False  # outside the cluster: only an ipBlock names it
    ns_selector, pod_selector = peer.get("namespaceSelector"), peer.get("podSelector")
    in_namespace = other.namespace == policy_ns if ns_selector is None else selects(ns_selector, other.namespace_labels)
    return in_namespace and (pod_selector is None or selects(pod_selector, other.labels))


def _ports_admit(ports: Iterable[dict] | None, port: int, protocol: str, destination: Pod) -> bool:
    ports = list(ports or ())
    if not ports:
        return True
    for entry in ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        if "port" not in entry:
            return True
        wanted = entry["port"]
        if isinstance(wanted, str):
            wanted = destination.ports.get(wanted)
            if wanted is None:
                continue
        if wanted <= port <= entry.get("endPort", wanted):
            return True
    return False


def _admitted(policies: list[dict], key: str, peers_key: str, policy_ns: str, other: Pod, port: int, protocol: str,
              destination: Pod) -> bool:
    for policy in policies:
        for rule in policy["spec"].get(key) or ():
            peers = rule.get(peers_key) or []
            if peers and not any(_peer_admits(p, policy_ns, other) for p in peers):
                continue
            if _ports_admit(rule.get("ports"), port, protocol, destination):
                return True
    return False


def _selecting(policies: list[dict], pod: Pod, kind: str) -> list[dict]:
    return [p for p in policies if pod.namespace and p["metadata"]["namespace"] == pod.namespace
            and kind in policy_types(p) and selects(p["spec"].get("podSelector"), pod.labels)]


def allowed(policies: list[dict], source: Pod, destination: Pod, port: int, protocol: str = "TCP") -> bool:
    """Whether `source` may open a connection to `destination` on `port`."""
    egress = _selecting(policies, source, "Egress")
    if egress and not _admitted(egress, "egress", "to", source.namespace, destination, port, protocol, destination):
        return False
    ingress = _selecting(policies, destination, "Ingress")
    if ingress and not _admitted(ingress, "ingress", "from", destination.namespace, source, port, protocol, destination):
        return False
    return True


def pods_of(objs: list[dict]) -> list[Pod]:
    """A pod of every Deployment and StatefulSet rendered (labels and named ports of its template)."""
    pods = []
    for obj in objs:
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        template = obj["spec"]["template"]
        ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])
                 if "name" in p}
        pods.append(Pod(obj["metadata"]["name"], obj["metadata"]["namespace"], template["metadata"]["labels"], "", ports))
    return pods
