"""Typed settings, parsed once at the edge from flags, then RAGLOOM_* variables, then defaults.

Each service declares a dataclass with its name in `service`; every field becomes a
`--flag-name` and a `RAGLOOM_<SERVICE>_FLAG_NAME` variable, documented by the field's `help`
metadata. The fields every service has (ServiceSettings': where it listens, logging, tracing,
TLS) also read the unprefixed `RAGLOOM_FLAG_NAME`, so one variable can set them for all
services, while a service's own options (`--threads` means different things to the embedder and
the generator) are never set by another's variable. A group of options owned by one component
(a generator backend's, say) is a dataclass field declared with `options(...)`: its fields
become `--<prefix>-name` and `RAGLOOM_<SERVICE>_<PREFIX>_NAME`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

ENV_PREFIX = "RAGLOOM_"


def option(default, help: str, **kwargs):
    """A settings field with its help text."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


def options(kind: type, prefix: str = ""):
    """A group of settings owned by one component: a dataclass of `option` fields.

    Its fields become `--<prefix>-<name>` flags (plain `--<name>` with no prefix); the group may
    define `validate()`, which ServiceSettings.validate calls.
    """
    return field(default_factory=kind, metadata={"group": prefix})


@dataclass(frozen=True)
class Flag:
    """One leaf setting: where it lives (`path` of field names) and how it is spelled."""

    path: tuple[str, ...]
    dest: str
    kind: type
    help: str
    env: tuple[str, ...]

    @property
    def flag(self) -> str:
        return "--" + self.dest.replace("_", "-")


def flags(cls) -> list[Flag]:
    """Every leaf setting of a settings class, groups flattened, with its variables in lookup order."""
    service = getattr(cls, "service", "")
    common = {f.name for f in dataclasses.fields(ServiceSettings)}
    own = ENV_PREFIX + (service.upper() + "_" if service else "")

    def walk(kind, path: tuple[str, ...], prefix: str) -> list[Flag]:
        hints = typing.get_type_hints(kind)
        found = []
        for f in dataclasses.fields(kind):
            if "group" in f.metadata:
                group = f.metadata["group"]
                found += walk(hints[f.name], (*path, f.name), f"{prefix}{group}_" if group else prefix)
                continue
            dest = prefix + f.name
            env = [own + dest.upper()]
            if not path and f.name in common and service:
                env.append(ENV_PREFIX + dest.upper())
            found.append(Flag((*path, f.name), dest, hints[f.name], f.metadata.get("help", ""), tuple(env)))
        return found

    return walk(cls, (), "")


@dataclass
class ServiceSettings:
    """What every service has: where it listens and how it stops."""

    #: The service's name, the prefix of its own variables (RAGLOOM_<SERVICE>_...).
    service: ClassVar[str] = ""

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
        from fabric.tls import Identity

        if not (self.tls_cert or self.tls_key or self.tls_ca):
            return None
        return Identity(Path(self.tls_cert), Path(self.tls_key), Path(self.tls_ca))

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        for leaf in flags(cls):
            help_text = f"{leaf.help} [env {' or '.join(leaf.env)}]".replace("%", "%%")
            if leaf.kind is bool:
                parser.add_argument(leaf.flag, dest=leaf.dest, action=argparse.BooleanOptionalAction, default=None,
                                    help=help_text)
            else:
                parser.add_argument(leaf.flag, dest=leaf.dest, default=None, metavar=leaf.dest.upper(), help=help_text)

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace, environ: Mapping[str, str] | None = None):
        """Settings from parsed flags, falling back to the environment, then the defaults."""
        environ = os.environ if environ is None else environ
        values: dict = {}
        for leaf in flags(cls):
            raw = getattr(ns, leaf.dest, None)
            for name in leaf.env:
                if raw is not None:
                    break
                raw = environ.get(name)
            if raw is not None:
                node = values
                for part in leaf.path[:-1]:
                    node = node.setdefault(part, {})
                node[leaf.path[-1]] = _convert(leaf.dest, leaf.kind, raw)
        settings = _build(cls, values)
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
        for f in dataclasses.fields(self):
            group = getattr(self, f.name)
            if "group" in f.metadata and hasattr(group, "validate"):
                group.validate()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _build(kind, values: dict):
    hints = typing.get_type_hints(kind)
    args = {}
    for f in dataclasses.fields(kind):
        if f.name not in values:
            continue
        args[f.name] = _build(hints[f.name], values[f.name]) if "group" in f.metadata else values[f.name]
    return kind(**args)


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
