"""--workers N: several processes answer on one port; a dead worker is restarted; SIGTERM drains all."""

from __future__ import annotations

import json
import os
import signal
import urllib.request

import grpc
import pytest

from helpers.servers import health_status, start_cli_server, wait_for
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc


def answering_pid(address: str) -> int:
    # A channel of its own (local subchannel pool): a new connection, so SO_REUSEPORT may pick another worker.
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        _, call = pb_grpc.GRPCInferenceServiceStub(ch).ServerMetadata.with_call(pb.ServerMetadataRequest(), timeout=10)
        return int(dict(call.trailing_metadata())["mnist-edge-pid"])


def infer_ok(address: str, images) -> bool:
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        req = pb.ModelInferRequest(model_name="mnist", inputs=[pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=[len(images), 28, 28])], raw_input_contents=[images.tobytes()])
        return len(pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=10).raw_output_contents) == 2


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def two_workers(tmp_path):
    metrics = f"127.0.0.1:{free_port()}"
    proc, address = start_cli_server(tmp_path, "--workers", "2", "--log-format", "json", "--metrics-address", metrics)
    proc.metrics = metrics
    try:
        wait_for(lambda: health_status(address) == "SERVING", timeout=90)
        yield proc, address
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except Exception:
                proc.kill()


def test_more_than_one_worker_pid_answers(two_workers, mnist):
    proc, address = two_workers
    pids = set()
    for _ in range(60):
        pids.add(answering_pid(address))
        if len(pids) > 1:
            break
    assert len(pids) >= 2, pids
    assert proc.pid not in pids  # the parent does not serve; its workers do
    assert infer_ok(address, mnist.test.images[:3])


def test_a_dead_worker_is_restarted(two_workers, mnist):
    proc, address = two_workers
    pids = set()
    for _ in range(60):
        pids.add(answering_pid(address))
        if len(pids) > 1:
            break
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    # the parent notices, restarts it, and two distinct live workers answer again
    def two_live_workers():
        seen = set()
        for _ in range(30):
            try:
                seen.add(answering_pid(address))
            except grpc.RpcError:
                # a connection that was queued on the killed worker's socket is reset; clients retry
                continue
        return len(seen - {victim}) >= 2
    wait_for(two_live_workers, timeout=60, interval=0.2)
    assert infer_ok(address, mnist.test.images[:2])


def test_sigterm_reaches_every_worker_and_each_drains(two_workers):
    proc, address = two_workers
    pids = set()
    for _ in range(60):
        pids.add(answering_pid(address))
        if len(pids) > 1:
            break
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    for pid in pids:
        assert not _alive(pid)
    events = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
    drained = [e for e in events if e["event"] == "stopping"]
    assert len(drained) >= 2  # each worker logged its own drain


def test_metrics_are_summed_across_workers(two_workers, mnist):
    proc, address = two_workers
    for _ in range(20):
        infer_ok(address, mnist.test.images[:1])
    text = urllib.request.urlopen(f"http://{proc.metrics}/metrics", timeout=10).read().decode()
    success = sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("mnist_edge_inference_request_success_total"))
    assert success >= 20


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_unix_socket_takes_one_worker(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "mnist_edge", "serve", "--address", f"unix:{tmp_path}/s.sock", "--workers", "2"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unix:" in out.stderr and "--workers must be 1" in out.stderr
