"""Readiness probes: a port nothing listens on reads as not ready, even when the connect loops back onto itself."""

from __future__ import annotations

import http.server
import socket
import threading

import pytest

from fabric import probe


def _self_connected() -> socket.socket:
    """What the kernel hands a probe, now and then, for a free port in its ephemeral range."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.connect(sock.getsockname())
    assert sock.getsockname() == sock.getpeername()
    return sock


@pytest.fixture
def looped_back(monkeypatch):
    made = []

    def create_connection(address, timeout=None):
        made.append(_self_connected())
        return made[-1]

    monkeypatch.setattr(probe.socket, "create_connection", create_connection)
    return made


def test_a_self_connection_is_refused_and_closed(looped_back):
    with pytest.raises(ConnectionRefusedError, match="looped back"):
        probe.connect("127.0.0.1", 1, 1.0)
    assert looped_back[0].fileno() == -1  # closed: the port is free for the server again


def test_http_probe_does_not_take_its_own_request_for_an_answer(looped_back):
    # Before: urllib read back "GET /healthz ..." as the status line and raised BadStatusLine.
    with pytest.raises(ConnectionRefusedError):
        probe.http_get("http://127.0.0.1:1/healthz?js-enabled-only=true", 1.0)
    assert probe.http_ready("http://127.0.0.1:1/healthz", 1.0) is False


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code = 200 if self.path == "/healthz?ok=1" else 503
        self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok" if code == 200 else b"no")

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_http_probe_reads_status_body_and_query(server):
    assert probe.http_get(server + "/healthz?ok=1", 2.0) == (200, b"ok")
    assert probe.http_ready(server + "/healthz?ok=1", 2.0) is True
    assert probe.http_get(server + "/healthz", 2.0) == (503, b"no")
    assert probe.http_ready(server + "/healthz", 2.0) is False


def test_a_port_nothing_listens_on_is_not_ready():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert probe.http_ready(f"http://127.0.0.1:{port}/", 0.5) is False


def test_a_server_that_is_not_http_is_not_ready():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def speak():
        conn, _ = listener.accept()
        conn.sendall(b"INFO {}\r\n")
        conn.close()

    threading.Thread(target=speak, daemon=True).start()
    try:
        with pytest.raises(ConnectionError, match="did not answer HTTP"):
            probe.http_get(f"http://127.0.0.1:{listener.getsockname()[1]}/", 2.0)
    finally:
        listener.close()


def test_only_plain_http_urls():
    with pytest.raises(ValueError, match="http://host:port"):
        probe.http_get("https://127.0.0.1:1/", 1.0)
