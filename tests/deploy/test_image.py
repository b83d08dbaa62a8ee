"""The container image, built and run for real: deploy/build-image.sh with podman (a debootstrap
base cached in ~/.cache/mnist-edge/image, a host wheelhouse, no network in the build), then the
image under runc with host networking, a read-only root and a tmpfs /tmp.

Checks: the image size (`podman image inspect` .Size <= 400,000,000 bytes), its labels, user and
HEALTHCHECK; the server reaching SERVING on the MNIST_EDGE_ADDRESS given with -e, classifying the
whole MNIST test set with the same digits as the shipped model on the host, running as the
non-root user as PID 1; the HEALTHCHECK (bash, no Python) answering healthy; `podman stop -t 15`
ending it with exit code 0 well inside the 15 s.

Needs root, podman, runc and debootstrap (scripts/test installs them and sets
MNIST_EDGE_REQUIRE_IMAGE=1, which turns a skip into a failure). The first build runs
debootstrap (~2-3 minutes); later ones reuse the base image or its cached tar.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from helpers.servers import health_status, ort_reference, wait_for
from mnist_edge.protos.inference import grpc_service_pb2 as pb
from mnist_edge.protos.inference import grpc_service_pb2_grpc as pb_grpc
from mnist_edge.server import model_store

REPO = Path(__file__).resolve().parents[2]
TAG = "localhost/mnist-edge:latest"
SIZE_LIMIT = 400_000_000
UID = 10001

pytestmark = [pytest.mark.slow, pytest.mark.full_setup]  # podman, runc, debootstrap: scripts/test (not --quick) installs them


def _env() -> dict[str, str]:
    # The project's containers.conf: runc may not raise RLIMIT_NOFILE on such hosts.
    return {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(REPO / "deploy" / "containers.conf"))}


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", "--runtime", "runc", *args], check=False, capture_output=True, text=True, env=_env(), timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited with {result.returncode}: {result.stderr[-2000:]}")
    return result


@pytest.fixture(scope="module")
def image() -> dict:
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    reason = None
    if missing:
        reason = f"missing {', '.join(missing)}: apt-get install podman runc debootstrap"
    elif os.geteuid() != 0:
        reason = "building the base image needs root (debootstrap)"
    if reason:
        if os.environ.get("MNIST_EDGE_REQUIRE_IMAGE") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    started = time.monotonic()
    build = subprocess.run([str(REPO / "deploy" / "build-image.sh"), TAG], check=False, capture_output=True, text=True, env=_env(), timeout=15 * 60)
    assert build.returncode == 0, f"deploy/build-image.sh failed:\n{build.stderr[-4000:]}"
    print(f"deploy/build-image.sh: {time.monotonic() - started:.0f} s")
    return json.loads(podman("image", "inspect", TAG).stdout)[0]


def test_image_is_small_labelled_non_root_and_keeps_its_healthcheck(image):
    size = int(podman("image", "inspect", "--format", "{{.Size}}", TAG).stdout)
    print(f".Size {size:,} bytes")
    assert size <= SIZE_LIMIT, f"the image is {size:,} bytes; the limit is {SIZE_LIMIT:,}"
    config = image["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Cmd"] == ["mnist-edge", "serve"] and not config.get("Entrypoint")
    labels = config["Labels"]
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], check=False, capture_output=True, text=True).stdout.strip()
    if head:
        assert labels["org.opencontainers.image.revision"].startswith(head)
    assert labels["org.opencontainers.image.source"] not in ("", "unknown")
    # Kept only in the docker format; the check itself is a bash script, not Python.
    assert image["Healthcheck"]["Test"] == ["CMD", "/usr/local/bin/mnist-edge-healthcheck"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _classify(address: str, images: np.ndarray) -> np.ndarray:
    digits = []
    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        for i in range(0, len(images), 1000):
            chunk = np.ascontiguousarray(images[i : i + 1000])
            req = pb.ModelInferRequest(
                model_name="mnist", inputs=[pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=list(chunk.shape))],
                raw_input_contents=[chunk.tobytes()], outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="digit")],
            )
            resp = stub.ModelInfer(req, timeout=60)
            digits.append(np.frombuffer(resp.raw_output_contents[0], dtype=np.int64))
    return np.concatenate(digits)


def test_image_serves_classifies_and_stops_with_exit_code_0(image, mnist):
    port = _free_port()
    address = f"127.0.0.1:{port}"
    name = f"mnist-edge-test-{os.getpid()}-{port}"
    podman("run", "-d", "--name", name, "--network=host", "--read-only", "--tmpfs", "/tmp",
           "-e", f"MNIST_EDGE_ADDRESS={address}", "-e", "MNIST_EDGE_METRICS_ADDRESS=", TAG)
    try:
        wait_for(lambda: health_status(address) == "SERVING", timeout=90, interval=0.2)
        pid = podman("inspect", "--format", "{{.State.Pid}}", name).stdout.strip()
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
        assert status["Uid"].split() == [str(UID)] * 4, f"the server runs as {status['Uid']}"
        assert status["NSpid"].split()[-1] == "1", "the server is not PID 1 in the container"
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[-3:-1] == [b"/opt/mnist-edge/venv/bin/mnist-edge", b"serve"]

        # The whole test set: the same digits as the shipped model run on the host.
        digits = _classify(address, mnist.test.images)
        manifest = model_store.resolve_manifest(None)
        entry = json.loads(manifest.read_text())["models"]["int8"]
        _, expected = ort_reference(manifest.parent / entry["file"], mnist.test.images)
        assert np.array_equal(digits, expected)
        accuracy = float(np.mean(digits == mnist.test.labels))
        assert abs(accuracy - entry["accuracy"]) < 0.0005, f"accuracy {accuracy:.4f} in the container; the manifest says {entry['accuracy']}"

        check = podman("healthcheck", "run", name, check=False)
        assert check.returncode == 0, f"HEALTHCHECK failed: {check.stdout} {check.stderr}"

        started = time.monotonic()
        podman("stop", "-t", "15", name, timeout=60)
        stop_s = time.monotonic() - started
        state = json.loads(podman("inspect", name).stdout)[0]["State"]
        assert state["ExitCode"] == 0, f"exit code {state['ExitCode']} after podman stop"
        assert stop_s < 12, f"podman stop took {stop_s:.1f} s: the server did not exit on SIGTERM"
        logs = podman("logs", name).stderr + podman("logs", name).stdout
        events = [json.loads(line)["event"] for line in logs.splitlines() if line.startswith("{")]
        assert events[-1] == "stopped" and "draining" in events
    finally:
        podman("rm", "-f", name, check=False)
