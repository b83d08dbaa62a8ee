"""--otel: one OpenTelemetry SERVER span per call, a child of the caller's W3C traceparent, with
the gRPC attributes and the server's figures; opentelemetry is never imported without --otel."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from helpers.servers import REPO, running_server
from mnist_edge.protos.inference import grpc_service_pb2 as pb
from mnist_edge.protos.inference import grpc_service_pb2_grpc as pb_grpc
from mnist_edge.server import otel
from mnist_edge.server import settings as settings_mod

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@pytest.fixture
def exporter(monkeypatch) -> InMemorySpanExporter:
    memory = InMemorySpanExporter()
    monkeypatch.setattr(otel, "_default_exporter", lambda: memory)
    return memory


def _request(images, **kw) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="mnist", inputs=[pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=[len(images), 28, 28])],
        raw_input_contents=[images.tobytes()], **kw,
    )


@pytest.mark.parametrize("lane", [True, False])
def test_a_span_per_call_continues_the_callers_trace(exporter, mnist, lane):
    with running_server(otel=True, infer_lane=lane) as app:
        with grpc.insecure_channel(app.address) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            stub.ModelInfer(_request(mnist.test.images[:4], id="r-1"), timeout=30, metadata=[("traceparent", f"00-{TRACE}-{PARENT}-01")])
            with pytest.raises(grpc.RpcError):
                stub.ModelInfer(_request(mnist.test.images[:1], model_version="9"), timeout=30)
            stub.ModelMetadata(pb.ModelMetadataRequest(name="mnist"), timeout=30)
        app.shutdown("test")  # flushes the batch processor
    spans = {s.name: s for s in exporter.get_finished_spans()}
    ok = next(s for s in exporter.get_finished_spans() if s.attributes.get("mnist_edge.request_id") == "r-1")
    assert ok.name == "inference.GRPCInferenceService/ModelInfer" and ok.kind is SpanKind.SERVER
    assert format(ok.context.trace_id, "032x") == TRACE and format(ok.parent.span_id, "016x") == PARENT
    assert ok.attributes["rpc.system"] == "grpc" and ok.attributes["rpc.method"] == "ModelInfer"
    assert ok.attributes["rpc.grpc.status_code"] == 0 and ok.attributes["mnist_edge.images"] == 4
    assert ok.attributes["mnist_edge.compute_us"] > 0 and ok.end_time > ok.start_time
    failed = [s for s in exporter.get_finished_spans() if s.attributes["rpc.grpc.status_code"] == 5]
    assert len(failed) == 1 and failed[0].status.status_code is StatusCode.ERROR and failed[0].parent is None
    assert "inference.GRPCInferenceService/ModelMetadata" in spans
    assert not any("Health" in name for name in spans)


def test_otel_needs_the_sdk(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("opentelemetry") else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install 'mnist-edge\[otel\]'"):
        settings_mod.Settings(otel=True).validate()


def test_opentelemetry_is_never_imported_without_otel():
    code = (
        "import sys\n"
        "from helpers.servers import running_server\n"
        "with running_server(access_log=True) as app:\n"
        "    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
                         env={"PYTHONPATH": str(REPO / "tests"), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
