"""Operator-facing behaviour of `mnist-edge serve` as a process: systemd notifications (sd_notify
over $NOTIFY_SOCKET), the warning for a misspelt MNIST_EDGE_* variable, and bearer-token
rotation on SIGHUP. Each test runs the real command line on port 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import grpc
import numpy as np
import pytest

from helpers.servers import (
    channel_per_worker,
    health_status,
    json_log,
    start_cli_server,
    wait_for,
)
from mnist_edge.protos.inference import grpc_service_pb2 as pb
from mnist_edge.protos.inference import grpc_service_pb2_grpc as pb_grpc
from mnist_edge.server import sd_notify
from mnist_edge.server import settings as settings_mod


class NotifySocket:
    """What systemd does for Type=notify: a datagram socket whose messages are recorded with
    the time they arrived and the server's readiness at that moment."""

    def __init__(self, path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self.address: str | None = None
        self.health_at_ready: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            for line in data.decode().splitlines():
                if line == "READY=1" and self.address:
                    self.health_at_ready = health_status(self.address)
                self.messages.append((now, line))

    def lines(self, key: str) -> list[float]:
        return [t for t, line in self.messages if line == key]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_sd_notify_ready_watchdog_stopping(tmp_path, workers):
    notify = NotifySocket(tmp_path / "notify")
    # A known port, so the reader can probe health the moment READY=1 arrives.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        notify.address = f"127.0.0.1:{s.getsockname()[1]}"
    env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"}
    proc, _ = start_cli_server(tmp_path, "--address", notify.address, "--workers", str(workers), "--log-format", "json", env=env)
    try:
        wait_for(lambda: notify.lines("READY=1"), timeout=60)
        # READY=1 came no earlier than readiness: health said SERVING when it arrived.
        assert notify.health_at_ready == "SERVING"
        ready_at = notify.lines("READY=1")[0]
        time.sleep(2.5)
        beats = [t for t in notify.lines("WATCHDOG=1") if ready_at <= t <= ready_at + 2.5]
        assert len(beats) >= 2, f"{len(beats)} WATCHDOG=1 in 2.5 s with WATCHDOG_USEC=1000000: {notify.messages}"
        assert not notify.lines("STOPPING=1")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        wait_for(lambda: notify.lines("STOPPING=1"), timeout=5)
        assert len(notify.lines("READY=1")) == 1
        assert any(line.startswith("STATUS=serving") for _, line in notify.messages)
    finally:
        if proc.poll() is None:
            proc.kill()
        notify.close()


def test_notifier_without_systemd_does_nothing_and_clears_the_environment():
    env = {"NOTIFY_SOCKET": "@abstract-name", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1", "OTHER": "x"}
    n = sd_notify.Notifier.from_environment(env)
    # The watchdog was meant for pid 1, not this process; the variables leave the environment.
    assert n.enabled and n.address == "\0abstract-name" and n.watchdog_interval_s is None
    assert env == {"OTHER": "x"}
    none = sd_notify.Notifier.from_environment({"WATCHDOG_USEC": "1000000"})
    assert not none.enabled and none.watchdog_interval_s is None and none.send("READY=1") is False


def test_a_misspelt_setting_is_named_with_the_closest_known_name(tmp_path):
    env = {"MNIST_EDGE_MAX_BATCH_SIZ": "8", "MNIST_EDGE_DATA_DIR": "/srv/mnist", "MNIST_EDGE_SERVICE_HOST": "10.0.0.1",
           "MNIST_EDGE_PORT_50051_TCP_ADDR": "10.0.0.1"}
    proc, address = start_cli_server(tmp_path, "--log-format", "json", env=env)
    try:
        wait_for(lambda: health_status(address) == "SERVING", timeout=60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = json_log(proc)
    warnings = [e for e in log if e["event"] == "unknown_setting"]
    assert [(e["variable"], e["closest"], e["level"]) for e in warnings] == [("MNIST_EDGE_MAX_BATCH_SIZ", "MNIST_EDGE_MAX_BATCH_SIZE", "warning")]
    assert "MNIST_EDGE_MAX_BATCH_SIZ" in warnings[0]["msg"] and "MNIST_EDGE_MAX_BATCH_SIZE" in warnings[0]["msg"]
    # Data folders, Kubernetes service links and the flags themselves are not warned about.
    assert settings_mod.unknown_env({"MNIST_EDGE_GRACE_S": "1", "MNIST_EDGE_CACHE_DIR": "x", "MNIST_EDGE_METRICS_SERVICE_PORT": "9464",
                                     "MNIST_EDGE_TOTALLY_UNKNOWN": "1", "PATH": "/bin"}) == [("MNIST_EDGE_TOTALLY_UNKNOWN", None)]


def test_empty_metrics_address_in_the_environment_turns_metrics_off():
    assert settings_mod.from_args([], env={"MNIST_EDGE_METRICS_ADDRESS": ""}).metrics_address == ""
    assert settings_mod.from_args([], env={}).metrics_address == "127.0.0.1:9464"


def _metadata_call(ch: grpc.Channel, token: bytes) -> grpc.StatusCode:
    try:
        pb_grpc.GRPCInferenceServiceStub(ch).ModelMetadata(pb.ModelMetadataRequest(name="mnist"), timeout=10,
                                                           metadata=[("authorization", "Bearer " + token.decode())])
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


def _infer_call(ch: grpc.Channel, token: bytes) -> grpc.StatusCode:
    req = pb.ModelInferRequest(model_name="mnist", inputs=[pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=[1, 28, 28])],
                               raw_input_contents=[np.zeros((1, 28, 28), np.uint8).tobytes()])
    try:
        pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=10, metadata=[("authorization", "Bearer " + token.decode())])
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_rotates_the_bearer_token(tmp_path, workers):
    old, new = os.urandom(24).hex().encode(), os.urandom(24).hex().encode()
    token_file = tmp_path / "token"
    token_file.write_bytes(old + b"\n")
    proc, address = start_cli_server(tmp_path, "--token-file", str(token_file), "--workers", str(workers), "--log-format", "json")
    try:
        wait_for(lambda: health_status(address) == "SERVING", timeout=60)
        channels = channel_per_worker(address, workers, metadata=[("authorization", "Bearer " + old.decode())])  # one per worker
        for ch in channels:
            assert _metadata_call(ch, old) == grpc.StatusCode.OK and _infer_call(ch, old) == grpc.StatusCode.OK
            assert _metadata_call(ch, new) == grpc.StatusCode.UNAUTHENTICATED
        tmp = tmp_path / "token.new"
        tmp.write_bytes(new + b"\n")
        os.replace(tmp, token_file)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: all(_metadata_call(ch, new) == grpc.StatusCode.OK for ch in channels), timeout=20)
        for ch in channels:  # every worker
            assert _metadata_call(ch, new) == grpc.StatusCode.OK and _infer_call(ch, new) == grpc.StatusCode.OK
            assert _metadata_call(ch, old) == grpc.StatusCode.UNAUTHENTICATED
            assert _infer_call(ch, old) == grpc.StatusCode.UNAUTHENTICATED
        # A token file that became unreadable keeps the token in effect.
        token_file.write_bytes(b"short")
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert all(_metadata_call(ch, new) == grpc.StatusCode.OK for ch in channels)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    log = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    events = [e["event"] for e in log]
    assert events.count("token_rotated") == workers and events.count("token_refused") == workers
    assert old.decode() not in err and new.decode() not in err, "a token appeared in the log"


