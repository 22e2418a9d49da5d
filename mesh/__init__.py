"""How the services run together: the `ragloom` CLI and its commands, the local launcher, the
Envoy gateway config, the traffic policy and the Helm chart. It imports services; none imports it."""
