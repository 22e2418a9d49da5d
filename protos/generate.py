"""Generates the Python stubs and the Envoy descriptor sets from the protos.

    python protos/generate.py            # write next to the .proto files (and the chart's router.pb)
    python protos/generate.py --out DIR --chart-out DIR2  # elsewhere (the drift test uses this)

Two descriptor sets: ragloom/ragloom.pb (every proto, with imports and source info) for the local
gateway and the package, and the chart's files/router.pb: the router's proto and its imports only,
without source info, which is all the cluster gateway's transcoder needs (about 22 KB, where the full
set is 170 KB: it ships in a ConfigMap, see mesh/chart/templates/istio-gateway.yaml).

Output is reproducible for a given grpcio-tools version, which pyproject.toml pins.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
# Inside the `ragloom` package, so an installed ragloom carries it (package data) for the gateway.
DESCRIPTOR_SET = "ragloom/ragloom.pb"
ERROR_DETAIL_PROTOS = ["google/rpc/status.proto", "google/rpc/error_details.proto"]
# Helm can only read files inside the chart: the gateway's descriptor set is written there.
CHART_FILES = PROTO_ROOT.parent / "mesh" / "chart" / "files"
#: The cluster gateway's descriptor set, in the chart's files/: the router's service, what it imports,
#: and the error detail types its statuses carry (BadRequest, RetryInfo), for convert_grpc_status.
ROUTER_DESCRIPTOR_SET = "router.pb"
ROUTER_PROTOS = ["ragloom/router/v1/router.proto"]


def proto_files(root: Path = PROTO_ROOT) -> list[str]:
    """Every .proto under ragloom/, relative to the proto root, sorted for stable output."""
    return sorted(p.relative_to(root).as_posix() for p in (root / "ragloom").rglob("*.proto"))


def include_dirs() -> list[str]:
    import grpc_tools
    from google.api import annotations_pb2

    googleapis = Path(annotations_pb2.__file__).resolve().parents[2]
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    return [str(PROTO_ROOT), str(googleapis), str(well_known)]


def generate(out: Path, chart_out: Path | None = None) -> None:
    """Stubs and ragloom.pb under `out`; the chart's router.pb under `chart_out` (default: the
    chart's files/ when `out` is the proto root, else nowhere)."""
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    files = proto_files()
    args = ["grpc_tools.protoc", *(f"-I{d}" for d in include_dirs())]
    code = protoc.main(
        [*args, f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *files]
    )
    if code != 0:
        raise SystemExit(f"protoc failed generating stubs (exit {code})")
    # The error detail types ride along so Envoy's transcoder can render rich statuses as JSON.
    code = protoc.main(
        [*args, "--include_imports", "--include_source_info",
         f"--descriptor_set_out={out / DESCRIPTOR_SET}", *files, *ERROR_DETAIL_PROTOS]
    )
    if code != 0:
        raise SystemExit(f"protoc failed writing the descriptor set (exit {code})")
    if chart_out is None and out == PROTO_ROOT and CHART_FILES.is_dir():
        chart_out = CHART_FILES
    if chart_out is None:
        return
    chart_out.mkdir(parents=True, exist_ok=True)
    code = protoc.main(
        [*args, "--include_imports", f"--descriptor_set_out={chart_out / ROUTER_DESCRIPTOR_SET}",
         *ROUTER_PROTOS, *ERROR_DETAIL_PROTOS]
    )
    if code != 0:
        raise SystemExit(f"protoc failed writing the router's descriptor set (exit {code})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="output root (default: %(default)s)")
    parser.add_argument("--chart-out", type=Path, default=None,
                        help="where the chart's router.pb goes (default: the chart's files/ with the default --out)")
    args = parser.parse_args(argv)
    generate(args.out, args.chart_out)


if __name__ == "__main__":
    sys.exit(main())
