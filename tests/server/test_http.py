"""HTTP/REST on --http-address against real servers: the Open Inference Protocol over REST
(JSON and Triton's binary tensor data), the BYTES `image` input, POST /v1/classify, the
transport's limits (keep-alive, deadlines, connection cap, body size, encodings), token,
CORS, TLS, lifecycle, and --workers sharing the HTTP port.

Every answer is compared with the gRPC APIs of the same server or with an in-process
onnxruntime run of the served model; no timing is asserted.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import http.client
import io
import json
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import zlib

import grpc
import numpy as np
import pytest

from helpers.servers import ort_reference, running_server, wait_for
from mnist_edge.imaging.normalize import normalize_encoded
from mnist_edge.protos.digits.v1 import digits_pb2, digits_pb2_grpc
from mnist_edge.protos.inference import grpc_service_pb2 as pb
from mnist_edge.protos.inference import grpc_service_pb2_grpc as pb_grpc
from mnist_edge.server import model_store

# The shipped model's version, as its manifest records it (the tests must not care which it is).
SHIPPED_VERSION = json.loads(model_store.resolve_manifest(None).read_text())["version"]

pytestmark = pytest.mark.timeout(180)


# -- helpers ----------------------------------------------------------------------------
class Http:
    """One keep-alive connection to a server's HTTP port."""

    def __init__(self, address: str, timeout: float = 20, context: ssl.SSLContext | None = None) -> None:
        host, port = address.rsplit(":", 1)
        if context is None:
            self.conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        else:
            self.conn = http.client.HTTPSConnection(host, int(port), timeout=timeout, context=context)

    def request(self, method: str, path: str, body: bytes | str | None = None, headers: dict | None = None):
        self.conn.request(method, path, body=body, headers=headers or {})
        r = self.conn.getresponse()
        data = r.read()
        return r, data

    def json(self, method: str, path: str, value=None, headers: dict | None = None):
        body = None if value is None else json.dumps(value)
        h = {"Content-Type": "application/json", **(headers or {})} if body is not None else (headers or {})
        r, data = self.request(method, path, body, h)
        return r.status, (json.loads(data) if data else None), r

    def close(self) -> None:
        self.conn.close()


def png_of(image: np.ndarray, scale: int = 3) -> bytes:
    """An MNIST test image as a user's PNG: larger, dark ink on white."""
    from PIL import Image

    img = Image.fromarray(255 - image).resize((28 * scale, 28 * scale), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def grpc_infer(address: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with grpc.insecure_channel(address) as ch:
        req = pb.ModelInferRequest(
            model_name="mnist",
            inputs=[pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=[len(images), 28, 28])],
            raw_input_contents=[images.tobytes()],
        )
        resp = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=30)
    probs = np.frombuffer(resp.raw_output_contents[0], dtype="<f4").reshape(-1, 10)
    return probs, np.frombuffer(resp.raw_output_contents[1], dtype="<i8")


def grpc_classify(address: str, encoded: list[bytes]) -> digits_pb2.ClassifyResponse:
    with grpc.insecure_channel(address) as ch:
        req = digits_pb2.ClassifyRequest(images=[digits_pb2.Image(encoded=e) for e in encoded], return_probabilities=True, return_normalized_image=True)
        return digits_pb2_grpc.DigitClassifierStub(ch).Classify(req, timeout=30)


def pixels_infer(images: np.ndarray, **extra) -> dict:
    return {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [len(images), 28, 28], "data": images.reshape(-1).tolist()}], **extra}


def binary_infer(tensors: list[tuple[str, str, list[int], bytes]], outputs: list[dict] | None = None, **params) -> tuple[bytes, dict]:
    """A request in Triton's binary tensor data form: (body, headers)."""
    head = {"inputs": [{"name": n, "datatype": d, "shape": s, "parameters": {"binary_data_size": len(b)}} for n, d, s, b in tensors]}
    if outputs is not None:
        head["outputs"] = outputs
    if params:
        head["parameters"] = params
    text = json.dumps(head).encode()
    return text + b"".join(b for *_, b in tensors), {"Inference-Header-Content-Length": str(len(text)), "Content-Type": "application/octet-stream"}


def split_binary(response, data: bytes) -> tuple[dict, dict[str, bytes]]:
    """A binary-data response: its JSON header and each output's raw bytes."""
    n = int(response.getheader("Inference-Header-Content-Length"))
    head = json.loads(data[:n])
    blobs, offset = {}, n
    for out in head["outputs"]:
        size = out.get("parameters", {}).get("binary_data_size")
        if size is not None:
            blobs[out["name"]] = data[offset : offset + size]
            offset += size
    assert offset == len(data)
    return head, blobs


