"""Mutual TLS with SPIFFE identities, as Istio issues them, for the mesh on one machine.

A local certificate authority (kept under the data dir) issues every workload a short
certificate whose URI SAN is `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
Servers require a client certificate from that CA (no certificate, no connection) and then
check the caller's SPIFFE id against the identities allowed to call them: a valid
certificate with the wrong identity gets PERMISSION_DENIED, as an Istio
AuthorizationPolicy would.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fabric.errors import PermissionDenied
from fabric.handlers import HandlerCache, rewrap


def spiffe_id(service_account: str, namespace: str = "ragloom", trust_domain: str = "cluster.local") -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


@dataclass(frozen=True)
class Identity:
    """A workload's certificate, key and the CA it trusts, as PEM files."""

    cert: Path
    key: Path
    ca: Path

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=self.ca.read_bytes(),
            require_client_auth=True,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.key.read_bytes(),
            certificate_chain=self.cert.read_bytes(),
        )


class LocalCA:
    """A certificate authority in a folder: created once, reused by every later `ragloom up`."""

    def __init__(self, folder: Path, validity_days: int = 30):
        self.folder = Path(folder)
        self.validity = datetime.timedelta(days=validity_days)
        self.cert_path = self.folder / "ca.pem"
        self._key_path = self.folder / "ca-key.pem"
        if not self.cert_path.exists():
            self._create()
        self._key = serialization.load_pem_private_key(self._key_path.read_bytes(), password=None)
        self._cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())

    def _create(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ragloom local mesh CA")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256())
        )
        _write_private(self._key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    @staticmethod
    def identity_paths(folder: Path, name: str) -> Identity:
        """Where `issue(name, …)` writes a workload's files in the CA folder `folder`."""
        folder = Path(folder)
        return Identity(folder / f"{name}.pem", folder / f"{name}-key.pem", folder / "ca.pem")

    def issue(self, name: str, spiffe: str, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> Identity:
        """A fresh workload certificate for `spiffe`, valid for `hosts`, written as `<name>.pem`/`<name>-key.pem`."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe)]
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + self.validity)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                                  x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        ident = self.identity_paths(self.folder, name)
        cert_path, key_path = ident.cert, ident.key
        _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return Identity(cert_path, key_path, self.cert_path)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def peer_spiffe_ids(context: grpc.aio.ServicerContext) -> list[str]:
    """SPIFFE ids in the verified client certificate of this call (empty without TLS)."""
    auth = context.auth_context()
    return [i for pem in auth.get("x509_pem_cert", []) for i in _spiffe_ids(pem)]


@functools.lru_cache(maxsize=256)
def _spiffe_ids(pem: bytes) -> tuple[str, ...]:
    """The SPIFFE ids a certificate names. Kept by certificate: a caller's connection presents the same
    one on every call, and parsing it took longer than the call it guarded."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://"))


class IdentityInterceptor(grpc.aio.ServerInterceptor):
    """Refuses (PERMISSION_DENIED) callers whose SPIFFE id is not allowed; health and reflection stay open."""

    OPEN = ("/grpc.health.v1.Health/", "/grpc.reflection.")

    def __init__(self, allowed: list[str]):
        self.allowed = set(allowed)
        self._handlers = HandlerCache(self._checked)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not self.allowed or handler_call_details.method.startswith(self.OPEN):
            return handler
        return self._handlers.get(handler_call_details.method, handler)

    def _checked(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        allowed = self.allowed

        def check(context) -> None:
            ids = peer_spiffe_ids(context)
            if not allowed.intersection(ids):
                raise PermissionDenied(f"caller {ids[0] if ids else 'without identity'} may not call {method}")

        def unary(behavior):
            async def checked(request, context):
                check(context)
                return await behavior(request, context)

            return checked

        def stream(behavior):
            async def checked(request, context):
                check(context)
                async for response in behavior(request, context):
                    yield response

            return checked

        return rewrap(handler, unary, stream)
