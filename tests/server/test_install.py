"""A server-only install, as a device does it: the wheel and its base dependencies from a wheelhouse,
no extras, no checkout. It serves the shipped model from site-packages, answers health and classify,
has neither torch nor onnx, and exits 0 on SIGTERM.

The wheelhouse is MNIST_EDGE_WHEELHOUSE or `<repo>/wheelhouse`, built from the repository root with
`pip wheel --wheel-dir wheelhouse .` (scripts/test does it). Nothing is fetched from an index.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers.servers import REPO

pytestmark = pytest.mark.full_setup  # needs what scripts/test (not --quick) sets up

SETUP = "python -m pip wheel --wheel-dir wheelhouse .   (from the repository root)"
INSTALL_TIMEOUT = 600


def wheelhouse() -> Path:
    configured = os.environ.get("MNIST_EDGE_WHEELHOUSE")
    path = Path(configured) if configured else REPO / "wheelhouse"
    if configured and not path.is_dir():
        pytest.fail(f"MNIST_EDGE_WHEELHOUSE={configured} is not a directory; build it with: {SETUP}")
    if path.is_dir() and any(path.glob("mnist_edge-*.whl")):
        return path
    message = f"no wheelhouse with the mnist-edge wheel at {path}; set MNIST_EDGE_WHEELHOUSE or build it with: {SETUP}"
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(message)
    pytest.skip(message)


def base_python() -> str:
    """The interpreter this test's venv was made from (not the venv's own python)."""
    candidate = getattr(sys, "_base_executable", None)
    if candidate and Path(candidate).exists() and Path(candidate).resolve() != Path(sys.executable).resolve():
        return candidate
    venv_bin = Path(sys.prefix) / "bin"
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p) != venv_bin)
    found = shutil.which("python3", path=path)
    if not found:
        pytest.fail("no base python3 found to create a fresh virtual environment with")
    return found


def clean_env() -> dict[str, str]:
    """No PYTHONPATH, no active venv, no project or pip configuration leaking in."""
    drop = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONUSERBASE")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("PIP_", "MNIST_EDGE_"))}
    venv_bin = str(Path(sys.prefix) / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env["PIP_CONFIG_FILE"] = os.devnull  # only the wheelhouse: no configured find-links or indexes
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PYTHONNOUSERSITE"] = "1"
    return env


def run(cmd: list[str], cwd: Path, timeout: float, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with `pip install --no-index --find-links WHEELHOUSE mnist-edge` (no extras)."""
    wheels = wheelhouse()
    root = tmp_path_factory.mktemp("install")
    venv = root / "v"
    proc = run([base_python(), "-m", "venv", venv], cwd=root, timeout=180)
    assert proc.returncode == 0, proc.stderr
    proc = run(
        [venv / "bin" / "pip", "install", "--no-index", "--find-links", wheels, "mnist-edge"],
        cwd=root,
        timeout=INSTALL_TIMEOUT,
    )
    assert proc.returncode == 0, f"server-only install failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return venv