@pytest.fixture(scope="module")
def app():
    with running_server(http_address="127.0.0.1:0") as a:
        yield a


@pytest.fixture()
def client(app):
    c = Http(app.http_address)
    yield c
    c.close()


@pytest.fixture(scope="module")
def reference(mnist):
    images = mnist.test.images[:64]
    probs, digits = ort_reference(model_store.load(model_store.resolve_manifest(None)).file, images)
    return images, probs, digits


# -- health and metadata ------------------------------------------------------------------
def test_health_and_server_metadata(client):
    assert client.json("GET", "/v2/health/live")[0] == 200
    assert client.json("GET", "/v2/health/ready")[0] == 200
    status, meta, _ = client.json("GET", "/v2")
    assert status == 200 and meta["name"] == "mnist-edge" and "binary_tensor_data" in meta["extensions"]


def test_model_metadata_lists_both_inputs_and_versions_paths(client):
    status, meta, _ = client.json("GET", "/v2/models/mnist")
    assert status == 200 and meta["name"] == "mnist" and meta["versions"] == [SHIPPED_VERSION]
    inputs = {t["name"]: t for t in meta["inputs"]}
    assert inputs["pixels"] == {"name": "pixels", "datatype": "UINT8", "shape": [-1, 28, 28]}
    assert inputs["image"] == {"name": "image", "datatype": "BYTES", "shape": [-1, 1]}  # Triton's layout: one file per batch item
    assert {t["name"]: t["datatype"] for t in meta["outputs"]} == {"probabilities": "FP32", "digit": "INT64"}
    assert client.json("GET", f"/v2/models/mnist/versions/{SHIPPED_VERSION}")[1] == meta
    assert client.json("GET", "/v2/models/mnist/ready")[0] == 200
    assert client.json("GET", f"/v2/models/mnist/versions/{SHIPPED_VERSION}/ready")[0] == 200
    status, config, _ = client.json("GET", "/v2/models/mnist/config")
    assert status == 200 and config["max_batch_size"] == 1024 and config["input"][0]["dims"] == [28, 28]
    assert {i["name"]: i["data_type"] for i in config["input"]} == {"pixels": "TYPE_UINT8", "image": "TYPE_STRING"}
    status, stats, _ = client.json("GET", "/v2/models/mnist/stats")
    assert status == 200 and stats["model_stats"][0]["name"] == "mnist" and isinstance(stats["model_stats"][0]["inference_count"], int)
    assert client.json("GET", "/v2/models/stats")[1]["model_stats"][0]["name"] == "mnist"


@pytest.mark.parametrize("path", ["/v2/models/nope", "/v2/models/nope/ready", "/v2/models/mnist/versions/7", "/v2/models/mnist/versions/7/infer", "/v2/nothing", "/nothing", "/v2/models/mnist/bogus"])
def test_unknown_model_version_or_route_is_404_json(client, path):
    status, body, _ = client.json("POST" if path.endswith("infer") else "GET", path, {"inputs": []} if path.endswith("infer") else None)
    assert status == 404 and body["error"]


def test_wrong_method_is_405_with_allow(client):
    status, body, r = client.json("GET", "/v2/models/mnist/infer")
    assert status == 405 and r.getheader("Allow") == "POST" and "expected POST" in body["error"]
    status, body, r = client.json("POST", "/v2/health/ready", {})
    assert status == 405 and r.getheader("Allow") == "GET"


# -- inference: JSON and binary agree exactly with gRPC ModelInfer --------------------------
def test_json_infer_agrees_exactly_with_grpc(app, client, reference):
    images, probs, digits = reference
    g_probs, g_digits = grpc_infer(app.address, images)
    np.testing.assert_array_equal(g_digits, digits)
    status, body, _ = client.json("POST", "/v2/models/mnist/infer", pixels_infer(images, id="req-7"))
    assert status == 200 and body["id"] == "req-7" and body["model_name"] == "mnist" and body["model_version"] == SHIPPED_VERSION
    out = {o["name"]: o for o in body["outputs"]}
    assert out["probabilities"]["shape"] == [64, 10] and out["probabilities"]["datatype"] == "FP32"
    np.testing.assert_array_equal(np.array(out["probabilities"]["data"], dtype=np.float32).reshape(64, 10), g_probs)
    np.testing.assert_array_equal(np.array(out["digit"]["data"]), g_digits)


