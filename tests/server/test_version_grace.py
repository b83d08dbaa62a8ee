"""Version grace on reload (--previous-version-grace-s): after a swap from N to N+1, calls that
name N keep working for the grace period (both loaded, ModelMetadata lists both, metrics per
version), unpinned calls get N+1 at once, then N is unloaded and answers NOT_FOUND."""

from __future__ import annotations

import signal
import time
import urllib.request

import grpc
import numpy as np
import pytest

from helpers.models import copy_models, set_version
from helpers.servers import (
    channel_per_worker,
    health_status,
    json_log,
    running_server,
    start_cli_server,
    wait_for,
)
from mnist_edge.protos.inference import grpc_service_pb2 as pb
from mnist_edge.protos.inference import grpc_service_pb2_grpc as pb_grpc
from mnist_edge.server import model_store
from mnist_edge.server.errors import NotFound


def _stub(address: str):
    return pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))


def _infer(stub, images: np.ndarray, version: str = "") -> pb.ModelInferResponse:
    req = pb.ModelInferRequest(
        model_name="mnist", model_version=version,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=[len(images), 28, 28])],
        raw_input_contents=[images.tobytes()],
    )
    return stub.ModelInfer(req, timeout=30)


def _digits(resp: pb.ModelInferResponse) -> np.ndarray:
    i = next(k for k, o in enumerate(resp.outputs) if o.name == "digit")
    return np.frombuffer(resp.raw_output_contents[i], dtype=np.int64)


def _metric_versions(metrics_address: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("mnist_edge_inference_request_success_total{"):
            version = line.split('version="', 1)[1].split('"', 1)[0]
            out[version] = float(line.rsplit(" ", 1)[1])
    return out


@pytest.mark.parametrize("workers", [1, 2])
def test_pinned_calls_keep_working_through_the_grace_period(tmp_path, shipped_manifest, mnist, workers):
    models = copy_models(shipped_manifest.parent, tmp_path / "models")
    set_version(models, 1)
    proc, address = start_cli_server(tmp_path, "--model", str(models), "--workers", str(workers), "--previous-version-grace-s", "6",
                                     "--log-format", "json")
    images = mnist.test.images[:16]
    try:
        wait_for(lambda: health_status(address) == "SERVING", timeout=60)
        stubs = [pb_grpc.GRPCInferenceServiceStub(ch) for ch in channel_per_worker(address, workers)]  # one per worker

        def versions(stub) -> list[str]:
            return list(stub.ModelMetadata(pb.ModelMetadataRequest(name="mnist"), timeout=5).versions)

        before = _digits(_infer(stubs[0], images, "1"))
        set_version(models, 2)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: all(versions(stub)[:1] == ["2"] for stub in stubs), timeout=30)
        swapped = time.monotonic()
        for stub in stubs:
            # Unpinned: the new version at once. Pinned to 1: still answered, by version 1.
            assert _infer(stub, images).model_version == "2"
            pinned = _infer(stub, images, "1")
            assert pinned.model_version == "1" and np.array_equal(_digits(pinned), before)
            assert _infer(stub, images, "2").model_version == "2"
            assert versions(stub) == ["2", "1"]
            assert stub.ModelReady(pb.ModelReadyRequest(name="mnist", version="1"), timeout=5).ready
        assert time.monotonic() - swapped < 6, "the checks above ran past the grace period"
        # After the grace period version 1 is gone.
        wait_for(lambda: all(versions(stub) == ["2"] for stub in stubs), timeout=15)
        for stub in stubs:
            with pytest.raises(grpc.RpcError) as info:
                _infer(stub, images, "1")
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = json_log(proc)
    assert sum(e["event"] == "previous_unloaded" for e in log) == workers


def test_the_previous_version_has_its_own_metrics_and_a_second_reload_drops_it(shipped_model, mnist):
    v1, v2, v3 = (model_store.LoadedModel(**{**shipped_model.__dict__, "version": str(v)}) for v in (1, 2, 3))
    with running_server(loader=lambda s: v1, previous_version_grace_s=60.0) as app:
        stub = _stub(app.address)
        images = mnist.test.images[:4]
        app.core.set_model(v2)
        _infer(stub, images, "1")
        _infer(stub, images, "1")
        _infer(stub, images)
        # A call's statistics are recorded just after its answer is sent: wait for them.
        wait_for(lambda: _metric_versions(app.metrics_address) == {"2": 1.0, "1": 2.0}, timeout=10)
        text = urllib.request.urlopen(f"http://{app.metrics_address}/metrics", timeout=10).read().decode()
        assert text.count("mnist_edge_model_info{") == 2
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="mnist"), timeout=5).model_stats
        assert [(m.version, m.inference_stats.success.count) for m in stats] == [("2", 1), ("1", 2)]
        # Only the version just replaced is kept: 3 replaces 2, and 1 goes at once.
        app.core.set_model(v3)
        assert [m.version for m in app.core.versions()] == ["3", "2"]
        with pytest.raises(grpc.RpcError) as info:
            _infer(stub, images, "1")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "'3', '2'" in info.value.details()
        with pytest.raises(NotFound):
            app.core.batcher_for(v1)


def test_grace_zero_unloads_at_the_swap(shipped_model, mnist):
    v1, v2 = (model_store.LoadedModel(**{**shipped_model.__dict__, "version": str(v)}) for v in (1, 2))
    with running_server(loader=lambda s: v1, previous_version_grace_s=0.0) as app:
        app.core.set_model(v2)
        assert app.core.previous is None and [m.version for m in app.core.versions()] == ["2"]
        with pytest.raises(grpc.RpcError) as info:
            _infer(_stub(app.address), mnist.test.images[:1], "1")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
