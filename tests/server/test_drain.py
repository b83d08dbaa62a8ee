"""Issue 18: SIGTERM under load loses nothing. Every call is answered OK with the right digits,
or refused before it started (UNAVAILABLE, RESOURCE_EXHAUSTED); none ends CANCELLED or
DEADLINE_EXCEEDED; the process exits 0. Load: 32 callers, each sending 1, 8, 64 and 256
images in turn, bounded in time; loopback only."""

from __future__ import annotations

import collections
import signal
import threading
import time

import grpc
import numpy as np
import pytest

from helpers.servers import health_status, start_cli_server, wait_for
from mnist_edge.protos.inference import grpc_service_pb2 as pb
from mnist_edge.protos.inference import grpc_service_pb2_grpc as pb_grpc

CALLERS = 32
SIZES = (1, 8, 64, 256)
LOAD_S = 3.0
REFUSED_BEFORE_START = {"UNAVAILABLE", "RESOURCE_EXHAUSTED"}


def request(images: np.ndarray) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="mnist",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=[len(images), 28, 28])],
        raw_input_contents=[images.tobytes()],
    )


def digits(response: pb.ModelInferResponse) -> list[int]:
    i = [t.name for t in response.outputs].index("digit")
    return np.frombuffer(response.raw_output_contents[i], "<i8").tolist()


def one_shutdown(tmp_path, images: np.ndarray, *flags: str) -> tuple[collections.Counter, int, int]:
    """(statuses of every call, wrong answers, exit code) for one SIGTERM under load."""
    proc, address = start_cli_server(tmp_path, "--drain-delay-s", "1", "--grace-s", "5", *flags)
    try:
        wait_for(lambda: health_status(address) == "SERVING", timeout=60)
        with grpc.insecure_channel(address) as ch:
            expected = digits(pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(request(images), timeout=30))
        statuses: collections.Counter = collections.Counter()
        wrong = [0]
        lock = threading.Lock()
        stop = threading.Event()

        def caller(k: int) -> None:
            with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                stub = pb_grpc.GRPCInferenceServiceStub(ch)
                i = k
                while not stop.is_set():
                    n = SIZES[i % len(SIZES)]
                    i += 1
                    try:
                        got = digits(stub.ModelInfer(request(images[:n]), timeout=20))
                        code = "OK"
                    except grpc.RpcError as exc:
                        got, code = None, exc.code().name
                    with lock:
                        statuses[code] += 1
                        wrong[0] += got is not None and got != expected[:n]
                    if code != "OK":
                        time.sleep(0.01)  # refused (the server is going away): do not spin

        threads = [threading.Thread(target=caller, args=(k,), daemon=True) for k in range(CALLERS)]
        for t in threads:
            t.start()
        time.sleep(LOAD_S)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        stop.set()
        for t in threads:
            t.join(30)
        return statuses, wrong[0], code
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("flags", [(), ("--no-infer-lane",)], ids=["lane", "threads"])
def test_sigterm_under_load_answers_or_refuses_every_call_before_it_starts(tmp_path, mnist, flags):
    images = np.ascontiguousarray(mnist.test.images[:256])
    for _ in range(2):
        statuses, wrong, code = one_shutdown(tmp_path, images, *flags)
        assert code == 0
        assert wrong == 0
        assert statuses["OK"] > 0
        assert set(statuses) <= {"OK"} | REFUSED_BEFORE_START, statuses


