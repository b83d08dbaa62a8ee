"""--workers N: several processes answer on one port; a dead worker is restarted; SIGTERM drains all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request

import grpc
import numpy as np
import pytest

from helpers.models import copy_models, set_version
from helpers.servers import health_status, json_log, make_settings, start_cli_server, stop_cli_server, wait_for
from mnist_edge.protos.inference import grpc_service_pb2 as pb
from mnist_edge.protos.inference import grpc_service_pb2_grpc as pb_grpc


def answering_pid(address: str) -> int:
    # A channel of its own (local subchannel pool): a new connection, so SO_REUSEPORT may pick another worker.
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        _, call = pb_grpc.GRPCInferenceServiceStub(ch).ServerMetadata.with_call(pb.ServerMetadataRequest(), timeout=10)
        return int(dict(call.trailing_metadata())["mnist-edge-pid"])


def infer_ok(address: str, images) -> bool:
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        req = pb.ModelInferRequest(model_name="mnist", inputs=[pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=[len(images), 28, 28])], raw_input_contents=[images.tobytes()])
        return len(pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=10).raw_output_contents) == 2


def every_worker_serving(address: str, images=None) -> bool:
    """Six calls on fresh connections all answered. A worker still loading its model answers
    UNAVAILABLE "starting" (clients retry), never a wrong answer."""
    images = np.zeros((2, 28, 28), np.uint8) if images is None else images
    try:
        return all(infer_ok(address, images) for _ in range(6))
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
        return False


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
        # Health answered by one worker says nothing of the other: wait until calls on fresh
        # connections (spread over the workers by SO_REUSEPORT) all succeed.
        wait_for(lambda: every_worker_serving(address), timeout=90, interval=0.2)
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

    # The restarted worker answers health before its model is verified.
    wait_for(lambda: every_worker_serving(address, mnist.test.images[:2]), timeout=60, interval=0.2)


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
    events = json_log(proc)
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
    import sys

    out = subprocess.run([sys.executable, "-m", "mnist_edge", "serve", "--address", f"unix:{tmp_path}/s.sock", "--workers", "2"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unix:" in out.stderr and "--workers must be 1" in out.stderr


def _pid_and_version(address: str) -> tuple[int, str]:
    """One fresh connection (so SO_REUSEPORT may pick either worker): which worker, which version."""
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        _, call = stub.ServerMetadata.with_call(pb.ServerMetadataRequest(), timeout=10)
        version = list(stub.ModelMetadata(pb.ModelMetadataRequest(name="mnist"), timeout=10).versions)[0]
        return int(dict(call.trailing_metadata())["mnist-edge-pid"]), version


def _versions_by_worker(address: str, tries: int = 80) -> dict[int, set[str]]:
    seen: dict[int, set[str]] = {}
    for _ in range(tries):
        pid, version = _pid_and_version(address)
        seen.setdefault(pid, set()).add(version)
        if len(seen) >= 2 and sum(len(v) for v in seen.values()) >= 4:
            break
    return seen


def test_sighup_reloads_every_worker_or_none(tmp_path, shipped_manifest):
    models = copy_models(shipped_manifest.parent, tmp_path / "models")
    set_version(models, 1)
    proc, address = start_cli_server(tmp_path, "--workers", "2", "--model", str(models))
    try:
        wait_for(lambda: health_status(address) == "SERVING", timeout=90)
        set_version(models, 2)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: all(v == {"2"} for v in _versions_by_worker(address, 10).values()), timeout=60)
        seen = _versions_by_worker(address)
        assert len(seen) == 2 and all(v == {"2"} for v in seen.values()), seen  # both workers swapped

        # A damaged model file under a new manifest: every worker refuses, so none swaps.
        int8 = json.loads((models / "manifest.json").read_text())["models"]["int8"]["file"]
        (models / int8).write_bytes(b"\0" * 1000)
        set_version(models, 3)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: b"reload_refused" in _read_stderr(proc), timeout=60)
        seen = _versions_by_worker(address)
        assert len(seen) == 2 and all(v == {"2"} for v in seen.values()), seen
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except Exception:
            proc.kill()


_STDERR: dict[int, bytearray] = {}


def _read_stderr(proc) -> bytes:
    """What the server has logged so far (read without blocking)."""
    buf = _STDERR.setdefault(proc.pid, bytearray())
    fd = proc.stderr.fileno()
    os.set_blocking(fd, False)
    try:
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
    except BlockingIOError:
        pass
    return bytes(buf)


class _FakeWorker:
    def __init__(self, index: int, refuse: bool = False) -> None:
        self.index, self.refuse, self.calls = index, refuse, []

    def call(self, cmd: str, timeout: float = 30.0, **args) -> dict:
        self.calls.append(cmd)
        if cmd == "prepare" and self.refuse:
            return {"ok": False, "error": "golden images disagree"}
        if cmd == "prepare":
            return {"ok": True, "result": {"version": "7"}}
        return {"ok": True, "result": None}


def test_one_refusing_worker_stops_every_worker_from_swapping():
    import threading

    from mnist_edge.server.workers import Supervisor

    sup = Supervisor.__new__(Supervisor)  # the coordination alone, without processes
    sup._reload_lock = threading.Lock()
    sup.workers = [_FakeWorker(0), _FakeWorker(1, refuse=True), _FakeWorker(2)]
    assert sup._swap_all("/served/copy", "test") is False
    assert all(w.calls == ["prepare", "abort"] for w in sup.workers), [w.calls for w in sup.workers]

    sup.workers = [_FakeWorker(0), _FakeWorker(1), _FakeWorker(2)]
    assert sup._swap_all("/served/copy", "test") is True
    assert all(w.calls == ["prepare", "commit"] for w in sup.workers), [w.calls for w in sup.workers]


def test_a_reload_reads_the_token_file_again_whatever_becomes_of_the_model(tmp_path):
    """SIGHUP rotates the bearer token in every worker first, even when the model is refused."""
    import threading

    from mnist_edge.server.workers import Supervisor

    sup = Supervisor.__new__(Supervisor)  # the coordination alone, without processes
    sup._reload_lock = threading.Lock()
    sup.settings = make_settings(model=str(tmp_path / "nothing-published-here"))
    sup.served = None
    sup.workers = [_FakeWorker(0), _FakeWorker(1)]
    assert sup.reload("test") is False
    assert all(w.calls == ["rotate_token"] for w in sup.workers), [w.calls for w in sup.workers]


def _events(proc, name: str) -> list[dict]:
    return [e for e in (json.loads(line) for line in _read_stderr(proc).decode().splitlines() if line.startswith("{")) if e.get("event") == name]


def test_workers_agree_on_the_version_the_parent_owns(tmp_path, shipped_manifest):
    """Issue 18: with N+1 published but no SIGHUP, a worker restarted after a crash serves N, as
    its sibling does; after SIGHUP every worker serves N+1; a second SIGHUP with nothing changed
    swaps nothing and logs no further `reloaded`; a half-written manifest or another model under
    the served version is refused by the parent."""
    models = copy_models(shipped_manifest.parent, tmp_path / "models")
    set_version(models, 1)
    proc, address = start_cli_server(tmp_path, "--workers", "2", "--model", str(models), "--log-format", "json")
    try:
        wait_for(lambda: health_status(address) == "SERVING", timeout=90)
        set_version(models, 2)  # published, no SIGHUP
        victim = next(iter(_versions_by_worker(address, 20)))
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: _events(proc, "worker_restarted"), timeout=60)
        versions = [_pid_and_version(address)[1] for _ in range(40)]
        assert versions == ["1"] * 40, versions

        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: _events(proc, "reloaded"), timeout=60)
        versions = [_pid_and_version(address)[1] for _ in range(40)]
        assert versions == ["2"] * 40, versions
        reloads = len(_events(proc, "reloaded"))

        proc.send_signal(signal.SIGHUP)  # nothing changed
        wait_for(lambda: _events(proc, "reload_unchanged"), timeout=60)
        assert len(_events(proc, "reloaded")) == reloads

        manifest = models / "manifest.json"
        good = manifest.read_bytes()
        manifest.write_bytes(good[: len(good) // 2])  # a half-written publish
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(_events(proc, "reload_refused")) == 1, timeout=60)
        # The same version with another model (the fp32 file as the default) is refused
        # everywhere, as by one process.
        from mnist_edge.export import manifest as mf

        other = json.loads(good)
        other["models"][other["default"]] = other["models"]["fp32"]

        mf.atomic_write(manifest, mf.dumps(other))
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(_events(proc, "reload_refused")) == 2, timeout=60)
        assert len(_events(proc, "reloaded")) == reloads
        assert {_pid_and_version(address)[1] for _ in range(10)} == {"2"}
    finally:
        stop_cli_server(proc)