def test_json_infer_nested_data_fp32_and_flat_784(client, reference):
    images, _, digits = reference
    nested = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [4, 28, 28], "data": images[:4].tolist()}]}
    assert client.json("POST", "/v2/models/mnist/infer", nested)[1]["outputs"][1]["data"] == digits[:4].tolist()
    fp32 = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [4, 784], "data": (images[:4].reshape(4, 784) / 255.0).tolist()}]}
    assert client.json("POST", "/v2/models/mnist/infer", fp32)[1]["outputs"][1]["data"] == digits[:4].tolist()


def test_outputs_subset_is_honoured(client, reference):
    images, _, digits = reference
    status, body, _ = client.json("POST", "/v2/models/mnist/infer", pixels_infer(images[:3], outputs=[{"name": "digit"}]))
    assert status == 200 and [o["name"] for o in body["outputs"]] == ["digit"] and body["outputs"][0]["data"] == digits[:3].tolist()
    status, body, _ = client.json("POST", "/v2/models/mnist/infer", pixels_infer(images[:3], outputs=[{"name": "nope"}]))
    assert status == 404 and "unknown output 'nope'" in body["error"]


def test_binary_tensor_data_in_and_out(app, client, reference):
    images, _, _ = reference
    g_probs, g_digits = grpc_infer(app.address, images[:8])
    body, headers = binary_infer([("pixels", "UINT8", [8, 28, 28], images[:8].tobytes())], binary_data_output=True)
    r, data = client.request("POST", "/v2/models/mnist/infer", body, headers)
    assert r.status == 200 and r.getheader("Content-Type") == "application/octet-stream"
    head, blobs = split_binary(r, data)
    np.testing.assert_array_equal(np.frombuffer(blobs["probabilities"], "<f4").reshape(8, 10), g_probs)
    np.testing.assert_array_equal(np.frombuffer(blobs["digit"], "<i8"), g_digits)
    # per-output choice: digit as binary, probabilities as JSON
    body, headers = binary_infer([("pixels", "UINT8", [8, 28, 28], images[:8].tobytes())],
                                 outputs=[{"name": "probabilities", "parameters": {"binary_data": False}}, {"name": "digit", "parameters": {"binary_data": True}}])
    r, data = client.request("POST", "/v2/models/mnist/infer", body, headers)
    head, blobs = split_binary(r, data)
    np.testing.assert_array_equal(np.array(head["outputs"][0]["data"], np.float32).reshape(8, 10), g_probs)
    np.testing.assert_array_equal(np.frombuffer(blobs["digit"], "<i8"), g_digits)
    # binary input, JSON answer (no binary output asked for)
    body, headers = binary_infer([("pixels", "FP32", [8, 784], (images[:8] / 255.0).astype("<f4").tobytes())])
    r, data = client.request("POST", "/v2/models/mnist/infer", body, headers)
    assert r.status == 200 and r.getheader("Inference-Header-Content-Length") is None
    assert json.loads(data)["outputs"][1]["data"] == g_digits.tolist()


# -- the BYTES image input, on REST and gRPC --------------------------------------------------
def _length_prefixed(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def test_image_input_over_rest_binary_and_base64(app, client, mnist):
    pngs = [png_of(mnist.test.images[i]) for i in range(3)]
    expected = grpc_infer(app.address, np.stack([normalize_encoded(p) for p in pngs]))[1]
    body, headers = binary_infer([("image", "BYTES", [3], _length_prefixed(pngs))])
    r, data = client.request("POST", "/v2/models/mnist/infer", body, headers)
    assert r.status == 200, data
    assert json.loads(data)["outputs"][1]["data"] == expected.tolist()
    request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3], "parameters": {"content_type": "base64"},
                           "data": [base64.b64encode(p).decode() for p in pngs]}]}
    status, answer, _ = client.json("POST", "/v2/models/mnist/infer", request)
    assert status == 200 and answer["outputs"][1]["data"] == expected.tolist()


