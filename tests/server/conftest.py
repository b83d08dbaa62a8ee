"""Fixtures: real servers on port 0, built by the same factory production uses."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from helpers.servers import running_server
from mnist_edge.server import model_store


@pytest.fixture(scope="session")
def shipped_manifest() -> Path:
    return model_store.resolve_manifest(None)


@pytest.fixture(scope="session")
def shipped_model(shipped_manifest):
    return model_store.load(shipped_manifest)


@pytest.fixture(scope="module")
def server():
    with running_server() as app:
        yield app


@pytest.fixture(scope="module")
def channel(server):
    ch = grpc.insecure_channel(server.address)
    grpc.channel_ready_future(ch).result(timeout=10)
    yield ch
    ch.close()
