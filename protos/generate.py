"""Generates the Python stubs and the Envoy descriptor set from the protos.

    python protos/generate.py            # write next to the .proto files
    python protos/generate.py --out DIR  # write into DIR (the drift test uses this)

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
# Helm can only read files inside the chart: the gateway's transcoder gets a copy.
CHART_COPY = PROTO_ROOT.parent / "mesh" / "chart" / "files" / Path(DESCRIPTOR_SET).name


def proto_files(root: Path = PROTO_ROOT) -> list[str]:
    """Every .proto under ragloom/, relative to the proto root, sorted for stable output."""
    return sorted(p.relative_to(root).as_posix() for p in (root / "ragloom").rglob("*.proto"))


def include_dirs() -> list[str]:
    import grpc_tools
    from google.api import annotations_pb2

    googleapis = Path(annotations_pb2.__file__).resolve().parents[2]
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    return [str(PROTO_ROOT), str(googleapis), str(well_known)]


def generate(out: Path) -> None:
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
    if out == PROTO_ROOT and CHART_COPY.parent.is_dir():
        CHART_COPY.write_bytes((out / DESCRIPTOR_SET).read_bytes())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="output root (default: %(default)s)")
    generate(parser.parse_args(argv).out)


if __name__ == "__main__":
    sys.exit(main())
