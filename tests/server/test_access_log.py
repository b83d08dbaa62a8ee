"""The access log (--access-log): one JSON line per call, failures included, with the request id,
method, status, images, timings, peer and the W3C trace id; --access-log-sample thins successes."""

from __future__ import annotations

import json
import signal

import grpc
import numpy as np
import pytest

from helpers.servers import health_status, start_cli_server, wait_for
from mnist_edge.protos.digits.v1 import digits_pb2 as dpb
from mnist_edge.protos.digits.v1 import digits_pb2_grpc as dpb_grpc
from mnist_edge.protos.inference import grpc_service_pb2 as pb
from mnist_edge.protos.inference import grpc_service_pb2_grpc as pb_grpc
from mnist_edge.server.access_log import AccessLog, trace_id

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE}-00f067aa0ba902b7-01"
FIELDS = {"event", "request_id", "api", "method", "status", "images", "queue_us", "compute_us", "duration_us", "peer", "trace_id"}


def test_traceparent_parsing():
    assert trace_id([("traceparent", TRACEPARENT)]) == TRACE
    assert trace_id([("other", "x"), ("traceparent", TRACEPARENT.encode())]) == TRACE
    assert trace_id([("traceparent", f"01-{TRACE}-00f067aa0ba902b7-01-future")]) == TRACE  # a later version, read as 00
    for bad in (f"00-{TRACE}-00f067aa0ba902b7-01-extra", f"ff-{TRACE}-00f067aa0ba902b7-01", f"00-{'0' * 32}-00f067aa0ba902b7-01",
                f"00-{TRACE}-{'0' * 16}-01", f"00-{TRACE.upper()}-00f067aa0ba902b7-01", "garbage"):
        assert trace_id([("traceparent", bad)]) is None, bad
    assert trace_id([]) is None and trace_id(None) is None


def test_sampling_keeps_every_failure():
    log = AccessLog(0.25, chance=iter([0.1, 0.9, 0.2, 0.3]).__next__)
    assert [log.wanted("OK") for _ in range(4)] == [True, False, True, False]
    assert all(AccessLog(0.0).wanted(s) for s in ("NOT_FOUND", "INVALID_ARGUMENT", "UNAVAILABLE"))
    assert not AccessLog(0.0).wanted("OK") and AccessLog(1.0).wanted("OK")


def _infer_request(images: np.ndarray, **kw) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="mnist", inputs=[pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=[len(images), 28, 28])],
        raw_input_contents=[images.tobytes()], **kw,
    )


