"""Calls that carry no deadline must still queue behind a running batch.

grpc reports "no deadline" as a huge time_remaining(); found by `mnist-edge bench`: a queued
stream message without a deadline once failed with OverflowError (an event wait beyond
threading's limit) and came back as an internal error. Clients such as grpcurl and
tritonclient send no deadline by default.
"""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import numpy as np

from helpers.servers import running_server
from mnist_edge.protos.digits.v1 import digits_pb2 as dpb
from mnist_edge.protos.digits.v1 import digits_pb2_grpc as dpb_grpc
from mnist_edge.protos.inference import grpc_service_pb2 as pb
from mnist_edge.protos.inference import grpc_service_pb2_grpc as pb_grpc
from mnist_edge.server import model_store


def test_unary_and_stream_calls_without_deadline_wait_in_the_queue_and_succeed(mnist):
    real = model_store.load(None)
    inner = real.runner
    gate, first_running = threading.Event(), threading.Event()

    class Held:
        """The real model; the first call holds the batcher busy until the gate opens."""

        def __init__(self) -> None:
            self.calls = 0

        def run(self, pixels):
            self.calls += 1
            if self.calls == 1:
                first_running.set()
                gate.wait(30)
            return inner.run(pixels)

    held = Held()

    def loader(settings):
        real.runner = held
        return real

    images = mnist.test.images[:3]
    expected = inner.run(np.ascontiguousarray(images))[1].tolist()

    def infer(i: int) -> int:
        req = pb.ModelInferRequest(
            model_name="mnist",
            inputs=[pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=[1, 28, 28])],
            raw_input_contents=[images[i].tobytes()],
        )
        resp = stub.ModelInfer(req)  # no timeout: no deadline
        return int(np.frombuffer(resp.raw_output_contents[1], "<i8")[0])

    def stream(i: int) -> list:
        reqs = iter([dpb.ClassifyRequest(images=[dpb.Image(pixels=images[i].tobytes())], request_id=str(i))])
        return list(native.ClassifyStream(reqs))  # no timeout

    with running_server(loader=loader) as app, grpc.insecure_channel(app.address) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        native = dpb_grpc.DigitClassifierStub(ch)
        with futures.ThreadPoolExecutor(3) as pool:
            # The held batch is a stream's, on a stream thread, so the ModelInfer below (on the
            # inference lane) finds the batcher busy and waits in its queue.
            first = pool.submit(stream, 0)
            assert first_running.wait(10)
            queued_unary = pool.submit(infer, 1)
            queued_stream = pool.submit(stream, 2)
            assert _wait_queued(app, 2)  # both are waiting behind the held batch
            gate.set()
            answers = [first.result(30), queued_stream.result(30)]
            assert queued_unary.result(30) == expected[1]
    for responses, want in zip(answers, (expected[0], expected[2])):
        assert len(responses) == 1 and not responses[0].HasField("error"), responses
        assert responses[0].predictions[0].digit == want
    assert app.core.batcher.stats.expired == 0


def _wait_queued(app, n: int, timeout: float = 10.0) -> bool:
    from helpers.servers import wait_for

    try:
        wait_for(lambda: app.core.batcher.queued_images >= n, timeout)
        return True
    except Exception:  # noqa: BLE001 - reported by the caller's assert
        return False
