"""Starts the real mesh (embedder, 2 indexer shards, generator, router) as processes on free loopback ports."""

import pytest

from tests.support.mesh import LocalMesh


@pytest.fixture(scope="session")
def mesh(tmp_path_factory):
    with LocalMesh(tmp_path_factory.mktemp("mesh")) as m:
        yield m