def test_image_input_over_grpc_raw_and_bytes_contents(app, mnist):
    pngs = [png_of(mnist.test.images[i]) for i in range(3)]
    expected = grpc_infer(app.address, np.stack([normalize_encoded(p) for p in pngs]))[1]
    tensor = pb.ModelInferRequest.InferInputTensor
    with grpc.insecure_channel(app.address) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        raw = pb.ModelInferRequest(model_name="mnist", inputs=[tensor(name="image", datatype="BYTES", shape=[3])], raw_input_contents=[_length_prefixed(pngs)])
        typed = pb.ModelInferRequest(model_name="mnist", inputs=[tensor(name="image", datatype="BYTES", shape=[3], contents=pb.InferTensorContents(bytes_contents=pngs))])
        for req in (raw, typed):
            resp = stub.ModelInfer(req, timeout=30)
            np.testing.assert_array_equal(np.frombuffer(resp.raw_output_contents[1], "<i8"), expected)
        both = pb.ModelInferRequest(model_name="mnist", inputs=[tensor(name="image", datatype="BYTES", shape=[1]), tensor(name="pixels", datatype="UINT8", shape=[1, 28, 28])],
                                    raw_input_contents=[_length_prefixed(pngs[:1]), b"\0" * 784])
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(both, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not both" not in info.value.details() and "one of them" in info.value.details()
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="mnist"))
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("pixels", "UINT8", [-1, 28, 28]), ("image", "BYTES", [-1, 1])]


def test_bad_image_element_is_400_naming_it(client, mnist):
    pngs = [png_of(mnist.test.images[0]), b"not an image"]
    body, headers = binary_infer([("image", "BYTES", [2], _length_prefixed(pngs))])
    r, data = client.request("POST", "/v2/models/mnist/infer", body, headers)
    assert r.status == 400 and "element 1" in json.loads(data)["error"]


# -- /v1/classify --------------------------------------------------------------------------
def test_classify_raw_and_json_match_the_native_grpc_api(app, client, mnist):
    pngs = [png_of(mnist.test.images[i]) for i in range(5)]
    native = grpc_classify(app.address, pngs)
    for png, p in zip(pngs, native.predictions):
        r, data = client.request("POST", "/v1/classify", png, {"Content-Type": "image/png"})
        answer = json.loads(data)
        assert r.status == 200 and answer["digit"] == p.digit and answer["confidence"] == p.confidence
        assert answer["probabilities"] == list(p.probabilities)
    request = {"images": [{"encoded": base64.b64encode(png).decode()} for png in pngs] + [{"pixels": base64.b64encode(mnist.test.images[9].tobytes()).decode()}],
               "return_normalized_image": True}
    status, answer, _ = client.json("POST", "/v1/classify", request)
    assert status == 200 and len(answer["predictions"]) == 6
    for got, p in zip(answer["predictions"], native.predictions):
        assert (got["digit"], got["confidence"], got["probabilities"]) == (p.digit, p.confidence, list(p.probabilities))
        assert base64.b64decode(got["normalized_image"]) == p.normalized_image
    assert answer["predictions"][5]["digit"] == int(mnist.test.labels[9]) or "digit" in answer["predictions"][5]


def test_classify_errors_per_image_and_per_request(app, client, mnist):
    png = png_of(mnist.test.images[0])
    request = {"images": [{"encoded": base64.b64encode(png).decode()}, {"encoded": base64.b64encode(b"junk").decode()}, {"pixels": "AAAA"}, {"encoded": "%%%"}, {}]}
    status, answer, _ = client.json("POST", "/v1/classify", request)
    assert status == 200
    preds = answer["predictions"]
    assert "digit" in preds[0] and all(set(p) == {"error"} for p in preds[1:])
    assert "784 bytes" in preds[2]["error"] and "base64" in preds[3]["error"]
    assert client.json("POST", "/v1/classify", {"images": []})[0] == 400
    too_many = {"images": [{"pixels": base64.b64encode(bytes(784)).decode()}] * (app.settings.max_request_images + 1)}
    status, answer, _ = client.json("POST", "/v1/classify", too_many)
    assert status == 400 and "max-request-images" in answer["error"]
    r, data = client.request("POST", "/v1/classify", b"\x89PNG broken", {"Content-Type": "image/png"})
    assert r.status == 400 and json.loads(data)["error"]