def test_no_training_dependencies_are_installed(installed):
    py = installed / "bin" / "python"
    for module in ("torch", "onnx", "onnxscript", "tqdm"):
        proc = run([py, "-c", f"import {module}"], cwd=installed.parent, timeout=60)
        assert proc.returncode != 0, f"{module} is importable in a server-only install"
        assert f"No module named '{module}'" in proc.stderr
    proc = run([py, "-c", "import onnxruntime, grpc, numpy, PIL; print('ok')"], cwd=installed.parent, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.fixture(scope="module")
def where(installed) -> dict:
    """Where the installed interpreter finds the code and the shipped model."""
    code = (
        "import json; from mnist_edge import server, client, imaging, protos; from mnist_edge.server import model_store; "
        "print(json.dumps({'modules': [m.__file__ for m in (server, client, imaging, protos)], "
        "'manifest': str(model_store.resolve_manifest(None))}))"
    )
    proc = run([installed / "bin" / "python", "-c", code], cwd=installed.parent, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


GENERIC_NAMES = ("server", "client", "training", "export", "imaging", "protos", "bench", "models")


def test_one_import_package_and_the_public_client_api(installed):
    """site-packages gains mnist_edge alone: no generic top-level names another distribution could
    overwrite, and the documented client import and module entry point work."""
    py = installed / "bin" / "python"
    code = (
        "import importlib.util, json; from mnist_edge.client import DigitClient; "
        f"print(json.dumps([n for n in {GENERIC_NAMES!r} if importlib.util.find_spec(n)]))"
    )
    proc = run([py, "-c", code], cwd=installed.parent, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
    proc = run([py, "-m", "mnist_edge", "--help"], cwd=installed.parent, timeout=60)
    assert proc.returncode == 0 and "serve" in proc.stdout, proc.stderr


def test_the_field_loop_tools_work_without_extras(installed, tmp_path):
    """Labelling and purging captures happen on the device: the server-only install has them."""
    bin_ = installed / "bin"
    proc = run([bin_ / "mnist-edge", "label", "--help"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 0 and "labels.csv" in proc.stdout, proc.stderr
    proc = run([bin_ / "mnist-edge", "label", str(tmp_path)], cwd=tmp_path, timeout=60)
    assert proc.returncode == 0 and "nothing to label" in proc.stdout, proc.stderr
    proc = run([bin_ / "mnist-edge", "captures", "purge", str(tmp_path)], cwd=tmp_path, timeout=60)
    assert proc.returncode == 0 and "deleted 0 captures" in proc.stdout, proc.stderr


def test_the_code_and_the_model_come_from_site_packages(installed, where):
    venv = installed.resolve()
    for f in where["modules"]:
        assert Path(f).resolve().is_relative_to(venv) and "site-packages" in f, f
    manifest = Path(where["manifest"]).resolve()
    assert manifest.is_relative_to(venv) and manifest.parts[-3:] == ("mnist_edge", "models", "manifest.json"), manifest
    shipped = json.loads(manifest.read_text())
    for entry in shipped["models"].values():
        assert (manifest.parent / entry["file"]).is_file(), entry["file"]
    # the wheel carries the checkout's model (if not, the wheelhouse is stale: rebuild it)
    assert manifest.read_bytes() == (REPO / "models" / "manifest.json").read_bytes(), f"stale wheelhouse? {SETUP}"
    # ... and nothing else: no model files of earlier builds (setuptools' build/ keeps them)
    installed_files = sorted(p.name for p in manifest.parent.iterdir() if p.is_file() and p.name != "__init__.py")
    expected = sorted({"manifest.json", *(e["file"] for e in shipped["models"].values())} | ({"manifest.json.sig"} if (REPO / "models" / "manifest.json.sig").exists() else set()))
    assert installed_files == expected, f"the installed models/ differs from the manifest: {installed_files}; rebuild with `rm -rf build wheelhouse`"


def _digit_png(image: np.ndarray) -> bytes:
    """An MNIST test digit as a camera might give it: 4x larger, dark ink on white."""
    from PIL import Image

    big = Image.fromarray(255 - image).resize((112, 112), Image.BILINEAR)
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    return buf.getvalue()


def _poll(predicate, timeout: float, interval: float = 0.1, attempts: int = 10_000):
    end = time.monotonic() + timeout
    for _ in range(attempts):
        value = predicate()
        if value or time.monotonic() > end:
            return value
        time.sleep(interval)
    return predicate()


def test_installed_server_serves_health_and_classify_then_exits_zero_on_sigterm(installed, where, mnist, tmp_path):
    from helpers.servers import ort_reference
    from mnist_edge.imaging.normalize import normalize_encoded

    bin_ = installed / "bin"
    manifest = json.loads(Path(where["manifest"]).read_text())  # the installed copy, in site-packages
    shipped = manifest["models"][manifest["default"]]
    assert manifest["default"] == "int8" and shipped["precision"] == "int8"

    # the digit, and what the same pipeline gives in this process
    index = 0
    label = int(mnist.test.labels[index])
    png = tmp_path / "digit.png"
    png.write_bytes(_digit_png(mnist.test.images[index]))
    model_file = Path(where["manifest"]).parent / shipped["file"]  # the same bytes the installed server loads
    expected = int(ort_reference(model_file, normalize_encoded(png.read_bytes())[None])[1][0])
    assert expected == label

    port_file = tmp_path / "port"
    out = open(tmp_path / "serve.out", "w")
    err = open(tmp_path / "serve.err", "w")
    proc = subprocess.Popen(
        [str(bin_ / "mnist-edge"), "serve", "--address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0", "--port-file", str(port_file), "--log-format", "json"],
        cwd=tmp_path,  # outside the checkout: the repository is not importable from here
        env=clean_env(),
        stdout=out,
        stderr=err,
    )
    try:
        assert _poll(lambda: port_file.exists() or proc.poll() is not None, timeout=60), "no port file within 60s"
        assert proc.poll() is None, (tmp_path / "serve.err").read_text()
        address = port_file.read_text().strip()
        assert address.startswith("127.0.0.1:") and not address.endswith(":0")

        def healthy() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"server exited {proc.returncode}: {(tmp_path / 'serve.err').read_text()}")
            return run([bin_ / "mnist-edge", "health", "--target", address, "--timeout", "2"], cwd=tmp_path, timeout=30).returncode == 0

        assert _poll(healthy, timeout=90, interval=0.2, attempts=400), "never SERVING within 90s"
        health = run([bin_ / "mnist-edge", "health", "--target", address], cwd=tmp_path, timeout=30)
        assert health.returncode == 0 and health.stdout.strip() == "SERVING", health.stderr

        classify = run([bin_ / "mnist-edge", "classify", "--target", address, png.name], cwd=tmp_path, timeout=60)
        assert classify.returncode == 0, classify.stderr
        first = classify.stdout.splitlines()[0]
        assert first.startswith(f"digit.png: {label} ("), classify.stdout
        shipped_version = json.loads((REPO / "models" / "manifest.json").read_text())["version"]
        assert f"1 images classified by model mnist v{shipped_version} (int8)" in classify.stdout

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        out.close()
        err.close()

    events = [json.loads(line) for line in (tmp_path / "serve.err").read_text().splitlines() if line.startswith("{")]
    serving = [e for e in events if e.get("event") == "serving"]
    assert len(serving) == 1, events
    assert serving[0]["msg"] == f"serving on {address}"
    assert serving[0]["sha256"] == shipped["sha256"]
    assert serving[0]["precision"] == "int8" and serving[0]["version"] == manifest["version"]
    assert [e["event"] for e in events][-1] == "stopped"