def _access_lines(proc) -> list[dict]:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    return [e for e in (json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")) if e["event"] == "access"]


@pytest.mark.parametrize("lane", ["--infer-lane", "--no-infer-lane"])
def test_every_call_gets_one_line_with_its_ids_status_and_timings(tmp_path, mnist, lane):
    # --log-level warning: the access log still appears (asking for it is asking for its lines).
    proc, address = start_cli_server(tmp_path, "--access-log", lane, "--log-format", "json", "--log-level", "warning")
    images = mnist.test.images[:3]
    try:
        wait_for(lambda: health_status(address) == "SERVING", timeout=60)
        with grpc.insecure_channel(address) as ch:
            v2 = pb_grpc.GRPCInferenceServiceStub(ch)
            native = dpb_grpc.DigitClassifierStub(ch)
            v2.ModelInfer(_infer_request(images, id="req-1"), timeout=30, metadata=[("traceparent", TRACEPARENT)])
            v2.ModelInfer(_infer_request(images[:1]), timeout=30, metadata=[("x-request-id", "from-metadata")])
            with pytest.raises(grpc.RpcError):
                v2.ModelInfer(_infer_request(images[:1], id="req-404", model_version="99"), timeout=30)
            with pytest.raises(grpc.RpcError):
                bad = _infer_request(images[:1], id="req-bad")
                bad.raw_input_contents[0] = b"\0" * 10
                v2.ModelInfer(bad, timeout=30)
            v2.ModelMetadata(pb.ModelMetadataRequest(name="mnist"), timeout=30)
            native.Classify(dpb.ClassifyRequest(images=[dpb.Image(pixels=im.tobytes()) for im in images[:2]], request_id="n-1"), timeout=30,
                            metadata=[("traceparent", TRACEPARENT)])
            replies = list(native.ClassifyStream(iter([dpb.ClassifyRequest(images=[dpb.Image(pixels=images[0].tobytes())], request_id="s-1")]), timeout=30))
            assert len(replies) == 1
        assert health_status(address) == "SERVING"  # not logged
        lines = _access_lines(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    for line in lines:
        assert FIELDS <= line.keys(), line
        assert line["peer"].startswith("ipv4:127.0.0.1:") and line["duration_us"] >= 0
    by_id = {line["request_id"]: line for line in lines}
    ok = by_id["req-1"]
    assert (ok["api"], ok["method"], ok["status"], ok["images"], ok["trace_id"]) == ("v2", "ModelInfer", "OK", 3, TRACE)
    assert ok["compute_us"] > 0 and ok["duration_us"] >= ok["compute_us"]
    assert by_id["from-metadata"]["status"] == "OK" and by_id["from-metadata"]["trace_id"] is None
    assert by_id["req-404"]["status"] == "NOT_FOUND" and by_id["req-bad"]["status"] == "INVALID_ARGUMENT"
    assert (by_id["n-1"]["api"], by_id["n-1"]["method"], by_id["n-1"]["images"], by_id["n-1"]["trace_id"]) == ("native", "Classify", 2, TRACE)
    assert by_id["s-1"]["method"] == "ClassifyStream" and by_id["s-1"]["status"] == "OK"
    assert [line["method"] for line in lines].count("ModelMetadata") == 1
    assert not any(line["method"] == "Check" for line in lines)
    assert len(lines) == 7, [(line["method"], line["status"]) for line in lines]


def test_sample_zero_records_only_failures(tmp_path, mnist):
    proc, address = start_cli_server(tmp_path, "--access-log", "--access-log-sample", "0", "--log-format", "json")
    try:
        wait_for(lambda: health_status(address) == "SERVING", timeout=60)
        with grpc.insecure_channel(address) as ch:
            v2 = pb_grpc.GRPCInferenceServiceStub(ch)
            for _ in range(5):
                v2.ModelInfer(_infer_request(mnist.test.images[:1]), timeout=30)
            unknown = _infer_request(mnist.test.images[:1])
            unknown.model_name = "nope"
            with pytest.raises(grpc.RpcError):
                v2.ModelInfer(unknown, timeout=30)
        lines = _access_lines(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [(line["method"], line["status"]) for line in lines] == [("ModelInfer", "NOT_FOUND")]


def test_no_access_log_by_default(tmp_path, mnist):
    proc, address = start_cli_server(tmp_path, "--log-format", "json")
    try:
        wait_for(lambda: health_status(address) == "SERVING", timeout=60)
        with grpc.insecure_channel(address) as ch:
            pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(_infer_request(mnist.test.images[:1]), timeout=30)
        assert _access_lines(proc) == []
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("lane", ["--infer-lane", "--no-infer-lane"])
def test_calls_refused_for_a_wrong_token_are_logged(tmp_path, mnist, lane):
    token = tmp_path / "token"
    token.write_text("a-token-of-enough-length-0123456789\n")
    proc, address = start_cli_server(tmp_path, "--access-log", lane, "--token-file", str(token), "--log-format", "json")
    try:
        wait_for(lambda: health_status(address) == "SERVING", timeout=60)
        with grpc.insecure_channel(address) as ch:
            wrong = [("authorization", "Bearer wrong"), ("x-request-id", "denied-1")]
            for call in (lambda: pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(_infer_request(mnist.test.images[:1]), timeout=30, metadata=wrong),
                         lambda: pb_grpc.GRPCInferenceServiceStub(ch).ModelMetadata(pb.ModelMetadataRequest(name="mnist"), timeout=30, metadata=wrong)):
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        lines = _access_lines(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sorted((line["method"], line["status"], line["request_id"]) for line in lines) == [
        ("ModelInfer", "UNAUTHENTICATED", "denied-1"), ("ModelMetadata", "UNAUTHENTICATED", "denied-1")]
    assert all(line["peer"].startswith("ipv4:127.0.0.1:") for line in lines)


def test_rest_inference_is_logged_with_headers_as_metadata(tmp_path, mnist):
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        http = f"127.0.0.1:{s.getsockname()[1]}"
    proc, address = start_cli_server(tmp_path, "--access-log", "--http-address", http, "--log-format", "json")
    try:
        wait_for(lambda: health_status(address) == "SERVING", timeout=60)
        body = json.dumps({"id": "rest-1", "inputs": [{"name": "pixels", "shape": [1, 28, 28], "datatype": "UINT8",
                                                       "data": mnist.test.images[0].ravel().tolist()}]}).encode()
        req = urllib.request.Request(f"http://{http}/v2/models/mnist/infer", data=body, method="POST",
                                     headers={"Content-Type": "application/json", "traceparent": TRACEPARENT})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200
        lines = _access_lines(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    (line,) = lines
    assert (line["api"], line["method"], line["status"], line["request_id"], line["trace_id"], line["images"]) == (
        "v2_http", "ModelInfer", "OK", "rest-1", TRACE, 1)