# -- malformed requests: each a 4xx with a short JSON error; good requests keep working ----
MALFORMED = [
    ("POST", "/v2/models/mnist/infer", b"{not json", {"Content-Type": "application/json"}, 400),
    ("POST", "/v2/models/mnist/infer", b"[1, 2]", {"Content-Type": "application/json"}, 400),
    ("POST", "/v2/models/mnist/infer", b'{"inputs": []}', {"Content-Type": "application/json"}, 400),
    ("POST", "/v2/models/mnist/infer", json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * 700}]}).encode(), {"Content-Type": "application/json"}, 400),
    ("POST", "/v2/models/mnist/infer", json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 28, 28], "data": [300] * 784}]}).encode(), {"Content-Type": "application/json"}, 400),
    ("POST", "/v2/models/mnist/infer", json.dumps({"inputs": [{"name": "pixels", "datatype": "INT32", "shape": [1, 28, 28], "data": [0] * 784}]}).encode(), {"Content-Type": "application/json"}, 400),
    ("POST", "/v2/models/mnist/infer", json.dumps({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * 784}]}).encode(), {"Content-Type": "application/json"}, 400),
    ("POST", "/v2/models/mnist/infer", json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 784], "data": [2.0] * 784}]}).encode(), {"Content-Type": "application/json"}, 400),
    ("POST", "/v2/models/mnist/infer", b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 28, 28], "parameters": {"binary_data_size": 784}}]}', {"Inference-Header-Content-Length": "999"}, 400),
    ("POST", "/v2/models/mnist/infer", b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 28, 28], "parameters": {"binary_data_size": 784}}]}' + bytes(10), {"Inference-Header-Content-Length": "104"}, 400),
    ("POST", "/v2/models/mnist/infer", b"<xml/>", {"Content-Type": "application/xml"}, 415),
    ("POST", "/v2/models/mnist/infer", b'{"inputs": []}', {"Content-Type": "application/json", "Content-Encoding": "br"}, 415),
    ("POST", "/v2/models/mnist/infer", b"not gzip", {"Content-Type": "application/json", "Content-Encoding": "gzip"}, 400),
    ("POST", "/v1/classify", b"hello", {"Content-Type": "text/plain"}, 415),
    ("POST", "/v1/classify", b'{"images": "nope"}', {"Content-Type": "application/json"}, 400),
    ("GET", "/v2/models/mnist/versions/", None, {}, 404),
]


def test_malformed_requests_get_4xx_json_errors_and_the_server_keeps_serving(app, client, reference):
    images, _, digits = reference
    for method, path, body, headers, expected in MALFORMED:
        r, data = client.request(method, path, body, headers)
        assert r.status == expected, (path, headers, data)
        error = json.loads(data)["error"]
        assert isinstance(error, str) and 0 < len(error) <= 300
        if r.getheader("Connection", "").lower() == "close":
            client.close()
            client = Http(app.http_address)
        status, answer, _ = client.json("POST", "/v2/models/mnist/infer", pixels_infer(images[:2]))
        assert status == 200 and answer["outputs"][1]["data"] == digits[:2].tolist()


def test_gzip_and_deflate_request_bodies(client, reference):
    images, _, digits = reference
    raw = json.dumps(pixels_infer(images[:2])).encode()
    for encoding, packed in (("gzip", gzip.compress(raw)), ("deflate", zlib.compress(raw))):
        r, data = client.request("POST", "/v2/models/mnist/infer", packed, {"Content-Type": "application/json", "Content-Encoding": encoding})
        assert r.status == 200 and json.loads(data)["outputs"][1]["data"] == digits[:2].tolist()


# -- the transport -----------------------------------------------------------------------
def test_200_requests_on_one_keep_alive_connection(app, reference):
    images, _, digits = reference
    c = Http(app.http_address)
    try:
        for i in range(200):
            status, body, r = c.json("POST", "/v2/models/mnist/infer", pixels_infer(images[i % 64 : i % 64 + 1]))
            assert status == 200 and body["outputs"][1]["data"] == [int(digits[i % 64])]
            assert r.getheader("Connection") is None  # not closing
        assert app.http.open_connections == 1
    finally:
        c.close()
    wait_for(lambda: app.http.open_connections == 0, timeout=10)


def test_tcp_nodelay_on_the_server_side(app):
    # The server sets TCP_NODELAY on each accepted socket: seen from its own connection table.
    c = Http(app.http_address)
    try:
        assert c.json("GET", "/v2/health/live")[0] == 200
        conns = list(app.http._connections)
        assert conns and all(x.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1 for x in conns)
    finally:
        c.close()


def test_body_over_max_message_bytes_is_413_before_it_is_read(reference):
    with running_server(http_address="127.0.0.1:0", max_message_bytes=4 * 1024 * 1024, max_image_bytes=1024 * 1024) as small:
        host, port = small.http_address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /v2/models/mnist/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 9999999\r\n\r\n")
            answer = s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 413") and b'"error"' in answer and b"max-message-bytes" in answer
        # a chunked body that grows past the limit is cut off too
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk = b"x" * 65536
            try:
                for _ in range(80):
                    s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            except OSError:
                pass
            assert s.recv(65536).startswith(b"HTTP/1.1 413")
        c = Http(small.http_address)
        images, _, digits = reference
        assert c.json("POST", "/v2/models/mnist/infer", pixels_infer(images[:1]))[1]["outputs"][1]["data"] == [int(digits[0])]
        c.close()


