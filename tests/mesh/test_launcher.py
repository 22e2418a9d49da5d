"""`ragloom up`'s plan: decided without touching the disk, written by prepare; each child gets its own
settings from the shell and nothing meant for another."""

from pathlib import Path

import pytest

from mesh import policy
from mesh.launcher import child_env, plan, prepare
from mesh.spec import MeshSpec


def test_the_plan_decides_and_prepare_writes(tmp_path):
    spec = MeshSpec(data_dir=tmp_path / "data", shards=2, replicas=2, router_port=41000, base_port=41001)
    planned = plan(spec, environ={})
    assert not (tmp_path / "data").exists()  # deciding writes nothing
    names = [c.name for c in planned.children]
    assert names == ["nats", "embedder", "generator", "indexer-0-r0", "indexer-0-r1", "indexer-1-r0", "indexer-1-r1",
                     "router", "gateway"]
    assert planned.public.address == "127.0.0.1:41000"
    router = planned.child("router")
    assert router.address == "127.0.0.1:41003"
    assert "127.0.0.1:41008|127.0.0.1:41009,127.0.0.1:41010|127.0.0.1:41011" in router.argv
    # the shards' log: an embedded nats-server with mutual TLS; router and replicas point at it
    nats_url = "tls://localhost:41006"
    for name in ("router", "indexer-0-r0", "indexer-1-r1"):
        argv = planned.child(name).argv
        assert argv[argv.index("--nats-url") + 1] == nats_url
    config_path, config = planned.nats_config
    assert "sync_interval: always" in config and "verify: true" in config and "listen: 127.0.0.1:41006" in config
    cert = Path(router.argv[router.argv.index("--tls-cert") + 1])
    prepare(planned)
    assert cert.is_file() and (tmp_path / "data" / "pki" / "ca.pem").is_file()
    assert (tmp_path / "data" / "gateway" / "envoy.json").is_file() and config_path.read_text() == config
    assert (tmp_path / "data" / "pki" / "nats.pem").is_file()
    # authentication: the router takes the tenant from the gateway alone; the local issuer's key and a
    # development token (its owner's only) are made once
    assert router.argv[router.argv.index("--tenant-from") + 1] == "gateway"
    assert router.argv[router.argv.index("--trusted-gateways") + 1] == policy.load().spiffe_id(policy.GATEWAY)
    pki = tmp_path / "data" / "pki"
    assert (pki / "jwks.json").is_file() and (pki / "token").stat().st_mode & 0o777 == 0o600
    assert (pki / "jwt-signing-key.pem").stat().st_mode & 0o777 == 0o600
    token = (pki / "token").read_text()
    prepare(planned)
    assert (pki / "token").read_text() == token, "a valid development token is kept"
    # the gateway's admin is a unix socket: no TCP port reaches it
    admin = planned.gateway_config["admin"]["address"]
    assert set(admin) == {"pipe"} and admin["pipe"]["mode"] == 0o600


def test_no_auth_lets_the_request_name_its_tenant(tmp_path):
    spec = MeshSpec(data_dir=tmp_path, auth=False, router_port=41000, base_port=41001)
    planned = plan(spec, environ={})
    router = planned.child("router").argv
    assert router[router.index("--tenant-from") + 1] == "request"
    assert planned.signer_folder is None
    filters = [f["name"] for f in planned.gateway_config["static_resources"]["listeners"][0]["filter_chains"][0][
        "filters"][0]["typed_config"]["http_filters"]]
    assert "envoy.filters.http.jwt_authn" not in filters and "envoy.filters.http.local_ratelimit" not in filters


def test_a_spec_that_cannot_work_says_which_flag():
    for fields, flag in [({"shards": 0}, "--shards"), ({"gateway": False}, "--mtls"),
                         ({"mtls": False}, "--no-auth"), ({"jwks_uri": "https://x/jwks"}, "--jwt-issuer"),
                         ({"canary_weight": 101}, "--canary-weight"), ({"base_port": 65534}, "ports")]:
        with pytest.raises(ValueError, match=flag):
            MeshSpec(data_dir=Path("/tmp/x"), **fields).validate()


