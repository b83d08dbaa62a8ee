"""Hostile input, property-based: every decoder and validator either answers correctly or fails
with the documented status; nothing else (no crash, no other exception type) is allowed."""

from __future__ import annotations

import io
import struct

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mnist_edge.imaging.idx import IdxError, encode_idx, parse_idx
from mnist_edge.imaging.normalize import ImageError, ImageLimits, normalize, normalize_encoded
from mnist_edge.protos.digits.v1 import digits_pb2 as dpb
from mnist_edge.protos.digits.v1 import digits_pb2_grpc as dpb_grpc
from mnist_edge.protos.inference import grpc_service_pb2 as pb
from mnist_edge.protos.inference import grpc_service_pb2_grpc as pb_grpc
from mnist_edge.server.errors import ServingError
from mnist_edge.server.v2 import decode_infer

DOCUMENTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
Tensor = pb.ModelInferRequest.InferInputTensor
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.floats(min_value=0.0, max_value=1.0, width=32),
    st.sampled_from([0.0, 1.0, -0.0, 1.0000001, -1e-9, 3.4e38, float("nan"), float("inf"), float("-inf")]),
)
dims = st.one_of(st.integers(-3, 3000), st.sampled_from([28, 784, 0, 1, -1, 2**40]))


@st.composite
def infer_requests(draw) -> pb.ModelInferRequest:
    n = draw(st.integers(-2, 6))
    datatype = draw(st.sampled_from(["UINT8", "FP32", "INT32", "FP16", "BYTES", "", "uint8", "UINT8 "]))
    shape = draw(st.one_of(
        st.just([n, 28, 28]), st.just([n, 784]), st.lists(dims, max_size=5),
    ))
    name = draw(st.sampled_from(["pixels", "pixels", "pixels", "image", "", "PIXELS"]))
    tensor = Tensor(name=name, datatype=datatype, shape=shape)
    req = pb.ModelInferRequest(model_name=draw(st.sampled_from(["mnist", "mnist", "other", ""])), inputs=[tensor])
    kind = draw(st.sampled_from(["raw-exact", "raw-random", "typed", "both", "none", "two-raw"]))
    count = max(n, 0) * 784
    if kind == "raw-exact":
        if datatype == "FP32":
            values = draw(st.lists(floats, min_size=count, max_size=count)) if count <= 784 * 2 else [0.5] * count
            req.raw_input_contents.append(np.asarray(values, dtype="<f4").tobytes())
        else:
            req.raw_input_contents.append(draw(st.binary(min_size=count, max_size=count)) if count <= 784 * 3 else b"\x01" * count)
    elif kind == "raw-random":
        req.raw_input_contents.append(draw(st.binary(max_size=4000)))
    elif kind == "typed":
        if datatype == "FP32":
            tensor.contents.fp32_contents.extend(draw(st.lists(floats, max_size=1600)))
        else:
            tensor.contents.uint_contents.extend(draw(st.lists(st.integers(0, 2**32 - 1), max_size=1600)))
        req.inputs[0].CopyFrom(tensor)
    elif kind == "both":
        tensor.contents.uint_contents.extend([1] * 784)
        req.inputs[0].CopyFrom(tensor)
        req.raw_input_contents.append(b"\0" * 784)
    elif kind == "two-raw":
        req.raw_input_contents.extend([b"\0" * 784, b"\0" * 784])
    if draw(st.booleans()):
        req.inputs.append(Tensor(name=draw(st.sampled_from(["pixels", "extra"])), datatype="UINT8", shape=[1, 784]))
    if draw(st.integers(0, 9)) == 0:
        req.parameters["priority"].int64_param = 1
    for out in draw(st.lists(st.sampled_from(["digit", "probabilities", "logits", ""]), max_size=3)):
        req.outputs.add(name=out)
    return req


@FAST
@given(infer_requests())
def test_v2_decoder_answers_or_names_the_problem(req):
    try:
        decoded = decode_infer(req, max_images=4)
    except ServingError as exc:
        assert exc.code in DOCUMENTED, (exc.code, exc.message)
        assert exc.message
        return
    # Accepted: then it really is a well-formed request.
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.ndim == 3 and decoded.pixels.shape[1:] == (28, 28)
    assert 1 <= decoded.pixels.shape[0] <= 4
    assert req.inputs[0].name == "pixels" and req.inputs[0].datatype in ("UINT8", "FP32")
    assert set(decoded.outputs) <= {"digit", "probabilities"}


