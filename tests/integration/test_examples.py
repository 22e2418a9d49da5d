"""The TypeScript example (examples/typescript) against the real mesh, through the gateway with a minted
token: it ingests a text, finds it, and streams an answer citing it.

CI runs this on a clean clone, where node_modules is not there: when node and npm are, the test installs
the example's pinned dependencies itself (`npm ci`, from the committed package-lock.json, a few seconds)
and compiles it (`tsc`). Without node or npm it is skipped, saying so; so is it when npm cannot reach a
registry (an offline machine), which is no fault of the example.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from mesh.auth import Signer
from tests.support.mesh import LocalMesh

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "typescript"
#: npm's words for "could not reach the registry"
OFFLINE = ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ETIMEDOUT", "ECONNRESET", "network")


def _npm(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["npm", *args, "--prefix", str(EXAMPLE), "--no-audit", "--no-fund"], capture_output=True,
                          text=True, timeout=timeout, cwd=EXAMPLE)


@pytest.fixture(scope="module")
def example() -> Path:
    """The compiled example, its dependencies installed first when they are not."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed to run the TypeScript example (examples/typescript)")
    installed = EXAMPLE / "node_modules" / ".package-lock.json"
    lock = EXAMPLE / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        result = _npm("ci")
        if result.returncode != 0:
            if any(word in result.stderr for word in OFFLINE):
                pytest.skip(f"npm ci could not reach a registry: {result.stderr.strip()[-300:]}")
            pytest.fail(f"npm ci failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    result = _npm("run", "build")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    return EXAMPLE / "dist" / "client.js"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, example):
    with LocalMesh(tmp_path_factory.mktemp("examples"), shards=2, gateway=True, mtls=True, auth=True) as m:
        yield m


def test_the_typescript_example_ingests_searches_and_streams_an_answer(mesh, example):
    token = Signer(mesh.spec.data_dir / "pki").mint("ts-example")
    env = {**os.environ, "RAGLOOM_ROUTER": mesh.router, "RAGLOOM_TOKEN": token}
    result = subprocess.run(["node", str(example)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["ingested"] == ["typescript-example:bees"]
    assert report["hits"][0]["document_id"] == "typescript-example:bees", "the tenant sees its own document"
    assert report["coverage"]["shards_answered"] == [0, 1]
    assert report["sources"] == ["typescript-example.txt"] and report["answer"].strip()
    assert report["abstained"] or report["citations"] == [1]

    refused = subprocess.run(["node", str(example)], capture_output=True, text=True, timeout=120,
                             env={**env, "RAGLOOM_TOKEN": "not-a-token"})
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