def test_each_child_gets_its_own_settings_and_the_shared_ones_only():
    shell = {
        "PATH": "/usr/bin", "RAGLOOM_LOG_LEVEL": "DEBUG", "RAGLOOM_EMBEDDER_THREADS": "2",
        "RAGLOOM_GENERATOR_THREADS": "4", "RAGLOOM_PORT": "9999", "RAGLOOM_TLS_CERT": "/x.pem",
        "RAGLOOM_INDEXER_PEERS": "10.0.0.1:1", "RAGLOOM_INDEXER_METRICS_PORT": "9100", "RAGLOOM_INDEXER_HNSW_M": "32",
    }
    embedder = child_env("embedder", shell)
    assert embedder == {"PATH": "/usr/bin", "RAGLOOM_LOG_LEVEL": "DEBUG", "RAGLOOM_EMBEDDER_THREADS": "2"}
    indexer = child_env("indexer", shell)
    assert indexer == {"PATH": "/usr/bin", "RAGLOOM_LOG_LEVEL": "DEBUG", "RAGLOOM_INDEXER_HNSW_M": "32"}
    spec = MeshSpec(data_dir=Path("/tmp/x"), gateway=False, mtls=False)
    generator = plan(spec, environ=shell).child("generator")
    assert generator.env["RAGLOOM_GENERATOR_THREADS"] == "4" and "RAGLOOM_EMBEDDER_THREADS" not in generator.env


class Exited:
    """A stand-in for a child process that has exited."""

    returncode = 1

    def poll(self):
        return 1


def test_the_supervisor_restarts_a_dead_child_with_backoff_and_reports_a_crash_loop(tmp_path, monkeypatch):
    import io

    from mesh import launcher
    from mesh.launcher import Child, Supervisor

    started = []
    monkeypatch.setattr(launcher, "start_child", lambda child: (started.append(child.name),
                                                                setattr(child, "process", Exited())))
    child = Child("indexer-0-r1", "127.0.0.1:1", ["x"], tmp_path / "indexer.log")
    (tmp_path / "indexer.log").write_text("disk I/O error\n")
    child.process = Exited()
    out = io.StringIO()
    supervisor = Supervisor([child], out=out)
    supervisor.tick(now=100.0)
    assert started == [] and "restarting it in 0.5 s" in out.getvalue()
    supervisor.tick(now=100.6)
    assert started == ["indexer-0-r1"]
    supervisor.tick(now=101.0)  # died again: twice the wait
    assert "restarting it in 1.0 s" in out.getvalue()
    supervisor.tick(now=102.1)
    supervisor.tick(now=102.2)
    assert "crash-looping: 3 exits" in out.getvalue() and "disk I/O error" in out.getvalue()
    assert supervisor.restarts == 3


def test_a_signal_during_start_up_stops_the_mesh_at_once(tmp_path, monkeypatch):
    """SIGTERM (or Ctrl-C) while the services are still starting gives the start-up up at once and stops
    what started, rather than waiting for every service (up to --startup-timeout)."""
    import os
    import signal
    import time

    from mesh import launcher

    stopped = []

    def slow_start(children, timeout_s, quiet=False):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # a service that takes its time

    monkeypatch.setattr(launcher, "start_all", slow_start)
    monkeypatch.setattr(launcher, "stop_all", lambda children, grace_s=10.0: stopped.append(len(children)))
    spec = MeshSpec(data_dir=tmp_path, auth=False, mtls=False, gateway=False, router_port=41000, base_port=41001)
    before = signal.getsignal(signal.SIGTERM)
    started = time.monotonic()
    assert launcher.run_up(spec) == 130
    assert time.monotonic() - started < 10 and stopped, "stopped at once, children included"
    assert signal.getsignal(signal.SIGTERM) is before, "the shell's handlers are put back"
