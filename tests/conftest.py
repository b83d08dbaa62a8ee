"""Shared fixtures. Tests use no network: MNIST comes from the cache `.ci/run` fills
(or MNIST_EDGE_DATA_DIR), loaded offline."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def mnist():
    from mnist_edge.training import data

    try:
        return data.load(offline=True)
    except data.DataError as exc:  # pragma: no cover - depends on the machine
        pytest.fail(f"MNIST is not available offline; run `mnist-edge train --smoke` or .ci/run once to fetch it.\n{exc}")
