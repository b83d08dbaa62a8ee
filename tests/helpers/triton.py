"""Where the tests find a Python with tritonclient 2.41 (it cannot share our process)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SETUP = "python3 -m venv .venv-triton && .venv-triton/bin/pip install 'tritonclient[grpc,http]==2.41.0' 'protobuf>=7.35.1,<8' numpy"


def tritonclient_python() -> Path:
    """MNIST_EDGE_TRITONCLIENT_PYTHON, else <repo>/.venv-triton; fail in CI, skip elsewhere."""
    configured = os.environ.get("MNIST_EDGE_TRITONCLIENT_PYTHON")
    if configured:
        path = Path(configured)
        if not path.exists():
            pytest.fail(f"MNIST_EDGE_TRITONCLIENT_PYTHON={configured} does not exist; set it up with: {SETUP}")
        return path
    default = REPO / ".venv-triton" / "bin" / "python"
    if default.exists():
        return default
    message = f"no Python with tritonclient 2.41: set MNIST_EDGE_TRITONCLIENT_PYTHON or, from the repository root, run: {SETUP}"
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(message)
    pytest.skip(message)