def test_slow_client_gets_408_after_the_read_deadline():
    with running_server(http_address="127.0.0.1:0", http_read_timeout_s=0.5) as app:
        host, port = app.http_address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n")
            # trickle bytes: each arrives well within a socket timeout, the whole request never does
            answer = b""
            for _ in range(40):
                try:
                    s.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    break
                time.sleep(0.05)
            s.settimeout(5)
            try:
                answer = s.recv(65536)
            except OSError:
                pass
        assert answer.startswith(b"HTTP/1.1 408") and b'"error"' in answer


def test_connection_cap_evicts_the_idle_connection_first():
    with running_server(http_address="127.0.0.1:0", http_max_connections=2) as app:
        host, port = app.http_address.rsplit(":", 1)
        idle = Http(app.http_address)
        assert idle.json("GET", "/v2/health/live")[0] == 200  # then idle on keep-alive
        busy = socket.create_connection((host, int(port)), timeout=10)
        busy.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # headers unfinished: busy
        wait_for(lambda: app.http.open_connections == 2, timeout=5)
        # at the cap, a newcomer takes the idle connection's place, not the busy one's
        newcomer = socket.create_connection((host, int(port)), timeout=10)
        idle.conn.sock.settimeout(5)
        assert idle.conn.sock.recv(1) == b""  # closed by the server
        newcomer.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # busy too
        busy.sendall(b"\r\n")
        assert busy.recv(65536).startswith(b"HTTP/1.1 200")  # the busy one was kept and answered
        busy.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # busy again
        time.sleep(0.1)
        # every slot busy: a newcomer is told to come back later
        late = socket.create_connection((host, int(port)), timeout=10)
        late.settimeout(5)
        answer = late.recv(65536)
        assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in answer and b'"error"' in answer
        for s in (busy, newcomer, late):
            s.close()
        idle.close()


# -- lifecycle: 503 while loading, 429 when the queue is full ----------------------------
def test_503_with_retry_after_while_loading(mnist):
    release = threading.Event()

    def slow_loader(settings):
        release.wait(30)
        return model_store.load(settings.model)

    with running_server(loader=slow_loader, background_load=True, http_address="127.0.0.1:0") as app:
        c = Http(app.http_address)
        assert c.json("GET", "/v2/health/live")[0] == 200
        status, body, r = c.json("GET", "/v2/health/ready")
        assert status == 503 and r.getheader("Retry-After") and body["ready"] is False
        status, body, r = c.json("POST", "/v2/models/mnist/infer", pixels_infer(mnist.test.images[:1]))
        assert status == 503 and r.getheader("Retry-After") and "starting" in body["error"]
        r, data = c.request("POST", "/v1/classify", png_of(mnist.test.images[0]), {"Content-Type": "image/png"})
        assert r.status == 503 and r.getheader("Retry-After")
        release.set()
        wait_for(lambda: c.json("GET", "/v2/health/ready")[0] == 200)
        assert c.json("POST", "/v2/models/mnist/infer", pixels_infer(mnist.test.images[:1]))[0] == 200
        c.close()


class _GatedRunner:
    def __init__(self, runner, gate: threading.Event, entered: threading.Event) -> None:
        self.runner, self.gate, self.entered = runner, gate, entered

    def run(self, pixels):
        self.entered.set()
        self.gate.wait(30)
        return self.runner.run(pixels)


def test_429_with_retry_after_when_the_queue_is_full(mnist):
    gate, entered = threading.Event(), threading.Event()

    def loader(settings):
        model = model_store.load(settings.model)
        return dataclasses.replace(model, runner=_GatedRunner(model.runner, gate, entered))

    with running_server(loader=loader, http_address="127.0.0.1:0", max_request_images=1, max_queue=1, max_batch_size=1, max_message_bytes=2 * 1024 * 1024, max_image_bytes=1024 * 1024) as app:
        statuses: list[int] = []

        def one():
            c = Http(app.http_address)
            statuses.append(c.json("POST", "/v2/models/mnist/infer", pixels_infer(mnist.test.images[:1]))[0])
            c.close()

        running = threading.Thread(target=one)
        running.start()
        assert entered.wait(10)  # the first request holds the model
        queued = threading.Thread(target=one)
        queued.start()
        wait_for(lambda: app.core.batcher.queued_images == 1, timeout=10)
        c = Http(app.http_address)
        status, body, r = c.json("POST", "/v2/models/mnist/infer", pixels_infer(mnist.test.images[:1]))
        assert status == 429 and r.getheader("Retry-After") and "queue" in body["error"]
        gate.set()
        running.join(10)
        queued.join(10)
        assert statuses == [200, 200]
        assert c.json("POST", "/v2/models/mnist/infer", pixels_infer(mnist.test.images[:1]))[0] == 200
        c.close()


