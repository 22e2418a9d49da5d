"""The `ragloom` command: run the mesh, run one service, and use it (ingest, search, ask, delete, status)."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from pathlib import Path

from mesh.spec import SERVICES, default_data_dir

DEFAULT_ROUTER = "127.0.0.1:50051"

#: How the client commands end, for scripts: what to do next without parsing messages.
EXIT_CODES = """exit status:
  0  done
  1  anything else failed; for ingest, any file that could not be ingested
  2  refused as asked, retrying will not help: fix the request or the credentials
     (INVALID_ARGUMENT, FAILED_PRECONDITION, NOT_FOUND, PERMISSION_DENIED, UNAUTHENTICATED, OUT_OF_RANGE)
  3  overloaded, unreachable or too slow: try again later; for ingest, no router reached at all
     (RESOURCE_EXHAUSTED, UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED)
  141  the output's reader went away (e.g. `| head`); nothing more is printed"""


#: What `ragloom status` can and cannot see, for its --help.
STATUS_HELP = """Asks the endpoint at --router for its gRPC health (the router's own: a gateway in front of it
routes the RouterService only, so there it is reported as not exposed), then runs one Search (top_k=1) to
see which index shards answer and whether retrieval is degraded (e.g. the embedder down: lexical only).
The generator and the answer cache are not visible this way: no Ask is made, so nothing is generated.
Exit status: 0 all answered, 1 some shard failed or a stage is degraded (or health not SERVING), else as
for the other commands (2 refused, e.g. a bad token; 3 unreachable)."""


