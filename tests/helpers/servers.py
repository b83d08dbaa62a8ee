"""Helpers for tests that run real servers on port 0, built by the same factory production uses."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from mnist_edge.server.app import App
from mnist_edge.server.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def make_settings(**overrides) -> Settings:
    base = dict(address="127.0.0.1:0", metrics_address="127.0.0.1:0", log_format="text", log_level="warning")
    base.update(overrides)
    return Settings(**base).validate()


@contextlib.contextmanager
def running_server(loader=None, background_load: bool = False, **overrides):
    app = App(make_settings(**overrides), loader)
    app.start(background_load=background_load)
    try:
        yield app
    finally:
        if not app.stopped.is_set():
            app.settings = app.settings.replace(grace_s=1.0, drain_delay_s=0.0)
            app.shutdown("test teardown")


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.02):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def start_cli_server(tmp_path: Path, *args: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`mnist-edge serve` as a subprocess; returns (process, address read from --port-file)."""
    port_file = tmp_path / f"port-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "mnist_edge", "serve", "--address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0", "--port-file", str(port_file), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    try:
        wait_for(lambda: port_file.exists() or proc.poll() is not None, timeout=60)
    except AssertionError:
        proc.kill()
        raise
    if proc.poll() is not None:
        out, err = proc.communicate()
        raise AssertionError(f"server exited with {proc.returncode}: {err}")
    return proc, port_file.read_text().strip()


def stop_cli_server(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Teardown for a CLI server: SIGTERM, and a kill if it has not exited within `timeout` s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def json_log(proc: subprocess.Popen) -> list[dict]:
    """The JSON log lines (`--log-format json`) a stopped CLI server wrote to stderr."""
    return [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]


def health_status(address: str, service: str = "") -> str:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        except grpc.RpcError as exc:
            return f"error:{exc.code().name}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def ort_reference(model_file: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from mnist_edge.server.runner import ModelRunner

    runner = ModelRunner(model_file.read_bytes())
    probs, digits = [], []
    for i in range(0, len(images), 1000):
        p, d = runner.run(np.ascontiguousarray(images[i : i + 1000]))
        probs.append(p)
        digits.append(d)
    return np.concatenate(probs), np.concatenate(digits)


def channel_per_worker(address: str, workers: int, metadata=(), attempts: int = 60) -> list[grpc.Channel]:
    """One channel (connection) to each worker process behind `address`: SO_REUSEPORT gives each
    new connection to one worker, so new connections are opened (each with a subchannel of its
    own) until every worker's pid (ServerMetadata's mnist-edge-pid trailer) has been seen."""
    from mnist_edge.protos.inference import grpc_service_pb2 as pb
    from mnist_edge.protos.inference import grpc_service_pb2_grpc as pb_grpc

    found: dict[int, grpc.Channel] = {}
    for _ in range(attempts):
        ch = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        _, call = pb_grpc.GRPCInferenceServiceStub(ch).ServerMetadata.with_call(pb.ServerMetadataRequest(), timeout=10, metadata=list(metadata))
        pid = int(dict(call.trailing_metadata())["mnist-edge-pid"])
        if pid in found:
            ch.close()
        else:
            found[pid] = ch
        if len(found) == workers:
            break
    else:
        raise AssertionError(f"reached {len(found)} of {workers} workers in {attempts} connections")
    # A worker answers before its model is loaded and verified: wait until each one is ready.
    stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in found.values()]
    wait_for(lambda: all(s.ServerReady(pb.ServerReadyRequest(), timeout=10, metadata=list(metadata)).ready for s in stubs),
             timeout=60, interval=0.1)
    return list(found.values())