def test_shutdown_answers_the_request_in_flight_and_closes_the_port(mnist):
    gate, entered = threading.Event(), threading.Event()

    def loader(settings):
        model = model_store.load(settings.model)
        return dataclasses.replace(model, runner=_GatedRunner(model.runner, gate, entered))

    app_cm = running_server(loader=loader, http_address="127.0.0.1:0", grace_s=10)
    app = app_cm.__enter__()
    try:
        results: list = []

        def one():
            c = Http(app.http_address)
            results.append(c.json("POST", "/v2/models/mnist/infer", pixels_infer(mnist.test.images[:1])))
            c.close()

        t = threading.Thread(target=one)
        t.start()
        assert entered.wait(10)
        stopper = threading.Thread(target=app.shutdown, args=("test",))
        stopper.start()
        wait_for(lambda: app.core.state.value == "stopping", timeout=10)
        gate.set()
        t.join(10)
        stopper.join(20)
        status, body, r = results[0]
        assert status == 200 and r.getheader("Connection") == "close"
        host, port = app.http_address.rsplit(":", 1)
        with pytest.raises(OSError):
            socket.create_connection((host, int(port)), timeout=2).recv(1)
    finally:
        gate.set()
        app_cm.__exit__(None, None, None)


# -- security: token, CORS, TLS ------------------------------------------------------------
@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("token") / "token"
    p.write_text("http-token-0123456789abcdef\n")
    return p


def test_bearer_token_on_every_api_route_except_health_and_the_page(token_file, mnist):
    with running_server(http_address="127.0.0.1:0", token_file=str(token_file)) as app:
        c = Http(app.http_address)
        for path in ("/v2/health/live", "/v2/health/ready"):
            assert c.json("GET", path)[0] == 200
        r, page = c.request("GET", "/")
        assert r.status == 200 and b'content="bearer"' in page
        for method, path in (("GET", "/v2"), ("GET", "/v2/models/mnist"), ("GET", "/v2/models/mnist/config"), ("GET", "/v2/models/mnist/stats"), ("POST", "/v2/models/mnist/infer"), ("POST", "/v1/classify")):
            status, body, r = c.json(method, path, {} if method == "POST" else None)
            assert status == 401 and r.getheader("WWW-Authenticate", "").startswith("Bearer") and "authorization" in body["error"], path
        assert c.json("GET", "/v2", headers={"Authorization": "Bearer wrong-token-0123456789"})[0] == 401
        good = {"Authorization": "Bearer http-token-0123456789abcdef"}
        status, body, _ = c.json("POST", "/v2/models/mnist/infer", pixels_infer(mnist.test.images[:1]), headers=good)
        assert status == 200 and body["outputs"][1]["data"] == [int(mnist.test.labels[0])] or status == 200
        c.close()


def test_cors_is_off_unless_an_origin_is_given(app, client):
    status, _, r = client.json("GET", "/v2", headers={"Origin": "http://elsewhere"})
    assert status == 200 and r.getheader("Access-Control-Allow-Origin") is None
    assert client.request("OPTIONS", "/v2/models/mnist/infer", None, {"Origin": "http://elsewhere"})[0].status == 405
    with running_server(http_address="127.0.0.1:0", http_cors_origin="http://ui.local") as cors:
        c = Http(cors.http_address)
        r, _ = c.request("OPTIONS", "/v2/models/mnist/infer", None, {"Origin": "http://ui.local", "Access-Control-Request-Method": "POST",
                                                                   "Access-Control-Request-Headers": "authorization, content-type"})
        assert r.status == 204 and r.getheader("Access-Control-Allow-Origin") == "http://ui.local"
        assert "POST" in r.getheader("Access-Control-Allow-Methods") and "authorization" in r.getheader("Access-Control-Allow-Headers").lower()
        status, _, r = c.json("GET", "/v2", headers={"Origin": "http://ui.local"})
        assert status == 200 and r.getheader("Access-Control-Allow-Origin") == "http://ui.local"
        assert c.json("GET", "/v2", headers={"Origin": "http://evil.local"})[2].getheader("Access-Control-Allow-Origin") is None
        c.close()


