"""Typed settings, parsed once at the edge from flags, then RAGLOOM_* variables, then defaults.

Each service declares a dataclass; every field becomes a `--flag-name` and a
`RAGLOOM_FLAG_NAME` variable, documented by the field's `help` metadata.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

ENV_PREFIX = "RAGLOOM_"


def option(default, help: str, **kwargs):
    """A settings field with its help text."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class ServiceSettings:
    """What every service has: where it listens and how it stops."""

    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(0, "port to listen on (0 picks a free one)")
    grace_s: float = option(5.0, "seconds in-flight calls get to finish on shutdown")
    max_message_mb: int = option(64, "largest gRPC message accepted or sent, in MiB")
    log_level: str = option("INFO", "log level: DEBUG, INFO, WARNING, ERROR")
    log_format: str = option("json", "log lines as 'json' (with trace ids) or 'text'")
    otlp_endpoint: str = option("", "OTLP/gRPC endpoint for traces, e.g. http://127.0.0.1:4317 (empty = tracing off)")
    trace_sample_ratio: float = option(0.1, "share of requests traced, decided where a trace starts (1 = every request)")
    metrics_port: int = option(0, "port for Prometheus /metrics (0 = off)")
    tls_cert: str = option("", "PEM certificate of this workload; with --tls-key and --tls-ca turns on mutual TLS")
    tls_key: str = option("", "PEM private key of this workload")
    tls_ca: str = option("", "PEM CA certificate that callers' and servers' certificates must chain to")
    allowed_callers: list[str] = option([], "SPIFFE ids allowed to call this service (mTLS only; empty = any valid certificate)")

    @property
    def identity(self):
        """This workload's mTLS identity, or None when TLS is off."""
        from mesh.tls import Identity

        if not (self.tls_cert or self.tls_key or self.tls_ca):
            return None
        return Identity(Path(self.tls_cert), Path(self.tls_key), Path(self.tls_ca))

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            kind = hints[f.name]
            env = ENV_PREFIX + f.name.upper()
            help_text = f"{f.metadata.get('help', '')} [env {env}]".replace("%", "%%")
            if kind is bool:
                parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            else:
                parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text)

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace, environ: Mapping[str, str] | None = None):
        """Settings from parsed flags, falling back to the environment, then the defaults."""
        environ = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):
            raw = getattr(ns, f.name, None)
            if raw is None:
                raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _convert(f.name, hints[f.name], raw)
        settings = cls(**values)
        settings.validate()
        return settings

    @classmethod
    def from_args(cls, argv: list[str] | None = None, environ: Mapping[str, str] | None = None):
        parser = argparse.ArgumentParser()
        cls.add_arguments(parser)
        return cls.from_namespace(parser.parse_args(argv), environ)

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if self.grace_s < 0:
            raise ValueError("grace_s must not be negative")
        if not 0 <= self.trace_sample_ratio <= 1:
            raise ValueError("trace_sample_ratio must be between 0 and 1")
        if self.log_format not in ("json", "text"):
            raise ValueError("log_format must be 'json' or 'text'")
        tls = [self.tls_cert, self.tls_key, self.tls_ca]
        if any(tls) and not all(tls):
            raise ValueError("mutual TLS needs all of --tls-cert, --tls-key and --tls-ca")
        for path in filter(None, tls):
            if not Path(path).is_file():
                raise ValueError(f"TLS file not found: {path}")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _convert(name: str, kind, raw):
    if not isinstance(raw, str):
        return raw
    try:
        if kind is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is Path:
            return Path(raw).expanduser()
        if typing.get_origin(kind) is list:
            return [item.strip() for item in raw.split(",") if item.strip()]
        return raw
    except ValueError:
        raise ValueError(f"{name}: cannot read {raw!r} as {getattr(kind, '__name__', kind)}") from None
