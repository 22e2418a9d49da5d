"""The local issuer: a key made once, its JWKS, tokens for a tenant, and the CLI that mints and sends them."""

import json
import time

import jwt
import pytest

from mesh import cli
from mesh.auth import AUDIENCE, ISSUER, Signer, check_tenant, client_token, parse_ttl


def test_tokens_carry_the_tenant_and_scopes_and_verify_with_the_jwks(tmp_path):
    signer = Signer(tmp_path)
    keys = jwt.PyJWKSet.from_dict(json.loads(signer.jwks_path.read_text()))
    token = signer.mint("alice", ttl_s=60)
    key = keys[jwt.get_unverified_header(token)["kid"]].key
    claims = jwt.decode(token, key, algorithms=["ES256"], audience=AUDIENCE, issuer=ISSUER)
    assert claims["tenant"] == "alice" and claims["scope"].split() == ["read", "write"]
    assert 55 <= claims["exp"] - time.time() <= 61
    reader = jwt.decode(signer.mint("alice", read_only=True), key, algorithms=["ES256"], audience=AUDIENCE)
    assert reader["scope"] == "read"
    # the key is made once: a second signer over the folder signs what the first one's JWKS verifies
    again = Signer(tmp_path)
    assert again.kid == signer.kid
    jwt.decode(again.mint("bob"), key, algorithms=["ES256"], audience=AUDIENCE)


def test_bad_tenant_names_and_lifetimes_are_refused():
    for name in ("", "-x", "a b", "x" * 65, "../etc"):
        with pytest.raises(ValueError):
            check_tenant(name)
    assert parse_ttl("90s") == 90 and parse_ttl("2h") == 7200 and parse_ttl("30d") == 30 * 86400
    for text in ("", "1", "0h", "1w", "-1h"):
        with pytest.raises(ValueError):
            parse_ttl(text)


def test_the_cli_sends_ragloom_token_else_the_development_token(tmp_path):
    assert client_token({}, tmp_path) == ""
    signer = Signer(tmp_path / "pki")
    path = signer.write_development_token()
    assert path.stat().st_mode & 0o777 == 0o600
    assert client_token({}, tmp_path) == path.read_text().strip()
    assert client_token({"RAGLOOM_TOKEN": "abc"}, tmp_path) == "abc"


def test_ragloom_token_mints_for_a_tenant(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["token", "--tenant", "alice", "--data-dir", str(tmp_path)])
    assert exit_.value.code == 2 and "ragloom up" in capsys.readouterr().err  # no key yet
    Signer(tmp_path / "pki")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["token", "--tenant", "alice", "--ttl", "15m", "--read-only", "--data-dir", str(tmp_path)])
    assert exit_.value.code == 0
    claims = jwt.decode(capsys.readouterr().out.strip(), options={"verify_signature": False})
    assert claims["tenant"] == "alice" and claims["scope"] == "read" and claims["exp"] - claims["iat"] == 900
    with pytest.raises(SystemExit) as exit_:
        cli.main(["token", "--tenant", "no way", "--data-dir", str(tmp_path)])
    assert exit_.value.code == 2 and "tenant" in capsys.readouterr().err
