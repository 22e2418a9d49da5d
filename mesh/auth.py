"""Bearer tokens for the mesh on one machine: a signing key, its JWKS, and tokens for a tenant.

`ragloom up` makes an ES256 key under DATA_DIR/pki (once), publishes its public half as a JWKS that
the gateway's Envoy (jwt_authn) verifies tokens with, and writes a development token there (mode
0600) that the CLI sends; `ragloom token` mints more. A real deployment plugs in any OIDC issuer
instead (the gateway is given its issuer, audiences and jwks_uri): nothing here is then used.

A token's claims: `iss`, `aud`, `sub`, `iat`, `exp`, the tenant (claim `tenant`) and the scopes,
space-separated as OAuth writes them (claim `scope`: "read write", or "read" for a read-only token).
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

#: The local issuer and audience (the chart's values name a real provider's).
ISSUER = "https://ragloom.local"
AUDIENCE = "ragloom"
READ, WRITE = "read", "write"
#: The tenant of the development token `ragloom up` writes.
DEFAULT_TENANT = "default"
#: Where the CLI finds a token when RAGLOOM_TOKEN is not set.
TOKEN_ENV = "RAGLOOM_TOKEN"

_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_TTL = re.compile(r"(\d+)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def check_tenant(name: str) -> str:
    """A tenant name: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit."""
    if not _TENANT.fullmatch(name):
        raise ValueError(f"not a tenant name (1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit): {name!r}")
    return name


def parse_ttl(text: str) -> int:
    """Seconds in "90s", "15m", "1h" or "30d"."""
    match = _TTL.fullmatch(text.strip())
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"not a lifetime (like 15m, 1h, 30d): {text!r}")
    return int(match.group(1)) * _UNIT_S[match.group(2)]


@dataclass(frozen=True)
class Verifier:
    """What the gateway checks a token against."""

    issuer: str
    audiences: tuple[str, ...]
    #: A JWKS file (the local signer's), or the URL of a provider's (its OIDC jwks_uri).
    jwks_path: Path | None = None
    jwks_uri: str = ""


class Signer:
    """The local issuer: an ES256 key in `folder` (made once, 0600) and its JWKS beside it."""

    KEY_FILE, JWKS_FILE, TOKEN_FILE = "jwt-signing-key.pem", "jwks.json", "token"

    def __init__(self, folder: Path, issuer: str = ISSUER, audience: str = AUDIENCE):
        self.folder = Path(folder)
        self.issuer, self.audience = issuer, audience
        self.key_path = self.folder / self.KEY_FILE
        self.jwks_path = self.folder / self.JWKS_FILE
        if not self.key_path.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            key = ec.generate_private_key(ec.SECP256R1())
            write_private(self.key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
        self._key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        public = json.loads(ECAlgorithm.to_jwk(self._key.public_key()))
        self.kid = _thumbprint(public)
        jwks = json.dumps({"keys": [{**public, "kid": self.kid, "alg": "ES256", "use": "sig"}]}, indent=2)
        if not self.jwks_path.exists() or self.jwks_path.read_text() != jwks:
            self.jwks_path.write_text(jwks)

    @property
    def verifier(self) -> Verifier:
        return Verifier(self.issuer, (self.audience,), jwks_path=self.jwks_path)

    @property
    def token_path(self) -> Path:
        return self.folder / self.TOKEN_FILE

    def mint(self, tenant: str, ttl_s: int = 3600, read_only: bool = False, subject: str = "",
             extra: Mapping[str, object] | None = None) -> str:
        """A signed token for `tenant`, valid for `ttl_s` seconds."""
        now = int(time.time())
        claims = {"iss": self.issuer, "aud": self.audience, "sub": subject or f"ragloom-cli:{check_tenant(tenant)}",
                  "iat": now, "nbf": now - 5, "exp": now + ttl_s, "jti": uuid.uuid4().hex,
                  "tenant": check_tenant(tenant), "scope": READ if read_only else f"{READ} {WRITE}", **(extra or {})}
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self.kid})

    def write_development_token(self, tenant: str = DEFAULT_TENANT, ttl_s: int = 30 * 86400) -> Path:
        """The token the CLI sends when RAGLOOM_TOKEN is unset: minted again when missing or near its end."""
        if not _still_valid(self.token_path, self, min_left_s=86400):
            write_private(self.token_path, (self.mint(tenant, ttl_s) + "\n").encode())
        return self.token_path


def _still_valid(path: Path, signer: Signer, min_left_s: int) -> bool:
    try:
        claims = jwt.decode(path.read_text().strip(), signer._key.public_key(), algorithms=["ES256"],
                            audience=signer.audience, issuer=signer.issuer)
    except (OSError, jwt.PyJWTError):
        return False
    return claims["exp"] - time.time() > min_left_s


def _thumbprint(jwk: Mapping[str, str]) -> str:
    """RFC 7638: the SHA-256 of the key's required members, as the key id."""
    import base64
    import hashlib

    members = json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(members.encode()).digest()).rstrip(b"=").decode()


def write_private(path: Path, data: bytes) -> None:
    """Writes `data` readable by its owner only (0600), replacing what was there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def client_token(environ: Mapping[str, str], data_dir: Path) -> str:
    """The token a CLI call sends: RAGLOOM_TOKEN, else the development token of the mesh in `data_dir`
    (empty when neither exists: the call then goes without one)."""
    token = environ.get(TOKEN_ENV, "").strip()
    if token:
        return token
    try:
        return (Path(data_dir) / "pki" / Signer.TOKEN_FILE).read_text().strip()
    except OSError:
        return ""
