"""Client channels between services: a deadline on every call, retries for UNAVAILABLE only."""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

if TYPE_CHECKING:
    from fabric.tls import Identity

# Transparent retries for UNAVAILABLE (the server never saw the call, or was stopping).
# Every internal RPC is idempotent, so a retry cannot apply a write twice.
RETRY_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


def channel(target: str, *, max_message_mb: int = 64, identity: "Identity | None" = None) -> grpc.aio.Channel:
    """An aio channel to another service with the retry policy and size limits; mutual TLS with `identity`."""
    size = max_message_mb * 1024 * 1024
    options = [
        ("grpc.service_config", RETRY_SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        ("grpc.keepalive_time_ms", 30_000),
        # Reconnect fast. gRPC's default backoff between connection attempts grows 1 s × 1.6 per try up
        # to 120 s, so a peer that was down for a minute is only retried tens of seconds after it is back,
        # and every call fails fast (UNAVAILABLE) meanwhile: a healthy shard left out of results. These
        # channels are loopback or cluster-internal, where an attempt costs one refused SYN, so retry
        # every 0.2 s growing to 1 s at most; an attempt may take 1 s to connect (the minimum connect
        # timeout, default 20 s) before the next.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 1_000),
        ("grpc.min_reconnect_backoff_ms", 1_000),
    ]
    if identity is not None:
        return grpc.aio.secure_channel(target, identity.channel_credentials(), options=options)
    return grpc.aio.insecure_channel(target, options=options)


class Deadline:
    """A request's time budget; each downstream call gets at most what is left of it."""

    def __init__(self, seconds: float | None):
        self._end = None if seconds is None else time.monotonic() + seconds

    @classmethod
    def from_context(cls, context: grpc.aio.ServicerContext | None, default_s: float) -> "Deadline":
        """The caller's deadline when it set one, else `default_s` from now."""
        remaining = context.time_remaining() if context is not None else None
        return cls(default_s if remaining is None else remaining)

    def remaining(self) -> float | None:
        return None if self._end is None else max(0.0, self._end - time.monotonic())

    def timeout(self, cap_s: float) -> float:
        """Timeout for one call: the stage's cap, or less when the request has less left."""
        left = self.remaining()
        return cap_s if left is None else max(0.001, min(cap_s, left))


async def wait_healthy(target: str, timeout_s: float = 60.0, service: str = "", identity: "Identity | None" = None) -> None:
    """Waits until `target` reports SERVING; raises TimeoutError otherwise."""
    end = time.monotonic() + timeout_s
    last = "no answer"
    async with channel(target, identity=identity) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < end:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.aio.AioRpcError as exc:
                last = exc.code().name
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{target} not SERVING after {timeout_s:.0f}s (last: {last})")