def test_every_variable_the_repository_reads_is_a_setting_or_listed_as_not_one():
    """A new MNIST_EDGE_* variable (a test's, a tool's) must join settings.NOT_FLAGS and the docs'
    list, or every server started with it set would warn about it."""
    import dataclasses
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    flags = {settings_mod.env_name(f.name) for f in dataclasses.fields(settings_mod.Settings)}
    examples = {"MNIST_EDGE_MAX_BATCH_SIZ", "MNIST_EDGE_TOTALLY_UNKNOWN", "MNIST_EDGE_SOME_NAME", "MNIST_EDGE_SERVICE_HOST",
                "MNIST_EDGE_PORT_50051_TCP_ADDR", "MNIST_EDGE_METRICS_SERVICE_PORT"}  # in the tests and docs on purpose
    used = set()
    for folder in ("server", "client", "training", "export", "bench", "tools", "tests", "scripts", "deploy"):
        for path in (repo / folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".sh", "") and "__pycache__" not in path.parts:
                used |= set(re.findall(r"MNIST_EDGE_[A-Z0-9_]*[A-Z0-9]", path.read_text(errors="replace")))
    unknown = sorted(used - flags - settings_mod.NOT_FLAGS - examples)
    assert not unknown, f"read somewhere but neither a flag nor in settings.NOT_FLAGS: {unknown}"
    docs = (repo / "docs" / "operating.md").read_text()
    assert [n for n in sorted(settings_mod.NOT_FLAGS) if f"`{n}`" not in docs] == []
