"""The Prometheus endpoint: scraped over HTTP, the counts move with the traffic."""

from __future__ import annotations

import urllib.request

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from mnist_edge.protos.digits.v1 import digits_pb2, digits_pb2_grpc
from mnist_edge.protos.inference import grpc_service_pb2 as pb
from mnist_edge.protos.inference import grpc_service_pb2_grpc as pb_grpc


def scrape(address: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name: str, **labels) -> float:
    want = tuple(sorted(labels.items()))
    matches = [v for (n, lab), v in samples.items() if n == name and all(item in lab for item in want)]
    assert matches, f"no sample {name} {labels}"
    return sum(matches)


def test_counts_move_with_traffic(server, mnist):
    before = scrape(server.metrics_address)
    with grpc.insecure_channel(server.address) as ch:
        v2 = pb_grpc.GRPCInferenceServiceStub(ch)
        req = pb.ModelInferRequest(
            model_name="mnist",
            inputs=[pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=[5, 28, 28])],
            raw_input_contents=[mnist.test.images[:5].tobytes()],
        )
        for _ in range(3):
            v2.ModelInfer(req)
        bad = pb.ModelInferRequest(model_name="mnist", inputs=[pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=[1, 784])], raw_input_contents=[b"\0"])
        try:
            v2.ModelInfer(bad)
        except grpc.RpcError:
            pass
        digits_pb2_grpc.DigitClassifierStub(ch).Classify(digits_pb2.ClassifyRequest(images=[digits_pb2.Image(pixels=mnist.test.images[0].tobytes())]))
    after = scrape(server.metrics_address)

    def delta(name, **labels):
        return value(after, name, **labels) - (value(before, name, **labels) if any(n == name and all(i in lab for i in labels.items()) for (n, lab) in before) else 0)

    assert delta("mnist_edge_requests_total", api="v2", code="OK") == 3
    assert delta("mnist_edge_requests_total", api="v2", code="INVALID_ARGUMENT") == 1
    assert delta("mnist_edge_requests_total", api="native", code="OK") == 1
    assert delta("mnist_edge_inference_request_success_total") == 4
    assert delta("mnist_edge_inference_request_failure_total") == 1
    assert delta("mnist_edge_inference_count_total") == 16
    assert delta("mnist_edge_inference_exec_count_total") == 4
    assert delta("mnist_edge_batch_size_count", model="mnist") == 4
    assert delta("mnist_edge_batch_size_sum", model="mnist") == 16
    assert delta("mnist_edge_queue_duration_seconds_count", model="mnist") == 4
    assert delta("mnist_edge_compute_duration_seconds_count", model="mnist") == 4
    assert delta("mnist_edge_inference_compute_infer_duration_us_total") > 0
    m = server.core.model
    assert value(after, "mnist_edge_model_info", version=m.version, precision="int8", sha256=m.sha256) == 1
    assert value(after, "mnist_edge_model_version") == float(m.version)
    assert value(after, "mnist_edge_up") == 1
    assert value(after, "mnist_edge_queue_depth") == 0


def test_metrics_can_be_turned_off():
    from helpers.servers import running_server

    with running_server(metrics_address="") as app:
        assert app.metrics_address is None


def test_histogram_buckets_are_cumulative(server):
    samples = scrape(server.metrics_address)
    buckets = sorted(
        ((float(dict(lab)["le"]), v) for (n, lab), v in samples.items() if n == "mnist_edge_batch_size_bucket"),
        key=lambda x: x[0],
    )
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and np.isinf(buckets[-1][0])


def _raw(address: str, request: bytes) -> bytes:
    import socket

    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_the_endpoint_answers_only_get_metrics_and_survives_odd_clients(server):
    import socket

    address = server.metrics_address
    assert _raw(address, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 404")
    assert _raw(address, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 405")
    assert _raw(address, b"hello\r\n\r\n").startswith(b"HTTP/1.1 400")
    head = _raw(address, b"HEAD /metrics HTTP/1.0\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")  # headers only
    # A client that connects and says nothing is dropped after its timeout; scrapes go on.
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10):
        assert value(scrape(address), "mnist_edge_up") == 1.0


def test_a_dripping_client_and_100_idle_connections_never_block_a_scrape():
    """Issue 18: scrapes answer while one client drips its request a byte at a time and 100
    connections sit idle; the slow and idle ones are closed by their deadline or evicted."""
    import socket
    import threading
    import time

    from mnist_edge.server.metrics import MetricsServer

    metrics = MetricsServer("127.0.0.1:0", dict, timeout_s=2.0, max_connections=32)
    host, port = metrics.address.rsplit(":", 1)
    stop = threading.Event()
    held: list[socket.socket] = []

    def drip():
        with socket.create_connection((host, int(port)), timeout=5) as s:
            for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n":
                if stop.wait(0.2):
                    return
                try:
                    s.sendall(bytes((byte,)))
                except OSError:
                    return  # closed by the server at its deadline: what should happen

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        for _ in range(100):
            held.append(socket.create_connection((host, int(port)), timeout=5))
        for _ in range(5):
            started = time.monotonic()
            reply = _raw(metrics.address, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert reply.startswith(b"HTTP/1.1 200"), reply[:100]
            assert time.monotonic() - started < 2.0  # a guard: normally milliseconds
        assert metrics.open_connections <= 32
        assert metrics.evicted >= 100 - 32
    finally:
        stop.set()
        for s in held:
            s.close()
        metrics.shutdown()
        dripper.join(5)


def test_a_connection_is_closed_at_its_whole_request_deadline_not_per_byte():
    import socket
    import time

    from mnist_edge.server.metrics import MetricsServer

    metrics = MetricsServer("127.0.0.1:0", dict, timeout_s=0.5)
    host, port = metrics.address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            started = time.monotonic()
            closed = False
            for _ in range(40):  # a byte every 0.1 s: a per-byte timeout would never fire
                try:
                    s.sendall(b"G")
                    s.settimeout(0.1)
                    if s.recv(1) == b"":
                        closed = True
                        break
                except TimeoutError:
                    continue
                except OSError:
                    closed = True
                    break
            assert closed and time.monotonic() - started < 2.0
    finally:
        metrics.shutdown()
