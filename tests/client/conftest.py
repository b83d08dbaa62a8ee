"""Fixtures for the client tests: a real server on port 0, built by the same factory production uses."""

from __future__ import annotations

import pytest

from helpers.servers import running_server


@pytest.fixture(scope="module")
def server():
    with running_server() as app:
        yield app
