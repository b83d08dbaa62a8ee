"""The serving and client paths import neither torch nor onnx (docs/design.md: a device installs the
server alone), and the client never imports the v2 modules that would clash with tritonclient.

Each check runs in a fresh interpreter (this test process has imported plenty already), in the
project's own environment, where torch and onnx ARE installed: an accidental import would succeed
there, so only a clean import graph passes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from helpers.servers import REPO

# Top-level modules that must never be imported on the serving path.
HEAVY = ("torch", "onnx", "onnxscript", "tritonclient", "mnist_edge.training", "mnist_edge.export")
# The client additionally must not need onnxruntime, the server, or the v2 (`inference`) modules.
CLIENT_FORBIDDEN = (*HEAVY, "onnxruntime", "mnist_edge.server", "mnist_edge.protos.inference")

REPORT = textwrap.dedent(
    """
    def _forbidden(names):
        import sys
        found = set()
        for mod in list(sys.modules):
            for name in names:
                if mod == name or mod.startswith(name + "."):
                    found.add(name)
        return sorted(found)
    """
)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_EDGE_") and k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REPO)  # the checkout, whatever the installation mode
    return env


def run_python(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args, "-c", code] if code else [sys.executable, *args],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def last_json(proc: subprocess.CompletedProcess):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_checks_can_see_a_heavy_import():
    """Control: in this environment torch and onnx are importable, and the report sees them."""
    proc = run_python(REPORT + "import json, onnx\nprint(json.dumps(_forbidden(['torch', 'onnx'])))")
    if proc.returncode != 0 and "No module named 'onnx'" in proc.stderr:
        pytest.skip("onnx is not installed here (no train extra); the import checks below still run")
    assert last_json(proc) == ["onnx"]


def test_a_running_server_imports_neither_torch_nor_onnx():
    code = REPORT + textwrap.dedent(
        f"""
        import json, time
        from mnist_edge.server import settings
        from mnist_edge.server.app import App
        from mnist_edge.server.core import State

        s = settings.from_args(["--address", "127.0.0.1:0", "--log-level", "warning"], env={{}})
        app = App(s).start()
        deadline = time.monotonic() + 60
        while app.core.state is not State.SERVING and time.monotonic() < deadline:
            if app.core.state is State.FAILED:
                raise SystemExit("model failed: " + str(app.core.failure))
            time.sleep(0.01)
        assert app.core.state is State.SERVING, app.core.state
        assert app.core.model is not None
        # one real call through the batcher and the runner, so the whole serving path is imported
        import numpy as np
        probs, digits, *_ = app.core.classify(np.zeros((1, 28, 28), dtype=np.uint8), 10.0)
        assert probs.shape == (1, 10)
        found = _forbidden({list(HEAVY)!r})
        app.settings = app.settings.replace(grace_s=1.0)
        app.shutdown("test")
        print(json.dumps({{"forbidden": found, "serving": True}}))
        """
    )
    report = last_json(run_python(code))
    assert report == {"forbidden": [], "serving": True}


def test_the_server_cli_module_imports_neither_torch_nor_onnx():
    code = REPORT + f"import json, mnist_edge.server.cli, mnist_edge.server.app, mnist_edge.server.v2, mnist_edge.server.native\nprint(json.dumps(_forbidden({list(HEAVY)!r})))"
    assert last_json(run_python(code)) == []


def test_the_client_library_and_commands_import_only_what_a_client_needs():
    code = REPORT + textwrap.dedent(
        f"""
        import json
        import mnist_edge.client as client
        import mnist_edge.client.cli, mnist_edge.client.health_cli, mnist_edge.client.client
        # the package face exports the library
        assert client.DigitClient is client.client.DigitClient and client.ClientError is client.client.ClientError
        assert client.Prediction is client.client.Prediction
        print(json.dumps(_forbidden({list(CLIENT_FORBIDDEN)!r})))
        """
    )
    assert last_json(run_python(code)) == []


def _imported_modules(importtime_stderr: str) -> set[str]:
    """Module names from `python -X importtime` output (`import time: self | cumulative | name`)."""
    names = set()
    for line in importtime_stderr.splitlines():
        m = re.match(r"import time:\s+\d+\s+\|\s+\d+\s+\|\s+(\S+)", line)
        if m:
            names.add(m.group(1))
    return names


def _top_levels(modules: set[str], names) -> list[str]:
    return sorted({n for n in names for m in modules if m == n or m.startswith(n + ".")})


@pytest.mark.parametrize(
    "argv, expected_exit, expected_text",
    [
        (["health", "--target", "127.0.0.1:1", "--timeout", "5"], 2, "UNREACHABLE"),
        (["classify", "--help"], 0, "--target"),
    ],
    ids=["health", "classify-help"],
)
def test_the_client_commands_import_neither_torch_nor_onnx(argv, expected_exit, expected_text):
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mnist_edge", *argv],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == expected_exit, proc.stderr[-2000:]
    assert expected_text in proc.stdout + proc.stderr
    modules = _imported_modules(proc.stderr)
    assert "mnist_edge.cli" in modules and "grpc" in modules  # the log really is an import log
    assert _top_levels(modules, CLIENT_FORBIDDEN) == []


def test_importing_training_and_export_packages_does_not_import_torch():
    code = REPORT + "import json, mnist_edge.training, mnist_edge.export\nprint(json.dumps(_forbidden(['torch', 'onnx', 'onnxscript', 'onnxruntime'])))"
    assert last_json(run_python(code)) == []


def test_the_importtime_check_sees_torch_when_a_command_imports_it():
    """Control for the check above: `mnist-edge train --help` does import torch, and the log shows it."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mnist_edge", "train", "--help"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode == 3:
        pytest.skip("torch is not installed here (no train extra)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch" in _top_levels(_imported_modules(proc.stderr), HEAVY)