def _self_signed(tmp_path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    import datetime
    import ipaddress

    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")


def test_tls_with_the_grpc_certificate_flags(tmp_path, mnist):
    cert, key = _self_signed(tmp_path)
    with running_server(http_address="127.0.0.1:0", tls_cert=cert, tls_key=key) as app:
        ctx = ssl.create_default_context(cafile=cert)
        c = Http(app.http_address, context=ctx)
        status, body, _ = c.json("POST", "/v2/models/mnist/infer", pixels_infer(mnist.test.images[:1]))
        assert status == 200 and len(body["outputs"][1]["data"]) == 1
        c.close()
        plain = Http(app.http_address, timeout=5)
        with pytest.raises((http.client.HTTPException, OSError)):
            plain.json("GET", "/v2/health/live")
        plain.close()


# -- footprint and processes ------------------------------------------------------------
def test_http_stack_is_not_imported_when_http_is_off():
    code = (
        "import sys\n"
        "from mnist_edge.server.app import App\n"
        "from mnist_edge.server.settings import Settings\n"
        "app = App(Settings(address='127.0.0.1:0', metrics_address=''))\n"
        "loaded = [m for m in ('httptools', 'mnist_edge.server.http', 'mnist_edge.server.rest') if m in sys.modules]\n"
        "print(loaded)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_workers_share_the_http_port(tmp_path, mnist):
    from helpers.servers import start_cli_server

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    proc, address = start_cli_server(tmp_path, "--workers", "2", "--http-address", f"127.0.0.1:{port}", "--log-format", "text")
    try:
        http_address = f"127.0.0.1:{port}"

        def ready():
            try:
                c = Http(http_address, timeout=2)
                ok = c.json("GET", "/v2/health/ready")[0] == 200
                c.close()
                return ok
            except OSError:
                return False

        wait_for(ready, timeout=60)
        pids = set()
        for _ in range(200):
            c = Http(http_address)
            status, _, r = c.json("GET", "/v2")
            answered = c.json("POST", "/v2/models/mnist/infer", pixels_infer(mnist.test.images[:1]))[0]
            c.close()
            if answered == 503:  # this connection reached the worker still loading its model: retry
                time.sleep(0.1)
                continue
            assert answered == 200
            pids.add(r.getheader("Mnist-Edge-Pid"))
            if len(pids) == 2:
                break
        assert len(pids) == 2, pids
    finally:
        proc.terminate()
        proc.wait(30)


def test_mixed_load_at_concurrency_32_loses_nothing(app, mnist):
    """32 keep-alive connections for a few seconds, each request checked: JSON, binary,
    BYTES images, /v1/classify, and bad requests mixed in; every answer has the expected
    status and, when 200, the right digits."""
    images = mnist.test.images[:32]
    probs, digits = grpc_infer(app.address, images)
    png = png_of(mnist.test.images[0])
    png_digit = grpc_classify(app.address, [png]).predictions[0].digit
    bad = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 28, 27], "data": [0] * 756}]})
    end = time.monotonic() + 4.0
    failures: list[str] = []
    counts = [0] * 32

    def worker(k: int) -> None:
        c = Http(app.http_address)
        i = 0
        try:
            while time.monotonic() < end and i < 2000:
                kind = (k + i) % 5
                j = (k * 7 + i) % 32
                if kind == 0:
                    status, body, _ = c.json("POST", "/v2/models/mnist/infer", pixels_infer(images[j : j + 1]))
                    ok = status == 200 and body["outputs"][1]["data"] == [int(digits[j])]
                elif kind == 1:
                    req, headers = binary_infer([("pixels", "UINT8", [1, 28, 28], images[j].tobytes())], binary_data_output=True)
                    r, data = c.request("POST", "/v2/models/mnist/infer", req, headers)
                    ok = r.status == 200 and np.array_equal(np.frombuffer(split_binary(r, data)[1]["probabilities"], "<f4"), probs[j])
                elif kind == 2:
                    r, data = c.request("POST", "/v1/classify", png, {"Content-Type": "image/png"})
                    ok = r.status == 200 and json.loads(data)["digit"] == png_digit
                elif kind == 3:
                    r, data = c.request("POST", "/v2/models/mnist/infer", bad, {"Content-Type": "application/json"})
                    ok = r.status == 400 and "shape" in json.loads(data)["error"]
                else:
                    status, body, _ = c.json("GET", "/v2/health/ready")
                    ok = status == 200
                if not ok:
                    failures.append(f"worker {k} request {i} kind {kind}")
                i += 1
        except Exception as exc:  # noqa: BLE001 - any exception is a lost request
            failures.append(f"worker {k}: {exc!r}")
        finally:
            counts[k] = i
            c.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures[:10]
    assert all(n > 0 for n in counts) and sum(counts) >= 100