def _service_module(name: str):
    return importlib.import_module(f"{name}.server")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ragloom",
        description="Retrieval-Augmented Generation as a mesh of gRPC services. "
        "Start the mesh with `ragloom up`, add documents with `ragloom ingest`, then `ragloom ask`.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="run the whole mesh on this machine until Ctrl-C",
                        description="Starts the embedder, N indexer shards, the generator and the router on "
                        "loopback, waits until all report SERVING, prints the endpoints, and stops them all on Ctrl-C.")
    up.add_argument("--data-dir", type=Path, default=Path(os.environ.get("RAGLOOM_DATA_DIR", default_data_dir())),
                    help="where shards keep their data and services their logs (default: %(default)s) [env RAGLOOM_DATA_DIR]")
    up.add_argument("--shards", type=int, default=2, help="indexer shards (default: %(default)s)")
    up.add_argument("--replicas", type=int, default=1,
                    help="replicas per shard, each following the shard's log (default: %(default)s)")
    up.add_argument("--nats-url", default=os.environ.get("RAGLOOM_NATS_URL", ""),
                    help="an existing NATS (JetStream) for the shards' logs, e.g. nats://10.0.0.5:4222 (default: run "
                    "one under DATA_DIR/nats) [env RAGLOOM_NATS_URL]")
    up.add_argument("--log-replicas", type=int, default=1,
                    help="replicas of each shard's stream on an existing NATS cluster (default: %(default)s)")
    up.add_argument("--redis-url", default=os.environ.get("RAGLOOM_REDIS_URL", ""),
                    help="Redis for the router's cache, e.g. redis://127.0.0.1:6379/0 (default: in-process cache) [env RAGLOOM_REDIS_URL]")
    up.add_argument("--gateway", action=argparse.BooleanOptionalAction, default=True,
                    help="put a real Envoy in front of the router on --router-port: gRPC and REST, retries, canary split (default: on)")
    up.add_argument("--mtls", action=argparse.BooleanOptionalAction, default=True,
                    help="mutual TLS between gateway, router and services with SPIFFE identities from a local CA in "
                    "DATA_DIR/pki; each service admits only the callers the policy names (default: on)")
    up.add_argument("--auth", action=argparse.BooleanOptionalAction, default=True,
                    help="bearer JWTs at the gateway decide who is asking and their tenant: a signing key, its JWKS "
                    "and a development token (0600, sent by this CLI) are made in DATA_DIR/pki; `ragloom token` "
                    "mints more. --no-auth lets anyone who reaches the port act as any tenant: a laptop only "
                    "(default: on)")
    up.add_argument("--jwt-issuer", default=os.environ.get("RAGLOOM_JWT_ISSUER", ""),
                    help="with --jwks-uri: accept tokens of this OIDC issuer (their iss) instead of the local one "
                    "[env RAGLOOM_JWT_ISSUER]")
    up.add_argument("--jwt-audience", dest="jwt_audiences", action="append", default=[], metavar="AUD",
                    help="with --jwks-uri: an accepted aud (repeatable; none = any)")
    up.add_argument("--jwks-uri", default=os.environ.get("RAGLOOM_JWKS_URI", ""),
                    help="the issuer's JWKS URL (its OIDC discovery document's jwks_uri) [env RAGLOOM_JWKS_URI]")
    up.add_argument("--values", action="append", type=Path, default=[], metavar="FILE",
                    help="Helm values overlay(s) for the traffic policy, e.g. mesh/chart/values-canary.yaml (repeatable)")
    up.add_argument("--canary-weight", type=int, default=None,
                    help="run a second (canary) router taking this percent of traffic; default: the values' router canary")
    up.add_argument("--metrics-base-port", type=int, default=0,
                    help="give each service a Prometheus /metrics port, counting up from this one (default: off)")
    up.add_argument("--otlp-endpoint", default=os.environ.get("RAGLOOM_OTLP_ENDPOINT", ""),
                    help="send every service's traces to this OTLP/gRPC endpoint (default: tracing off) [env RAGLOOM_OTLP_ENDPOINT]")
    up.add_argument("--host", default="127.0.0.1", help="address every service listens on (default: %(default)s)")
    up.add_argument("--router-port", type=int, default=50051, help="the public API's port (default: %(default)s)")
    up.add_argument("--base-port", type=int, default=50052,
                    help="first internal port: embedder, generator, then one per shard (default: %(default)s)")
    up.add_argument("--generator-backend", default="llama_cpp",
                    help="generator backend: llama_cpp, openai or tensorrt_llm (default: %(default)s)")
    up.add_argument("--generator-model-path", default="",
                    help="GGUF file (llama_cpp) or checkpoint/engine folder (tensorrt_llm); default: the packaged SmolLM2")
    up.add_argument("--openai-base-url", default="", help="base URL of an OpenAI-compatible server, for --generator-backend openai")
    up.add_argument("--openai-model", default="", help="model name at that server")
    up.add_argument("--startup-timeout", dest="startup_timeout_s", type=float, default=300.0, help="seconds to wait for every service to be SERVING")

    serve = sub.add_parser("serve", help="run one service (what a Kubernetes pod runs)", add_help=False,
                           description="Runs one service until SIGTERM/SIGINT. "
                           "`ragloom serve SERVICE --help` lists its flags; each can also be set with a RAGLOOM_* variable.")
    serve.add_argument("service", choices=SERVICES, help="the service to run")
    serve.add_argument("flags", nargs=argparse.REMAINDER, help="the service's flags")

    def data_dir_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("RAGLOOM_DATA_DIR", default_data_dir())),
                       help="the mesh's data folder (default: %(default)s) [env RAGLOOM_DATA_DIR]")

    def client_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--router", default=os.environ.get("RAGLOOM_ROUTER", DEFAULT_ROUTER),
                       help="router address (default: %(default)s) [env RAGLOOM_ROUTER]")
        p.add_argument("--timeout", type=float, default=300.0, help="seconds before the call is abandoned")
        p.add_argument("--token", default=None,
                       help="bearer token to send (default: $RAGLOOM_TOKEN, else the development token "
                       "`ragloom up` wrote in DATA_DIR/pki/token)")
        data_dir_arg(p)

    token = sub.add_parser("token", help="mint a bearer token for a tenant (the local issuer of `ragloom up`)",
                           description="Prints a token signed by the local issuer's key in DATA_DIR/pki. Send it "
                           "as `authorization: Bearer TOKEN` (REST or gRPC metadata), or set RAGLOOM_TOKEN for this CLI.")
    token.add_argument("--tenant", required=True, help="the tenant the token acts for")
    token.add_argument("--ttl", default="1h", help="lifetime, like 15m, 1h, 30d (default: %(default)s)")
    token.add_argument("--read-only", action="store_true", help="search and ask only: ingest and delete are refused")
    data_dir_arg(token)

    def tenant_arg(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument("--tenant", default="", help=f"the tenant {what} (default: the token's; with --no-auth "
                       "the default tenant)")

    def scope_args(p: argparse.ArgumentParser) -> None:
        tenant_arg(p, "whose documents are searched")
        p.add_argument("--tag", dest="tags", action="append", default=[], metavar="TAG",
                       help="only passages carrying one of these tags (repeatable)")
        p.add_argument("--mode", choices=("dense", "lexical", "hybrid"), default=None,
                       help="retrieval: embeddings, BM25 over the words, or both fused (default: the router's, hybrid)")
        p.add_argument("--require-complete", action="store_true",
                       help="fail (UNAVAILABLE) rather than answer from the shards that did answer")

    client = {"epilog": EXIT_CODES, "formatter_class": argparse.RawDescriptionHelpFormatter}
    ingest = sub.add_parser("ingest", help="add files or folders to the collection", **client,
                            description="Ingests txt, md, html and pdf files (folders are walked). A file ingested\n"
                            "again replaces its earlier version. A file that cannot be read is reported and skipped.")
    ingest.add_argument("paths", nargs="*", type=Path, help="files or folders")
    ingest.add_argument("--sample", action="store_true", help="ingest the bundled sample documents")
    ingest.add_argument("--concurrency", type=int, default=4, help="files in flight at once (default: %(default)s)")
    ingest.add_argument("--json", action="store_true", help="print the summary as JSON")
    tenant_arg(ingest, "that owns the documents")
    ingest.add_argument("--tag", dest="tags", action="append", default=[], metavar="TAG",
                        help="a tag stored with every chunk, for search --tag (repeatable)")
    client_args(ingest)

    ask = sub.add_parser("ask", help="ask a question; the answer streams, then its sources", **client)
    ask.add_argument("question")
    ask.add_argument("--top-k", type=int, default=None, help="sources to retrieve, 1-50 (router default when unset)")
    ask.add_argument("--max-tokens", type=int, default=None, help="longest answer in tokens (router default when unset)")
    ask.add_argument("--temperature", type=float, default=None,
                     help="sampling temperature, 0 (greedy) to 2 (router default when unset)")
    ask.add_argument("--no-cache", action="store_true", help="answer afresh, not from the answer cache")
    ask.add_argument("--json", action="store_true", help="print one JSON object: answer, sources, citations, timings")
    scope_args(ask)
    client_args(ask)

    search = sub.add_parser("search", help="find the passages closest to a query", **client)
    search.add_argument("query")
    search.add_argument("--top-k", type=int, default=None, help="hits to return, 1-1000 (router default when unset)")
    search.add_argument("--json", action="store_true", help="print the hits as a JSON list")
    search.add_argument("--rerank", action=argparse.BooleanOptionalAction, default=None,
                        help="rerank a wider candidate set by how well each passage answers; show the best sentence "
                        "(default: the router's, off)")
    scope_args(search)
    client_args(search)

    delete = sub.add_parser("delete", help="remove documents by id", **client)
    delete.add_argument("document_ids", nargs="+")
    tenant_arg(delete, "that owns the documents")
    client_args(delete)

    status = sub.add_parser("status", help="what the public endpoint says of the mesh's health", **client,
                            description=STATUS_HELP)
    tenant_arg(status, "the probe search runs for")
    status.add_argument("--json", action="store_true", help="print the report as one JSON object")
    client_args(status)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "up":
            from mesh.launcher import run_up
            from mesh.spec import MeshSpec

            sys.exit(run_up(MeshSpec.from_namespace(args)))
        if args.command == "serve":
            sys.exit(_serve(args))
        if args.command == "token":
            sys.exit(_token(args))
        if args.command == "status":
            from mesh.status import status

            sys.exit(status(args))
        from mesh import commands

        sys.exit(getattr(commands, args.command)(args))
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        # The reader went away (`ragloom ask … | head`): stop quietly, as other command-line tools do. Python
        # would also report the pipe when it flushes stdout at exit; point stdout at nothing first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)  # 128 + SIGPIPE, what a shell reports for such a command


def _token(args: argparse.Namespace) -> int:
    from mesh.auth import Signer, parse_ttl

    folder = args.data_dir / "pki"
    if not (folder / Signer.KEY_FILE).exists():
        print(f"ragloom token: no signing key in {folder}: start the mesh once with `ragloom up` "
              "(--data-dir as there)", file=sys.stderr)
        return 2
    try:
        print(Signer(folder).mint(args.tenant, parse_ttl(args.ttl), read_only=args.read_only))
    except ValueError as exc:
        print(f"ragloom token: {exc}", file=sys.stderr)
        return 2
    return 0


def _serve(args: argparse.Namespace) -> int:
    from fabric.server import serve
    from fabric.telemetry import configure_logging

    module = _service_module(args.service)  # imported only here: it loads the service's heavy libraries
    parser = argparse.ArgumentParser(prog=f"ragloom serve {args.service}",
                                     description=f"Runs the {args.service} until SIGTERM/SIGINT.")
    module.Settings.add_arguments(parser)
    flags = parser.parse_args(args.flags)
    try:
        settings = module.Settings.from_namespace(flags)
    except ValueError as exc:
        print(f"ragloom serve {args.service}: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(serve(module.create_service(settings), settings))
    return 0
