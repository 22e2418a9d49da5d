"""The committed stubs and descriptor set are exactly what protos/generate.py makes from the protos."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"


def _generate_module():
    spec = importlib.util.spec_from_file_location("protos_generate", PROTOS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_matches_protos(tmp_path):
    generate = _generate_module()
    chart_out = tmp_path / "chart-files"
    out = tmp_path / "protos"
    generate.generate(out, chart_out)
    # the chart's router-only descriptor set (the cluster gateway's transcoder reads it)
    assert sorted(p.name for p in chart_out.iterdir()) == [generate.ROUTER_DESCRIPTOR_SET]
    committed_chart = generate.CHART_FILES / generate.ROUTER_DESCRIPTOR_SET
    assert committed_chart.is_file() and committed_chart.read_bytes() == (chart_out / generate.ROUTER_DESCRIPTOR_SET).read_bytes(), (
        "mesh/chart/files/router.pb is out of date with the protos: run python protos/generate.py")
    tmp_path = out
    fresh = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}
    assert fresh, "protoc produced nothing"
    committed = {
        p.relative_to(PROTOS) for p in PROTOS.rglob("*")
        if p.is_file() and (p.name.endswith(("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")) or p.relative_to(PROTOS).as_posix() == generate.DESCRIPTOR_SET)
    }
    assert committed == fresh, "generated files differ in name from the committed ones: run python protos/generate.py"
    stale = sorted(str(rel) for rel in fresh if (tmp_path / rel).read_bytes() != (PROTOS / rel).read_bytes())
    assert not stale, f"stubs out of date with the protos, run `python protos/generate.py`: {stale}"


def test_every_rpc_and_field_is_documented():
    import re

    undocumented = []
    for proto in PROTOS.rglob("*.proto"):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            is_rpc = stripped.startswith("rpc ")
            is_field = re.match(r"^(optional |repeated )?[\w.<>, ]+ \w+ = \d+;", stripped) and not stripped.startswith("option")
            if (is_rpc or is_field) and not lines[i - 1].strip().startswith("//"):
                undocumented.append(f"{proto.name}:{i + 1}: {stripped}")
    assert not undocumented, "\n".join(undocumented)


def test_router_public_rpcs_carry_http_annotations():
    from google.api import annotations_pb2

    from ragloom.router.v1 import router_pb2

    routes = {}
    for method in router_pb2.DESCRIPTOR.services_by_name["RouterService"].methods:
        rule = method.GetOptions().Extensions[annotations_pb2.http]
        routes[method.name] = (rule.WhichOneof("pattern"), getattr(rule, rule.WhichOneof("pattern")))
    assert routes["Ask"] == ("post", "/v1/ask")
    assert routes["Search"] == ("post", "/v1/search")
    assert routes["Ingest"] == ("post", "/v1/documents")
    assert routes["DeleteDocument"] == ("delete", "/v1/documents/{document_id}")


def test_the_policys_method_idempotency_is_the_protos():
    """Retries follow each method's idempotency_level: the values' lists must say what the protos say."""
    from google.protobuf import descriptor_pb2

    from mesh import policy
    from ragloom.embedder.v1 import embedder_pb2
    from ragloom.generator.v1 import generator_pb2
    from ragloom.indexer.v1 import indexer_pb2
    from ragloom.router.v1 import router_pb2

    levels = descriptor_pb2.MethodOptions.IdempotencyLevel
    traffic = policy.load()
    for service, module in (("router", router_pb2), ("embedder", embedder_pb2), ("indexer", indexer_pb2),
                            ("generator", generator_pb2)):
        (described,) = module.DESCRIPTOR.services_by_name.values()
        declared = {m.name: m.GetOptions().idempotency_level for m in described.methods}
        route = traffic.route(service)
        assert set(route.no_side_effects) == {n for n, lv in declared.items() if lv == levels.Value("NO_SIDE_EFFECTS")}
        assert set(route.idempotent) == {n for n, lv in declared.items() if lv == levels.Value("IDEMPOTENT")}
        for name in declared:
            retries = route.retries_for(name)
            assert "resource-exhausted" not in retries.retry_on, "overload is never retried"
        assert route.retries_for("SomethingNew") is route.unsafe_retries
        assert set(route.unsafe_retries.retry_on) <= {"connect-failure", "refused-stream", "reset-before-request"}
