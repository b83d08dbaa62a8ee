"""Issue 18: junk in a request is refused quickly, in a short message, without the server's
memory or other callers paying for it (a server subprocess, loopback only)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from helpers.servers import health_status, start_cli_server, stop_cli_server, wait_for
from mnist_edge.protos.inference import grpc_service_pb2 as pb
from mnist_edge.protos.inference import grpc_service_pb2_grpc as pb_grpc

Tensor = pb.ModelInferRequest.InferInputTensor


def million_parameters() -> bytes:
    """A ~14 MB ModelInferRequest with 1,000,000 parameters (written directly: protobuf takes
    seconds to build it; test_bounds checks that protobuf reads it back)."""
    head = pb.ModelInferRequest(model_name="mnist").SerializeToString()
    return head + b"".join(b"\x22\x0d\x0a\x07k%06d\x12\x02\x08\x01" % i for i in range(1_000_000))


def memory_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def good_request(mnist) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name="mnist", inputs=[Tensor(name="pixels", datatype="UINT8", shape=[1, 28, 28])],
                                raw_input_contents=[mnist.test.images[:1].tobytes()])


@pytest.mark.parametrize("flags", [(), ("--no-infer-lane",)], ids=["lane", "threads"])
def test_junk_requests_are_refused_short_and_cheap_while_others_are_served(tmp_path, mnist, flags):
    proc, address = start_cli_server(tmp_path, *flags)
    try:
        wait_for(lambda: health_status(address) == "SERVING", timeout=60)
        junk = million_parameters()
        assert 13_000_000 < len(junk) < 16 * 1024 * 1024
        good = good_request(mnist)
        with grpc.insecure_channel(address) as ch:
            infer = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=None, response_deserializer=None)
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            stub.ModelInfer(good, timeout=10)
            time.sleep(0.5)
            idle_kb = memory_kb(proc.pid, "VmRSS")

            waits: list[float] = []
            errors: list[grpc.RpcError] = []
            stop = threading.Event()

            def other_caller():  # a good call every 50 ms, on a connection of its own
                with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as own:
                    s = pb_grpc.GRPCInferenceServiceStub(own)
                    while not stop.wait(0.05):
                        t = time.monotonic()
                        try:
                            s.ModelInfer(good, timeout=10)
                        except grpc.RpcError as exc:
                            errors.append(exc)
                        waits.append(time.monotonic() - t)

            other = threading.Thread(target=other_caller, daemon=True)
            other.start()
            time.sleep(0.3)
            for _ in range(3):
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as info:
                    infer(junk, timeout=10)
                assert time.monotonic() - started < 2.0
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
                assert len(info.value.details()) <= 4096 and "parameters" in info.value.details()

            huge_name = pb.ModelInferRequest(model_name="mnist", inputs=[Tensor(name="n" * 10_000_000, datatype="UINT8", shape=[1, 28, 28])])
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(huge_name, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(info.value.details()) < 300, info.value.details()[:300]

            wide = pb.ModelInferRequest(model_name="mnist", inputs=[Tensor(name="pixels", datatype="UINT8", shape=[1] * 2_000_000)])
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(wide, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "2,000,000 dimensions" in info.value.details()
            wait_for(lambda: len(waits) >= 10, timeout=10)  # the other caller was served throughout
            stop.set()
            other.join(10)
        peak_kb = memory_kb(proc.pid, "VmHWM")
        assert peak_kb - idle_kb <= 100 * 1024, (idle_kb, peak_kb)
        assert not errors, errors[:3]  # the other caller was answered every time
        assert len(waits) >= 10 and max(waits) < 0.5, max(waits)  # a guard: normally a few ms
    finally:
        stop_cli_server(proc)