@FAST
@given(st.binary(max_size=2000))
def test_idx_parser_on_random_bytes(data):
    try:
        arr = parse_idx(data)
    except IdxError as exc:
        assert str(exc)
        return
    assert arr.size * arr.dtype.itemsize + 4 + 4 * arr.ndim == len(data)


@FAST
@given(st.data())
def test_idx_parser_on_mutated_files(data):
    good = encode_idx(np.arange(2 * 5 * 5, dtype=np.uint8).reshape(2, 5, 5))
    cut = data.draw(st.integers(0, len(good)))
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(0, 255)), max_size=4))
    blob = bytearray(good[:cut] if data.draw(st.booleans()) else good)
    for pos, val in flips:
        if pos < len(blob):
            blob[pos] = val
    try:
        parse_idx(bytes(blob))
    except IdxError:
        pass


@FAST
@given(st.one_of(
    st.lists(st.lists(floats, min_size=1, max_size=40), min_size=1, max_size=40).filter(lambda rows: len({len(r) for r in rows}) == 1),
))
def test_normaliser_on_random_arrays(rows):
    a = np.asarray(rows, dtype=np.float32)
    try:
        out = normalize(a)
    except ImageError as exc:
        assert str(exc)
        return
    assert out.shape == (28, 28) and out.dtype == np.uint8


def _valid_images() -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for fmt in ("PNG", "JPEG", "BMP", "PPM"):
        img = np.zeros((40, 30), np.uint8)
        img[5:35, 12:18] = 255
        img = np.clip(img + rng.integers(0, 20, img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


VALID = _valid_images()
LIMITS = ImageLimits(max_bytes=64 * 1024, max_pixels=256 * 256)


@FAST
@given(st.data())
def test_image_decoder_on_truncated_and_mutated_images(data):
    blob = bytearray(data.draw(st.sampled_from(VALID)))
    mode = data.draw(st.sampled_from(["truncate", "flip", "splice", "random"]))
    if mode == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    elif mode == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    elif mode == "splice":
        at = data.draw(st.integers(0, len(blob)))
        blob[at:at] = data.draw(st.binary(max_size=64))
    else:
        blob = bytearray(data.draw(st.binary(max_size=512)))
    try:
        out = normalize_encoded(bytes(blob), LIMITS)
    except ImageError as exc:
        assert str(exc)
        return
    assert out.shape == (28, 28) and out.dtype == np.uint8


@FAST
@given(st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1))
def test_header_sizes_over_the_limit_are_refused_without_decoding(width, height):
    """PNG headers declaring any size: over the pixel limit means refused, whatever the data."""
    def chunk(kind, payload):
        import zlib

        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)

    blob = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")
    try:
        normalize_encoded(blob, LIMITS)
    except ImageError as exc:
        if width * height > LIMITS.max_pixels:
            assert "refused before decoding" in str(exc) or "too many pixels" in str(exc), str(exc)
        return
    raise AssertionError("an image with no pixel data cannot be decoded")


# -- through a real server: only the documented statuses, and it keeps serving ----------------

@pytest.fixture(scope="module")
def stubs(channel):
    return pb_grpc.GRPCInferenceServiceStub(channel), dpb_grpc.DigitClassifierStub(channel)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(infer_requests())
def test_server_answers_hostile_v2_requests_with_documented_statuses(stubs, req):
    v2, _ = stubs
    try:
        resp = v2.ModelInfer(req, timeout=30)
    except grpc.RpcError as exc:
        assert exc.code() in DOCUMENTED, (exc.code(), exc.details())
        return
    assert len(resp.raw_output_contents) == len(resp.outputs) >= 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(
    st.builds(lambda b: dpb.Image(pixels=b), st.binary(max_size=1000)),
    st.builds(lambda b: dpb.Image(encoded=b), st.binary(max_size=600)),
    st.builds(lambda b: dpb.Image(encoded=b), st.sampled_from(VALID)),
    st.just(dpb.Image()),
), max_size=6))
def test_server_answers_hostile_native_requests(stubs, images):
    _, native = stubs
    try:
        resp = native.Classify(dpb.ClassifyRequest(images=images), timeout=30)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT and not images, (exc.code(), exc.details())
        return
    assert len(resp.predictions) == len(images)
    for image, p in zip(images, resp.predictions):
        if p.HasField("error"):
            assert p.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and p.error.message
        else:
            assert 0 <= p.digit <= 9
            if image.WhichOneof("data") == "pixels":
                assert len(image.pixels) == 784


def test_server_is_still_healthy_after_the_hostile_tests(server):
    from helpers.servers import health_status

    assert health_status(server.address) == "SERVING"
