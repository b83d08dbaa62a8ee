"""Lifecycle: port first, NOT_SERVING while loading, SERVING, drain on SIGTERM, bad models never serve."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

from helpers.servers import health_status, running_server, start_cli_server, wait_for
from mnist_edge.protos.digits.v1 import digits_pb2, digits_pb2_grpc
from mnist_edge.protos.inference import grpc_service_pb2 as pb
from mnist_edge.protos.inference import grpc_service_pb2_grpc as pb_grpc
from mnist_edge.server import model_store

SERVICES = ("", "inference.GRPCInferenceService", "digits.v1.DigitClassifier")


def _infer(address: str, images: np.ndarray, timeout: float = 30):
    with grpc.insecure_channel(address) as ch:
        req = pb.ModelInferRequest(
            model_name="mnist",
            inputs=[pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=[len(images), 28, 28])],
            raw_input_contents=[images.tobytes()],
        )
        return pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=timeout)


def test_not_serving_and_unavailable_while_a_slow_loader_runs(mnist):
    release = threading.Event()

    def slow_loader(settings):
        release.wait(30)
        return model_store.load(settings.model)

    with running_server(loader=slow_loader, background_load=True) as app:
        for name in SERVICES:
            assert health_status(app.address, name) == "NOT_SERVING"
        assert health_status(app.address, "liveness") == "SERVING"
        with grpc.insecure_channel(app.address) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            assert stub.ServerLive(pb.ServerLiveRequest()).live
            assert not stub.ServerReady(pb.ServerReadyRequest()).ready
            assert not stub.ModelReady(pb.ModelReadyRequest(name="mnist")).ready
            with pytest.raises(grpc.RpcError) as info:
                _infer(app.address, mnist.test.images[:1])
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "starting" in info.value.details()
            with pytest.raises(grpc.RpcError) as info:
                digits_pb2_grpc.DigitClassifierStub(ch).Classify(digits_pb2.ClassifyRequest(images=[digits_pb2.Image(pixels=b"\0" * 784)]))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        release.set()
        wait_for(lambda: health_status(app.address) == "SERVING")
        for name in SERVICES:
            assert health_status(app.address, name) == "SERVING"
        assert _infer(app.address, mnist.test.images[:2]).raw_output_contents


def test_unknown_health_name_is_not_found(server):
    assert health_status(server.address, "no.such.Service") == "error:NOT_FOUND"


def test_reflection_lists_every_service(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.address) as ch:
        services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
        assert {"inference.GRPCInferenceService", "digits.v1.DigitClassifier", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
        # and a client can resolve a method's message types from the server alone
        db = ProtoReflectionDescriptorDatabase(ch)
        fd = db.FindFileContainingSymbol("digits.v1.DigitClassifier")
        assert fd.package == "digits.v1"


def test_grpcurl_discovers_and_calls_the_api_through_reflection(server, mnist):
    """grpcurl (the Go tool) needs nothing but reflection to list, describe and call us."""
    import base64
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    grpcurl = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
    if grpcurl is None:
        pytest.skip("grpcurl not installed (the dev extra installs it on x86-64)")

    def run(*args: str) -> str:
        proc = subprocess.run([grpcurl, "-plaintext", *args], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    listed = run(server.address, "list").split()
    assert {"inference.GRPCInferenceService", "digits.v1.DigitClassifier", "grpc.health.v1.Health"} <= set(listed)
    assert "rpc Classify" in run(server.address, "describe", "digits.v1.DigitClassifier")
    body = json.dumps({"images": [{"pixels": base64.b64encode(mnist.test.images[0].tobytes()).decode()}]})
    answer = json.loads(run("-d", body, server.address, "digits.v1.DigitClassifier/Classify"))
    assert answer["predictions"][0]["digit"] == 7
    request = json.dumps({
        "model_name": "mnist",
        "inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 28, 28]}],
        "raw_input_contents": [base64.b64encode(mnist.test.images[1].tobytes()).decode()],
    })
    answer = json.loads(run("-d", request, server.address, "inference.GRPCInferenceService/ModelInfer"))
    assert np.frombuffer(base64.b64decode(answer["raw_output_contents"][1]), "<i8").tolist() == [2]


def test_reflection_can_be_turned_off():
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with running_server(reflection=False) as app, grpc.insecure_channel(app.address) as ch:
        with pytest.raises(grpc.RpcError) as info:
            ProtoReflectionDescriptorDatabase(ch).get_services()
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize("infer_lane", [True, False], ids=["lane", "handler-threads"])
def test_shutdown_finishes_calls_in_flight_and_refuses_new_ones(mnist, infer_lane):
    """In process: a model whose run takes 0.5s; calls in flight when shutdown starts all complete."""
    entered = threading.Semaphore(0)

    def loader(settings):
        model = model_store.load(settings.model)
        real = model.runner.run

        class Slow:
            def run(self, pixels):
                entered.release()
                time.sleep(0.5)
                return real(pixels)

        model.runner = Slow()
        return model

    # 6 calls in the handlers at once: more handler threads than the default
    with running_server(loader=loader, grace_s=10.0, handler_threads=8, infer_lane=infer_lane) as app:
        images = mnist.test.images
        with futures.ThreadPoolExecutor(8) as pool:
            calls = [pool.submit(_infer, app.address, images[i : i + 1]) for i in range(6)]
            assert entered.acquire(timeout=10)  # the first batch is running
            if infer_lane:
                # The rest wait for the lane thread, taken by gRPC core but not yet read: no
                # counter shows them, so they get time to arrive (ordering, not a timing check).
                time.sleep(0.5)
            else:
                wait_for(lambda: app.core.batcher.queued_images == 5, timeout=10)  # the rest wait in the queue
            stopper = threading.Thread(target=app.shutdown, args=("test",))
            stopper.start()
            wait_for(lambda: health_status(app.address) != "SERVING" or app.stopped.is_set(), timeout=10)
            outcomes = []
            for c in calls:
                try:
                    outcomes.append(c.result(timeout=30))
                except grpc.RpcError as exc:
                    outcomes.append(exc)
        stopper.join(30)
        assert app.stopped.is_set()
        # Every call the server had started completes. On the lane the test cannot see a call
        # arrive: one that reaches the server only after the shutdown began is refused before it
        # starts (UNAVAILABLE, "not started"; docs/limits.md), never cancelled or half-served.
        assert len(outcomes[0].raw_output_contents) == 2  # in flight when the shutdown began
        for o in outcomes:
            if isinstance(o, grpc.RpcError):
                assert infer_lane and o.code() == grpc.StatusCode.UNAVAILABLE and "not started" in o.details(), (o.code(), o.details())
            else:
                assert len(o.raw_output_contents) == 2


def test_drain_delay_keeps_serving_new_calls_while_not_ready(mnist):
    with running_server(drain_delay_s=1.0, grace_s=5.0) as app:
        stopper = threading.Thread(target=app.shutdown, args=("test",))
        stopper.start()
        wait_for(lambda: health_status(app.address) == "NOT_SERVING", timeout=5)
        assert health_status(app.address, "liveness") == "SERVING"
        assert _infer(app.address, mnist.test.images[:1]).raw_output_contents  # still served while draining
        stopper.join(20)
        assert app.stopped.is_set()


def test_cli_sigterm_with_requests_in_flight_completes_them_and_exits_zero(tmp_path, mnist):
    # The batcher may wait 2s to fill a batch, so calls sent now are still in flight at SIGTERM.
    proc, address = start_cli_server(tmp_path, "--max-queue-delay-us", "2000000", "--grace-s", "20", "--log-format", "json")
    try:
        wait_for(lambda: health_status(address) == "SERVING", timeout=60)
        with futures.ThreadPoolExecutor(8) as pool:
            calls = [pool.submit(_infer, address, mnist.test.images[i : i + 1]) for i in range(8)]
            time.sleep(0.5)
            assert not any(c.done() for c in calls)  # really in flight
            proc.send_signal(signal.SIGTERM)
            wait_for(lambda: health_status(address) != "SERVING", timeout=10)
            results = [c.result(timeout=30) for c in calls]
        assert all(len(r.raw_output_contents) == 2 for r in results)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    events = [json.loads(line)["event"] for line in err.splitlines() if line.startswith("{")]
    assert events[:2] == ["listening", "serving"] and events[-3:] == ["draining", "stopping", "stopped"]
    serving = next(json.loads(line) for line in err.splitlines() if '"serving"' in line)
    assert serving["msg"] == f"serving on {address}"


def test_bad_model_exits_non_zero_and_is_never_serving(tmp_path, shipped_manifest):
    bad = tmp_path / "models"
    shutil.copytree(shipped_manifest.parent, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    target = bad / manifest["models"]["int8"]["file"]
    data = bytearray(target.read_bytes())
    data[-100] ^= 0xFF
    target.write_bytes(bytes(data))
    proc, address = start_cli_server(tmp_path, "--model", str(bad))
    seen = set()
    while proc.poll() is None:
        seen.add(health_status(address))
        time.sleep(0.01)
    assert proc.returncode == 1
    assert "SERVING" not in seen
    assert "does not match the manifest" in proc.stderr.read()


def test_golden_mismatch_is_refused(tmp_path, shipped_manifest):
    bad = tmp_path / "models"
    shutil.copytree(shipped_manifest.parent, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["golden"][0]["digit"] = (manifest["golden"][0]["digit"] + 1) % 10
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(model_store.ModelLoadError, match="self-test failed on 1 of 20 golden images"):
        model_store.load(bad)


def test_busy_port_fails_instead_of_sharing(server, tmp_path):
    from helpers.servers import make_settings
    from mnist_edge.server.app import App, BindError

    with pytest.raises(BindError, match="could not listen on"):
        App(make_settings(address=server.address))
