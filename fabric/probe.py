"""Readiness probes that cannot be fooled by a TCP self-connection.

A loopback connect to a port that nothing listens on yet can, when the port lies in the kernel's
ephemeral range, be given that same port as its source and so connect to itself (TCP simultaneous
open): the probe then reads back its own request, and holds the very port the server is about to
bind. Every probe here closes such a connection at once and reports the port as not listening.
"""

from __future__ import annotations

import http.client
import socket
import urllib.parse


def connect(host: str, port: int, timeout_s: float) -> socket.socket:
    """A connected socket to host:port; ConnectionRefusedError if nothing listens there."""
    sock = socket.create_connection((host, port), timeout=timeout_s)
    if sock.getsockname() == sock.getpeername():
        sock.close()
        raise ConnectionRefusedError(f"{host}:{port}: nothing listens (the connection looped back onto itself)")
    return sock


def http_get(url: str, timeout_s: float) -> tuple[int, bytes]:
    """(status, body) of a plain-HTTP GET. OSError when nothing (or no HTTP server) answers there."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or not parts.port:
        raise ValueError(f"{url!r}: want http://host:port/path")
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    try:
        conn.sock = connect(parts.hostname, parts.port, timeout_s)
        conn.request("GET", urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, "")))
        response = conn.getresponse()
        return response.status, response.read()
    except http.client.HTTPException as e:
        raise ConnectionError(f"{parts.netloc} did not answer HTTP: {e!r}") from e
    finally:
        conn.close()


def http_ready(url: str, timeout_s: float) -> bool:
    """Whether a GET of url answers 200 now."""
    try:
        return http_get(url, timeout_s)[0] == 200
    except OSError:
        return False
