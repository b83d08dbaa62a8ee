"""One handler per inference RPC (server/rpc.py): the inference lane and the handler threads
give every request the same answer, the same status and message, and the same statistics."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from helpers.servers import running_server
from mnist_edge.protos.digits.v1 import digits_pb2 as dpb
from mnist_edge.protos.inference import grpc_service_pb2 as pb
from mnist_edge.server import rpc

Tensor = pb.ModelInferRequest.InferInputTensor
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
CLASSIFY = "/digits.v1.DigitClassifier/Classify"


def infer_bytes(images: np.ndarray, model: str = "mnist", shape=None) -> bytes:
    shape = [len(images), 28, 28] if shape is None else shape
    return pb.ModelInferRequest(
        model_name=model, id="r", inputs=[Tensor(name="pixels", datatype="UINT8", shape=shape)], raw_input_contents=[images.tobytes()]
    ).SerializeToString()


def classify_bytes(*images: dpb.Image) -> bytes:
    return dpb.ClassifyRequest(images=list(images), request_id="c").SerializeToString()


def outcome(call, body: bytes):
    """(status name, details) of a failure, or the response bytes."""
    try:
        return call(body, timeout=10)
    except grpc.RpcError as exc:
        return exc.code().name, exc.details()


def exchange(app, mnist) -> tuple[list, dict, tuple[int, int]]:
    """The same requests, good and bad, on both RPCs: their outcomes, the counts by API and
    status, and the model's success and fail counts."""
    image = mnist.test.images[:1]
    with grpc.insecure_channel(app.address) as ch:
        infer, classify = ch.unary_unary(MODEL_INFER), ch.unary_unary(CLASSIFY)
        got = [
            outcome(infer, infer_bytes(image)),
            outcome(infer, infer_bytes(image, shape=[1, 27, 29])),  # decoded: model-level failure
            outcome(infer, infer_bytes(image, model="other")),  # not for this model
            outcome(infer, b"\xff\xff\xff"),  # not a ModelInferRequest
            outcome(classify, classify_bytes(dpb.Image(pixels=image.tobytes()), dpb.Image(pixels=b"\x00"))),
            outcome(classify, classify_bytes(dpb.Image(pixels=b"\x00"))),  # every image refused: OK, no model
            outcome(classify, classify_bytes()),  # no images
            outcome(classify, b"\xff\xff"),  # not a ClassifyRequest
        ]
    stats = app.core.stats
    with stats.locked():
        return got, dict(stats.requests_by), (stats.success.count, stats.fail.count)


def test_the_lane_and_the_handler_threads_answer_and_count_every_request_the_same(mnist):
    results = {}
    for on_lane in (True, False):
        with running_server(infer_lane=on_lane) as app:
            assert (app.lane is not None) is on_lane
            results[on_lane] = exchange(app, mnist)
    assert results[True] == results[False]
    got, by_status, (success, fail) = results[True]
    assert [g[0] if isinstance(g, tuple) else "OK" for g in got] == [
        "OK", "INVALID_ARGUMENT", "NOT_FOUND", "INVALID_ARGUMENT", "OK", "OK", "INVALID_ARGUMENT", "INVALID_ARGUMENT"
    ]
    assert "not a valid inference.ModelInferRequest" in got[3][1] and "not a valid digits.v1.ClassifyRequest" in got[7][1]
    assert by_status == {("v2", "OK"): 1, ("v2", "INVALID_ARGUMENT"): 2, ("v2", "NOT_FOUND"): 1,
                         ("native", "OK"): 2, ("native", "INVALID_ARGUMENT"): 2}
    # In the model's statistics: what reached decoding (not another model's request, not bytes
    # that are no request, not a request whose every image was refused).
    assert (success, fail) == (2, 2)


class FakeContext:
    def __init__(self) -> None:
        self.aborted = None

    def time_remaining(self):
        return None

    def is_active(self) -> bool:
        return True

    def abort(self, code, details):
        self.aborted = (code, details)
        raise Exception  # as grpcio's abort does


def test_a_handler_thread_call_gets_an_answer_whatever_the_rpc_does(caplog):
    class Rpc(rpc.InferenceRpc):
        method = "Broken"

        def __init__(self, behaviour) -> None:
            self.behaviour = behaviour

        def serve(self, call, request=None):
            self.behaviour(call)

    def boom(call):
        raise RuntimeError("boom")

    for behaviour, code, fragment in (
        (lambda call: call.reply(b"ok"), None, None),
        (lambda call: call.fail(grpc.StatusCode.NOT_FOUND, "nope"), grpc.StatusCode.NOT_FOUND, "nope"),
        (boom, grpc.StatusCode.INTERNAL, "internal error in Broken: RuntimeError"),
        (lambda call: None, grpc.StatusCode.INTERNAL, "left unanswered"),
    ):
        context = FakeContext()
        if code is None:
            assert Rpc(behaviour).serve_context(b"", context) == b"ok"
            continue
        with pytest.raises(Exception):  # noqa: B017 - grpcio's abort raises a bare Exception
            Rpc(behaviour).serve_context(b"", context)
        assert context.aborted[0] is code and fragment in context.aborted[1]
    assert any("boom" in str(r.exc_info) for r in caplog.records)
